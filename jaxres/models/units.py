"""The unit interface: every jaxres model is `stem -> unit_1 -> ... -> unit_K -> head`.

A *unit* is one residual block (or its plain twin) of a ResNet, or one conv layer
(+BN+activation, with a following max pool attached to its end) of a VGG. The analysis and
training code see models only through this interface:

- `unit_names(model)` -> ("stem", "unit_1", ..., "unit_K", "head");
- `model.apply(variables, x, capture=True)` -> (logits, {unit name: its output}), plus the
  head's features ("pre_logits"; VGG: "fc6", "fc7");
- `model.apply(variables, h, start="unit_3", stop="unit_7")` applies units 3..7 (inclusive)
  to the activation `h` (the output of unit_2), with the same variables;
- `model.stage_names()`: the units that end each resolution level (`stage_outputs`).

Composing ranges reproduces the full forward pass exactly (same ops, same order).
With `probes=True`, each weight layer's normalized output inside a unit (before the
activation or the residual addition) is a probe named `layer1`, `layer2`, ...; unit outputs
are probes named `out_<unit>` at the top level. See `layers.probe` for how the analysis
reads them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
from flax import linen as nn

from jaxres.choices import closest_names
from jaxres.models.conv import materialized_on_cpu
from jaxres.models.layers import probe
from jaxres.models.scan_layout import identical_runs, is_stacked, locate_run


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """One unit of a model: its name, a builder of its module, and its input channels."""

    name: str
    # functools.partial(ModuleClass, **fields): build(name=...) -> module called as module(x).
    # A partial, so that the class can be wrapped (nn.remat) and runs of identical units found
    # by comparing fields (scan_layout.identical_runs).
    build: functools.partial
    in_channels: int
    # 2x2/2 max pools the unit applies (VGG): each halves H and W, rounding down, and would
    # leave an empty map (NaN logits) on a smaller input; strided convs with padding cannot.
    halvings: int = 0

    def __post_init__(self):
        if not (isinstance(self.build, functools.partial) and isinstance(self.build.func, type)
                and issubclass(self.build.func, nn.Module)):
            raise TypeError(
                f"UnitSpec {self.name!r}: build must be functools.partial(ModuleClass, **fields), "
                f"got {self.build!r}"
            )


class UnitModel(nn.Module):
    """Base class: subclasses define `unit_specs()` and `stage_names()`; this class runs any
    range of the units.

    `scan_units` and `remat_units` change how the units execute, never the numbers:
    - `scan_units=True` runs each run of identical consecutive units with one `lax.scan`
      (bounded compile time for deep nets); it reads per-unit or stacked variables
      (`scan_layout`), and training states keep them stacked;
    - `remat_units=True` rematerializes each unit in the backward pass (`nn.remat` per unit,
      or `jax.checkpoint` of the scan body): activation memory of one unit instead of all of
      them, for about one more forward pass of compute.
    """

    scan_units: bool = dataclasses.field(default=False, kw_only=True)
    remat_units: bool = dataclasses.field(default=False, kw_only=True)
    # BatchNorm statistics synchronized over this mapped axis (data-parallel training sets it).
    bn_axis_name: str | None = dataclasses.field(default=None, kw_only=True)

    def unit_specs(self, train: bool, probes: bool = False) -> Sequence[UnitSpec]:
        """The units in order; `train` selects batch statistics and dropout in their builders,
        `probes` turns on their layer probes (`layers.probe`). The last unit is named "head"
        and its module returns `(output, {feature name: value})` ("pre_logits", ...)."""
        raise NotImplementedError

    def stage_names(self) -> tuple[str, ...]:
        """The unit that ends each stage (resolution level), for `stage_outputs`."""
        raise NotImplementedError

    def unit_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.unit_specs(False))

    def unit_range(self, start: str | None, stop: str | None) -> tuple[int, int]:
        """Indices [first, last] of the units from `start` to `stop`, both inclusive."""
        names = self.unit_names()

        def index(name, default):
            if name is None:
                return default
            if name not in names:
                raise ValueError(
                    f"unknown unit {name!r}{closest_names(name, names)}; this model's units are "
                    f"{names[0]}, {names[1]} ... {names[-2]}, {names[-1]} ({len(names)} in all)"
                )
            return names.index(name)

        first, last = index(start, 0), index(stop, len(names) - 1)
        if first > last:
            raise ValueError(f"start unit {start!r} comes after stop unit {stop!r}")
        return first, last

    @nn.compact
    def __call__(self, x, train: bool = False, *, start: str | None = None,
                 stop: str | None = None, capture: bool = False, probes: bool = False):
        """Applies units `start`..`stop` (inclusive; default: the whole model) to NHWC `x`.

        Returns the last unit's output, or `(output, {name: output})` with `capture`: every
        unit's output, and when the head runs, its features too ("pre_logits"; VGG: "fc6",
        "fc7"). `train=False` is the default: `train=True` uses batch statistics in
        BatchNorm (pass `mutable=["batch_stats"]`) and enables dropout (pass
        `rngs={"dropout": key}`). `probes=True` turns on the analysis probes (`layers.probe`):
        without it the 'intermediates' and 'perturbations' collections stay empty.
        """
        specs = self.unit_specs(train, probes)
        first, last = self.unit_range(start, stop)
        check_input(x, specs[first : last + 1], train)
        # Initialization creates every unit's variables, and probes and capture need each
        # unit traced on its own: only plain forward and training passes scan.
        scanning = self.scan_units and not (capture or probes or self.is_initializing())
        if not scanning and is_stacked(self.variables):
            raise ValueError(
                "these variables hold runs of identical units stacked (the scan_units training layout), "
                "which only the plain forward or training pass of a scan_units=True model reads; to "
                "capture outputs, read probes or run units one by one, convert them first with "
                "jaxres.models.unstack_identical_units(model, variables)"
            )
        outputs = {}
        groups = identical_runs(specs[first : last + 1]) if scanning else [[s] for s in specs[first : last + 1]]
        for group in groups:
            stored = self.stored_run(group) if scanning else None
            if len(group) > 1 or stored is not None:
                x = self.scan_units_run(group, x, train, stored)
                continue
            spec = group[0]
            x = self.unit_module(spec)(x)
            if spec.name == "head":  # the head also returns its features (pre-logits)
                x, features = x
                if capture:
                    outputs.update(features)
            else:
                x = probe(self, f"out_{spec.name}", materialized_on_cpu(x), probes)
            if capture:
                outputs[spec.name] = x
        return (x, outputs) if capture else x

    def unit_module(self, spec: UnitSpec) -> nn.Module:
        """The unit's module, rematerialized in the backward pass with `remat_units`."""
        if not self.remat_units:
            return spec.build(name=spec.name)
        return nn.remat(spec.build.func)(*spec.build.args, **spec.build.keywords, name=spec.name)

    def stored_run(self, group: Sequence[UnitSpec]) -> tuple[str, int] | None:
        """(key, offset of group[0]) of the stacked run holding `group`'s variables, if stored so."""
        if not is_stacked(self.variables):
            return None
        found = locate_run(self, [spec.name for spec in group])
        return found if found is not None and found[0] in self.variables.get("params", {}) else None

    def scan_units_run(self, group: Sequence[UnitSpec], x, train: bool, stored: tuple[str, int] | None):
        """Applies identical units with one `lax.scan` over their stacked variables, so XLA
        compiles one unit per run instead of hundreds (cifar_resnet1202 has runs of 199).
        Reads either layout (see `scan_layout`): the stacked one as stored (`stored` = its key
        and the offset of group[0], from `stored_run`), the per-unit one stacked here, per call."""
        names = [spec.name for spec in group]
        unit = group[0].build(parent=None)  # unbound: applied functionally to each slice
        key, offset = stored or (None, 0)
        n = len(names)
        if key is not None:
            stacked = {col: jax.tree.map(lambda a: a[offset : offset + n], tree[key])
                       for col, tree in self.variables.items() if key in tree}
        else:
            stacked = {
                col: jax.tree.map(lambda *leaves: jax.numpy.stack(leaves), *(tree[name] for name in names))
                for col, tree in self.variables.items() if all(name in tree for name in names)
            }

        def body(h, variables):
            if not train:
                return unit.apply(variables, h), None
            out, updates = unit.apply(variables, h, mutable=["batch_stats"])
            return out, updates.get("batch_stats")

        if self.remat_units:
            body = jax.checkpoint(body)  # keep one unit's activations per step, recompute the rest
        x, stats = jax.lax.scan(body, x, stacked)
        if stats and key is not None:
            old = self.variables["batch_stats"][key]
            self.put_variable("batch_stats", key, jax.tree.map(lambda a, s: a.at[offset : offset + n].set(s), old, stats))
        elif stats:
            for i, name in enumerate(names):
                self.put_variable("batch_stats", name, jax.tree.map(lambda s: s[i], stats))
        return x


def check_input(x, specs: Sequence[UnitSpec], train: bool) -> None:
    """Rejects inputs the units `specs` (a range, applied in order) cannot take, before any
    shape error deep inside XLA and before any NaN: shapes are static, so this runs at trace time."""
    spec = specs[0]
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"input to {spec.name!r} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"input to {spec.name!r} must be a 4-D NHWC batch (N, H, W, C), got shape "
            f"{tuple(x.shape)}; add a batch axis with x[None] for a single image"
        )
    if x.shape[-1] != spec.in_channels:
        hint = ""
        if x.shape[1] == spec.in_channels:
            hint = "; it looks like NCHW: pass x.transpose(0, 2, 3, 1)"
        raise ValueError(
            f"input to {spec.name!r} must have {spec.in_channels} channels in the last (NHWC) "
            f"axis, got shape {tuple(x.shape)}{hint}"
        )
    if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
        raise TypeError(
            f"input to {spec.name!r} must be floating point, got {x.dtype}; convert uint8 "
            f"images with x.astype(jnp.float32) / 255 and normalize"
        )
    halvings = sum(s.halvings for s in specs)
    if min(x.shape[1:3]) < 2**halvings:  # floor(h / 2**k) >= 1 exactly when h >= 2**k
        side = 2**halvings
        why = (f": its {halvings} max pools from {spec.name!r} to {specs[-1].name!r} halve H and W (rounding "
               f"down), and an empty map gives NaN logits" if halvings else "")
        raise ValueError(
            f"input to {spec.name!r} must be at least {side}x{side}{why}; got shape {tuple(x.shape)}; "
            f"resize or pad the images"
        )
    if train and x.shape[0] == 0:
        raise ValueError(
            f"train-mode apply needs a non-empty batch (BatchNorm statistics of 0 examples are NaN and "
            f"would overwrite batch_stats); got shape {tuple(x.shape)}; skip empty batches or use train=False"
        )


def unit_names(model: UnitModel) -> tuple[str, ...]:
    """("stem", "unit_1", ..., "head") for any zoo model."""
    return model.unit_names()


def unit_outputs(model: UnitModel, variables, x, train: bool = False, rngs=None):
    """(logits, {unit name: output}): the activations at every unit boundary.

    With `train=True` BatchNorm uses batch statistics (the updated statistics are dropped)
    and dropout needs `rngs={"dropout": key}`.
    """
    if not train:
        return model.apply(variables, x, False, capture=True)
    (logits, outputs), _ = model.apply(
        variables, x, True, capture=True, rngs=rngs, mutable=["batch_stats"]
    )
    return logits, outputs


def apply_units(model: UnitModel, variables, h, start: str, stop: str):
    """Applies units `start`..`stop` (inclusive) in eval mode to the activation `h`."""
    return model.apply(variables, h, False, start=start, stop=stop)


def stage_outputs(model: UnitModel, variables, x, out_indices: Sequence[int] | None = None,
                  train: bool = False, rngs=None) -> list:
    """The outputs of the stages `out_indices` (default: all) of `model` on the NHWC batch `x`,
    in that order: timm's `features_only` / `out_indices`, for detection or segmentation
    backbones. The units after the last stage asked for (and the head) do not run.

    Stage i ends at unit `model.stage_names()[i]`. ResNets: 0 is the stem (stride 4 on
    ImageNet, after its max pool; timm's level 0 is before the pool, at stride 2), 1..4 the
    four stages (strides 4, 8, 16, 32 on ImageNet). VGGs: the post-pool output of each max
    pool (strides 2, 4, 8, 16, 32). `train` as in `unit_outputs`.
    """
    stages = model.stage_names()
    indices = tuple(range(len(stages))) if out_indices is None else tuple(out_indices)
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(stages):
            raise ValueError(
                f"out_indices must be stage numbers 0..{len(stages) - 1} (this model's stages end at "
                f"{', '.join(stages)}); got {i!r} in {indices!r}"
            )
    if not indices:
        raise ValueError(f"out_indices is empty; pick from stages 0..{len(stages) - 1}")
    names = model.unit_names()
    stop = max((stages[i] for i in indices), key=names.index)
    if not train:
        _, outputs = model.apply(variables, x, False, stop=stop, capture=True)
    else:
        (_, outputs), _ = model.apply(variables, x, True, stop=stop, capture=True, rngs=rngs,
                                      mutable=["batch_stats"])
    return [outputs[stages[i]] for i in indices]
