"""Measured rates of ||d z / d h|| in plain-JAX twins of the mean-field setting: wide MLPs
(`mlp_twin_rates`, no convolution borders) and conv stages (`conv_twin_rates`) with switches
the zoo's models do not have - circular padding, BatchNorm centred per position, masks
shuffled in the backward pass - so that each mechanism of `jaxres.analysis.theory` can be
isolated by a control (`jaxres experiment theory`, jaxres/experiments/theory_check.py). Measurements, not theory: every number
here comes from JAX's VJPs of the twin's own forward pass.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxres.analysis.mean_field import fixed_point_chi
from jaxres.choices import pick
from jaxres.models.layers import ACTIVATIONS, NORMS


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _bulk_rate(sq: np.ndarray, skip: int) -> float:
    """sq (depth + 1, examples): squared norms at every layer input; the geometric mean of
    the per-layer factors (towards the input) over layers skip..depth-skip, per example,
    then the median over examples."""
    depth = sq.shape[0] - 1
    ratios = np.sqrt(sq[:-1] / sq[1:])[skip:depth - skip]
    return float(np.median(np.exp(np.mean(np.log(ratios), 0))))


def mlp_twin_rates(*, activation: str, norm: str, residual: bool = False, preactivation: bool = False,
                   width: int = 1024, depth: int = 12, batch: int = 64, examples: int = 8, skip: int = 2,
                   seed: int = 0, weight_variance: float = 2.0, quantity: str = "block",
                   shuffle_masks: bool = False) -> dict:
    """Measured per-layer (plain) or per-block (residual) factors of the per-example
    ||d z_i / d h_i|| in a wide MLP twin in plain JAX: the fully connected net the mean-field
    theory describes, without convolution borders.

    Plain: h_{l+1} = W_l phi(BN(h_l)) (norm="batchnorm": train-mode batch statistics,
    biased variance, epsilon 1e-5) or W_l phi(h_l) (norm="none"), W_l ~ N(0, sigma_w^2 / width).
    Residual (no norm): h_{l+1} = phi(h_l + W2 phi(W1 h_l)) (post-activation) or
    h_l + W2 phi(W1 phi(h_l)) (`preactivation`). z_i = v . h_depth,i, one output (the rates
    do not depend on the readout). Inputs are N(0, q*) (the forward fixed point: no forward
    transient; |N(0, 1)| for post-activation ReLU). The per-example blocks take the cotangent
    on one example only (batch statistics couple the examples), for the first `examples`
    examples. `quantity`: "block" measures ||d z_i / d h_i|| (the per-example block),
    "total" ||d z_i / d h|| (the whole gradient over the batch, Yang et al.'s quantity; equal
    without BN). `shuffle_masks` (post-activation residual only, a control): the backward
    pass through phi after each addition uses that block's phi'(s) permuted at random over
    the neurons, which keeps its law but cuts the link to each neuron's own trajectory.

    Returns `{"rate": geometric mean over layers skip..depth-skip of the ratio, per example,
    then the median over examples, "per_layer": (depth,) medians, "open", "persistence"}`:
    per weight layer for plain nets (compare with `Prediction.per_layer_sq ** 0.5`), per block
    for residual ones (compare with `Prediction.rate`). For post-activation residual nets
    `open` is the fraction of s = h + F(h) > 0 and `persistence` P(open | open in the
    previous block), over neurons, examples and the measured blocks (ReLU)."""
    import jax
    import jax.numpy as jnp

    pick("normalization", norm, dict.fromkeys(NORMS))
    total = pick("quantity", quantity, {"block": False, "total": True})
    if residual and norm != "none":
        raise ValueError(f"the residual MLP twin has no normalization; got norm={norm!r}")
    if shuffle_masks and (not residual or preactivation):
        raise ValueError("shuffle_masks is a control for post-activation residual twins (residual=True, "
                         "preactivation=False)")
    for name, value, low in (("width", width, 2), ("depth", depth, 2 * skip + 1), ("batch", batch, 4),
                             ("examples", examples, 1)):
        _check_int(name, value, low)
    examples = min(examples, batch)
    post = residual and not preactivation
    keys = jax.random.split(jax.random.key(seed), 3 * depth + 2)
    scale = math.sqrt(weight_variance / width)
    w1 = jnp.stack([jax.random.normal(keys[2 * l], (width, width)) * scale for l in range(depth)])
    w2 = jnp.stack([jax.random.normal(keys[2 * l + 1], (width, width)) * scale for l in range(depth)])
    perms = jnp.stack([jax.random.permutation(keys[2 * depth + l], width) for l in range(depth)])
    readout = jax.random.normal(keys[-1], (width,)) / math.sqrt(width)
    q = 1.0
    if not residual and norm == "none" and activation not in ("relu", "linear"):
        q = fixed_point_chi(activation, weight_variance)[0]
    x = jax.random.normal(keys[-2], (batch, width)) * math.sqrt(q)
    if post and activation == "relu":
        x = jnp.abs(x)
    measure = _mlp_program(activation, norm, residual, preactivation, depth, examples, total, shuffle_masks)
    sq, opened = measure(x, w1, w2, perms, readout)
    sq = np.asarray(sq, np.float64)
    ratios = np.sqrt(sq[:-1] / sq[1:])  # (depth, examples): factor across layer l towards the input
    out = {"rate": _bulk_rate(sq, skip), "per_layer": np.median(ratios, 1).tolist(),
           "width": width, "depth": depth, "batch": batch, "examples": examples}
    if post and activation == "relu" and not shuffle_masks:
        o = np.asarray(opened)[skip:depth - skip]
        out["open"] = float(o.mean())
        out["persistence"] = float(np.sum(o[1:] & o[:-1]) / np.sum(o[:-1]))
    return out



@functools.lru_cache(maxsize=32)
def _mlp_program(activation, norm, residual, preactivation, depth, examples, total, shuffle_masks):
    """The jitted measurement of `mlp_twin_rates` for one configuration (draws share it):
    (x, w1, w2, perms, readout) -> ((depth + 1, examples) squared norms, masks)."""
    import jax
    import jax.numpy as jnp

    phi = ACTIVATIONS[activation]
    post = residual and not preactivation

    def bn(h):
        mean = h.mean(0, keepdims=True)
        return (h - mean) / jnp.sqrt(jnp.mean(jnp.square(h - mean), 0, keepdims=True) + 1e-5)

    def branch(a, b, h):
        if preactivation:
            return phi(phi(h) @ a) @ b
        return phi(h @ a) @ b

    def layer(a, b, h):
        if residual:
            return h + branch(a, b, h) if preactivation else phi(h + branch(a, b, h))
        return phi(bn(h) if norm == "batchnorm" else h) @ a

    def pre_mask(a, b, h):  # post-activation: s = h + F(h), whose phi' is taken apart
        return h + branch(a, b, h)

    @jax.jit
    def measure(x, w1, w2, perms, readout):  # weights as arguments: XLA would fold constants for seconds
        # (depth + 1, examples): ||d z_i / d h_l,i||^2 with the cotangent on example i only, one
        # VJP per layer for all `examples` cotangents at once; lax.scan keeps compiles short
        batch, width = x.shape
        index = jnp.arange(examples)

        def forward(h, weights):
            a, b, perm = weights
            if post:
                s = pre_mask(a, b, h)
                slope = jax.vmap(jax.grad(phi))(s.ravel()).reshape(s.shape)
                return phi(s), (h, slope[:, perm] if shuffle_masks else slope)
            return layer(a, b, h), (h, jnp.zeros((1, 1)))

        _, (hs, slopes) = jax.lax.scan(forward, x, (w1, w2, perms))

        def norm_sq(c):
            if total:
                return jnp.sum(jnp.square(c), (1, 2))
            return jnp.sum(jnp.square(c[index, index]), -1)

        def backward(cot, step):
            h, slope, a, b = step
            if post:
                cot = cot * slope
                _, vjp = jax.vjp(functools.partial(pre_mask, a, b), h)
            else:
                _, vjp = jax.vjp(functools.partial(layer, a, b), h)
            cot = jax.vmap(lambda c: vjp(c)[0])(cot)
            return cot, norm_sq(cot)

        cot = jnp.zeros((examples, batch, width)).at[index, index].set(readout)
        _, sq = jax.lax.scan(backward, cot, (hs, slopes, w1, w2), reverse=True)  # sq[l]: at h_l
        opened = slopes > 0 if post else jnp.zeros((depth, 1, 1), bool)
        return jnp.concatenate([sq, norm_sq(cot)[None]]), opened

    return measure


def conv_twin_rates(*, activation: str = "relu", norm: str = "batchnorm", spatial: int = 8, width: int = 64,
                    depth: int = 17, batch: int = 8, examples: int = 4, skip: int = 4, seed: int = 0,
                    padding: str = "zero", centring: str = "channel", quantity: str = "block") -> dict:
    """Measured per-layer factors of ||d z_i / d h|| in a plain conv stage in plain JAX, laid
    out like the zoo's plain CIFAR nets: h_{l+1} = phi(BN(conv3x3(h_l))) (or without BN),
    `width` channels on `spatial`^2 maps, He fan-out init (N(0, 2 / (9 width))), no bias,
    inputs h_0 ~ N(0, 1), NHWC; the cotangent of example i is a readout's spatially uniform
    gradient at h_depth (a global-average-pool head), so the last layer's BN meets the head's
    batch term. In `mean_field_unit_norms` terms: a stem of `width` channels (layer 0), then
    units of two layers (`depth` odd), then the head.

    Switches the zoo does not have, for controls: `padding` "zero" (the zoo's) or "circular"
    (no borders: the map is a torus); `centring` "channel" (Flax's BN: mean and variance per
    channel over N x H x W) or "position" (the mean per channel *and position* over the batch,
    the variance still per channel: removes any example-independent spatial pattern).

    `quantity` "block": ||d z_i / d h_i||, "total": ||d z_i / d h||. Returns {"rate": the
    bulk per-layer factor (geometric mean over layers skip..depth-skip per example, median
    over the first `examples` examples), "per_layer": (depth,) median factors across each
    layer towards the input, layer 0 first, "norms_sq": (depth + 1, examples) the squared
    norms at every h_l, "pattern_share": at the conv outputs of the bulk
    layers, the spatial variance of the per-position batch mean over the variance over
    N x H x W (BN's divisor), each averaged over the channels, less the 1/N a finite batch
    puts there by chance: (measured - 1/N) / (1 - 1/N)}."""
    import jax
    import jax.numpy as jnp

    pick("normalization", norm, dict.fromkeys(NORMS))
    total = pick("quantity", quantity, {"block": False, "total": True})
    circular = pick("padding", padding, {"zero": False, "circular": True})
    per_position = pick("centring", centring, {"channel": False, "position": True})
    for name, value, low in (("spatial", spatial, 2), ("width", width, 2), ("depth", depth, 2 * skip + 1),
                             ("batch", batch, 4), ("examples", examples, 1)):
        _check_int(name, value, low)
    examples = min(examples, batch)
    keys = jax.random.split(jax.random.key(seed), depth + 2)
    std = math.sqrt(2.0 / (9 * width))
    kernels = jnp.stack([jax.random.normal(k, (3, 3, width, width)) * std for k in keys[:depth]])
    readout = jax.random.normal(keys[-1], (width,)) / math.sqrt(width)
    x = jax.random.normal(keys[-2], (batch, spatial, spatial, width))
    measure = _conv_program(activation, norm, depth, examples, circular, per_position, total)
    sq, shares = measure(x, kernels, readout)
    sq = np.asarray(sq, np.float64)
    ratios = np.sqrt(sq[:-1] / sq[1:])
    raw = float(np.mean(np.asarray(shares)[skip:depth - skip]))
    return {"rate": _bulk_rate(sq, skip), "per_layer": np.median(ratios, 1).tolist(), "norms_sq": sq.tolist(),
            "pattern_share": (raw - 1.0 / batch) / (1.0 - 1.0 / batch), "spatial": spatial, "width": width,
            "depth": depth, "batch": batch, "padding": padding, "centring": centring}


@functools.lru_cache(maxsize=32)
def _conv_program(activation, norm, depth, examples, circular, per_position, total):
    """The jitted measurement of `conv_twin_rates` for one configuration (draws share it):
    (x, kernels, readout) -> ((depth + 1, examples) squared norms, (depth,) pattern shares)."""
    import jax
    import jax.numpy as jnp

    phi = ACTIVATIONS[activation]

    def conv(h, w):
        if circular:
            h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
        return jax.lax.conv_general_dilated(h, w, (1, 1), "VALID" if circular else ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def bn(y):
        if norm != "batchnorm":
            return y
        centred = y - y.mean(0 if per_position else (0, 1, 2), keepdims=True)
        return centred / jnp.sqrt(jnp.mean(jnp.square(centred), (0, 1, 2), keepdims=True) + 1e-5)

    def share(y):  # spatial variance of the per-position batch mean over the channel variance
        return jnp.mean(jnp.var(y.mean(0), (0, 1))) / jnp.mean(jnp.var(y, (0, 1, 2)))

    def layer(kernel, h):
        return phi(bn(conv(h, kernel)))

    @jax.jit
    def measure(x, kernels, readout):
        spatial = x.shape[1]
        index = jnp.arange(examples)

        def forward(h, kernel):
            return layer(kernel, h), (h, share(conv(h, kernel)))

        _, (hs, shares) = jax.lax.scan(forward, x, kernels)

        def norm_sq(c):
            if total:
                return jnp.sum(jnp.square(c), (1, 2, 3, 4))
            return jnp.sum(jnp.square(c[index, index]), (1, 2, 3))

        def backward(cot, step):
            h, kernel = step
            _, vjp = jax.vjp(functools.partial(layer, kernel), h)
            cot = jax.vmap(lambda c: vjp(c)[0])(cot)
            return cot, norm_sq(cot)

        cot = jnp.zeros((examples,) + x.shape).at[index, index].set(readout / spatial**2)
        _, sq = jax.lax.scan(backward, cot, (hs, kernels), reverse=True)
        return jnp.concatenate([sq, norm_sq(cot)[None]]), shares

    return measure
