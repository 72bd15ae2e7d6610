"""The gradient of a residual net split by path length (Veit, Wilber & Belongie 2016, arXiv
1605.06431, Sec. 5 and Fig. 6): residual nets behave like ensembles of paths, and the paths
that carry the gradient are short.

For a fixed forward pass, the backward map of a residual unit out = act(S h + F(h)) is
D (S + J_F), D = act'(pre) the activation's mask (the identity in pre-activation units), S the
shortcut (the identity, or option A's subsample + zero-pad at a transition) and J_F the
branch's Jacobian. The chain of n such units expands into a sum over the 2^n subsets of units
whose branch the gradient goes through, so the gradient at the input of the residual stack
splits exactly into

    g = sum_k g_k,   g_k = the sum over the C(n, k) paths through exactly k branches.

Everything goes through the unit interface (`segments`), as the lesions do: the branch's
output is the unit's last layer probe p(h). A unit's VJP is split into its branch part
c -> J_F^T D c and its shortcut part c -> S^T D c: the unit's VJP in its input and in the
(zero) perturbation of its last probe gives the whole (S + J_F)^T D c and D c, the cotangent at
the probe; the VJP of p(h) with D c is the branch part, and the whole minus it the shortcut
part - all at the unit's own forward pass, so the masks D are the forward pass's. A unit *has a
shortcut* when its shortcut part is not zero on the batch (a plain unit's is: its output is
act(p(h))); those are the residual units; the stem, the head and any other unit are chained
whole.

`path_gradients` (exact): the recursion g_k <- S^T D g_k + J_F^T D g_{k-1} from the last
residual unit to the first, over k = 0..n: n(n+1)/2 split VJPs per example, each a sum of the
same terms as the path expansion - no interpolation (it equals the coefficients of the
polynomial g(t) = sum_k t^k g_k obtained by scaling every branch's cotangent by t, which a
discrete Fourier transform on a circle would also give, at 4x the VJPs). `single_path_gradients`
(Veit et al.'s estimate): the gradient through one path, the shortcut at every unit but the
path's k branches. `path_study` measures both on images, per example, at the input of the
residual stack (the stem's output, where every path starts) and at the net's input (the stem's
VJP applied to each g_k).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis.estimators import confidence_interval
from jaxres.analysis.lesion import unit_inputs
from jaxres.analysis.loss import cross_entropies
from jaxres.analysis.segments import Segment, SegmentCache, check_bn, last_probe_name

EXACT = ("exact: the recursion over path length through each residual unit's shortcut and branch VJPs "
         "(float32), per example; mean over the images [95% t interval over the images]")
SAMPLED = ("Veit et al.'s estimate: the norm of the gradient through one path of length k (k branches drawn "
           "uniformly, the shortcut elsewhere) on one image, a draw per (path, image); mean over the draws [95% t "
           "interval over the draws], times C(n, k) for the total")
SHORTCUT_TOLERANCE = 1e-4  # shortcut part / whole VJP below this: the unit has no shortcut (a plain unit: exactly 0)
REFERENCE = "Veit, Wilber & Belongie 2016 (arXiv 1605.06431), Sec. 5 and Fig. 6"


def _build_vjp(fn, _):
    """Segment op: `(cvars, pert, h, cts (K, N, *out)) -> (K, N, *in)`, the unit's VJP on K cotangents."""

    def vjp(cvars, pert, h, cts):
        _, pullback = jax.vjp(lambda x: fn(cvars, pert, x), h)
        return jax.vmap(lambda c: pullback(c)[0])(cts)

    return vjp


def _build_split_vjp(fn, capture_fn):
    """Segment op: `(cvars, pert, h, cts (K, N, *out)) -> (shortcut part, branch part)`, both
    (K, N, *in): the unit's VJP with the gradient through its last layer probe (the branch)
    apart from the rest (the shortcut), at the unit's own forward pass (see the module doc)."""

    def split(cvars, pert, h, cts):
        _, probes = capture_fn(cvars, h)  # traced for the probe's name; XLA drops what is unused
        name = last_probe_name(probes)

        def unit(x, delta):  # delta: added to the last probe, so its cotangent is d out / d probe
            return fn(cvars, {**pert, "inner": {**pert["inner"], name: pert["inner"][name] + delta}}, x)

        _, pullback = jax.vjp(unit, h, pert["inner"][name])
        _, branch_pullback = jax.vjp(lambda x: capture_fn(cvars, x)[1][name], h)

        def one(c):
            whole, at_probe = pullback(c)
            branch = branch_pullback(at_probe)[0]
            return whole - branch, branch

        return jax.vmap(one)(cts)

    return split


# These ops run many times each (n(n+1)/2 cotangents per unit), so they get XLA's default
# optimization (a cifar_resnet56 unit's split VJP of 8 x 16 cotangents: 0.052 s per call instead of
# 0.079 s at `segments.COMPILER_OPTIONS`'s level 0, for 0.46 s of compile instead of 0.30 s; the
# 2-core CPU at load 11).
def _split_op(seg: Segment):
    return seg.op("paths_split_vjp", _build_split_vjp, {})


def _vjp_op(seg: Segment):
    return seg.op("paths_vjp", _build_vjp, {})


def _chunked(op, seg: Segment, h, cts, chunk: int):
    """`op(seg.cvars, seg.pert, h, cts[i:i + chunk])` over `cts` (M, N, ...) in chunks of exactly
    `chunk` (the last padded with zeros), so each op compiles once; the results concatenated,
    as numpy arrays (the bookkeeping between ops in numpy compiles nothing per shape)."""
    cts = np.asarray(cts)
    m = cts.shape[0]
    pad = -m % chunk
    if pad:
        cts = np.concatenate([cts, np.zeros((pad,) + cts.shape[1:], cts.dtype)])
    parts = [op(seg.cvars, seg.pert, h, cts[i:i + chunk]) for i in range(0, m + pad, chunk)]
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:m], *parts)


def residual_units(segments: list[Segment], hs: list, seed: int = 0, *, chunk: int = 8) -> tuple[list[str], dict]:
    """`(residual, others)`: the units with a shortcut, in order, and for every other unit why
    it is not one ("no layer probes", "no shortcut: ..."), read on the activations `hs`
    (`lesion.unit_inputs`) with one random cotangent per unit: a unit has a shortcut when its
    shortcut part is more than `SHORTCUT_TOLERANCE` of its whole VJP (a plain unit's is 0).
    `chunk` as in `path_gradients` (the same compiled code)."""
    residual, others = [], {}
    key = jax.random.key(seed)
    for i, seg in enumerate(segments):
        _, probes = seg.ops.capture_fn(seg.cvars, hs[i])
        if not probes:
            others[seg.name] = "no layer probes"
            continue
        key, sub = jax.random.split(key)
        ct = jax.random.normal(sub, (1,) + tuple(hs[i + 1].shape), hs[i + 1].dtype)
        shortcut, branch = _chunked(_split_op(seg), seg, hs[i], ct, chunk)
        ratio = float(np.linalg.norm(shortcut) / max(float(np.linalg.norm(shortcut + branch)), 1e-30))
        if ratio > SHORTCUT_TOLERANCE:
            residual.append(seg.name)
        else:
            others[seg.name] = f"no shortcut (shortcut part {ratio:.1e} of its VJP)"
    return residual, others


def check_residual(residual: list[str], others: dict, model_name: str = "this net") -> None:
    """A ValueError when no unit has a shortcut (a plain net), naming the units and why."""
    if not residual:
        plain = [u for u, why in others.items() if why.startswith("no shortcut")]
        bare = [u for u, why in others.items() if not why.startswith("no shortcut")]
        kinds = "; ".join(part for part in (
            f"{', '.join(plain)}: no shortcut (the VJP without the branch is 0)" if plain else "",
            f"{', '.join(bare)}: no layer probes" if bare else "") if part)
        raise ValueError(f"{model_name} has no residual unit ({kinds}), so its gradient has no decomposition by path "
                         f"length; pass a residual net (e.g. cifar_resnet20)")


def _stack_range(segments: list[Segment], residual: list[str]) -> tuple[int, int]:
    """Indices of the first and last residual unit in `segments`."""
    index = [i for i, s in enumerate(segments) if s.name in residual]
    return index[0], index[-1]


def logit_cotangent(logits, labels):
    """(N, C) d CE_i / d z_i: the per-example cross-entropy's gradient at the logits, each
    example its own loss (softmax - onehot)."""
    return jax.grad(lambda z: jnp.sum(cross_entropies(z, labels)))(jnp.asarray(logits, jnp.float32))


def _to_stack_top(segments: list[Segment], hs: list, cotangent, last: int, chunk: int):
    """The cotangent (1, N, *) at the output of unit `last`, from `cotangent` at the logits."""
    cts = np.asarray(cotangent)[None]
    for i in range(len(segments) - 1, last, -1):
        cts = _chunked(_vjp_op(segments[i]), segments[i], hs[i], cts, 1)
    return cts


def _through_stack(segments: list[Segment], hs: list, cotangent, residual: list[str], combine, copies: int,
                   chunk: int) -> np.ndarray:
    """The backward pass from the logits to the input of the residual stack, `copies` cotangents
    per example: at each residual unit (index j among them) `combine(j, shortcut, branch)` makes
    the next stack from the split VJP of the current one; other units are applied whole."""
    first, last = _stack_range(segments, residual)
    cts = _to_stack_top(segments, hs, cotangent, last, chunk)
    cts = np.broadcast_to(cts, (copies,) + cts.shape[1:])
    column = {name: j for j, name in enumerate(residual)}
    for i in range(last, first - 1, -1):
        seg = segments[i]
        if seg.name in column:
            cts = combine(column[seg.name], *_chunked(_split_op(seg), seg, hs[i], cts, chunk))
        else:
            cts = _chunked(_vjp_op(seg), seg, hs[i], cts, chunk)
    return cts


def path_gradients(segments: list[Segment], hs: list, cotangent, residual: list[str], *, chunk: int = 8) -> np.ndarray:
    """Exact: the gradient at the input of the residual stack split by path length.

    segments: the model (`SegmentCache.segments`); hs: its activations (`lesion.unit_inputs`:
    every unit's input, then the logits), batch N; cotangent: (N, C) at the logits (e.g.
    `logit_cotangent`); residual: the units with a shortcut (`residual_units`), n of them.
    Returns g (n + 1, N, *s) float32, s the shape of the first residual unit's input: g[k] the
    part of the VJP through paths with exactly k residual branches, so that g.sum(0) is the
    ordinary VJP at that point. Units between residual units without a shortcut are applied
    whole to every g[k]. Cost: n(n+1)/2 split VJPs of the batch, `chunk` cotangents per
    compiled call.
    """

    def one_more_order(_, shortcut, branch):  # g_k <- S^T D g_k + J^T D g_{k-1}
        grown = np.concatenate([shortcut, np.zeros_like(shortcut[:1])])
        grown[1:] += branch
        return grown

    return _through_stack(segments, hs, cotangent, residual, one_more_order, 1, chunk)


def single_path_gradients(segments: list[Segment], hs: list, cotangent, residual: list[str], branches, *,
                          chunk: int = 8) -> np.ndarray:
    """The gradient through single paths (Veit et al. Sec. 5): `branches` (P, n) or (P, N, n)
    bool says which of the n residual units' branches path p takes (for every example, or for
    each example its own); the VJP goes through those branches and the shortcut at every
    other residual unit. Returns (P, N, *s) float32 at the input of the residual stack (as
    `path_gradients`). Exact for each path; averaging their norms over random paths is the
    estimate."""
    branches = np.asarray(branches, bool)
    n, num = len(residual), cotangent.shape[0]
    if branches.ndim == 2:
        branches = np.broadcast_to(branches[:, None, :], (branches.shape[0], num, branches.shape[-1]))
    if branches.ndim != 3 or branches.shape[1:] != (num, n):
        raise ValueError(f"branches must be (paths, {n}) or (paths, {num}, {n}) booleans, one column per residual "
                         f"unit; got shape {branches.shape}")

    def follow(j, shortcut, branch):
        return np.where(branches[:, :, j].reshape(branches.shape[:2] + (1,) * (branch.ndim - 2)), branch, shortcut)

    return _through_stack(segments, hs, cotangent, residual, follow, branches.shape[0], chunk)


def to_input(segments: list[Segment], hs: list, g, first: int, *, chunk: int = 8) -> np.ndarray:
    """(M, N, *x): `g` (M, N, *s) at the input of unit `first` carried back to the net's input
    through the units before it (the stem): linear, so it maps each part of a sum to its part."""
    for i in range(first - 1, -1, -1):
        g = _chunked(_vjp_op(segments[i]), segments[i], hs[i], g, chunk)
    return g


def path_counts(n: int) -> np.ndarray:
    """(n + 1,) C(n, k): the number of paths through exactly k of n residual branches."""
    return np.array([math.comb(n, k) for k in range(n + 1)], np.float64)


def _norms(g) -> np.ndarray:
    """(M, N) per-example Euclidean norms of g (M, N, ...), float64."""
    g = np.asarray(g, np.float64)
    return np.sqrt(np.sum(g.reshape(g.shape[0], g.shape[1], -1) ** 2, -1))


def _interval(samples) -> dict:
    """{"estimate", "ci_low", "ci_high"} lists: the mean of nonnegative `samples` (draws, ...)
    over the draws and its 95% Student-t interval, clipped at 0."""
    samples = np.asarray(samples, np.float64)
    if samples.shape[0] < 2:
        return {"estimate": samples.mean(0).tolist()}
    ci = confidence_interval(samples)
    return {key: np.maximum(ci[key], 0.0).tolist() for key in ("estimate", "ci_low", "ci_high")}


def _cumulative_share(values) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return np.cumsum(values) / np.sum(values)


def _first_reaching(share, level: float) -> int:
    return int(np.argmax(np.asarray(share) >= level - 1e-12))


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def sample_branches(n: int, ks, draws: int, num: int, rng) -> np.ndarray:
    """(len(ks) * draws, num, n) bool: for each k in `ks`, `draws` rows of paths through k of
    the n branches, drawn uniformly (without replacement) and independently for each of `num`
    examples; rows grouped by k."""
    rows = np.zeros((len(ks) * draws, num, n), bool)
    for a, k in enumerate(ks):
        for d in range(draws):
            for e in range(num):
                rows[a * draws + d, e, rng.choice(n, k, replace=False)] = True
    return rows


def path_study(model, variables, images, labels, *, bn: str = "eval", draws: int = 1, seed: int = 0,
               batch_size: int = 16, chunk: int = 8, model_name: str = "this net",
               cache: SegmentCache | None = None) -> dict:
    """The gradient of the per-example cross-entropy by path length, exact and as Veit et al.
    estimate it, on `images`.

    images: float NHWC (N, H, W, C); labels: int (N,); bn: BatchNorm policy (`segments`; "eval"
    keeps examples apart, so each image's gradient is its own loss's; "batch" couples them: an
    image's row of the gradient of the batch's summed loss); draws: random paths per length k
    and image (Veit et al.'s estimate; seed `seed`); batch_size: images per batch (it must
    divide their number); chunk: cotangents per compiled call. Bad arguments raise ValueError
    before any gradient is taken, and a net without residual units before any but the one VJP
    per unit that finds the shortcuts.

    Returns a JSON-ready dict. Per k = 0..n (n residual units): `paths` C(n, k) and
    `path_share` C(n, k) / 2^n (exact); `exact.norm_stack` and `exact.norm_input` the mean over
    the images of ||g_k|| at the residual stack's input and at the net's input [t interval over
    images]; `exact.truncation` the mean relative error ||g - sum_{j<=k} g_j|| / ||g||; the
    cumulative shares of sum_k ||g_k||; `sampled.per_path` the mean gradient norm through one
    path of length k and `sampled.total` C(n, k) times it (Veit et al. Fig. 6b and 6c, with
    intervals over the draws), and its cumulative share; `check` the largest relative
    difference between sum_k g_k and the ordinary VJP.
    """
    check_bn(bn)
    images, labels = np.asarray(images, np.float32), np.asarray(labels)
    if images.ndim != 4 or images.shape[0] < 1 or labels.shape != images.shape[:1]:
        raise ValueError(f"images must be an NHWC batch with one label each; got {images.shape} and {labels.shape}")
    for name, value in (("draws", draws), ("batch_size", batch_size), ("chunk", chunk)):
        _check_positive(name, value)
    num = images.shape[0]
    if num % batch_size and num > batch_size:
        raise ValueError(f"the number of images ({num}) must be a multiple of batch_size ({batch_size}), so every "
                         f"batch has the shape the units were traced for")
    batch_size = min(batch_size, num)
    cache = SegmentCache() if cache is None else cache
    segments = cache.segments(model, variables, (batch_size,) + images.shape[1:], bn, jnp.float32)
    rng = np.random.default_rng(seed)
    stack_norms, input_norms, full_norms, truncation, sampled = [], [], [], [], []
    check, check_input = 0.0, 0.0
    residual = None
    for start in range(0, num, batch_size):
        x = jnp.asarray(images[start:start + batch_size])
        hs = unit_inputs(segments, x)
        if residual is None:
            residual, others = residual_units(segments, hs, seed, chunk=chunk)
            check_residual(residual, others, model_name)
            n = len(residual)
            first = [s.name for s in segments].index(residual[0])
        cot = logit_cotangent(hs[-1], jnp.asarray(labels[start:start + batch_size]))
        g = path_gradients(segments, hs, cot, residual, chunk=chunk)
        full = _to_stack_top(segments, hs, cot, first - 1, chunk)  # the ordinary VJP, unit by unit
        g_input = to_input(segments, hs, g, first, chunk=chunk)
        full_input = to_input(segments, hs, full, first, chunk=chunk)
        full_norm = _norms(full)[0]
        full_norms.append(full_norm)
        check = max(check, float(np.max(_norms(g.sum(0)[None] - full)[0] / full_norm)))
        check_input = max(check_input, float(np.max(_norms(g_input.sum(0)[None] - full_input)[0]
                                                    / _norms(full_input)[0])))
        stack_norms.append(_norms(g))
        input_norms.append(_norms(g_input))
        truncation.append(_norms(full - np.cumsum(g, 0)) / full_norm)
        branches = sample_branches(n, range(n + 1), draws, batch_size, rng)
        single = single_path_gradients(segments, hs, cot, residual, branches, chunk=chunk)
        sampled.append(_norms(single).reshape(n + 1, draws * batch_size))  # a draw: one path on one image
    stack_norms, input_norms = np.concatenate(stack_norms, 1), np.concatenate(input_norms, 1)
    truncation = np.concatenate(truncation, 1)
    sampled = np.concatenate(sampled, 1)  # (n + 1, draws * images)
    counts = path_counts(n)
    exact_stack = _interval(stack_norms.T)
    per_path = _interval(sampled.T)
    total = {key: (np.asarray(value) * counts).tolist() for key, value in per_path.items()}
    exact_share = _cumulative_share(exact_stack["estimate"])
    sampled_share = _cumulative_share(total["estimate"])
    path_share = counts / 2.0 ** n
    decay = np.polyfit(np.arange(n + 1), np.log(per_path["estimate"]), 1)[0]
    levels = (0.5, 0.9, 0.99)
    return {
        "analysis": "paths", "bn": bn, "num_images": num, "batch_size": batch_size, "seed": seed,
        "draws_per_k": draws * num, "residual_units": residual, "other_units": others,
        "num_residual_units": n, "measured_at": {
            "stack": f"the input of {residual[0]} (the residual stack's input: every path starts there)",
            "input": "the net's input (the image), through the units before the stack"},
        "loss": ("per-example cross-entropy, each example's own gradient (eval-mode BatchNorm keeps them apart)"
                 if bn == "eval" else "the batch's summed cross-entropy (batch statistics couple the examples); "
                 "norms of each example's rows"),
        "k": list(range(n + 1)), "paths": counts.tolist(), "path_share": path_share.tolist(),
        "exact": {"method": EXACT, "norm_stack": exact_stack, "norm_input": _interval(input_norms.T),
                  "full_norm_stack": _interval(np.concatenate(full_norms)),
                  "truncation": _interval(truncation.T),
                  "cumulative_share": exact_share.tolist(),
                  "k_reaching": {str(level): _first_reaching(exact_share, level) for level in levels}},
        "sampled": {"method": SAMPLED, "per_path": per_path, "total": total,
                    "cumulative_share": sampled_share.tolist(),
                    "k_reaching": {str(level): _first_reaching(sampled_share, level) for level in levels},
                    "decay_per_branch": float(np.exp(decay)),
                    "decay_method": "exp(slope) of a least-squares line through log(mean per-path norm) vs k"},
        "cancellation": (np.asarray(exact_stack["estimate"]) / np.asarray(total["estimate"])).tolist(),
        "path_distribution_reaching": {str(level): _first_reaching(np.cumsum(path_share), level) for level in levels},
        "check": {"max_relative_difference_stack": check, "max_relative_difference_input": check_input,
                  "what": "max over images of ||sum_k g_k - g|| / ||g||, g the ordinary VJP chained unit by unit"},
        "reference": REFERENCE,
    }
