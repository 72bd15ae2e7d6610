"""Building blocks shared by every family: activations, initializers, norms, pooling, probes.

All arrays are NHWC. The study switches of the zoo (activation, normalization, kernel
initializer) are resolved here from short names, so a model config stays a plain dataclass
of strings and numbers.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxres.choices import pick
from jaxres.models.batchnorm import BatchNorm
from jaxres.models.conv import conv_general_dilated

Array = jax.Array
ModuleDef = Any


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "elu": nn.elu,
    "leaky_relu": nn.leaky_relu,
    "softplus": nn.softplus,
    # The identity turns a network into a deep linear net: the reference case of the
    # dynamical-isometry theory (Saxe et al. 2014, Pennington et al. 2017).
    "linear": lambda x: x,
}


def _delta_orthogonal(key, shape, dtype=jnp.float32):
    # Xiao et al. 2018: an orthogonal matrix at the kernel's centre tap, zeros elsewhere.
    # jax's version needs in <= out channels; we fall back to a row-orthogonal matrix when
    # a layer narrows (in > out), which keeps J J^T = I on the output side.
    *spatial, fan_in, fan_out = shape
    if fan_in <= fan_out:
        return nn.initializers.delta_orthogonal()(key, shape, dtype)
    centre = nn.initializers.orthogonal(column_axis=-2)(key, (fan_out, fan_in), dtype).T
    kernel = jnp.zeros(shape, dtype)
    return kernel.at[tuple(s // 2 for s in spatial)].set(centre)


KERNEL_INITS: dict[str, Callable] = {
    # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
    "he_normal_fan_out": nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    "he_normal_fan_in": nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
    "he_uniform_fan_in": nn.initializers.variance_scaling(2.0, "fan_in", "uniform"),
    "lecun_normal": nn.initializers.variance_scaling(1.0, "fan_in", "normal"),
    "glorot_normal": nn.initializers.variance_scaling(1.0, "fan_avg", "normal"),
    "glorot_uniform": nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
    "orthogonal": nn.initializers.orthogonal(),
    "delta_orthogonal": _delta_orthogonal,
}

NORMS = ("batchnorm", "none")


def check_study_switches(activation: str, norm: str, kernel_init: str) -> None:
    pick("activation", activation, ACTIVATIONS)
    pick("normalization", norm, dict.fromkeys(NORMS))
    pick("kernel initializer", kernel_init, KERNEL_INITS)


def torch_linear_init(key, shape, dtype=jnp.float32):
    """torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_linear_bias_init(fan_in: int):
    """torch.nn.Linear's default bias init, which depends on the layer's fan-in."""

    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv_def(kernel_init: str, use_bias: bool, dtype, param_dtype) -> ModuleDef:
    """The conv partial every block receives: explicit torch-style padding is given per call."""
    return functools.partial(
        nn.Conv,
        conv_general_dilated=conv_general_dilated,
        use_bias=use_bias,
        kernel_init=pick("kernel initializer", kernel_init, KERNEL_INITS),
        dtype=dtype,
        param_dtype=param_dtype,
    )


def norm_def(norm: str, train: bool, momentum: float, epsilon: float, dtype, param_dtype,
             axis_name: str | None = None):
    """The norm partial every block receives, or None for normalization-free networks.

    torch's BatchNorm momentum=0.1 is Flax's momentum=0.9 (weight of the old running value).
    `axis_name`: a mapped axis (pmap/shard_map) over which training batch statistics are
    averaged (synchronized BatchNorm); None keeps them per device.
    """
    pick("normalization", norm, dict.fromkeys(NORMS))
    if norm == "none":
        return None
    return functools.partial(
        BatchNorm,
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        axis_name=axis_name,
    )


def pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric torch-style padding: `padding=p` in torch.nn.Conv2d, not XLA's 'SAME'."""
    return ((p, p), (p, p))


def max_pool_torch(x: Array, window: int, stride: int, padding: int) -> Array:
    """torch.nn.MaxPool2d(window, stride, padding): pads with -inf, floor output size.

    'SAME' would pad asymmetrically (0 before, 1 after) for the ResNet stem's 3x3/2 pool on
    112x112 inputs and select different maxima than torchvision.
    """
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad(padding))


def adaptive_avg_pool(x: Array, output_size: int) -> Array:
    """torch.nn.AdaptiveAvgPool2d(output_size) on NHWC input, bin edges exactly as torch.

    Bin i covers [floor(i*H/out), ceil((i+1)*H/out)); on a 7x7 map pooled to 7 it is the
    identity, as in VGG at 224x224.
    """
    n, h, w, c = x.shape
    if (h, w) == (output_size, output_size):
        return x
    if h % output_size == 0 and w % output_size == 0:
        return x.reshape(n, output_size, h // output_size, output_size, w // output_size, c).mean((2, 4))

    def edges(size):
        return [(i * size // output_size, -(-(i + 1) * size // output_size)) for i in range(output_size)]

    rows = [x[:, a:b].mean(axis=1, keepdims=True) for a, b in edges(h)]
    x = jnp.concatenate(rows, axis=1)
    cols = [x[:, :, a:b].mean(axis=2, keepdims=True) for a, b in edges(w)]
    return jnp.concatenate(cols, axis=2)


# A probe's 'perturbations' variable is named apart from its 'intermediates' entry: NNX's
# bridge (nnx.bridge.ToNNX) keeps all of a module's variables in one namespace.
PERTURBATION_PREFIX = "d_"


def perturbation_name(probe_name: str) -> str:
    """The 'perturbations' variable of probe `probe_name` (its gradient is d loss/d probe)."""
    return PERTURBATION_PREFIX + probe_name


def probe_name(perturbation: str) -> str:
    """The probe a 'perturbations' variable belongs to (inverse of `perturbation_name`)."""
    return perturbation.removeprefix(PERTURBATION_PREFIX)


def check_num_classes_or_features(num_classes) -> None:
    """A zoo model's `num_classes`: a positive number of classes, or 0 for no classifier
    (the model returns its pooled features, timm's convention)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(
            f"num_classes must be a positive integer, or 0 for the pooled features without a "
            f"classifier; got {num_classes!r}"
        )


def check_sizes(model: str, field: str, value, meaning: str, *, many: bool = False, empty_ok: bool = False) -> None:
    """A size field of a model: a positive integer (`in_channels`), or with `many` a sequence of
    them (`widths`, `stage_sizes`; empty only when `empty_ok`). Unchecked, a zero width ends in a
    ZeroDivisionError inside an initializer, a negative one in an MLIRError from XLA, and no stage
    at all in an IndexError."""
    def positive(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1

    if not many:
        if not positive(value):
            raise ValueError(f"{model} {field} must be a positive integer ({meaning}); got {field}={value!r}")
        return
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{model} {field} must be a sequence of positive integers ({meaning}); got {field}={value!r}")
    if not value and not empty_ok:
        raise ValueError(f"{model} {field} is empty; it needs at least one entry ({meaning})")
    if not all(positive(v) for v in value):
        raise ValueError(f"{model} {field} must be positive integers ({meaning}); got {field}={value!r}")


def probe(module: nn.Module, name: str, x: Array, enabled: bool) -> Array:
    """Marks `x` as a named measurement point for the analysis; the identity unless `enabled`
    (the `probes=True` argument of a zoo model's `apply`).

    When enabled:
    - `sow`s x as `name` into 'intermediates' when that collection is mutable (forward
      statistics, He et al. 2015 Fig. 7);
    - `perturb`s x with a zero variable `perturbation_name(name)` in 'perturbations' when that
      collection is passed or mutable, so one VJP gives d(output)/d(x) at every probe at once.
    Probes are skipped while initializing so `model.init` returns only params/batch_stats.
    """
    if not enabled or module.is_initializing():
        return x
    module.sow("intermediates", name, x)
    return module.perturb(perturbation_name(name), x)
