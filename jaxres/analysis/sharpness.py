"""Sharpness: the top eigenvalue of the training loss's Hessian (Cohen, Kaur, Li, Kolter & Talwalkar
2021, arXiv 2103.00065, "edge of stability").

lambda_max of H = d^2 L / d theta^2, L the mean cross-entropy over a fixed batch, theta every
parameter of the model (kernels, biases, BatchNorm scales and offsets; not the running
statistics), by Lanczos (`unit_jacobian.lanczos_largest`: full reorthogonalization in float64)
on exact Hessian-vector products (forward-over-reverse, float32), compiled once per model,
batch shape and BatchNorm policy. The weight decay's L2 term is not in L (it adds its
coefficient, 1e-4 in the recipes, to every eigenvalue).

What is exact and what is not: each Hessian-vector product is exact (to float32 rounding); the
Ritz value `lambda_max` never exceeds the true top eigenvalue (interlacing) and some eigenvalue
lies within `residual * |lambda_max|` of it, `residual` <= `tol` when `converged`; Lanczos finds
the extremes of the spectrum first, so that eigenvalue is the top one unless a gap hides it.

Cohen et al. find that full-batch gradient descent with step size eta drives lambda_max up to
2/eta and holds it there; with heavy-ball momentum beta the threshold is (2 + 2 beta)/eta.

BatchNorm policy as in `segments`: "batch" (the loss as trained, statistics of the batch; the
Hessian includes the statistics' dependence on the parameters) or "eval" (running statistics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxres.analysis.loss import mean_cross_entropy
from jaxres.analysis.segments import check_bn
from jaxres.analysis.unit_jacobian import lanczos_largest

METHOD = "Lanczos (full reorthogonalization, float64) on exact Hessian-vector products (forward-over-reverse)"
DEFAULT_TOL = 1e-3
DEFAULT_MAX_ITER = 100


def non_finite_count(variables) -> tuple[int, int]:
    """(non-finite values, all values) over every array of `variables`."""
    leaves = [np.asarray(a) for a in jax.tree.leaves(variables)]
    return sum(int(np.size(a) - np.isfinite(a).sum()) for a in leaves), sum(int(np.size(a)) for a in leaves)


def check_finite(variables, what: str = "the checkpoint") -> None:
    """A ValueError naming the fix when `variables` hold NaN or infinite values (a diverged run):
    the curvature of a diverged net is not defined."""
    bad, total = non_finite_count(variables)
    if bad:
        raise ValueError(f"{what} holds {bad:,} non-finite values (NaN or inf) among {total:,}: the run diverged, "
                         f"and the loss of a diverged net has no Hessian; pass an earlier checkpoint (a step "
                         f"directory WORKDIR/checkpoints/STEP) from before the divergence")


@functools.lru_cache(maxsize=None)
def hessian_vector_product(model, bn: str):
    """Jitted `(params, rest, x, labels, v) -> (H v, L)`, v a pytree like params; compiled once
    per model, policy and shapes (cached here, so a training monitor compiles it once per run)."""
    loss = mean_cross_entropy(model, bn)

    def hvp(params, rest, x, labels, v):
        grad = lambda p: jax.grad(loss)(p, rest, x, labels)  # noqa: E731
        _, hv = jax.jvp(grad, (params,), (v,))
        return hv, loss(params, rest, x, labels)

    return jax.jit(hvp)


def check_tolerance(tol, max_iter) -> None:
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"the Lanczos tolerance must be a relative residual in (0, 1), e.g. 1e-3; got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 2:
        raise ValueError(f"the Lanczos step limit must be an integer >= 2, got {max_iter!r}")


def top_hessian_eigenvalue(model, variables, x, labels, *, bn: str = "batch", tol: float = DEFAULT_TOL,
                           max_iter: int = DEFAULT_MAX_ITER, seed: int = 0) -> dict:
    """lambda_max of the Hessian of the mean cross-entropy on the NHWC batch `x` (labels (N,) int)
    w.r.t. `variables["params"]`. Non-finite variables raise ValueError (see `check_finite`).

    Returns a JSON-ready dict: `lambda_max` (the top Ritz value), `residual` (relative Ritz
    residual at stop), `converged`, `iterations` (Hessian-vector products), `tol`, `interval`
    ([lambda_max, lambda_max + residual |lambda_max|]: where the top eigenvalue lies when the
    Ritz value is its), `loss` (L at these parameters), `num_parameters`, `num_images`, `bn`,
    `method`.
    """
    check_bn(bn)
    check_tolerance(tol, max_iter)
    check_finite(variables)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    flat, unravel = ravel_pytree(params)
    x, labels = jnp.asarray(x), jnp.asarray(labels, jnp.int32)
    hvp = hessian_vector_product(model, bn)
    losses = []

    def matvec(v):  # (1, m) float64 -> H v
        hv, loss = hvp(params, rest, x, labels, unravel(jnp.asarray(v[0], flat.dtype)))
        losses.append(loss)
        return np.asarray(ravel_pytree(hv)[0], np.float64)[None]

    result = lanczos_largest(matvec, 1, flat.size, tol=tol, max_iter=max_iter, seed=seed)
    theta, residual = float(result["theta"][0]), float(result["residual"][0])
    return {"lambda_max": theta, "residual": residual, "converged": bool(result["converged"][0]),
            "iterations": int(result["iterations"]), "tol": tol,
            "interval": [theta, theta + residual * abs(theta)],
            "loss": float(losses[0]) if losses else float("nan"), "num_parameters": int(flat.size),
            "num_images": int(x.shape[0]), "bn": bn, "method": METHOD}


def stability_thresholds(learning_rate: float, momentum: float = 0.0) -> dict:
    """Cohen et al.'s thresholds for a step size: 2/eta (gradient descent) and (2 + 2 beta)/eta
    (heavy-ball momentum beta, their Appendix); inf at eta = 0."""
    if learning_rate <= 0:
        return {"gd": float("inf"), "momentum": float("inf")}
    return {"gd": 2.0 / learning_rate, "momentum": (2.0 + 2.0 * momentum) / learning_rate}


def sharpness_study(model, x, labels, points: dict, *, momentum: float = 0.0, bn: str = "batch",
                    tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, seed: int = 0) -> dict:
    """`top_hessian_eigenvalue` on one batch at several points of one net, e.g. the trained
    weights and the initialization: `points` maps a name to `(variables, step, learning_rate)`
    (step and learning rate None where unknown). With a learning rate an entry gains `step`,
    `learning_rate` and `thresholds` (`stability_thresholds` with `momentum`). Returns
    {"analysis", "reference", name: entry, ...}; the arguments are checked first."""
    check_bn(bn)
    check_tolerance(tol, max_iter)
    out = {"analysis": "sharpness", "reference": "Cohen et al. 2021 (arXiv 2103.00065)"}
    for name, (variables, step, learning_rate) in points.items():
        result = top_hessian_eigenvalue(model, variables, x, labels, bn=bn, tol=tol, max_iter=max_iter, seed=seed)
        if step is not None and learning_rate is not None:
            result.update(step=step, learning_rate=learning_rate,
                          thresholds=stability_thresholds(learning_rate, momentum))
        out[name] = result
    return out
