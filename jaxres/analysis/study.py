"""The plain-vs-residual study behind `jaxres analyze` (and `make demo`).

For every model (a plain/residual twin pair at each depth) and every setting (normalization,
activation, BatchNorm policy) at initialization, on one fixed batch of synthetic inputs
(an arc through image space, see `shattered.arc_inputs`; labels drawn at random):

- end-to-end norms at every unit input and layer probe (exact, `endtoend`);
- per-unit Jacobians: ||J_l||_F^2 (exact or Hutchinson with a 95% interval), the mean
  squared singular value ||J_l||_F^2 / n_in, sigma_max(J_l) by Lanczos, the cross-example
  share of the batch map (bn="batch"), and for identity-shortcut residual units the split
  into ||I + J_F|| (identity path + branch, before the activation) and ||J_F|| (branch);
- forward response stds (He et al. 2015, Fig. 7) and shattered-gradient correlations.

Twins share their weights: the residual net is initialized once and the plain twin uses the
same variables (same parameter tree; flax derives every parameter's key from its path, so
this equals the plain net's own initialization, and the comparison is controlled).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis import estimators, unit_jacobian
from jaxres.analysis.endtoend import end_to_end_norms
from jaxres.analysis.segments import SegmentCache, check_bn, last_probe
from jaxres.analysis.shattered import arc_inputs, gradient_correlations
from jaxres.models.layers import ACTIVATIONS, NORMS, closest_names, pick
from jaxres.models.registry import create_model, list_models, model_card

METHODS = ("auto", "exact", "estimate")
EXACT_AUTO_MAX_BASIS = 256  # "auto": exact when the smaller side needs <= this many JVP/VJPs
EXACT_MAX_BASIS = 1 << 16  # "exact": refuse beyond this many basis passes per unit


@dataclasses.dataclass(frozen=True)
class Setting:
    norm: str = "batchnorm"
    activation: str = "relu"
    bn: str = "eval"

    @property
    def label(self) -> str:
        norm = f"BN-{self.bn}" if self.norm == "batchnorm" else "no norm"
        return f"{norm}, {self.activation}"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What to measure. `models` are families ("cifar_plain", "cifar_resnet") combined with
    `depths`, or full registry names (their depth is in the name)."""

    models: tuple = ("cifar_plain", "cifar_resnet")
    depths: tuple = (20, 56, 110)
    # The default grid fits `make demo` (<= 3 min on 2 CPU cores). At initialization BN's
    # running statistics are (0, 1), so bn="eval" is the identity and measures exactly the
    # normalization-free net (checked: identical numbers); it matters for trained variables.
    norms: tuple = ("batchnorm", "none")
    activations: tuple = ("relu",)
    bns: tuple = ("batch",)
    batch_size: int = 4
    method: str = "auto"
    seed: int = 0
    num_probes: int = 8
    jacobian_examples: int = 1  # bn="eval": per-unit Jacobians on the first few examples
    jacobian_units: int = 4  # per-unit Jacobians on this many evenly spaced units (0: all)
    tol: float = 1e-2
    max_iter: int = 32
    chunk_size: int = 64

    def __post_init__(self):
        pick("method", self.method, dict.fromkeys(METHODS))
        for norm in self.norms:
            pick("normalization", norm, dict.fromkeys(NORMS))
        for act in self.activations:
            pick("activation", act, ACTIVATIONS)
        for bn in self.bns:
            check_bn(bn)
        for name, value, low in (("batch_size", self.batch_size, 1), ("jacobian_examples", self.jacobian_examples, 1),
                                 ("num_probes", self.num_probes, 2), ("seed", self.seed, 0),
                                 ("jacobian_units", self.jacobian_units, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch statistics, gradient correlations), got {self.batch_size}")
        model_names(self)

    def settings(self) -> list[Setting]:
        out = []
        for norm, act in itertools.product(self.norms, self.activations):
            for bn in (self.bns if norm == "batchnorm" else ("eval",)):  # no BN: the policy is moot
                out.append(Setting(norm, act, bn))
        return out


def model_names(config: StudyConfig) -> list[str]:
    """Registry names of the study, checked (unknown names and depths raise ValueError)."""
    names, known = [], list_models()
    families = {model_card(n).family for n in known}
    for entry in config.models:
        if entry in known:
            names.append(entry)
        elif entry in families:
            for depth in config.depths:
                name = f"{entry}{depth}"
                if name not in known:
                    valid = sorted(int(re.sub(r"\D", "", n.removeprefix(entry)) or 0)
                                   for n in list_models(entry) if n.removeprefix(entry).isdigit())
                    raise ValueError(f"{entry} has no depth {depth} (valid depths: {valid})")
                names.append(name)
        else:
            raise ValueError(
                f"unknown model or family {entry!r}{closest_names(entry, known + sorted(families))}; "
                f"use a family such as cifar_plain / cifar_resnet with --depths, or a name from `jaxres models`"
            )
    return list(dict.fromkeys(names))


def twin_key(model) -> object:
    """Models that share variables: equal once `activation` and `residual` are neutralized."""
    fields = {f.name for f in dataclasses.fields(model)}
    neutral = {k: v for k, v in (("activation", "relu"), ("residual", True)) if k in fields}
    return dataclasses.replace(model, **neutral) if neutral else model


def _quantiles(values) -> dict:
    v = np.asarray(values, np.float64).ravel()
    return {"mean": float(v.mean()), "median": float(np.median(v)), "q10": float(np.quantile(v, 0.1)),
            "q90": float(np.quantile(v, 0.9)), "per_example": v.tolist()}


def _to_list(x):
    return np.asarray(x).tolist()


def frobenius_sq(seg, f, params, h, *, per_example, config, seed) -> dict:
    """||J||_F^2 of a unit map by the configured method; a ValueError if exact is impossible."""
    n_in, n_out = math.prod(h.shape[1:]), math.prod(seg.out_shape[1:])
    basis = min(n_in, n_out) * (1 if per_example else h.shape[0])
    exact = config.method == "exact" or (config.method == "auto" and basis <= EXACT_AUTO_MAX_BASIS)
    if config.method == "exact" and basis > EXACT_MAX_BASIS:
        raise ValueError(
            f"method='exact' needs {basis:,} JVP/VJPs for {seg.name} ({n_in} inputs, {n_out} outputs"
            f"{'' if per_example else f', batch map of {h.shape[0]}'}), more than {EXACT_MAX_BASIS:,}; "
            f"use --method estimate (Hutchinson with 95% intervals) or a smaller batch"
        )
    if exact:
        value = unit_jacobian.frobenius_sq_exact(f, h, params=params, per_example=per_example,
                                                 chunk_size=config.chunk_size)
        if per_example:
            return {"method": "exact", "estimate": _to_list(value)}
        total, diag = (float(v) for v in value)
        return {"method": "exact", "estimate": total, "diagonal": diag}
    est = estimators.frobenius_sq_hutchinson(f, h, params=params, num_probes=config.num_probes,
                                             per_example=per_example, seed=seed)
    out = {"method": f"hutchinson-{config.num_probes}",
           **{k: _to_list(est[k]) for k in ("estimate", "std_err", "ci_low", "ci_high")}}
    if not per_example:
        out["diagonal"] = float(est["diagonal"]["estimate"])
    return out


def identity_unit(out, pre, activation: Callable | None) -> bool:
    """True when a unit's output is act(h + branch) or h + branch on this batch, `pre` being
    h + (last layer probe): the identity-shortcut units, recognized from the outside."""
    if pre is None:
        return False
    candidates = [lambda y: y] + ([activation] if activation is not None else [])
    return any(bool(jnp.allclose(out, act(pre), rtol=1e-4, atol=1e-5)) for act in candidates)


def _build_branch_products(_, capture_fn):
    """Segment op: (cvars, h, z) -> per-example ||J_F z||^2 and ||(I + J_F) z||^2."""

    def products(cvars, h, z):
        _, jf_z = jax.jvp(lambda x: last_probe(capture_fn(cvars, x)[1]), (h,), (z,))
        sq = lambda v: jnp.sum(jnp.square(v).reshape(v.shape[0], -1), 1)  # noqa: E731
        return sq(jf_z), sq(z + jf_z)

    return products


def residual_split(seg, cvars, h, per_example: bool, num_probes: int, seed: int) -> dict:
    """Hutchinson estimates (same probes) of ||J_F||_F and ||I + J_F||_F: the residual branch
    alone and identity path + branch, before the unit's final activation."""
    rng = np.random.default_rng(seed)
    op = seg.op("branch_products", _build_branch_products)
    branch, total = [], []
    for _ in range(num_probes):
        b, t = op(cvars, h, jnp.asarray(rng.choice([-1.0, 1.0], size=h.shape), h.dtype))
        branch.append(np.asarray(b, np.float64))
        total.append(np.asarray(t, np.float64))
    reduce = (lambda v: v.mean(0)) if per_example else (lambda v: v.sum(1).mean(0))
    return {"branch": _to_list(np.sqrt(reduce(np.stack(branch)))),
            "identity_plus_branch": _to_list(np.sqrt(reduce(np.stack(total)))),
            "method": f"hutchinson-{num_probes}"}


def unit_jacobians(seg, h, setting: Setting, config: StudyConfig, seed: int, identity: bool) -> dict:
    """Per-unit Jacobian quantities for one segment at its input batch `h`."""
    per_example = setting.bn == "eval"
    params = seg.params
    if per_example:  # the probes' zero perturbations have the batch shape: slice them too
        h = h[: config.jacobian_examples]
        params = (params[0], jax.tree.map(lambda p: p[: config.jacobian_examples], params[1]))
    n_in = math.prod(h.shape[1:]) * (1 if per_example else h.shape[0])
    fro = frobenius_sq(seg, seg.ops.map, params, h, per_example=per_example, config=config, seed=seed)
    est = np.asarray(fro["estimate"], np.float64)
    result = {"frobenius_sq": fro, "mean_sq_singular_value": _to_list(est / n_in)}
    if not per_example and est > 0:
        result["cross_example_share"] = float(1.0 - fro["diagonal"] / est)
    spec = unit_jacobian.spectral_norm_lanczos(seg.ops.map, h, params=params, per_example=per_example,
                                               tol=config.tol, max_iter=config.max_iter, seed=seed)
    result["spectral_norm"] = {"sigma": _to_list(spec["sigma"]), "iterations": int(spec["iterations"]),
                               "residual": _to_list(spec["residual"]), "converged": _to_list(spec["converged"]),
                               "tol": config.tol}
    if identity:
        result["residual_split"] = residual_split(seg, params[0], h, per_example, config.num_probes, seed)
    return result


def jacobian_unit_indices(num_units: int, count: int) -> set[int]:
    """`count` evenly spaced unit indices among the inner units (stem and head excluded), or all."""
    inner = list(range(1, num_units - 1))
    if count == 0 or count >= len(inner):
        return set(range(num_units))
    return {inner[round(i * (len(inner) - 1) / (count - 1))] for i in range(count)} if count > 1 else {inner[0]}


def summarize(units: list[dict], correlations) -> dict:
    """Headline numbers of one run (medians over examples; inner units exclude stem/head)."""
    jac = [u["logit_jac"]["median"] for u in units]
    inner = [u for u in units if u["name"] not in ("stem", "head") and u["jacobian"] is not None]
    first, last = jac[1], jac[-1]  # input of unit_1 (after the stem) and input of the head
    steps = max(len(units) - 2, 1)
    ratio = first / last if last > 0 else float("inf")
    sigmas = [float(np.median(u["jacobian"]["spectral_norm"]["sigma"])) for u in inner]
    msv = [float(np.median(u["jacobian"]["mean_sq_singular_value"])) for u in inner]
    return {
        "first_last_ratio": ratio,
        "growth_per_unit": ratio ** (1.0 / steps) if np.isfinite(ratio) and ratio > 0 else float("nan"),
        "input_logit_jac": units[0]["logit_jac"]["median"],
        "median_spectral_norm": float(np.median(sigmas)) if sigmas else float("nan"),
        "median_mean_sq_singular_value": float(np.median(msv)) if msv else float("nan"),
        "grad_correlation_lag1": float(correlations[0]) if len(correlations) else float("nan"),
    }


def analyze_model(model, variables, x, labels, setting: Setting, config: StudyConfig, cache: SegmentCache,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Every measurement of the study for one model and setting (see the module docstring)."""
    start = time.perf_counter()
    e2e = end_to_end_norms(model, variables, x, labels, bn=setting.bn, cache=cache, return_input_grads=True,
                           return_activations=True)
    segments = cache.segments(model, variables, x.shape, setting.bn, x.dtype)
    activation = ACTIVATIONS.get(getattr(model, "activation", None))
    units = []
    chosen = jacobian_unit_indices(len(segments), config.jacobian_units)
    for index, seg in enumerate(segments):
        h = e2e["activations"][index]
        identity = identity_unit(e2e["activations"][index + 1], e2e["pre_activations"][index], activation)
        if progress:
            progress(seg.name)
        entry = e2e["units"][seg.name]
        units.append({
            "name": seg.name,
            "in_shape": list(seg.in_shape),
            "out_shape": list(seg.out_shape),
            "logit_jac": _quantiles(entry["input"]["logit_jac"]),
            "loss_grad": _quantiles(entry["input"]["loss_grad"]),
            "probes": {p: {k: _quantiles(v) for k, v in q.items()} for p, q in entry["probes"].items()},
            "forward_std": entry["forward"],
            "param_grad": entry["param_grad"],
            "identity_shortcut": identity,
            "jacobian": (unit_jacobians(seg, h, setting, config, config.seed + index, identity)
                         if index in chosen else None),
        })
    correlations = gradient_correlations(e2e["input_grads"])
    return {
        "units": units,
        "loss": e2e["loss"],
        "shattered": {"correlation_by_lag": correlations.tolist()},
        "summary": summarize(units, correlations),
        "seconds": time.perf_counter() - start,
    }


def study_inputs(config: StudyConfig, input_shape=(32, 32, 3), num_classes: int = 10):
    """The fixed synthetic batch: arc images (N, H, W, C) float32 and random labels (N,)."""
    key = jax.random.key(config.seed)
    x = arc_inputs(jax.random.fold_in(key, 1), config.batch_size, input_shape)
    labels = jax.random.randint(jax.random.fold_in(key, 2), (config.batch_size,), 0, num_classes)
    return x, labels


def run_study(config: StudyConfig = StudyConfig(), variables_for: Callable | None = None,
              progress_bar: bool = True) -> dict:
    """Runs the study; returns `{"config", "runs": [...]}` (see `report.write_results`).

    `variables_for(name, model, x)` may supply trained variables (e.g. from a checkpoint);
    by default every model is initialized with `config.seed` (twins share weights).
    """
    from tqdm.auto import tqdm

    names = model_names(config)
    settings = config.settings()
    jobs = [(name, s) for s in settings for name in names]
    bar = tqdm(total=len(jobs), disable=not progress_bar, desc="analyze", unit="model")
    init_cache, caches, runs = {}, {}, []
    for name, setting in jobs:
        card = model_card(name)
        model = create_model(name, activation=setting.activation, norm=setting.norm)
        x, labels = study_inputs(config, (card.input_size, card.input_size, getattr(model, "in_channels", 3)),
                                 model.num_classes)
        if variables_for is not None:
            variables = variables_for(name, model, x)
        else:
            key = (twin_key(model), x.shape)
            if key not in init_cache:
                init_cache[key] = model.init(jax.random.key(config.seed), x)
            variables = init_cache[key]
        cache = caches.setdefault((setting.norm, setting.activation, setting.bn), SegmentCache())
        bar.set_description(f"analyze {name} [{setting.label}]")
        run = analyze_model(model, variables, x, labels, setting, config, cache,
                            progress=lambda unit: bar.set_postfix_str(unit, refresh=False))
        runs.append({"model": name, "family": card.family, "depth": _depth(name),
                     "residual": bool(getattr(model, "residual", True)),
                     "setting": dataclasses.asdict(setting), **run})
        bar.update(1)
    bar.close()
    return {"config": dataclasses.asdict(config), "runs": runs}


def _depth(name: str) -> int | None:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else None
