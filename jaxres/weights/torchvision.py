"""torchvision VGG/ResNet state_dicts -> jaxres Flax variables, exactly.

The conversion is a table: regex rules map each torchvision *module* name to a Flax module
path and a layer kind, and per-kind leaf rules map each tensor (`weight`, `running_mean`, ...)
to a Flax collection/leaf with its layout transform:

    conv    OIHW -> HWIO kernel                       (torch.nn.Conv2d)
    bn      weight/bias -> params scale/bias,          (torch.nn.BatchNorm2d; the counter
            running_mean/var -> batch_stats mean/var    num_batches_tracked is dropped)
    linear  (out, in) -> (in, out) kernel             (torch.nn.Linear)
    linear_nchw  VGG's first classifier layer: torch flattens the NCHW map (index c*P*P +
            h*P + w), jaxres the NHWC map (index (h*P + w)*C + c); its input rows are reordered.

Every tensor's shape is checked against the model's abstract variables before anything is
converted; all problems (missing, unexpected, wrong shape) are collected and reported in one
`ConversionError`, never a partial load. BatchNorm epsilon (1e-5) and the torch momentum 0.1
(Flax 0.9) are already the zoo's defaults, so the converted model computes torchvision's
function: tests/test_torchvision_parity.py checks logits and every unit boundary.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util

from jaxres.models import ResNet, VGG, create_model
from jaxres.models.complexity import abstract_variables
from jaxres.models.resnet import IMAGENET_DEPTHS
from jaxres.models.units import UnitModel
from jaxres.models.vgg import VGG_LAYERS
from jaxres.weights.head import fresh_classifier, warn_fresh_classifier
from jaxres.weights.state_dict import identify, to_numpy, unwrap_state_dict

FlatVariables = dict[tuple[str, ...], Any]


class ConversionError(ValueError):
    """A state_dict that does not fit the model; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """A torchvision module name (full regex match) -> Flax module path and layer kind.

    `target` and `kind` are format strings over the match's named groups and the fields the
    family's layout derives from them (`unit`, `layer`, `kind`).
    """

    pattern: str
    target: str
    kind: str


RESNET_RULES = (
    Rule(r"conv1", "stem/conv1", "conv"),
    Rule(r"bn1", "stem/norm1", "bn"),
    Rule(r"layer(?P<stage>\d+)\.(?P<block>\d+)\.conv(?P<j>[123])", "{unit}/conv{j}", "conv"),
    Rule(r"layer(?P<stage>\d+)\.(?P<block>\d+)\.bn(?P<j>[123])", "{unit}/norm{j}", "bn"),
    Rule(r"layer(?P<stage>\d+)\.(?P<block>\d+)\.downsample\.0", "{unit}/proj_conv", "conv"),
    Rule(r"layer(?P<stage>\d+)\.(?P<block>\d+)\.downsample\.1", "{unit}/proj_norm", "bn"),
    Rule(r"fc", "head/fc", "linear"),
)

VGG_RULES = (
    Rule(r"features\.(?P<index>\d+)", "{unit}/{layer}", "{kind}"),
    Rule(r"classifier\.(?P<index>\d+)", "head/{layer}", "{kind}"),
)


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change: `torch_shape(flax_shape)` for the shape check, `apply` to convert."""

    torch_shape: Callable[[tuple[int, ...], int], tuple[int, ...]]
    apply: Callable[[np.ndarray, tuple[int, ...], int], np.ndarray]
    layout: str = ""  # named in shape-mismatch messages


def transpose_2d(a: np.ndarray, block: int = 512) -> np.ndarray:
    """a.T as a C-contiguous array, copied in cache-sized tiles: several times faster than
    numpy's own strided copy on VGG's 4096 x 25088 matrix."""
    out = np.empty(a.shape[::-1], a.dtype)
    for i in range(0, a.shape[0], block):
        for j in range(0, a.shape[1], block):
            out[j : j + block, i : i + block] = a[i : i + block, j : j + block].T
    return out


def _nchw_rows_to_nhwc(a, flax_shape, channels):
    # (out, C*P*P) -> rows in NCHW order (C*P*P, out) -> rows in NHWC order (P*P*C, out);
    # the row permutation moves whole contiguous rows.
    positions = flax_shape[0] // channels
    return transpose_2d(a).reshape(channels, positions, -1).transpose(1, 0, 2).reshape(flax_shape)


SAME = Transform(lambda s, c: s, lambda a, s, c: a)
CONV = Transform(lambda s, c: (s[3], s[2], s[0], s[1]), lambda a, s, c: a.transpose(2, 3, 1, 0), " (OIHW)")
LINEAR = Transform(lambda s, c: (s[1], s[0]), lambda a, s, c: transpose_2d(a), " (out, in)")
LINEAR_NCHW = Transform(lambda s, c: (s[1], s[0]), _nchw_rows_to_nhwc, " (out, in), NCHW-flattened input")

DROPPED = None  # a torch tensor with no Flax counterpart, consumed without a copy

# kind -> torch leaf -> (Flax collection, Flax leaf, transform)
LEAVES = {
    "conv": {"weight": ("params", "kernel", CONV), "bias": ("params", "bias", SAME)},
    "bn": {
        "weight": ("params", "scale", SAME),
        "bias": ("params", "bias", SAME),
        "running_mean": ("batch_stats", "mean", SAME),
        "running_var": ("batch_stats", "var", SAME),
        # BatchNorm (jaxres.models.batchnorm, Flax's variables) keeps no step counter; torch reads it only when momentum=None.
        "num_batches_tracked": DROPPED,
    },
    "linear": {"weight": ("params", "kernel", LINEAR), "bias": ("params", "bias", SAME)},
    "linear_nchw": {"weight": ("params", "kernel", LINEAR_NCHW), "bias": ("params", "bias", SAME)},
}


class ResNetLayout:
    """torchvision's `layer{stage}.{block}` -> jaxres `unit_k`, numbered from 1 across stages."""

    rules = RESNET_RULES

    def __init__(self, model: ResNet):
        self.stage_sizes = tuple(model.stage_sizes)
        self.channels = 0  # no NCHW flatten in a ResNet

    def fields(self, groups: dict[str, str]) -> dict[str, str]:
        if "stage" not in groups:
            return groups
        stage, block = int(groups["stage"]), int(groups["block"])
        if not 1 <= stage <= len(self.stage_sizes) or block >= self.stage_sizes[stage - 1]:
            sizes = ", ".join(map(str, self.stage_sizes))
            raise LookupError(f"the model has no layer{stage}.{block} (its stages have {sizes} blocks)")
        return {**groups, "unit": f"unit_{1 + sum(self.stage_sizes[: stage - 1]) + block}"}


class VGGLayout:
    """Indices of torchvision's `features`/`classifier` Sequentials -> jaxres units and layers."""

    rules = VGG_RULES

    def __init__(self, model: VGG):
        self.features: dict[int, dict[str, str]] = {}
        index, conv = 0, 0
        for width in model.layers:
            if width == "M":  # MaxPool2d
                index += 1
                continue
            unit = "stem" if conv == 0 else f"unit_{conv}"
            self.features[index] = {"unit": unit, "layer": "conv", "kind": "conv"}
            if model.norm == "batchnorm":  # Conv2d, BatchNorm2d, ReLU
                self.features[index + 1] = {"unit": unit, "layer": "norm", "kind": "bn"}
                index += 3
            else:  # Conv2d, ReLU
                index += 2
            conv += 1
            self.channels = width
        # Linear, ReLU, Dropout per hidden layer, then the last Linear.
        n_fc = len(model.classifier_widths) + 1
        self.classifier = {
            3 * i: {"layer": f"fc{i + 1}", "kind": "linear_nchw" if i == 0 else "linear"} for i in range(n_fc)
        }

    def fields(self, groups: dict[str, str]) -> dict[str, str]:
        table = self.features if "features" in groups["_module"] else self.classifier
        index = int(groups["index"])
        if index not in table:
            raise LookupError(f"the model has no weight layer at {groups['_module']} (a ReLU, pool or dropout, or too deep)")
        return {**groups, **table[index]}


def layout_for(model: UnitModel):
    """The name layout of the torchvision twin of `model`, or a ValueError if it has none."""
    if isinstance(model, VGG):
        return VGGLayout(model)
    if isinstance(model, ResNet) and model.stem == "imagenet" and not model.preact and not model.stride_in_1x1:
        return ResNetLayout(model)
    raise ValueError(
        f"torchvision has no counterpart of this {type(model).__name__} (torchvision's ResNets are "
        f"post-activation, v1.5 strides, ImageNet stem); convertible models: "
        f"{', '.join(convertible_models())}"
    )


def convertible_models() -> list[str]:
    """Registry names with a torchvision twin: vgg11..vgg19(_bn), resnet18..resnet152."""
    return [f"vgg{d}{bn}" for d in VGG_LAYERS for bn in ("", "_bn")] + [f"resnet{d}" for d in IMAGENET_DEPTHS]


def _resolve_model(model: str | UnitModel, num_classes: int | None) -> tuple[UnitModel, str]:
    if isinstance(model, str):
        return create_model(model, num_classes=num_classes), model
    if isinstance(model, UnitModel):
        if num_classes is not None and num_classes != model.num_classes:
            raise ValueError(
                f"num_classes={num_classes} disagrees with the model's num_classes={model.num_classes}; "
                f"pass one of them"
            )
        return model, type(model).__name__
    raise TypeError(f"model must be a registry name or a jaxres model, got {type(model).__name__}")


def _target(layout, module: str) -> tuple[tuple[str, ...], str]:
    for rule in layout.rules:
        match = re.fullmatch(rule.pattern, module)
        if match:
            fields = layout.fields({**match.groupdict(), "_module": module})
            return tuple(rule.target.format(**fields).split("/")), rule.kind.format(**fields)
    raise LookupError("matches no rule of the torchvision layout")


def _report(name: str, missing, unexpected, wrong_shape, found: str | None) -> str:
    def section(title, lines, limit=12):
        more = f"\n    ... and {len(lines) - limit} more" if len(lines) > limit else ""
        return f"\n  {title} ({len(lines)}):\n    " + "\n    ".join(lines[:limit]) + more if lines else ""

    counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} wrong shape"
    hint = ""
    if found is not None and found != name:
        hint = f"\n  the state_dict looks like torchvision's {found}: convert it as model={found!r}"
    return (
        f"state_dict does not fit {name} ({counts}); nothing was converted"
        + hint
        + section("missing (jaxres variables with no tensor)", missing)
        + section("unexpected (tensors with no jaxres variable)", unexpected)
        + section("wrong shape", wrong_shape)
    )


@dataclasses.dataclass(frozen=True)
class Step:
    """How one torchvision tensor becomes one Flax leaf."""

    flax_key: tuple[str, ...]
    transform: Transform
    shape: tuple[int, ...]  # the Flax leaf's shape
    dtype: Any


@dataclasses.dataclass(frozen=True)
class Plan:
    """The checked conversion of one state_dict: a Step per tensor (dropped ones omitted)."""

    steps: dict[str, Step]
    channels: int  # channels of VGG's flattened feature map
    fresh_head: tuple[str, ...] | None  # the last layer to initialize afresh, if classes differ
    weights_classes: int | None


def plan_conversion(shapes: Mapping[str, tuple[int, ...]], model: str | UnitModel, *,
                    num_classes: int | None = None) -> Plan:
    """Matches torchvision tensor names/shapes to the model's variables without touching data.

    Raises `ConversionError` listing every missing, unexpected and wrong-shape tensor.
    """
    model, name = _resolve_model(model, num_classes)
    layout = layout_for(model)
    expected: FlatVariables = traverse_util.flatten_dict(abstract_variables(model, 32))
    head = model.classifier_path()
    # num_classes=0 (pooled features, no classifier): the weights' classifier is left out
    classes = expected[("params", *head, "kernel")].shape[1] if model.num_classes else None

    steps: dict[str, Step] = {}
    missing, unexpected, wrong_shape = [], [], []
    misfits = set()  # variables reported under "wrong shape", not again under "missing"
    weights_classes = None  # set when the weights' last layer has another number of classes
    for key, shape in shapes.items():
        shape = tuple(shape)
        module, _, leaf = key.rpartition(".")
        try:
            path, kind = _target(layout, module)
        except LookupError as reason:
            unexpected.append(f"{key}: {reason}")
            continue
        if leaf not in LEAVES[kind]:
            unexpected.append(f"{key}: a {kind} layer has no {leaf!r}")
            continue
        if LEAVES[kind][leaf] is DROPPED:
            continue
        collection, flax_leaf, transform = LEAVES[kind][leaf]
        flax_key = (collection, *path, flax_leaf)
        if classes is None and path == head:
            continue
        if flax_key not in expected:
            unexpected.append(f"{key}: the model has no {'/'.join(flax_key)}")
            continue
        want = expected[flax_key]
        torch_shape = transform.torch_shape(tuple(want.shape), layout.channels)
        if path == head and len(shape) == len(torch_shape) and shape[0] != classes and shape[1:] == torch_shape[1:]:
            weights_classes = shape[0]  # another number of classes: a fresh last layer
            continue
        if shape != torch_shape:
            wrong_shape.append(f"{key} is {shape}, {'/'.join(flax_key)} needs {torch_shape}{transform.layout}")
            misfits.add(flax_key)
            continue
        steps[key] = Step(flax_key, transform, tuple(want.shape), want.dtype)

    converted = {step.flax_key for step in steps.values()}
    fresh = {k for k in expected if k[1:-1] == head} if weights_classes else set()
    missing = ["/".join(k) for k in expected if k not in converted | fresh | misfits]
    if missing or unexpected or wrong_shape:
        raise ConversionError(_report(name, missing, unexpected, wrong_shape, identify(shapes)))
    return Plan(steps, layout.channels, head if weights_classes else None, weights_classes)


def from_torchvision(
    state_dict: Mapping[str, Any],
    model: str | UnitModel,
    *,
    num_classes: int | None = None,
    rng: jax.Array | None = None,
) -> dict[str, dict]:
    """Flax variables {"params", "batch_stats"} for `model` from a torchvision state_dict.

    `state_dict`: torch tensors or numpy arrays by torchvision name (`model.state_dict()`, the
    contents of a torchvision `.pth` or a safetensors file; see `read_state_dict`).
    `model`: a registry name (vgg11..vgg19[_bn], resnet18..resnet152) or a jaxres model.
    `num_classes`: when it differs from the weights' (1000 for ImageNet), the backbone and
    VGG's hidden classifier layers are loaded and the last linear layer is freshly
    initialized from `rng` (default `jax.random.key(0)`), with a warning saying so; a model
    with `num_classes=0` (pooled features) gets everything but the classifier.
    Arrays are cast to the model's `param_dtype`; the result has the model's exact tree.
    Raises `ConversionError` listing every missing, unexpected and wrong-shape tensor.
    """
    model, name = _resolve_model(model, num_classes)
    tensors = {key: to_numpy(value) for key, value in unwrap_state_dict(state_dict).items()}  # views, no copies
    plan = plan_conversion({key: array.shape for key, array in tensors.items()}, model)
    converted = {}
    for key, step in plan.steps.items():
        source = tensors[key]
        array = np.ascontiguousarray(step.transform.apply(source, step.shape, plan.channels), dtype=step.dtype)
        if np.may_share_memory(array, source):
            # tensor.numpy() shares torch's memory and device_put on CPU may share numpy's: without
            # a copy, a later in-place update of the torch model (a train step) would change the
            # "immutable" jax arrays too.
            array = array.copy()
        converted[step.flax_key] = jax.device_put(array)
    if plan.fresh_head is not None:
        fresh = fresh_classifier(model, jax.random.key(0) if rng is None else rng)
        converted.update({("params", *plan.fresh_head, leaf): value for leaf, value in fresh.items()})
        warn_fresh_classifier(name, "a torchvision state_dict", plan.weights_classes, model)
    return traverse_util.unflatten_dict(converted)
