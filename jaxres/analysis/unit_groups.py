"""Per-unit Jacobian measurements for many units at once (the inner loop of the study).

Units that are the same computation (identical jaxprs, see `segments.SegmentCache`) differ
only in their variables and their input, so a *group* of them - e.g. every stage-1 block of
the cifar_resnet20/56/110 of one setting, 30 units - is stacked along a new leading axis U
and measured by ONE vmapped, compiled op:

    group_products(cvars (U, ...), h (U, N, ...), v (U, N, ...)) -> (
        ||J v||^2 per example (U, N),  J^T J v (U, N, ...),
        ||J_F v||^2 (U, N),  ||v + J_F v||^2 (U, N))

with J = d unit(h) / d h and J_F the derivative of the unit's last layer probe (for an
identity-shortcut unit act(h + F(h)), the residual branch F before the addition). Lanczos
(sigma_max), Hutchinson (||J||_F^2 with a 95% interval) and the identity/branch split are
host loops over this op, so each distinct computation of a setting compiles one op whatever
the depth, and a Lanczos step is one call for the whole group instead of one per unit.

BatchNorm policy as in `segments`: bn="eval" measures the per-example Jacobians of the first
`JacobianOptions.examples` examples; bn="batch" the Jacobian of the whole batch map.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis import estimators, unit_jacobian
from jaxres.analysis.segments import last_probe
from jaxres.choices import pick

EXACT_AUTO_MAX_BASIS = 256  # "auto": exact when the smaller side needs <= this many JVP/VJPs
EXACT_MAX_BASIS = 1 << 16  # "exact": refuse beyond this many basis passes per unit
METHODS = ("auto", "exact", "estimate")


@dataclasses.dataclass(frozen=True)
class JacobianOptions:
    """How per-unit Jacobians are measured.

    method: "exact" (basis JVP/VJPs), "estimate" (Hutchinson with `num_probes` Rademacher
    probes and a 95% interval) or "auto" (exact when a unit needs <= 256 products); tol,
    max_iter: Lanczos' relative Ritz residual and step limit for sigma_max; chunk_size: basis
    vectors per compiled step of the exact norms; examples: bn="eval" measures the
    per-example Jacobians of the first `examples` examples (the map is separable).
    """

    method: str = "auto"
    num_probes: int = 8
    tol: float = 1e-2
    max_iter: int = 32
    chunk_size: int = 64
    examples: int = 1

    def __post_init__(self):
        pick("method", self.method, dict.fromkeys(METHODS))
        for name, value, low in (("num_probes", self.num_probes, 2), ("max_iter", self.max_iter, 1),
                                 ("chunk_size", self.chunk_size, 1), ("jacobian_examples", self.examples, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ValueError(f"tol must be a relative tolerance in (0, 1), got {self.tol!r}")


def _to_list(x):
    return np.asarray(x).tolist()


def _sq(v):
    return jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=1)


def _build_group_products(_, capture_fn):
    """Segment op over a stacked group (see the module docstring)."""

    def one(cvars, h, v):
        def unit(x):
            out, probes = capture_fn(cvars, x)
            branch = last_probe(probes) if probes else None
            if branch is None or branch.shape != x.shape:
                branch = jnp.zeros_like(x)  # no residual split for this unit (never reported)
            return out, branch

        _, lin = jax.linearize(unit, h)
        jv, jfv = lin(v)
        (gram,) = jax.linear_transpose(lambda t: lin(t)[0], h)(jv)
        return _sq(jv), gram, _sq(jfv), _sq(v + jfv)

    return jax.vmap(one)


def stack_group(items, per_example: bool, examples: int):
    """(cvars (U, ...), h (U, N', ...)) of a group of `(segment, h)`; N' = `examples` when
    `per_example` (the map is separable over the batch), else the whole batch."""
    # stacked on the host: jnp.stack would compile one small program per leaf shape and count
    cvars = jax.tree.map(lambda *leaves: np.stack([np.asarray(v) for v in leaves]), *[seg.cvars for seg, _ in items])
    h = np.stack([np.asarray(x[:examples] if per_example else x) for _, x in items])
    return cvars, jnp.asarray(h)


def frobenius_sq(seg, f, params, h, *, per_example: bool, options: JacobianOptions) -> dict:
    """||J||_F^2 of one unit map, exactly (basis JVP/VJPs); a ValueError if it cannot run."""
    n_in, n_out = math.prod(h.shape[1:]), math.prod(seg.out_shape[1:])
    basis = min(n_in, n_out) * (1 if per_example else h.shape[0])
    if options.method == "exact" and basis > EXACT_MAX_BASIS:
        raise ValueError(
            f"method='exact' needs {basis:,} JVP/VJPs for {seg.name} ({n_in} inputs, {n_out} outputs"
            f"{'' if per_example else f', batch map of {h.shape[0]}'}), more than {EXACT_MAX_BASIS:,}; "
            f"use --method estimate (Hutchinson with 95% intervals) or a smaller batch"
        )
    value = unit_jacobian.frobenius_sq_exact(f, h, params=params, per_example=per_example,
                                             chunk_size=options.chunk_size)
    if per_example:
        return {"method": "exact", "estimate": _to_list(value)}
    total, diag = (float(v) for v in value)
    return {"method": "exact", "estimate": total, "diagonal": {"estimate": diag}}


def use_exact(seg, per_example: bool, batch: int, method: str) -> bool:
    n_in, n_out = math.prod(seg.in_shape[1:]), math.prod(seg.out_shape[1:])
    basis = min(n_in, n_out) * (1 if per_example else batch)
    return method == "exact" or (method == "auto" and basis <= EXACT_AUTO_MAX_BASIS)


def _slice_params(seg, examples: int, per_example: bool):
    """`(cvars, pert)` for `seg.ops.map`; the probes' zero perturbations have the batch shape."""
    if not per_example:
        return seg.params
    return seg.cvars, jax.tree.map(lambda p: p[:examples], seg.pert)


def measure_group(items, identity, bn: str, options: JacobianOptions, seed: int) -> list[dict]:
    """Per-unit Jacobian quantities for `items` = [(segment, input batch h)] of one computation.

    identity: per item, whether it is an identity-shortcut unit (gets the residual split).
    Returns one dict per item, every quantity with its `method`:
    - `frobenius_sq`: ||J||_F^2, exact or Hutchinson (`std_err`, 95% `ci_low`/`ci_high`); for a
      batch map (bn="batch") of the whole (N n_out) x (N n_in) map, with `diagonal` the same
      for its per-example blocks sum_i ||J_ii||_F^2;
    - `mean_sq_singular_value`: of the per-example Jacobians (bn="eval": ||J_i||_F^2 / n_in per
      measured example; bn="batch": of the blocks, sum_i ||J_ii||_F^2 / (N n_in)), with the
      interval when estimated; bn="batch" adds `mean_sq_singular_value_batch_map` (||J||_F^2 /
      (N n_in)) and `cross_example_share` (1 - diagonal / total, of this unit's map);
    - `spectral_norm`: sigma_max by Lanczos (`sigma`, `residual`, `converged`, `iterations` =
      steps run for the whole group, `tol`), per example (bn="eval") or of the batch map;
    - identity units: `residual_split` (`branch` = ||J_F||_F, `identity_plus_branch` =
      ||I + J_F||_F, Hutchinson with the same probes).
    Lists have one entry per measured example (bn="eval"); bn="batch" gives scalars.
    """
    per_example = bn == "eval"
    seg0 = items[0][0]
    cvars, h = stack_group(items, per_example, options.examples)
    units, n = h.shape[:2]
    n_in = math.prod(h.shape[2:]) * (1 if per_example else n)
    op = seg0.op("group_products", _build_group_products)
    rng = np.random.default_rng(seed)
    exact = use_exact(seg0, per_example, n, options.method)
    hutchinson = f"hutchinson-{options.num_probes}"

    # Hutchinson probes (also the residual split's): Rademacher; for a batch map each probe
    # lives on one random example j per unit, scaled by sqrt(N), so E[z z^T] = I still and
    # the same samples estimate the same-example (diagonal) blocks; see `estimators`.
    samples, diagonal, branch, total = [], [], [], []
    if not exact or any(identity):
        for _ in range(options.num_probes):
            z = rng.choice([-1.0, 1.0], size=h.shape)
            if not per_example:
                j = rng.integers(n, size=units)
                z = z * (np.sqrt(n) * (np.arange(n)[None, :] == j[:, None]))[(...,) + (None,) * (h.ndim - 2)]
            sq, _, sq_branch, sq_total = (np.asarray(a, np.float64) for a in op(cvars, h, jnp.asarray(z, h.dtype)))
            if per_example:
                samples.append(sq)
                branch.append(sq_branch)
                total.append(sq_total)
            else:
                samples.append(sq.sum(1))
                diagonal.append(sq[np.arange(units), j])
                branch.append(sq_branch.sum(1))
                total.append(sq_total.sum(1))
    shape = h.shape

    def matvec(v):  # (groups, m) float64 -> J^T J v for every unit (and example)
        _, gram, _, _ = op(cvars, h, jnp.asarray(v.reshape(shape), h.dtype))
        return np.asarray(gram, np.float64).reshape(v.shape)

    groups = units * n if per_example else units
    spec = unit_jacobian.lanczos_top(matvec, groups, math.prod(shape) // groups, tol=options.tol,
                                     max_iter=options.max_iter, seed=seed)
    reshape = (lambda a: np.asarray(a).reshape(units, n)) if per_example else (lambda a: np.asarray(a))

    def scaled(interval: dict, scale: float) -> dict:
        return {k: _to_list(np.asarray(v, np.float64) * scale) for k, v in interval.items()}

    results = []
    for u, (seg, x) in enumerate(items):
        if exact:
            fro = frobenius_sq(seg, seg.ops.map, _slice_params(seg, options.examples, per_example),
                               x[: options.examples] if per_example else x, per_example=per_example,
                               options=options)
        else:
            ci = estimators.confidence_interval(np.stack(samples)[:, u])
            fro = {"method": hutchinson, **{k: _to_list(ci[k]) for k in ci}}
            if not per_example:
                fro["diagonal"] = {k: _to_list(v) for k, v in
                                   estimators.confidence_interval(np.stack(diagonal)[:, u]).items()}
        blocks = fro if per_example else fro["diagonal"]
        msv = {"method": fro["method"], **scaled({k: v for k, v in blocks.items() if k != "method"}, 1.0 / n_in)}
        result = {"frobenius_sq": fro, "mean_sq_singular_value": msv}
        if not per_example:
            result["mean_sq_singular_value_batch_map"] = {
                "method": fro["method"],
                **scaled({k: v for k, v in fro.items() if k not in ("method", "diagonal")}, 1.0 / n_in)}
            if fro["estimate"] > 0:
                result["cross_example_share"] = {"method": fro["method"],
                                                 "estimate": float(1.0 - blocks["estimate"] / fro["estimate"])}
        result["spectral_norm"] = {"method": "lanczos",
                                   "of": "per-example J_i" if per_example else "the batch map",
                                   "sigma": _to_list(np.atleast_1d(reshape(spec["sigma"])[u])),
                                   "iterations": int(spec["iterations"]),
                                   "residual": _to_list(np.atleast_1d(reshape(spec["residual"])[u])),
                                   "converged": _to_list(np.atleast_1d(reshape(spec["converged"])[u])),
                                   "tol": options.tol}
        if identity[u]:
            result["residual_split"] = {"branch": _to_list(np.sqrt(np.stack(branch)[:, u].mean(0))),
                                        "identity_plus_branch": _to_list(np.sqrt(np.stack(total)[:, u].mean(0))),
                                        "method": hutchinson}
        results.append(result)
    return results


@functools.lru_cache(maxsize=None)
def _first_example_block(f):
    """`g((params, h), x0) = f(params, h with example 0 replaced by x0)[:1]`: the diagonal
    block d out_0 / d h_0 of a batch map (the other examples held fixed), as a stable
    function object so compiled code is shared (see `unit_jacobian.bind`)."""

    def block(params, x0):
        inner, h = params
        return f(inner, jnp.concatenate([x0, h[1:]], axis=0))[:1]

    return block


def exact_spectrum(seg, h, bn: str) -> dict:
    """Every singular value (descending) of a unit's Jacobian at example 0, by exact SVD of
    the materialized matrix (`unit_jacobian.jacobian_matrix`, size-guarded).

    bn="eval": J_0 of example 0 (the map is separable). bn="batch": the diagonal block
    d out_0 / d h_0 of the batch map (other examples fixed; the whole batch map would be
    (N n)^2, too large; its cross-example blocks hold a small share, see `measure_group`).
    """
    if bn == "eval":
        matrix = unit_jacobian.jacobian_matrix(seg.ops.map, h[:1], params=_slice_params(seg, 1, True))[0]
        what = "J of example 0"
    else:
        block = _first_example_block(seg.ops.map)
        matrix = unit_jacobian.jacobian_matrix(block, h[:1], params=(seg.params, h))[0]
        what = "diagonal block d out_0/d h_0 of the batch map"
    sigma = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    return {"singular_values": sigma.astype(np.float32).tolist(), "shape": list(matrix.shape), "of": what,
            "method": "exact SVD (float64 LAPACK) of the materialized float32 Jacobian"}
