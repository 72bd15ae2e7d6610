"""The model registry: every zoo variant is an entry (a builder partial plus its card).

    >>> model = jaxres.create_model("cifar_resnet56")           # He et al. 2015, 0.85M
    >>> model = jaxres.create_model("resnet50", num_classes=10)
    >>> model = jaxres.create_model("cifar_plain56", activation="tanh", norm="none")
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import inspect
from typing import Callable

from jaxres.choices import closest_names
from jaxres.models import complexity
from jaxres.models.layers import check_num_classes_or_features
from jaxres.models.resnet import ResNet, cifar_resnet, imagenet_resnet
from jaxres.models.units import UnitModel
from jaxres.models.vgg import VGG, cifar_vgg, vgg

HE2015 = "He et al. 2015, Deep Residual Learning (arXiv 1512.03385)"
HE2016 = "He et al. 2016, Identity Mappings in Deep Residual Networks (arXiv 1603.05027)"
VGG2014 = "Simonyan & Zisserman 2014, Very Deep Convolutional Networks (arXiv 1409.1556)"


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What a registry entry is: how to build it and what it is for."""

    name: str
    family: str
    builder: Callable[..., UnitModel]
    input_size: int  # default square input side, NHWC
    num_classes: int  # default number of classes
    paper: str
    note: str = ""

    @property
    def model_cls(self) -> type[UnitModel]:
        return VGG if self.family.endswith("vgg") else ResNet

    def build(self, **overrides) -> UnitModel:
        overrides.setdefault("num_classes", self.num_classes)
        return self.builder(**overrides)

    @functools.cached_property
    def abstract_variables(self):
        """Shapes and dtypes of the default model's variables (nothing allocated)."""
        return complexity.abstract_variables(self.build(), self.input_size)

    @functools.cached_property
    def params(self) -> int:
        """Trainable parameters at the default number of classes."""
        return complexity.count_params(self.abstract_variables)

    @functools.cached_property
    def macs(self) -> int:
        """Multiply-accumulates per example at the default input size."""
        return complexity.count_macs(self.build(), self.input_size, self.abstract_variables)


_REGISTRY: dict[str, ModelCard] = {}


def register(name, family, builder, input_size, num_classes, paper, note=""):
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = ModelCard(name, family, builder, input_size, num_classes, paper, note)


for _depth in (11, 13, 16, 19):
    register(f"vgg{_depth}", "vgg", functools.partial(vgg, _depth), 224, 1000, VGG2014, "torchvision layout")
    register(f"vgg{_depth}_bn", "vgg", functools.partial(vgg, _depth, batch_norm=True), 224, 1000, VGG2014,
             "torchvision layout, BatchNorm")
    register(f"cifar_vgg{_depth}", "cifar_vgg", functools.partial(cifar_vgg, _depth, batch_norm=False), 32, 10,
             VGG2014, "CIFAR layout: 1x1 pool, one linear layer")
    register(f"cifar_vgg{_depth}_bn", "cifar_vgg", functools.partial(cifar_vgg, _depth), 32, 10, VGG2014,
             "CIFAR layout, BatchNorm")

for _depth in (18, 34, 50, 101, 152):
    register(f"resnet{_depth}", "resnet", functools.partial(imagenet_resnet, _depth), 224, 1000, HE2015,
             "torchvision v1.5, option B")
    register(f"preact_resnet{_depth}", "preact_resnet", functools.partial(imagenet_resnet, _depth, preact=True),
             224, 1000, HE2016, "pre-activation, option B")
for _depth in (18, 34):
    register(f"plain{_depth}", "plain", functools.partial(imagenet_resnet, _depth, residual=False), 224, 1000,
             HE2015, "plain twin of resnet")

for _depth in (20, 32, 44, 56, 110, 1202):
    register(f"cifar_resnet{_depth}", "cifar_resnet", functools.partial(cifar_resnet, _depth), 32, 10, HE2015,
             "option A")
for _depth in (20, 32, 44, 56, 110):
    register(f"cifar_plain{_depth}", "cifar_plain", functools.partial(cifar_resnet, _depth, residual=False), 32,
             10, HE2015, "plain twin of cifar_resnet")
register("preact_resnet110", "cifar_preact_resnet",
         functools.partial(cifar_resnet, 110, preact=True, shortcut="B"), 32, 10, HE2016, "CIFAR, basic blocks")
for _depth in (164, 1001):
    register(f"preact_resnet{_depth}", "cifar_preact_resnet",
             functools.partial(cifar_resnet, _depth, block="bottleneck", preact=True, shortcut="B"), 32, 10,
             HE2016, "CIFAR, bottleneck blocks")


def model_names(filter: str | None = None) -> list[str]:
    """Registry names, in registry order; `filter` selects a family ("vgg", "resnet",
    "cifar_plain", ...) or, when it holds a wildcard (`*`, `?`, `[`), the names matching it as
    a shell pattern ("resnet*", "*vgg16*"). The public listing is `jaxres.list_models`, which
    adds `pretrained=True` (the names with published weights) on top of this one."""
    if filter is not None and any(c in filter for c in "*?["):
        return [name for name in _REGISTRY if fnmatch.fnmatchcase(name, filter)]
    families = {card.family for card in _REGISTRY.values()}
    if filter is not None and filter not in families:
        raise ValueError(
            f"unknown family {filter!r}{closest_names(filter, families)} (valid: {', '.join(sorted(families))}; "
            f"or a pattern such as 'resnet*')"
        )
    return [name for name, card in _REGISTRY.items() if filter in (None, card.family)]


def model_card(name: str) -> ModelCard:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"unknown model {name!r}{closest_names(name, _REGISTRY)}; "
            f"jaxres.list_models() (or `jaxres models`) lists all {len(_REGISTRY)}"
        )
    return _REGISTRY[name]


def create_model(name: str, *, num_classes: int | None = None, **overrides) -> UnitModel:
    """Builds the registry entry `name` with any field of its model class overridden.

    Overrides are the model dataclass's fields (`activation`, `norm`, `kernel_init`,
    `residual`, `shortcut`, `zero_init_residual`, `dtype`, ...); `depth` of the CIFAR
    ResNets is fixed by the name: pick another entry instead. Flax modules hold no
    parameters: for a model with pretrained weights use `jaxres.pretrained(name, weights)`,
    which returns `(model, variables)`.
    """
    if "weights" in overrides:
        raise TypeError(
            f"create_model builds a model without weights; for pretrained weights use "
            f"model, variables = jaxres.pretrained({name!r}, {overrides['weights']!r})"
        )
    card = model_card(name)
    valid = _override_names(card)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        hints = "".join(closest_names(u, valid) for u in unknown)
        raise TypeError(
            f"{name} got unknown override(s) {', '.join(unknown)}{hints}; valid overrides: {', '.join(sorted(valid))}"
        )
    if num_classes is not None:
        check_num_classes_or_features(num_classes)
        overrides["num_classes"] = num_classes
    return card.build(**overrides)


def _override_names(card: ModelCard) -> set[str]:
    fields = {f.name for f in dataclasses.fields(card.model_cls)} - {"parent", "name"}
    fixed = set(card.builder.keywords) | set(inspect.signature(card.builder.func).parameters)
    # the structure keywords set by the entry itself are what makes it this entry
    structural = {"stage_sizes", "block", "stem", "widths", "layers", "preact", "depth", "batch_norm"}
    return (fields | fixed) - structural - {"config"}
