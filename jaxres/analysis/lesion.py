"""Lesion study (Veit, Wilber & Belongie 2016, arXiv 1605.06431, Fig. 3 and 5): remove units of
a trained net at test time and measure its error.

The surgery goes through the unit interface only (`segments`):
- a unit with an identity shortcut (recognized from the outside by `segments.identity_unit`:
  its output is act(h + last layer probe)) keeps the shortcut and loses its branch: the
  branch's last normalized output (the unit's last layer probe) is cancelled through the
  unit's own perturbation, so the unit computes act(h + 0) - for ReLU nets, whose units'
  inputs are >= 0, that is h itself;
- a unit without one (a plain unit) becomes the identity;
- a unit whose output has another shape than its input (the stem, a stride-2 or widening
  unit, the head) can be neither and is refused, with the units that can be lesioned named.
Plain and residual twins therefore lose the same units: the shape-keeping ones.

Numbers (`lesion_study`): the error is an exact count of mistakes on the given images (every
quantity carries `method`); its `ci_low`/`ci_high` are Wilson's 95% interval for the error on
the distribution the images come from. Random lesions of k units draw `draws` sets each; their
interval is Student's t over the draws (the spread of which units are removed, not of the images).

BatchNorm policy as in `segments`: "eval" uses the running statistics (the net as tested; a
lesion leaves the later units' statistics stale, as in Veit et al.); "batch" recomputes them on
each evaluation batch of `batch_size` images.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxres.analysis.estimators import binomial_interval, confidence_interval
from jaxres.analysis.forward_stats import build_forward
from jaxres.analysis.segments import Segment, SegmentCache, check_bn, identity_unit, last_probe_name

SHORTCUT = "branch removed, identity shortcut kept"
IDENTITY = "replaced by the identity"
METHOD = "exact count of mistakes on these images; 95% Wilson interval for the test distribution"


def _build_apply(fn, _):
    """Segment op: `(cvars, pert, h) -> output`, the unit as it is."""
    return fn


def _build_branch_removed(fn, capture_fn):
    """Segment op: `(cvars, pert, h) -> output` with the unit's last layer probe cancelled (its
    perturbation set to minus the probe's value), so a residual unit keeps only its shortcut."""

    def removed(cvars, pert, h):
        _, probes = capture_fn(cvars, h)
        name = last_probe_name(probes)
        inner = {**pert["inner"], name: pert["inner"][name] - probes[name]}
        return fn(cvars, {**pert, "inner": inner}, h)

    return removed


def classify_units(segments: list[Segment], x) -> tuple[dict, dict]:
    """`(kinds, refused)`: for each unit that can be lesioned, how (`SHORTCUT` or `IDENTITY`), read
    on the NHWC batch `x`; for each other unit, why not."""
    kinds, refused = {}, {}
    h = x
    for seg in segments:
        out, _, pre = seg.op("forward", build_forward)(seg.cvars, h)
        if not seg.keeps_shape:
            refused[seg.name] = f"changes the shape of its input ({_shape(seg.in_shape)} -> {_shape(seg.out_shape)})"
        else:
            kinds[seg.name] = SHORTCUT if identity_unit(out, pre) else IDENTITY
        h = out
    return kinds, refused


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape[1:])


def check_lesion_units(units, kinds: dict, refused: dict) -> tuple[str, ...]:
    """The units to lesion (default: every unit that can be), or a ValueError naming the bad one,
    why, and the units that can be lesioned."""
    if units is None:
        return tuple(kinds)
    units = tuple(units)
    allowed = f"units that can be lesioned: {', '.join(kinds) or 'none'}"
    if not units:
        raise ValueError(f"no unit to lesion was given; {allowed}")
    for unit in units:
        if unit in refused:
            raise ValueError(f"cannot lesion {unit}: it {refused[unit]}, so it can neither become the identity nor "
                             f"keep an identity shortcut; {allowed}")
        if unit not in kinds:
            raise ValueError(f"unknown unit {unit!r}; {allowed}")
    if len(set(units)) != len(units):
        raise ValueError(f"units to lesion repeat: {', '.join(units)}")
    return units


def check_ks(ks, num_units: int) -> tuple[int, ...]:
    ks = tuple(ks)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_units]
    if bad:
        raise ValueError(f"numbers of units to remove at random must lie in 1..{num_units} (the units that can be "
                         f"lesioned); got {bad}")
    return ks


def _batches(images, labels, batch_size: int):
    """(x, labels, mask) batches of exactly `batch_size` (the last one padded with its first
    images, masked out), so every batch has the shape the units were traced for."""
    n = images.shape[0]
    for start in range(0, n, batch_size):
        index = np.arange(start, start + batch_size)
        mask = index < n
        index = np.where(mask, index, start)
        yield jnp.asarray(images[index]), np.asarray(labels)[index], mask


def unit_inputs(segments: list[Segment], x) -> list:
    """The intact net's activations on the NHWC batch `x`: every unit's input, then the logits."""
    hs = [x]
    for seg in segments:
        hs.append(seg.op("apply", _build_apply)(seg.cvars, seg.pert, hs[-1]))
    return hs


def lesioned_logits(segments: list[Segment], kinds: dict, hs: list, removed) -> jnp.ndarray:
    """The logits with the units in `removed` lesioned (`kinds` says how), from the intact net's
    activations `hs` (`unit_inputs`): the units before the first removed one are not run again."""
    index = {seg.name: i for i, seg in enumerate(segments)}
    start = min((index[u] for u in removed), default=len(segments))
    h = hs[start]
    for seg in segments[start:]:
        if seg.name not in removed:
            h = seg.op("apply", _build_apply)(seg.cvars, seg.pert, h)
        elif kinds[seg.name] == SHORTCUT:
            h = seg.op("branch_removed", _build_branch_removed)(seg.cvars, seg.pert, h)
    return h


def lesioned_mistakes(segments: list[Segment], kinds: dict, batches, lesions: list[frozenset]) -> np.ndarray:
    """Mistakes (top-1) of the net with each set of units in `lesions` removed (an empty set: the
    net as it is), summed over `batches` of (x, labels, mask); per batch the intact net runs once."""
    wrong = np.zeros(len(lesions), np.int64)
    for x, labels, mask in batches:
        hs = unit_inputs(segments, x)
        for c, removed in enumerate(lesions):
            logits = np.asarray(lesioned_logits(segments, kinds, hs, removed))
            wrong[c] += int(np.sum((np.argmax(logits, -1) != labels) & mask))
    return wrong


def _error(count: int, n: int) -> dict:
    return {"method": METHOD, "mistakes": int(count), **binomial_interval(int(count), n)}


def lesion_study(model, variables, images, labels, *, bn: str = "eval", units=None, ks=None, draws: int = 3,
                 seed: int = 0, batch_size: int = 250, cache: SegmentCache | None = None) -> dict:
    """Test error of `model` with each lesionable unit removed alone (Veit et al. Fig. 3), and with
    k units removed at random, `draws` sets per k (Fig. 5a).

    images: float NHWC (N, H, W, C); labels: int (N,); units: the units to lesion (default: all
    that can be); ks: numbers of units removed at random (default 1..min(10, #units)); draws:
    random sets per k (seed `seed`). Bad arguments raise ValueError before any evaluation.
    Returns a JSON-ready dict: `units`, `kinds` (how each is removed), `refused` (why the others
    cannot be), `baseline` (the intact net's error), `single` {unit: error}, `random`: per k the
    sets drawn, their errors, and their mean with a t interval over the draws.
    """
    check_bn(bn)
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[0] < 1 or labels.shape != images.shape[:1]:
        raise ValueError(f"images must be an NHWC batch with one label each; got {images.shape} and {labels.shape}")
    for name, value in (("batch_size", batch_size), ("draws", draws)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    batch_size = min(batch_size, images.shape[0])
    cache = SegmentCache() if cache is None else cache
    segments = cache.segments(model, variables, (batch_size,) + images.shape[1:], bn, jnp.float32)
    kinds, refused = classify_units(segments, jnp.asarray(images[:batch_size]))
    units = check_lesion_units(units, kinds, refused)
    ks = check_ks(range(1, min(10, len(units)) + 1) if ks is None else ks, len(units))
    rng = np.random.default_rng(seed)
    drawn = {k: [tuple(units[i] for i in sorted(rng.choice(len(units), k, replace=False))) for _ in range(draws)]
             for k in ks}
    lesions = [frozenset()] + [frozenset([u]) for u in units] + [frozenset(s) for k in ks for s in drawn[k]]
    wrong = lesioned_mistakes(segments, kinds, _batches(images, labels, batch_size), lesions)
    n = images.shape[0]
    single = {u: _error(wrong[1 + i], n) for i, u in enumerate(units)}
    random, offset = [], 1 + len(units)
    for k in ks:
        errors = wrong[offset:offset + draws] / n
        offset += draws
        entry = {"k": k, "sets": [list(s) for s in drawn[k]], "errors": errors.tolist(),
                 "method": f"mean over {draws} random sets of exact errors on these images"}
        if draws >= 2:
            ci = confidence_interval(errors)
            entry.update({key: float(np.clip(ci[key], 0.0, 1.0)) for key in ("estimate", "ci_low", "ci_high")})
        else:
            entry["estimate"] = float(errors[0])
        random.append(entry)
    return {"analysis": "lesion", "bn": bn, "num_images": n, "batch_size": batch_size, "seed": seed,
            "units": list(units), "kinds": {u: kinds[u] for u in units}, "refused": refused,
            "baseline": _error(wrong[0], n), "single": single, "random": random,
            "reference": "Veit, Wilber & Belongie 2016 (arXiv 1605.06431), Fig. 3 and 5"}

