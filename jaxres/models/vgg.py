"""VGG (Simonyan & Zisserman 2014, arXiv 1409.1556) in torchvision's layout, and CIFAR VGGs.

A VGG is a config list (`64, 64, "M", ...`, torchvision's `cfgs`) read by one module.
Unit boundaries: `stem` is the first conv layer; each `unit_k` is one further conv layer
(conv3x3-[BN]-act); a max pool ("M") that follows a conv layer is attached to the *end* of that
layer's unit, so every boundary activation is post-pool. `head` is the adaptive average pool,
the NHWC flatten and the classifier. Probe `layer1` in each conv unit is its normalized
pre-activation output.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Sequence

import jax.numpy as jnp
from flax import linen as nn

from jaxres.models.layers import (
    adaptive_avg_pool,
    check_num_classes_or_features,
    check_sizes,
    pad,
    probe,
)
from jaxres.models.convnet import ConvNet
from jaxres.models.units import UnitSpec

ModuleDef = Any

# torchvision.models.vgg.cfgs, keyed by depth ("A", "B", "D", "E" in the paper's Table 1).
VGG_LAYERS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class ConvUnit(nn.Module):
    """conv3x3 (pad 1, with bias as in torchvision) - [BN] - act - [maxpool 2x2/2]."""

    features: int
    pool: bool
    conv: ModuleDef
    norm: ModuleDef | None
    act: Callable
    probes: bool = False  # see layers.probe

    @nn.compact
    def __call__(self, x):
        x = self.conv(self.features, (3, 3), 1, padding=pad(1), name="conv")(x)
        if self.norm is not None:
            x = self.norm(name="norm")(x)
        x = self.act(probe(self, "layer1", x, self.probes))
        return nn.max_pool(x, (2, 2), strides=(2, 2)) if self.pool else x


class Classifier(nn.Module):
    """Adaptive avg pool to pool_size^2 - flatten (NHWC order) - [Dense-act-Dropout]* - Dense.

    torchvision flattens NCHW; converted weights reorder the first Dense (weights issue).
    Init as torchvision: N(0, 0.01) weights, zero biases.

    Returns `(logits, features)`: `features["pre_logits"]` is what the last Dense reads, and
    each hidden Dense layer's activation is there under the paper's name (fc6, fc7; their
    parameters are fc1, fc2). With `num_classes=0` there is no last Dense and the "logits" are
    the pre-logits, in the compute dtype.
    """

    num_classes: int
    pool_size: int
    widths: Sequence[int]
    dropout: float
    train: bool
    act: Callable
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        x = adaptive_avg_pool(x, self.pool_size)
        x = x.reshape(x.shape[0], x.shape[1] * x.shape[2] * x.shape[3])  # not -1: N may be 0
        dense = functools.partial(
            nn.Dense,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        features = {}
        for i, width in enumerate(self.widths):
            x = features[f"fc{i + 6}"] = self.act(dense(width, name=f"fc{i + 1}")(x))
            x = nn.Dropout(self.dropout, deterministic=not self.train)(x)
        features["pre_logits"] = x
        if self.num_classes == 0:
            return x, features
        x = dense(self.num_classes, name=f"fc{len(self.widths) + 1}")(x)
        return x.astype(jnp.float32), features


class VGG(ConvNet):
    """One class for every VGG of the zoo. Defaults: torchvision's ImageNet VGG without BN.

    `num_classes=0`: no last linear layer; the model returns the classifier's last hidden
    activation (fc7, 4096 wide; with `classifier_widths=()` the flattened pooled features).
    """

    layers: Sequence[int | str]
    num_classes: int = 1000
    norm: str = "none"  # "batchnorm" for the *_bn variants
    pool_size: int = 7
    classifier_widths: Sequence[int] = (4096, 4096)
    dropout: float = 0.5

    def __post_init__(self):
        check_num_classes_or_features(self.num_classes)
        self.check_layer_fields("VGG")
        if not self.layers or self.layers[0] == "M" or any(
            not (v == "M" or (isinstance(v, int) and not isinstance(v, bool) and v > 0)) for v in self.layers
        ):
            raise ValueError(
                f"VGG layers must be positive conv widths or 'M', starting with a conv; got {self.layers!r}"
            )
        check_sizes("VGG", "pool_size", self.pool_size, "the side of the pooled map the classifier reads: 7 in "
                    "torchvision, 1 for CIFAR")
        check_sizes("VGG", "classifier_widths", self.classifier_widths, "hidden Dense layers, e.g. (4096, 4096), "
                    "or () for none", many=True, empty_ok=True)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0 <= self.dropout < 1:
            raise ValueError(f"VGG dropout must be a probability in [0, 1) (torchvision: 0.5; 0: none); "
                             f"got dropout={self.dropout!r}")
        super().__post_init__()

    def classifier_path(self) -> tuple[str, ...]:
        """Flax module path of the last linear layer, the one whose width is `num_classes`."""
        return ("head", f"fc{len(self.classifier_widths) + 1}")

    def stage_names(self) -> tuple[str, ...]:
        """The units that end in a max pool (post-pool outputs at strides 2, 4, 8, ...)."""
        return tuple(spec.name for spec in self.unit_specs(False) if spec.halvings)

    def unit_specs(self, train: bool, probes: bool = False) -> list[UnitSpec]:
        # VGG convs keep their bias even with BN (torchvision), hence use_bias=True.
        conv, norm, act = self.layer_defs(train, conv_bias=True)
        specs, channels = [], self.in_channels
        widths = list(self.layers)
        for i, width in enumerate(widths):
            if width == "M":
                continue
            pool = i + 1 < len(widths) and widths[i + 1] == "M"
            name = "stem" if not specs else f"unit_{len(specs)}"
            build = functools.partial(ConvUnit, features=width, pool=pool, conv=conv, norm=norm, act=act,
                                      probes=probes)
            specs.append(UnitSpec(name, build, channels, halvings=int(pool)))
            channels = width
        head = functools.partial(
            Classifier,
            num_classes=self.num_classes,
            pool_size=self.pool_size,
            widths=tuple(self.classifier_widths),
            dropout=self.dropout,
            train=train,
            act=act,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        specs.append(UnitSpec("head", head, channels))
        return specs


def vgg(depth: int, *, batch_norm: bool = False, **config) -> VGG:
    """torchvision's vgg{11,13,16,19}[_bn]: 224x224 input, 7x7 pool, 4096-4096 classifier."""
    if depth not in VGG_LAYERS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_LAYERS)}; got {depth!r}")
    config.setdefault("norm", "batchnorm" if batch_norm else "none")
    return VGG(layers=VGG_LAYERS[depth], **config)


def cifar_vgg(depth: int, *, batch_norm: bool = True, **config) -> VGG:
    """The usual CIFAR VGG (32x32 input): torchvision's features, 1x1x512 -> one linear layer."""
    config.setdefault("pool_size", 1)
    config.setdefault("classifier_widths", ())
    config.setdefault("num_classes", 10)
    return vgg(depth, batch_norm=batch_norm, **config)
