"""A model's units sorted into stages, recognized from their shapes alone.

Inner units that keep their input's shape ("shape-keeping": identity-shortcut blocks and
their plain twins) make up the bulk of a stage; a unit that changes the shape (stride 2,
more channels: a "transition") opens the next stage. The stem and the head stand apart.
Per-stage growth rates are taken over the shape-keeping units only, because a transition
changes the scale predictably (a stride-2 unit sees a quarter of the positions) and the
stem and head are not blocks at all.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxres.choices import pick


@dataclasses.dataclass(frozen=True)
class UnitPlace:
    """Where a unit sits: `kind` is "stem", "transition", "shape-keeping" or "head"; `stage`
    numbers the stages from 1 (None for the stem and the head)."""

    name: str
    kind: str
    stage: int | None


def unit_places(segments) -> list[UnitPlace]:
    """The place of every unit of `segments` (stem first, head last; see the module docstring)."""
    places, stage = [], 0
    for index, seg in enumerate(segments):
        if index == 0 or index == len(segments) - 1:
            places.append(UnitPlace(seg.name, "stem" if index == 0 else "head", None))
            continue
        if not seg.keeps_shape or stage == 0:
            stage += 1
        places.append(UnitPlace(seg.name, "shape-keeping" if seg.keeps_shape else "transition", stage))
    return places


def sample_units(places: list[UnitPlace], count: int, *, within: str = "stage") -> list[int]:
    """Indices into `places` of `count` evenly spaced units, centred: of n candidates, those at
    int((j + 1/2) n / count), j = 0 .. count - 1 (all n when count >= n), in forward order.

    - within="stage": `count` per stage among its shape-keeping units (those a stage's rate is
      taken over, `stage_rates`): what `jaxres analyze` measures per-unit Jacobians on;
    - within="net": `count` among all inner units, transitions included (stem and head
      excluded): what the training monitor measures them on (`analysis_unit_jacobians`).

    count=0: every unit, stem and head included."""
    per_stage = pick("sampling scope (within)", within, {"stage": True, "net": False})
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"the number of units to sample must be an integer >= 0 (0: every unit), got {count!r}")
    if count == 0:
        return list(range(len(places)))
    if per_stage:
        groups = [[i for i, p in enumerate(places) if p.stage == stage and p.kind == "shape-keeping"]
                  for stage in sorted({p.stage for p in places if p.stage is not None})]
    else:
        groups = [[i for i, p in enumerate(places) if p.kind in ("shape-keeping", "transition")]]
    picked = []
    for members in groups:
        n = min(count, len(members))
        picked += [members[int((j + 0.5) * len(members) / n)] for j in range(n)]
    return sorted(picked)


def unit_rates(norms: list[np.ndarray]) -> np.ndarray:
    """(units, N) per-example growth across each unit towards the input: entry l is
    ||dz/dh_l|| / ||dz/dh_{l+1}|| (h_l: unit l's input), from the norms at every unit input
    and, last, at the head's input (so `norms` has one more entry than there are ratios)."""
    v = np.asarray(norms, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return v[:-1] / v[1:]


def stage_rates(places: list[UnitPlace], norms: list[np.ndarray]) -> dict:
    """Per-stage bulk rates and transition rates of ||dz/dh|| from `norms` (per unit input,
    (N,) each): `{"stages": [{"stage", "units", "rate", "rate_per_example"}], "transitions":
    [{"unit", "stage", "rate", "rate_per_example"}]}`. A stage's rate is the geometric mean
    over its shape-keeping units of their per-unit rates, per example, then the median over
    examples; a transition's is its own rate. Rates > 1: the gradient grows towards the input."""
    ratios = unit_rates(norms)  # ratios[l]: across unit l (stem .. last unit before the head)
    stages, transitions = [], []
    for stage in sorted({p.stage for p in places if p.stage is not None}):
        members = [i for i, p in enumerate(places) if p.stage == stage and p.kind == "shape-keeping"]
        if members:
            with np.errstate(divide="ignore", invalid="ignore"):
                per_example = np.exp(np.mean(np.log(ratios[members]), axis=0))
            stages.append({"stage": stage, "units": [places[i].name for i in members],
                           "rate": float(np.median(per_example)), "rate_per_example": per_example.tolist()})
    for i, p in enumerate(places):
        if p.kind == "transition":
            transitions.append({"unit": p.name, "stage": p.stage, "rate": float(np.median(ratios[i])),
                                "rate_per_example": ratios[i].tolist()})
    return {"stages": stages, "transitions": transitions}
