"""ResNets (He et al. 2015, arXiv 1512.03385) and pre-activation ResNets (He et al. 2016,
arXiv 1603.05027), with their plain twins, for ImageNet and CIFAR.

Unit boundaries: `stem` is the first conv (+BN+act, +3x3/2 max pool on ImageNet); each
`unit_k` is one residual block or its plain twin; `head` is global average pooling and the
classifier (preceded by the final BN+act in pre-activation nets). Within a unit, probes
`layer1`..`layer3` sit on each weight layer's output after its norm and before the
activation or the residual addition (He et al. 2015, Fig. 7 "responses").
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax.numpy as jnp
from flax import linen as nn

from jaxres.choices import pick
from jaxres.models.layers import (
    check_num_classes_or_features,
    check_sizes,
    max_pool_torch,
    pad,
    probe,
    torch_linear_bias_init,
    torch_linear_init,
)
from jaxres.models.convnet import ConvNet
from jaxres.models.units import UnitSpec

ModuleDef = Any

SHORTCUTS = ("A", "B", "C")  # He et al. 2015, section 3.3 / Table 3


class Block(nn.Module):
    """Fields and helpers shared by the four block types; `__call__` is per type.

    `shortcut` is the resolved kind for this block: "identity", "pad" (option A:
    subsample + zero-pad channels, parameter-free), "projection" (1x1 conv + norm), or
    "none" (the plain twin: no shortcut at all).
    """

    features: int  # width of the 3x3 convs; the block outputs features * expansion
    strides: int
    conv: ModuleDef
    norm: ModuleDef | None
    act: Callable
    shortcut: str
    shortcut_scale: float = 1.0
    residual_scale: float = 1.0
    zero_init_last: bool = False
    stride_in_1x1: bool = False  # bottlenecks only: ResNet v1 (paper) vs v1.5 (torchvision)
    probes: bool = False  # see layers.probe

    expansion = 1
    preactivated = False  # the branch ends in a conv, not a norm (He et al. 2016)

    def normalize(self, y, name: str, zero: bool = False):
        if self.norm is None:
            return y
        if zero:  # Goyal et al. 2017 (arXiv 1706.02677): each block starts as the identity
            return self.norm(name=name, scale_init=nn.initializers.zeros)(y)
        return self.norm(name=name)(y)

    def last_conv(self):
        """The conv of the branch's last weight layer. With zero_init_last and no norm to zero
        (no normalization, or a pre-activation block, whose branch ends in the conv), its kernel
        starts at zero, so the block starts as the identity (Fixup, Zhang et al. 2019; SkipInit,
        De & Smith 2020)."""
        if self.zero_init_last and (self.norm is None or self.preactivated):
            return functools.partial(self.conv, kernel_init=nn.initializers.zeros)
        return self.conv

    def shortcut_path(self, x, preactivated=None):
        out = self.features * self.expansion
        if self.shortcut == "none":
            return None
        if self.shortcut == "identity":
            return x
        if self.shortcut == "pad":
            if self.strides > 1:
                x = x[:, :: self.strides, :: self.strides, :]
            extra = out - x.shape[-1]
            return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        y = self.conv(out, (1, 1), self.strides, padding=pad(0), name="proj_conv")
        if preactivated is not None:
            # He et al. 2016: the projection reads the shared pre-activation and, like the
            # branch it is added to, ends in a conv (no norm; timm's ResNetV2 does the same).
            return y(preactivated)
        return self.normalize(y(x), "proj_norm")

    def merge(self, shortcut, branch):
        if self.shortcut == "none":
            return branch
        return self.shortcut_scale * shortcut + self.residual_scale * branch


class BasicBlock(Block):
    """conv3x3-BN-act-conv3x3-BN (+ shortcut) - act."""

    @nn.compact
    def __call__(self, x):
        y = self.conv(self.features, (3, 3), self.strides, padding=pad(1), name="conv1")(x)
        y = self.act(probe(self, "layer1", self.normalize(y, "norm1"), self.probes))
        y = self.last_conv()(self.features, (3, 3), 1, padding=pad(1), name="conv2")(y)
        y = probe(self, "layer2", self.normalize(y, "norm2", zero=self.zero_init_last), self.probes)
        return self.act(self.merge(self.shortcut_path(x), y))


class BottleneckBlock(Block):
    """conv1x1-BN-act-conv3x3-BN-act-conv1x1(x4)-BN (+ shortcut) - act."""

    expansion = 4

    @nn.compact
    def __call__(self, x):
        s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        y = self.conv(self.features, (1, 1), s1, padding=pad(0), name="conv1")(x)
        y = self.act(probe(self, "layer1", self.normalize(y, "norm1"), self.probes))
        y = self.conv(self.features, (3, 3), s3, padding=pad(1), name="conv2")(y)
        y = self.act(probe(self, "layer2", self.normalize(y, "norm2"), self.probes))
        y = self.last_conv()(self.features * 4, (1, 1), 1, padding=pad(0), name="conv3")(y)
        y = probe(self, "layer3", self.normalize(y, "norm3", zero=self.zero_init_last), self.probes)
        return self.act(self.merge(self.shortcut_path(x), y))


class PreActBasicBlock(Block):
    """BN-act-conv3x3-BN-act-conv3x3 (+ shortcut), no activation after the addition."""

    preactivated = True

    @nn.compact
    def __call__(self, x):
        p = self.act(self.normalize(x, "norm1"))
        y = self.conv(self.features, (3, 3), self.strides, padding=pad(1), name="conv1")(p)
        y = probe(self, "layer1", y, self.probes)
        y = self.act(self.normalize(y, "norm2"))
        y = self.last_conv()(self.features, (3, 3), 1, padding=pad(1), name="conv2")(y)
        y = probe(self, "layer2", y, self.probes)
        return self.merge(self.shortcut_path(x, preactivated=p), y)


class PreActBottleneckBlock(PreActBasicBlock):
    """BN-act-conv1x1-BN-act-conv3x3-BN-act-conv1x1(x4) (+ shortcut)."""

    expansion = 4

    @nn.compact
    def __call__(self, x):
        s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        p = self.act(self.normalize(x, "norm1"))
        y = probe(self, "layer1", self.conv(self.features, (1, 1), s1, padding=pad(0), name="conv1")(p),
                  self.probes)
        y = self.act(self.normalize(y, "norm2"))
        y = probe(self, "layer2", self.conv(self.features, (3, 3), s3, padding=pad(1), name="conv2")(y),
                  self.probes)
        y = self.act(self.normalize(y, "norm3"))
        y = self.last_conv()(self.features * 4, (1, 1), 1, padding=pad(0), name="conv3")(y)
        y = probe(self, "layer3", y, self.probes)
        return self.merge(self.shortcut_path(x, preactivated=p), y)


BLOCKS = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): BottleneckBlock,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", True): PreActBottleneckBlock,
}


class Stem(nn.Module):
    """ImageNet: conv7x7/2 (pad 3) - BN - act - maxpool 3x3/2 (pad 1), exactly torchvision.
    CIFAR: conv3x3 (pad 1) - BN - act. Pre-activation nets keep only the conv (and pool):
    the first block's BN-act follows (He et al. 2016; timm's ResNetV2)."""

    features: int
    kernel: int
    stride: int
    pool: bool
    conv: ModuleDef
    norm: ModuleDef | None
    act: Callable | None  # None: pre-activation stem
    probes: bool = False  # see layers.probe

    @nn.compact
    def __call__(self, x):
        k = self.kernel
        x = self.conv(self.features, (k, k), self.stride, padding=pad(k // 2), name="conv1")(x)
        if self.act is not None:
            if self.norm is not None:
                x = self.norm(name="norm1")(x)
            x = self.act(probe(self, "layer1", x, self.probes))
        else:
            x = probe(self, "layer1", x, self.probes)
        return max_pool_torch(x, 3, 2, 1) if self.pool else x


class PoolClassifier(nn.Module):
    """(final BN-act of pre-activation nets) - global average pool - linear, float32 logits.

    Returns `(logits, {"pre_logits": pooled features})`; with `num_classes=0` there is no
    linear layer and the "logits" are the pooled features, in the compute dtype.
    """

    num_classes: int
    norm: ModuleDef | None
    act: Callable | None  # set for pre-activation nets only
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        if self.act is not None:
            if self.norm is not None:
                x = self.norm(name="norm")(x)
            x = self.act(x)
        features = jnp.mean(x, axis=(1, 2))
        if self.num_classes == 0:
            return features, {"pre_logits": features}
        logits = nn.Dense(
            self.num_classes,
            kernel_init=torch_linear_init,
            bias_init=torch_linear_bias_init(features.shape[-1]),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc",
        )(features)
        return logits.astype(jnp.float32), {"pre_logits": features}


class ResNet(ConvNet):
    """One class for every ResNet of the zoo; variants are registry entries (see registry.py).

    Defaults follow torchvision (v1.5 strides, option-B shortcuts, He fan-out init, BN with
    torch's momentum 0.1 / eps 1e-5). NHWC input, float32 logits; `dtype` is the compute dtype,
    `param_dtype` the parameter dtype. `num_classes=0`: no classifier, the model returns the
    pooled features (`widths[-1] * expansion` wide).
    """

    stage_sizes: Sequence[int]
    block: str = "basic"  # "basic" | "bottleneck"
    preact: bool = False
    stem: str = "imagenet"  # "imagenet" | "cifar"
    widths: Sequence[int] = (64, 128, 256, 512)
    num_classes: int = 1000
    residual: bool = True
    shortcut: str = "B"
    stride_in_1x1: bool = False
    zero_init_residual: bool = False
    norm: str = "batchnorm"
    shortcut_scale: float = 1.0
    residual_scale: float = 1.0

    def __post_init__(self):
        check_num_classes_or_features(self.num_classes)
        pick("block type", self.block, {"basic": 0, "bottleneck": 0})
        pick("stem", self.stem, {"imagenet": 0, "cifar": 0})
        pick("shortcut option", self.shortcut, dict.fromkeys(SHORTCUTS))
        self.check_layer_fields("ResNet")
        check_sizes("ResNet", "stage_sizes", self.stage_sizes, "blocks per stage, e.g. (2, 2, 2, 2)", many=True)
        check_sizes("ResNet", "widths", self.widths, "conv channels per stage, e.g. (64, 128, 256, 512)", many=True)
        if self.zero_init_residual and not self.residual:
            raise ValueError("zero_init_residual zeroes each residual branch's last layer so that the block starts "
                             "as its shortcut; the plain twin (residual=False) has no shortcut, so its every block "
                             "would start dead: use it with residual=True")
        if len(self.widths) != len(self.stage_sizes):
            raise ValueError(
                f"widths {tuple(self.widths)} and stage_sizes {tuple(self.stage_sizes)} must have "
                f"the same length (one width per stage)"
            )
        super().__post_init__()

    def classifier_path(self) -> tuple[str, ...]:
        """Flax module path of the last linear layer, the one whose width is `num_classes`."""
        return ("head", "fc")

    def unit_specs(self, train: bool, probes: bool = False) -> list[UnitSpec]:
        conv, norm, act = self.layer_defs(train, conv_bias=self.norm == "none")
        block_cls = BLOCKS[(self.block, self.preact)]
        imagenet = self.stem == "imagenet"
        # torchvision's ImageNet stem is 64 wide for every depth; CIFAR's matches stage 1.
        stem_width = 64 if imagenet else self.widths[0]
        specs = [
            UnitSpec(
                "stem",
                functools.partial(
                    Stem,
                    features=stem_width,
                    kernel=7 if imagenet else 3,
                    stride=2 if imagenet else 1,
                    pool=imagenet,
                    conv=conv,
                    norm=norm,
                    act=None if self.preact else act,
                    probes=probes,
                ),
                self.in_channels,
            )
        ]
        channels = stem_width
        for stage, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for index in range(size):
                strides = 2 if stage > 0 and index == 0 else 1
                out = width * block_cls.expansion
                kind = self._shortcut_kind(channels, out, strides, len(specs))
                specs.append(
                    UnitSpec(
                        f"unit_{len(specs)}",
                        functools.partial(
                            block_cls,
                            features=width,
                            strides=strides,
                            conv=conv,
                            norm=norm,
                            act=act,
                            shortcut=kind,
                            shortcut_scale=self.shortcut_scale,
                            residual_scale=self.residual_scale,
                            zero_init_last=self.zero_init_residual,
                            stride_in_1x1=self.stride_in_1x1,
                            probes=probes,
                        ),
                        channels,
                    )
                )
                channels = out
        specs.append(
            UnitSpec(
                "head",
                functools.partial(
                    PoolClassifier,
                    num_classes=self.num_classes,
                    norm=norm,
                    act=act if self.preact else None,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                ),
                channels,
            )
        )
        return specs

    def stage_names(self) -> tuple[str, ...]:
        """The stem, then the last block of each stage (timm's feature levels 1..4 on ImageNet:
        strides 4, 8, 16, 32; the stem's output is stride 4 there, after the max pool)."""
        ends, last = ["stem"], 0
        for size in self.stage_sizes:
            last += size
            ends.append(f"unit_{last}")
        return tuple(ends)

    def _shortcut_kind(self, channels: int, out: int, strides: int, unit: int) -> str:
        same_shape = strides == 1 and channels == out
        if not self.residual:
            return "none"
        if self.shortcut == "C":
            return "projection"
        if same_shape:
            return "identity"
        if self.shortcut == "B":
            return "projection"
        if out < channels:
            raise ValueError(
                f"shortcut option A cannot zero-pad unit_{unit} from {channels} to {out} channels; "
                f"use shortcut='B'"
            )
        return "pad"


IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


def imagenet_resnet(depth: int, **config) -> ResNet:
    """ResNet-18/34/50/101/152 (Table 1 of He et al. 2015), torchvision layout."""
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(
            f"ImageNet ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}; got {depth!r}"
        )
    block, stages = IMAGENET_DEPTHS[depth]
    return ResNet(stage_sizes=stages, block=block, stem="imagenet", **config)


def cifar_resnet(depth: int, *, block: str = "basic", **config) -> ResNet:
    """CIFAR ResNets of He et al. 2015, section 4.2: 3x3 stem, 3 stages of 16/32/64 filters.

    Basic blocks give depth 6n+2 (20, 32, 44, 56, 110, 1202); bottlenecks (pre-activation
    ResNet-164/1001 of He et al. 2016) give depth 9n+2 with outputs 64/128/256.
    """
    per_block = pick("block type", block, {"basic": 2, "bottleneck": 3})  # convs per block
    if not isinstance(depth, int) or depth < 2 or (depth - 2) % (3 * per_block):
        examples = "20, 32, 44, 56, 110, 1202" if block == "basic" else "164, 1001"
        raise ValueError(
            f"cifar_resnet depth with {block} blocks must be {3 * per_block}n+2 ({examples}); got {depth!r}"
        )
    n = (depth - 2) // (3 * per_block)
    config.setdefault("shortcut", "A")
    config.setdefault("num_classes", 10)
    return ResNet(stage_sizes=(n, n, n), block=block, stem="cifar", widths=(16, 32, 64), **config)
