"""A model as a chain of per-unit pure functions, built only from the unit interface.

`model.apply(v, h, start=u, stop=u)` runs one unit; this module wraps it into functions of
`(unit_variables, h)` and shares compiled code between units that compute the same thing.
Two units are the *same computation* when their traced jaxprs are identical (same ops, same
shapes, parameters passed as arguments) - a black-box test that needs no knowledge of the
model's internals. A cifar_resnet110 has 56 units but only 7 distinct computations, so the
analysis compiles 7 small functions instead of one 110-layer graph, and the compile cost no
longer grows with depth (about 10 s -> 1 s on a laptop CPU for the whole pipeline).

BatchNorm policy (`bn`):
- "eval": running statistics; every unit maps each example separately, so Jacobians are
  per example (block diagonal over the batch).
- "batch": batch statistics as in training (`train=True`); a unit maps the whole batch and
  its Jacobian has cross-example blocks. Dropout, where a model has it, runs with a fixed key.

Chaining the per-unit VJPs from the logits back to the input is exactly one reverse-mode
pass through the model, cut at the unit boundaries.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxres.choices import pick
from jaxres.models.layers import ACTIVATIONS, perturbation_name, probe_name

BN_POLICIES = {"eval": False, "batch": True}  # policy -> `train` flag of model.apply
# Unit ops are small (one block at a small batch) and the study is compile-bound: XLA's
# backend optimization level 0 compiles faster (a basic block's backward op at batch 4,
# bn="batch": 0.40 s instead of 0.53 s) for slower code (19 ms instead of 7.7 ms per call),
# measured on the 2-core CPU. The default level would pay off for the blocks repeated along a
# stage, but it changes float rounding, and the deep plain BN-batch nets amplify rounding
# chaotically (cifar_plain110, BN-batch ReLU: 14% on d logits/d x, 1% on the loss), so the
# study keeps one level for all of its numbers.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
_DROPOUT_KEY = 0


def check_bn(bn: str) -> bool:
    """The `train` flag for a BatchNorm policy, or a ValueError naming the valid ones."""
    return pick("BatchNorm policy (bn)", bn, BN_POLICIES)


def unit_variables(variables, name: str) -> dict:
    """The collections of `variables` that belong to unit `name`, keyed without the name."""
    return {col: tree[name] for col, tree in variables.items() if isinstance(tree, dict) and name in tree}


def apply_unit(model, name: str, bn: str, cvars: dict, h, perturbations=None, capture: bool = False):
    """Applies unit `name` of `model` to the NHWC batch `h`.

    `cvars` are the unit's variables without the unit name (see `unit_variables`);
    `perturbations` (optional) is `{"inner": {probe: zeros}, "out": zeros}` for the unit's
    layer probes and its output probe. Returns the unit output, or `(output, {probe: value})`
    for the layer probes inside the unit when `capture`.
    """
    train = check_bn(bn)
    variables = {col: {name: sub} for col, sub in cvars.items()}
    if perturbations is not None:
        pert = {}
        if perturbations.get("inner"):
            pert[name] = {perturbation_name(k): v for k, v in perturbations["inner"].items()}
        if perturbations.get("out") is not None:
            pert[perturbation_name(f"out_{name}")] = perturbations["out"]
        variables["perturbations"] = pert
    mutable = (["batch_stats"] if train and "batch_stats" in cvars else []) + (["intermediates"] if capture else [])
    rngs = {"dropout": jax.random.key(_DROPOUT_KEY)} if train else None
    result = model.apply(variables, h, train, start=name, stop=name, probes=True, mutable=mutable or False,
                         rngs=rngs)
    out, state = result if mutable else (result, {})
    if not capture:
        return out
    sown = state.get("intermediates", {}).get(name, {})
    return out, {probe: value[0] for probe, value in sown.items()}


def trace_unit(model, name: str, bn: str, cvars: dict, h) -> tuple:
    """One trace of unit `name` on the abstract NHWC batch `h`, its layer probes creating
    their zero perturbations: `(jaxpr, out ShapeDtypeStruct, zero perturbations
    {"inner": {probe: zeros}, "out": zeros | None})`. The jaxpr identifies the computation
    (see `SegmentCache`); one trace serves both, tracing being a large share of the study."""
    train = check_bn(bn)
    mutable = ["perturbations"] + (["batch_stats"] if train and "batch_stats" in cvars else [])
    rngs = {"dropout": jax.random.key(_DROPOUT_KEY)} if train else None

    def apply(cv, x):
        variables = {col: {name: sub} for col, sub in cv.items()}
        out, state = model.apply(variables, x, train, start=name, stop=name, probes=True, mutable=mutable,
                                 rngs=rngs)
        return out, state.get("perturbations", {})

    jaxpr, (out, shapes) = jax.make_jaxpr(apply, return_shape=True)(cvars, h)
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    inner = {probe_name(k): zeros(s) for k, s in shapes.get(name, {}).items()}
    out_probe = shapes.get(perturbation_name(f"out_{name}"))
    return jaxpr, out, {"inner": inner, "out": None if out_probe is None else zeros(out_probe)}


@dataclasses.dataclass
class UnitOps:
    """Jit-compiled operations of one distinct unit computation; `fn(cvars, pert, h) -> out`."""

    fn: Callable
    capture_fn: Callable
    ops: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        # A stable function of (params, h) with params = (cvars, pert), for the Jacobian
        # routines, which cache compiled code per function object.
        self.map = lambda params, h: self.fn(params[0], params[1], h)

    def op(self, kind: str, build: Callable[[Callable, Callable], Callable], compiler_options=None) -> Callable:
        """The compiled op `kind`, built once per distinct unit by `build(fn, capture_fn)`;
        `compiler_options` for XLA (default `COMPILER_OPTIONS`; `{}`: XLA's defaults, for
        analyses whose run time outweighs their compile time)."""
        if kind not in self.ops:
            options = COMPILER_OPTIONS if compiler_options is None else compiler_options
            self.ops[kind] = jax.jit(build(self.fn, self.capture_fn), compiler_options=options)
        return self.ops[kind]


def last_probe_name(probes: dict) -> str:
    """The name of a unit's last weight layer's probe (`layerK` with the largest K)."""
    if not probes:
        raise ValueError("this unit has no layer probes (layer1, layer2, ...)")
    return max(probes, key=lambda name: int(name.removeprefix("layer") or 0))


def last_probe(probes: dict):
    """The value of the last weight layer's probe (`layerK` with the largest K) of a unit."""
    return probes[last_probe_name(probes)]


def identity_unit(out, pre) -> bool:
    """True when a unit's output is act(h + branch) or h + branch on this batch for one of
    the zoo's activations, `pre` being h + (last layer probe): the identity-shortcut units,
    recognized from the outside."""
    if pre is None:
        return False
    candidates = [lambda y: y, *ACTIVATIONS.values()]
    return any(bool(jnp.allclose(out, act(pre), rtol=1e-4, atol=1e-5)) for act in candidates)


@dataclasses.dataclass
class Segment:
    """One unit of a model: its name, its variables/perturbations (unit name removed), its
    NHWC input and output shapes, the BatchNorm policy it was traced for, and its ops."""

    name: str
    cvars: dict
    pert: dict
    in_shape: tuple
    out_shape: tuple
    ops: UnitOps
    bn: str = "eval"

    @property
    def keeps_shape(self) -> bool:
        """Input and output have the same shape (not a stride-2/widening transition, the stem or the head)."""
        return self.in_shape == self.out_shape

    def op(self, kind: str, build, compiler_options=None) -> Callable:
        return self.ops.op(kind, build, compiler_options)

    @property
    def params(self):
        """`(cvars, pert)`: the argument of `self.ops.map` and friends."""
        return (self.cvars, self.pert)


class SegmentCache:
    """Shares `UnitOps` (and so compiled code) between units whose jaxprs are identical."""

    def __init__(self):
        self._ops: dict[Any, UnitOps] = {}

    def __len__(self) -> int:
        return len(self._ops)

    def segments(self, model, variables, x_shape, bn: str = "eval", dtype=jnp.float32) -> list[Segment]:
        """The model as a list of `Segment`s, stem to head, for inputs of NHWC shape `x_shape`."""
        check_bn(bn)
        h = jax.ShapeDtypeStruct(tuple(x_shape), dtype)
        segments = []
        for name in model.unit_names():
            cvars = unit_variables(variables, name)
            jaxpr, out, pert = trace_unit(model, name, bn, cvars, h)

            def fn(cv, p, x, _name=name):
                return apply_unit(model, _name, bn, cv, x, p)

            def capture_fn(cv, x, _name=name):
                return apply_unit(model, _name, bn, cv, x, capture=True)

            key = (jax.tree.structure((cvars, pert)), str(jaxpr))
            ops = self._ops.setdefault(key, UnitOps(fn, capture_fn))
            segments.append(Segment(name, cvars, pert, tuple(h.shape), tuple(out.shape), ops, bn))
            h = jax.ShapeDtypeStruct(out.shape, out.dtype)
        return segments


def find_segment(segments: list[Segment], name: str) -> Segment:
    names = [s.name for s in segments]
    return segments[pick("unit", name, {n: i for i, n in enumerate(names)})]
