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

import concurrent.futures
import dataclasses
import functools
import itertools
import math
import os
import re
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis.endtoend import end_to_end_norms
from jaxres.analysis.segments import SegmentCache, check_bn
from jaxres.analysis.shattered import arc_inputs, gradient_correlations
from jaxres.analysis.unit_groups import exact_spectrum, frobenius_sq, measure_group  # noqa: F401 (re-export)
from jaxres.models.layers import ACTIVATIONS, NORMS, closest_names, pick
from jaxres.models.registry import create_model, list_models, model_card

METHODS = ("auto", "exact", "estimate")


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
    # The default grid is the whole issue-3 grid (6 settings x 6 models) and fits `make demo`
    # (<= 3 min on 2 CPU cores). At initialization BN's running statistics are (0, 1), so
    # bn="eval" BN is the identity map and measures the normalization-free net (same numbers
    # up to float rounding); it is kept because it matters for trained variables.
    norms: tuple = ("batchnorm", "none")
    activations: tuple = ("relu", "tanh")
    bns: tuple = ("eval", "batch")
    batch_size: int = 4
    method: str = "auto"
    seed: int = 0
    num_probes: int = 8
    jacobian_examples: int = 1  # bn="eval": per-unit Jacobians on the first few examples
    # Per-unit Jacobians on this many evenly spaced inner units per model (0: all). All units
    # of the full grid would take well over 10 min on the 2-core CPU (measured: one bn="batch"
    # group of 30 stage-1 units, each a 65,536-dim batch map, ran > 1 min), so the demo samples
    # 4 per model (first and last inner units included).
    jacobian_units: int = 4
    # exact SVD spectrum of each model's last shape-keeping unit with <= this many input values
    # per example (4096: the 8x8x64 stage-3 units, a 4096 x 4096 J); 0: none. Off by default:
    # one such SVD took 30-60 s on the 2-core CPU (measured), more than the whole demo budget
    # allows for 36 models; the default study reports the exact spectra of d logits / d h_l.
    spectrum_max_dim: int = 0
    tol: float = 1e-2
    max_iter: int = 32
    chunk_size: int = 64
    in_channels: int = 3  # image channels the models take (1 for a net trained on Fashion-MNIST)

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
                                 ("jacobian_units", self.jacobian_units, 0),
                                 ("spectrum_max_dim", self.spectrum_max_dim, 0), ("in_channels", self.in_channels, 1)):
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


def identity_unit(out, pre, activation: Callable | None) -> bool:
    """True when a unit's output is act(h + branch) or h + branch on this batch, `pre` being
    h + (last layer probe): the identity-shortcut units, recognized from the outside."""
    if pre is None:
        return False
    candidates = [lambda y: y] + ([activation] if activation is not None else [])
    return any(bool(jnp.allclose(out, act(pre), rtol=1e-4, atol=1e-5)) for act in candidates)


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


def study_inputs(config: StudyConfig, input_shape=(32, 32, 3), num_classes: int = 10):
    """The fixed synthetic batch: arc images (N, H, W, C) float32 and random labels (N,)."""
    key = jax.random.key(config.seed)
    x = arc_inputs(jax.random.fold_in(key, 1), config.batch_size, input_shape)
    labels = jax.random.randint(jax.random.fold_in(key, 2), (config.batch_size,), 0, num_classes)
    return x, labels


def _model_pass(name: str, setting: Setting, config: StudyConfig, cache: SegmentCache, variables_for: Callable):
    """End-to-end norms, forward stats and gradient correlations of one model (exact);
    returns the run (per-unit `jacobian` still None), its segments and unit inputs."""
    start = time.perf_counter()
    card = model_card(name)
    model = create_model(name, activation=setting.activation, norm=setting.norm, in_channels=config.in_channels)
    x, labels = study_inputs(config, (card.input_size, card.input_size, config.in_channels), model.num_classes)
    variables = variables_for(name, model, x)
    e2e = end_to_end_norms(model, variables, x, labels, bn=setting.bn, cache=cache, return_input_grads=True,
                           return_activations=True)
    activation = ACTIVATIONS.get(getattr(model, "activation", None))
    units = []
    for index, seg in enumerate(e2e["segments"]):
        entry = e2e["units"][seg.name]
        units.append({
            "name": seg.name,
            "in_shape": list(seg.in_shape),
            "out_shape": list(seg.out_shape),
            "logit_jac": _quantiles(entry["input"]["logit_jac"]),
            "loss_grad": _quantiles(entry["input"]["loss_grad"]),
            # exact singular values of d logits / d h_l per example (C of them, descending)
            "logit_jac_singular_values": entry["input"]["singular_values"].astype(np.float32).tolist(),
            "probes": {p: {k: _quantiles(v) for k, v in q.items()} for p, q in entry["probes"].items()},
            "forward_std": entry["forward"],
            "param_grad": entry["param_grad"],
            "identity_shortcut": identity_unit(e2e["activations"][index + 1], e2e["pre_activations"][index],
                                               activation),
            "jacobian": None,
        })
    run = {"model": name, "family": card.family, "depth": _depth(name),
           "residual": bool(getattr(model, "residual", True)), "setting": dataclasses.asdict(setting),
           "units": units, "loss": e2e["loss"],
           "shattered": {"correlation_by_lag": gradient_correlations(e2e["input_grads"]).tolist()},
           "seconds": time.perf_counter() - start}
    return run, e2e["segments"], e2e["activations"]


def spectrum_unit_index(segments, max_dim: int) -> int | None:
    """The last inner unit (before the head) that keeps its shape and whose per-example input
    has <= max_dim values: the unit whose exact singular spectrum the study reports."""
    for index in range(len(segments) - 2, 0, -1):
        seg = segments[index]
        if seg.in_shape == seg.out_shape and math.prod(seg.in_shape[1:]) <= max_dim:
            return index
    return None


class _SharedInit:
    """Initial variables per (twin, input shape), computed once even when several settings
    ask at the same time from different threads (the others wait for the first)."""

    def __init__(self, seed: int):
        self._seed, self._values, self._locks, self._lock = seed, {}, {}, threading.Lock()

    def __call__(self, name, model, x):
        key = (twin_key(model), x.shape)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._values:
                self._values[key] = model.init(jax.random.key(self._seed), x)
            return self._values[key]


class _Progress:
    """A tqdm bar that several setting threads update (its total grows as groups are found)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, disable=not enabled, desc="analyze", unit="step")
        self._lock = threading.Lock()

    def describe(self, description: str):
        """What a thread starts now (the bar shows the latest)."""
        with self._lock:
            self._bar.set_description(description)

    def step(self, extra_total: int = 0, done: int = 1):
        with self._lock:
            self._bar.total += extra_total
            self._bar.update(done)

    def close(self):
        self._bar.close()


def default_workers(num_settings: int) -> int:
    """Settings run concurrently, one thread each, up to the machine's cores: a setting's
    compiles and runs release the GIL, so two settings keep both cores of a 2-core CPU busy
    (one setting alone keeps about one core busy: it is mostly single-threaded XLA compiles)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, num_settings))


def setting_cost_rank(setting: Setting) -> int:
    """0 for the costliest settings: BatchNorm with batch statistics (every per-unit Jacobian is
    a batch map, about 3x the per-example work), then BatchNorm eval, then no normalization."""
    return 0 if setting.norm == "batchnorm" and setting.bn == "batch" else 1 if setting.norm == "batchnorm" else 2


def run_study(config: StudyConfig = StudyConfig(), variables_for: Callable | None = None,
              progress_bar: bool = True, workers: int | None = None) -> dict:
    """Runs the study; returns `{"config", "runs": [...]}` (see `report.write_results`).

    Per setting: one exact end-to-end pass per model, then the per-unit Jacobians of every
    model at once, grouped by computation (`unit_groups.measure_group`), then the exact
    spectra. `variables_for(name, model, x)` may supply trained variables (e.g. from a
    checkpoint); by default every model is initialized with `config.seed` (twins share weights).
    Settings share no compiled code, so `workers` threads (default: `default_workers`) run
    them concurrently; every number is the same as with `workers=1` (each setting's seeds
    and order of operations are fixed).
    """
    names = model_names(config)
    settings = config.settings()
    workers = default_workers(len(settings)) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    progress = _Progress(len(settings) * len(names), progress_bar)
    variables_for = variables_for or _SharedInit(config.seed)
    run_setting = functools.partial(_run_setting, names=names, config=config, variables_for=variables_for,
                                    progress=progress)
    try:
        if workers == 1:
            per_setting = [run_setting(setting) for setting in settings]
        else:
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="analyze") as pool:
                # the costliest settings start first, so the threads finish close together
                started = {i: pool.submit(run_setting, settings[i])
                           for i in sorted(range(len(settings)), key=lambda i: setting_cost_rank(settings[i]))}
                per_setting = [started[i].result() for i in range(len(settings))]
    finally:
        progress.close()
    runs = [run for setting_runs in per_setting for run in setting_runs]
    return {"config": dataclasses.asdict(config), "runs": runs, "reductions": reductions(config)}


def _run_setting(setting: Setting, *, names, config: StudyConfig, variables_for: Callable,
                 progress: _Progress) -> list[dict]:
    """Every model of one setting: end-to-end passes, grouped per-unit Jacobians, spectra."""
    cache = SegmentCache()  # compiled unit code is shared by every model of a setting
    pending = []
    for name in names:
        progress.describe(f"analyze [{setting.label}] {name} end-to-end")
        pending.append(_model_pass(name, setting, config, cache, variables_for))
        progress.step()
    groups: dict[int, list] = {}
    for r, (_, segments, _) in enumerate(pending):
        for i in sorted(jacobian_unit_indices(len(segments), config.jacobian_units)):
            groups.setdefault(id(segments[i].ops), []).append((r, i))
    spectra = [(r, spectrum_unit_index(segments, config.spectrum_max_dim)) for r, (_, segments, _) in
               enumerate(pending)] if config.spectrum_max_dim else []
    spectra = [(r, i) for r, i in spectra if i is not None]
    progress.step(extra_total=len(groups) + len(spectra), done=0)
    for g, members in enumerate(groups.values()):
        first = pending[members[0][0]][1][members[0][1]]
        progress.describe(f"analyze [{setting.label}] per-unit Jacobians: {len(members)} x {first.name}-like")
        start = time.perf_counter()
        measured = measure_group([(pending[r][1][i], pending[r][2][i]) for r, i in members],
                                 [pending[r][0]["units"][i]["identity_shortcut"] for r, i in members],
                                 setting.bn, config, config.seed + g)
        share = (time.perf_counter() - start) / len(members)
        for (r, i), result in zip(members, measured):
            pending[r][0]["units"][i]["jacobian"] = result
            pending[r][0]["seconds"] += share
        progress.step()
    for r, i in spectra:
        run, segments, hs = pending[r]
        progress.describe(f"analyze [{setting.label}] exact spectrum {run['model']} {segments[i].name}")
        start = time.perf_counter()
        run["units"][i]["spectrum"] = exact_spectrum(segments[i], hs[i], setting.bn)
        run["seconds"] += time.perf_counter() - start
        progress.step()
    for run, _, _ in pending:
        run["summary"] = summarize(run["units"], run["shattered"]["correlation_by_lag"])
    return [run for run, _, _ in pending]


def reductions(config: StudyConfig) -> list[str]:
    """What this configuration leaves out, in words (written to results.json)."""
    out = [f"synthetic batch of {config.batch_size} inputs"]
    if config.jacobian_units:
        out.append(f"per-unit Jacobians on {config.jacobian_units} evenly spaced inner units per model "
                   f"(jacobian_units=0: all)")
    if "eval" in config.bns or "none" in config.norms:
        out.append(f"bn='eval'/no-norm per-unit Jacobians on the first {config.jacobian_examples} example(s)")
    if not config.spectrum_max_dim:
        out.append("no exact unit-Jacobian spectra (spectrum_max_dim=0); exact spectra of d logits/d h only")
    return out


def _depth(name: str) -> int | None:
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else None
