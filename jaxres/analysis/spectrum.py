"""Singular-value density of Jacobians by stochastic Lanczos quadrature (Pennington, Schoenholz &
Ganguli 2017, arXiv 1711.04735, dynamical isometry; Tarnowski, Warchol, Jastrzebski, Tabor &
Nowak 2019, arXiv 1809.08848, for residual nets).

J = d h_out / d h_in of a chain of units (`segments`: the input of unit `start` to the output
of unit `stop`; `stop` = the last unit before the head gives Pennington et al.'s input-output
Jacobian of the feature extractor, `stop` = "head" d logits / d h, `start` = `stop` a unit's
own Jacobian), at a batch h (N, H, W, C), under a BatchNorm policy:
- bn="eval": each example maps separately, so J of the batch is block diagonal and its
  spectrum is the union of the N per-example spectra; the density is their average;
- bn="batch": the batch map, cross-example terms of the statistics included.

Stochastic Lanczos quadrature (Lin, Saad & Yang 2016; Ubaru, Chen & Saad 2017): from a
Rademacher probe v on the smaller side of J (n = min(n_in, n_out) values: the input for a tall
or square J, else the output, where the Golub-Kahan steps run on J^T), k steps of Golub-Kahan
bidiagonalization with full reorthogonalization (`matfree.decomp.bidiag`, Kraemer et al.) give
a k x k bidiagonal B; its singular values s_j (nodes) and the squared first entries of its
right singular vectors w_j (weights, summing to 1) form the Gauss rule
sum_j w_j f(s_j) ~ v^T f((A^T A)^(1/2)) v / ||v||^2 (A = J or J^T), exact for f(s) a polynomial
in s^2 of degree < 2k. Averaged over probes, it estimates the spectral measure
(1/n) sum_i delta(sigma_i) over J's n = min(n_in, n_out) singular values (a wide J's
n_in - n_out structural zeros are not counted). What is exact and what is estimated:
- `mean_sq_singular_value` = ||J||_F^2 / n = m1 and `mean_fourth_singular_value` =
  ||J^T J||_F^2 / n = m2: exact per probe given v (degrees 1 and 2 in s^2, exact for k >= 2),
  so unbiased (Hutchinson) estimates with 95% Student-t intervals over the probes;
- `isometry` = m1^2 / m2, the participation ratio of the squared singular values: 1 for an
  isometry up to scale (all sigma equal; Pennington et al.'s dynamical isometry), r/n for r
  equal nonzero ones, smaller the wider the spread; a ratio of two unbiased estimates, itself
  biased for few probes (on a 96 x 96 test Jacobian with 16 probes it came out 3% high and its
  95% bootstrap interval over the probes missed the truth), so the interval is a guide.
  Unlike the quantiles below it does not depend on how finely k nodes resolve the density;
- `null_share` (the share of singular values below `NULL_RELATIVE` x sigma_max), the quantiles
  of log10 sigma over the rest and the density: estimates; the quantiles' intervals are
  bootstrap intervals over the probes (they do not cover the quadrature error: a Gauss rule of
  k nodes lumps a cluster - e.g. the exact zeros of ReLU-masked rows next to a continuum of
  small values - into its lowest node, which then carries the cluster's whole weight);
- `sigma_max`: the largest node over the probes, a lower bound on the true sigma_max (nodes
  interlace); with k = min(n_in, n_out) the nodes are the exact singular values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis.estimators import confidence_interval
from jaxres.analysis.lesion import unit_inputs
from jaxres.analysis.segments import Segment, SegmentCache, check_bn, find_segment

NULL_RELATIVE = 1e-5  # nodes below this fraction of sigma_max count as zero (float32 Krylov noise)
DENSITY_BINS = np.linspace(-6.0, 3.0, 91)  # log10 sigma, 0.1-decade bins
BOOTSTRAP = 400
METHOD = ("stochastic Lanczos quadrature: Golub-Kahan bidiagonalization (matfree.decomp.bidiag, full "
          "reorthogonalization) from Rademacher probes")


@functools.lru_cache(maxsize=None)
def _quadrature_fn(fns: tuple, num_matvecs: int, transpose: bool):
    """Jitted `(params, h, v) -> B`, the k x k bidiagonal of k Golub-Kahan steps on the Jacobian
    J of the chain of unit maps `fns` (`fn(cvars, pert, h)`), or on J^T when `transpose`, from
    the probe v; compiled once per chain computation, k and side."""
    from matfree import decomp

    def chain(params, h):
        for fn, (cvars, pert) in zip(fns, params):
            h = fn(cvars, pert, h)
        return h

    def bidiagonal(params, h, v):
        _, lin = jax.linearize(lambda x: chain(params, x), h)
        if transpose:
            lin_t = jax.linear_transpose(lin, h)
            return decomp.bidiag(num_matvecs)(lambda u: lin_t(u)[0], v).J_small
        return decomp.bidiag(num_matvecs)(lin, v).J_small

    return jax.jit(bidiagonal)


BREAKDOWN = 1e-6  # an entry of B below this fraction of its largest so far: the Krylov space closed


def krylov_size(bidiagonal) -> int:
    """The number m of leading steps of a k x k upper bidiagonal B (diagonal alpha, superdiagonal
    beta) that hold information: the steps up to the first alpha_j or beta_j that is non-finite
    or below `BREAKDOWN` times the largest entry before it. There the Krylov space from the
    probe is exhausted (J has fewer distinct singular values reachable from it, e.g. a
    rank-deficient Jacobian of ReLU units), and the later steps normalize float32 noise: matfree
    continues, and their entries grow without bound."""
    b = np.asarray(bidiagonal, np.float64)
    alpha, beta = np.diag(b), np.append(np.diag(b, 1), np.inf)
    scale = 0.0
    for j in range(b.shape[0]):
        if not np.isfinite(alpha[j]):
            return max(j, 1)
        scale = max(scale, abs(alpha[j]))
        if abs(alpha[j]) <= BREAKDOWN * scale or not np.isfinite(beta[j]) or abs(beta[j]) <= BREAKDOWN * scale:
            return j + 1
        scale = max(scale, abs(beta[j]))
    return b.shape[0]


def gauss_rule(bidiagonal) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, weights) of the Gauss rule of one k x k upper bidiagonal B (float64 SVD): the
    singular values of B and the squared first entries of its right singular vectors. When the
    Krylov space was exhausted after m < k steps (`krylov_size`), only the leading m x m block
    is used: its nodes are then exact; the remaining nodes get weight 0."""
    b = np.asarray(bidiagonal, np.float64)
    k, m = b.shape[0], krylov_size(b)
    _, s, vt = np.linalg.svd(b[:m, :m], full_matrices=False)
    nodes, weights = np.zeros(k), np.zeros(k)
    nodes[:m], weights[:m] = s, np.square(vt[:, 0])
    return nodes, weights


def chain_between(segments: list[Segment], start: str, stop: str) -> list[Segment]:
    """The units from `start` to `stop` (both included), or a ValueError naming the order."""
    first = segments.index(find_segment(segments, start))
    last = segments.index(find_segment(segments, stop))
    if first > last:
        raise ValueError(f"start unit {start!r} comes after stop unit {stop!r}; the Jacobian runs forward from "
                         f"the input of `start` to the output of `stop`")
    return segments[first:last + 1]


def quadrature_nodes(chain: list[Segment], h, *, num_matvecs: int, num_probes: int, seed: int = 0):
    """(nodes, weights), each (num_probes, k): the SLQ rule of J = d chain(h) / d h for every
    probe, on J's smaller side (k = num_matvecs, at most min(n_in, n_out) of the batch map,
    else ValueError; with k = min(n_in, n_out) the nodes are J's singular values)."""
    n_in, n_out = int(np.prod(h.shape)), int(np.prod(chain[-1].out_shape))
    for name, value, low in (("num_matvecs", num_matvecs, 1), ("num_probes", num_probes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if num_matvecs > min(n_in, n_out):
        raise ValueError(f"num_matvecs={num_matvecs} exceeds min(n_in, n_out) = {min(n_in, n_out)} of this Jacobian "
                         f"({n_out} x {n_in} for the batch); use at most that many (then the nodes are exact)")
    transpose = n_out < n_in
    fn = _quadrature_fn(tuple(seg.ops.fn for seg in chain), num_matvecs, transpose)
    params = [seg.params for seg in chain]
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    for _ in range(num_probes):
        v = jnp.asarray(rng.choice([-1.0, 1.0], size=chain[-1].out_shape if transpose else h.shape), h.dtype)
        s, w = gauss_rule(fn(params, h, v))
        nodes.append(s)
        weights.append(w)
    return np.stack(nodes), np.stack(weights)


def _weighted_quantiles(values, weights, qs):
    order = np.argsort(values)
    cdf = np.cumsum(weights[order])
    cdf = cdf / cdf[-1]
    return np.interp(qs, cdf, values[order])


def summarize(nodes, weights, *, seed: int = 0) -> dict:
    """The module docstring's quantities from SLQ nodes and weights (num_probes, k)."""
    probes = nodes.shape[0]
    sigma_max = float(nodes.max())
    null = nodes < NULL_RELATIVE * sigma_max
    m1, m2 = np.sum(weights * nodes ** 2, 1), np.sum(weights * nodes ** 4, 1)
    mean_sq, mean_fourth = confidence_interval(m1), confidence_interval(m2)
    null_share = confidence_interval(np.sum(weights * null, 1))
    qs = np.array([0.1, 0.5, 0.9])

    def quantiles(rows):
        keep = ~null[rows]
        logs = np.log10(np.where(keep, nodes[rows], 1.0))
        return _weighted_quantiles(logs[keep], weights[rows][keep], qs) if keep.any() else np.full(3, np.nan)

    point = quantiles(np.arange(probes))
    rng = np.random.default_rng(seed)
    draws = [rng.integers(probes, size=probes) for _ in range(BOOTSTRAP)]
    boot = np.stack([quantiles(rows) for rows in draws])
    ratio = lambda rows: np.mean(m1[rows]) ** 2 / max(np.mean(m2[rows]), 1e-300)  # noqa: E731
    ratios = np.array([ratio(rows) for rows in draws])
    low, high = np.nanpercentile(boot, 2.5, 0), np.nanpercentile(boot, 97.5, 0)
    logs = np.log10(np.maximum(nodes, 1e-300))
    density, _ = np.histogram(np.clip(logs[~null], DENSITY_BINS[0], DENSITY_BINS[-1]), DENSITY_BINS,
                              weights=weights[~null] / probes)
    interval = lambda ci: {"estimate": float(ci["estimate"]), "ci_low": float(ci["ci_low"]),  # noqa: E731
                           "ci_high": float(ci["ci_high"])}
    spread = boot[:, 2] - boot[:, 0]
    return {
        "mean_sq_singular_value": {**interval(mean_sq), "method": "exact per probe (Gauss rule, degree 1); 95% "
                                   "Student-t interval over the probes"},
        "mean_fourth_singular_value": {**interval(mean_fourth), "method": "exact per probe (Gauss rule, degree 2); "
                                       "95% Student-t interval over the probes"},
        "isometry": {"estimate": float(ratio(np.arange(probes))), "ci_low": float(np.percentile(ratios, 2.5)),
                     "ci_high": float(np.percentile(ratios, 97.5)),
                     "method": "m1^2 / m2 of the squared singular values (1: isometry); ratio estimate, 95% "
                               "bootstrap over probes (a guide: the ratio is biased for few probes)"},
        "null_share": {**interval(null_share), "threshold": f"sigma < {NULL_RELATIVE:g} sigma_max",
                       "method": "SLQ estimate; 95% t interval over the probes (quadrature error not included)"},
        "log10_sigma_quantiles": {f"q{int(q * 100)}": {"estimate": float(p), "ci_low": float(lo), "ci_high": float(hi)}
                                  for q, p, lo, hi in zip(qs, point, low, high)},
        "spread_decades": {"estimate": float(point[2] - point[0]), "ci_low": float(np.nanpercentile(spread, 2.5)),
                           "ci_high": float(np.nanpercentile(spread, 97.5)),
                           "method": "q90 - q10 of log10 sigma over the non-null part; 95% bootstrap over probes"},
        "sigma_max": {"estimate": sigma_max, "method": "largest SLQ node: a lower bound on sigma_max"},
        "density": {"log10_sigma_edges": DENSITY_BINS.tolist(), "mass": density.tolist(),
                    "method": "SLQ weights of the non-null nodes per 0.1-decade bin, averaged over probes "
                              "(sums to 1 - null share)"},
    }


def jacobian_spectrum(segments: list[Segment], hs: list, start: str, stop: str, *, num_matvecs: int = 64,
                      num_probes: int = 8, seed: int = 0) -> dict:
    """SLQ spectrum of d (output of `stop`) / d (input of `start`) at the activations `hs` (the
    input of every unit, as `lesion.unit_inputs` or `endtoend.EndToEnd.activations` give);
    num_matvecs is capped at min(n_in, n_out). Returns `summarize`'s dict with `from`, `to`,
    `shape_in`, `shape_out` (NHWC of the batch), `num_matvecs`, `num_probes`, `bn`, `method`,
    and `rule`: every probe's Gauss-rule nodes and weights (float32), from which `summarize`
    recomputes the rest."""
    chain = chain_between(segments, start, stop)
    h = hs[segments.index(chain[0])]
    k = min(num_matvecs, int(np.prod(h.shape)), int(np.prod(chain[-1].out_shape)))
    nodes, weights = quadrature_nodes(chain, h, num_matvecs=k, num_probes=num_probes, seed=seed)
    n_in, n_out = int(np.prod(h.shape)), int(np.prod(chain[-1].out_shape))
    return {"from": start, "to": stop, "shape_in": list(h.shape), "shape_out": list(chain[-1].out_shape),
            "num_singular_values": min(n_in, n_out), "probe_side": "output" if n_out < n_in else "input",
            "num_matvecs": k, "num_probes": num_probes, "bn": chain[0].bn, "method": METHOD,
            **summarize(nodes, weights, seed=seed),
            "rule": {"nodes": _significant(nodes), "weights": _significant(weights)}}


def _significant(array, digits: int = 6) -> list:
    """Nested lists of floats to `digits` significant digits (float32's), for compact JSON."""
    return [[float(f"{v:.{digits}g}") for v in row] for row in np.asarray(array, np.float64)]


def default_starts(names) -> tuple[str, ...]:
    """Three evenly spaced inner units (`names`: the model's units, stem to head) whose input
    the Jacobians of `spectrum_study` start at."""
    names = list(names)
    return tuple(names[1:-1:max(1, (len(names) - 2) // 3)])


def spectrum_study(model, variants: dict, x, *, starts=None, bn: str = "eval", num_matvecs: int = 64,
                   num_probes: int = 8, seed: int = 0) -> dict:
    """The SLQ spectra of one net at each of `variants` ({name: variables}, e.g. the trained
    weights and the initialization) on the NHWC batch `x`: for each unit u of `starts` (default
    `default_starts`) `logits[u]`, d logits / d h(u), and `own[u]`, u's own Jacobian; and
    `features`, Pennington et al.'s input-output Jacobian of the feature extractor (the input of
    the first unit after the stem to the output of the last before the head). Returns
    {"analysis", "reference", name: {"logits", "own", "features"}, ...}; units are checked first."""
    check_bn(bn)
    names = list(model.unit_names())
    starts = default_starts(names) if starts is None else tuple(starts)
    for unit in starts:
        if unit not in names[:-1]:
            raise ValueError(f"--units: {unit!r} is not a unit before the head of {type(model).__name__} "
                             f"({', '.join(names[:-1])})")
    features = (names[1], names[-2])
    x = jnp.asarray(x)
    cache = SegmentCache()
    out = {"analysis": "spectrum", "reference": "Pennington, Schoenholz & Ganguli 2017 (arXiv 1711.04735)"}
    options = {"num_matvecs": num_matvecs, "num_probes": num_probes, "seed": seed}
    for name, variables in variants.items():
        segments = cache.segments(model, variables, x.shape, bn)
        hs = unit_inputs(segments, x)
        entry = {"logits": {}, "own": {}}
        for unit in starts:  # d logits / d h: at most C * N singular values, all of them with k = C * N
            entry["logits"][unit] = jacobian_spectrum(segments, hs, unit, names[-1], **options)
            entry["own"][unit] = jacobian_spectrum(segments, hs, unit, unit, **options)
        entry["features"] = jacobian_spectrum(segments, hs, *features, **options)
        out[name] = entry
    return out
