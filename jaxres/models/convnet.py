"""What every conv net of the zoo shares: the fields that choose its layers (activation, kernel
initialization, BatchNorm's momentum and epsilon, input channels, compute and parameter dtypes)
and the partials built from them, which each unit receives (as the Flax ImageNet example injects
`conv` and `norm`). `ResNet` and `VGG` subclass it; each keeps its own `norm` field, whose
default differs (torchvision's ResNets have BatchNorm, its plain VGGs do not)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from jaxres.models.layers import ACTIVATIONS, check_sizes, check_study_switches, conv_def, norm_def
from jaxres.models.units import UnitModel


def _field(default):
    # keyword-only, so that subclasses may declare fields without defaults (ResNet.stage_sizes, VGG.layers)
    return dataclasses.field(default=default, kw_only=True)


class ConvNet(UnitModel):
    """Base class of the zoo's families: the shared layer fields and the partials built from them."""

    activation: str = _field("relu")
    kernel_init: str = _field("he_normal_fan_out")
    in_channels: int = _field(3)
    bn_momentum: float = _field(0.9)  # flax's convention: torch's momentum 0.1
    bn_epsilon: float = _field(1e-5)
    dtype: Any = _field(jnp.float32)  # the compute dtype
    param_dtype: Any = _field(jnp.float32)

    def check_layer_fields(self, family: str) -> None:
        """The shared fields' checks, each error naming `family` and what a valid value is."""
        check_study_switches(self.activation, self.norm, self.kernel_init)
        check_sizes(family, "in_channels", self.in_channels, "image channels: 3 for RGB, 1 for grayscale")

    def layer_defs(self, train: bool, conv_bias: bool) -> tuple[Callable, Callable | None, Callable]:
        """(conv, norm, act): the conv partial (with a bias when `conv_bias`), the norm partial (None
        without normalization; batch statistics when `train`, synchronized over `bn_axis_name`) and
        the activation function."""
        conv = conv_def(self.kernel_init, conv_bias, self.dtype, self.param_dtype)
        norm = norm_def(self.norm, train, self.bn_momentum, self.bn_epsilon, self.dtype, self.param_dtype,
                        self.bn_axis_name)
        return conv, norm, ACTIVATIONS[self.activation]
