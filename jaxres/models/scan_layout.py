"""Runs of identical units and their stacked variable layout, for `scan_units`.

A run is two or more consecutive units built alike (same block class and arguments, same input
channels), e.g. the 199 identical blocks of each cifar_resnet1202 stage; `scan_units` executes a
run as one `lax.scan` whose body sees one unit's variables.

Two layouts hold the same numbers:
- per unit (`unit_k`), what `init` creates and what the unit interface, the analysis and the
  weight converters use;
- stacked: each run's variables under one key `"unit_2..unit_200"`, every array with a new
  leading axis of the run's length. The training state of a `scan_units` model is kept this
  way, so that a step on a 1,000-layer net updates a few dozen arrays instead of thousands:
  XLA:CPU emits a kernel per array for the optimizer update, the gradient norm and the
  BatchNorm statistics, and compiling those dominated (cifar_resnet1202: 234 s of a 240 s
  compile, with the per-unit layout).

`stack_identical_units` / `unstack_identical_units` convert between them; `training_layout`
picks the one a model trains on.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

RUN_SEPARATOR = ".."


def identical_runs(specs: Sequence) -> list[list]:
    """Consecutive `UnitSpec`s built by the same class with the same fields, grouped."""
    def key(spec):
        return fields_key(spec.build), spec.in_channels

    groups: list[list] = []
    for spec in specs:
        if groups and key(groups[-1][0]) == key(spec):
            groups[-1].append(spec)
        else:
            groups.append([spec])
    return groups


def fields_key(value):
    """A comparable form of a unit's builder and its fields: partials (the conv and norm
    definitions, `functools.partial` objects that compare by identity) are compared by their
    function and arguments, so that units built alike match even when each got its own."""
    if isinstance(value, functools.partial):
        keywords = sorted(value.keywords.items(), key=lambda kv: kv[0])
        return (value.func, tuple(fields_key(a) for a in value.args),
                tuple((k, fields_key(v)) for k, v in keywords))
    return value


def run_key(names: Sequence[str]) -> str:
    """The stacked layout's key for a run: "first..last"."""
    return f"{names[0]}{RUN_SEPARATOR}{names[-1]}"


def stacked_runs(model) -> list[tuple[str, ...]]:
    """The unit names of every run of two or more identical units of `model`."""
    return [tuple(s.name for s in g) for g in identical_runs(model.unit_specs(False)) if len(g) > 1]


def is_stacked(variables: Mapping) -> bool:
    """Whether `variables` hold any run in the stacked layout."""
    return any(RUN_SEPARATOR in name for tree in variables.values() for name in tree)


def stack_identical_units(model, variables: Mapping) -> dict:
    """Per-unit layout -> stacked layout (runs already stacked are left as they are)."""
    out = {}
    for col, tree in variables.items():
        tree = dict(tree)
        for names in stacked_runs(model):
            if all(n in tree for n in names):
                tree[run_key(names)] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(tree.pop(n) for n in names))
        out[col] = tree
    return out


def unstack_identical_units(model, variables: Mapping) -> dict:
    """Stacked layout -> per-unit layout (a no-op on per-unit variables)."""
    out = {}
    for col, tree in variables.items():
        tree = dict(tree)
        for names in stacked_runs(model):
            stacked = tree.pop(run_key(names), None)
            if stacked is not None:
                for i, name in enumerate(names):
                    tree[name] = jax.tree.map(lambda a, i=i: a[i], stacked)
        out[col] = tree
    unknown = sorted(name for tree in out.values() for name in tree if RUN_SEPARATOR in name)
    if unknown:
        raise ValueError(
            f"stacked runs {unknown} are not runs of identical units of this model "
            f"(its runs: {[run_key(n) for n in stacked_runs(model)]}); pass the model the variables belong to"
        )
    return out


def training_layout(model, variables: Mapping) -> dict:
    """`variables` in the layout `model` trains on: stacked runs when it scans its units
    (`model.scan_units`), per unit otherwise."""
    if model.scan_units:
        return stack_identical_units(model, variables)
    return unstack_identical_units(model, variables)


def locate_run(model, names: Sequence[str]) -> tuple[str, int] | None:
    """(key of the whole run that holds the consecutive units `names`, offset of names[0]),
    or None when they are not in a run."""
    for run in stacked_runs(model):
        if names[0] in run:
            return run_key(run), run.index(names[0])
    return None
