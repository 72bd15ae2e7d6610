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


def sample_units(places: list[UnitPlace], per_stage: int) -> list[int]:
    """Indices of `per_stage` evenly spaced shape-keeping units of every stage (centred in
    the stage; all of them when it has fewer); `per_stage=0`: every unit."""
    if per_stage == 0:
        return list(range(len(places)))
    picked = []
    for stage in sorted({p.stage for p in places if p.stage is not None}):
        members = [i for i, p in enumerate(places) if p.stage == stage and p.kind == "shape-keeping"]
        count = min(per_stage, len(members))
        picked += [members[int((j + 0.5) * len(members) / count)] for j in range(count)]
    return sorted(set(picked))


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
