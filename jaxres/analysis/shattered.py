"""Shattered gradients (Balduzzi et al. 2017, arXiv 1702.08591): how fast input gradients
decorrelate between nearby inputs.

Balduzzi et al. feed a 1-D line of inputs and find that the gradients of deep plain nets
look like white noise along it (correlation between neighbours -> 0 with depth), while
residual nets keep them correlated (decaying like a power law, not exponentially). Two
kinds of 1-D inputs: `arc_inputs`, an arc through image space, x(theta) = cos(theta) a +
sin(theta) b with a, b independent N(0, 1) images (every point has the same marginal
distribution, so the batch is also a fair "random inputs" batch for the study's other
measurements), and `line_inputs`, evenly spaced points on a straight segment (Balduzzi et
al.'s setting; use >= 64 points: 4 points give only 3 neighbouring pairs).
`correlation_decay_by_depth` measures the lag-1 correlation against depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def arc_inputs(key, num_points: int, shape, span: float = np.pi / 2, dtype=jnp.float32):
    """(num_points, *shape) images on the arc cos(t) a + sin(t) b, t evenly in [0, span]."""
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be a positive integer, got {num_points!r}")
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, tuple(shape), dtype)
    b = jax.random.normal(kb, tuple(shape), dtype)
    t = jnp.linspace(0.0, span, num_points, dtype=dtype).reshape((-1,) + (1,) * len(shape))
    return jnp.cos(t) * a + jnp.sin(t) * b


def gradient_correlations(grads) -> np.ndarray:
    """Mean Pearson correlation of input gradients at each lag along the line.

    grads: (C, N, ...) gradients of C scalar outputs at N consecutive points (exact, from
    `end_to_end_norms(..., return_input_grads=True)`). Returns (N - 1,): entry k - 1 is the
    correlation between points i and i + k, averaged over i and the C outputs.
    """
    g = np.asarray(grads, np.float64)
    g = g.reshape(g.shape[0], g.shape[1], -1)
    g = g - g.mean(-1, keepdims=True)
    norm = np.linalg.norm(g, axis=-1, keepdims=True)
    g = g / np.where(norm > 0, norm, 1.0)
    n = g.shape[1]
    return np.array([np.mean(np.sum(g[:, :-lag] * g[:, lag:], -1)) for lag in range(1, n)])


def line_inputs(key, num_points: int, shape, span: float = 1.0, dtype=jnp.float32):
    """(num_points, *shape) images evenly spaced on a line segment a + t u, t in [-span/2,
    span/2] * ||a||, with a ~ N(0, I) and u a random unit direction: neighbours lie
    span / (num_points - 1) * ||a|| apart (Balduzzi et al. sweep a 1-D input the same way)."""
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2 (neighbouring pairs), got {num_points!r}")
    if not np.isfinite(span) or span <= 0:
        raise ValueError(f"span must be a positive length (in units of ||a||), got {span!r}")
    ka, ku = jax.random.split(key)
    a = jax.random.normal(ka, tuple(shape), dtype)
    u = jax.random.normal(ku, tuple(shape), dtype)
    u = u / jnp.linalg.norm(u) * jnp.linalg.norm(a)
    t = jnp.linspace(-span / 2, span / 2, num_points, dtype=dtype).reshape((-1,) + (1,) * len(shape))
    return a + t * u


def balduzzi_plain_relu(layers) -> np.ndarray:
    """Balduzzi et al. 2017, Theorem 1: in a plain ReLU net with He init the correlation of the
    input gradients of two inputs falls like 2^-L in the number L of ReLU layers (a CIFAR
    basic block holds two). Their residual nets decay sublinearly instead (their abstract),
    not exponentially."""
    return 2.0 ** -np.asarray(layers, np.float64)


def correlation_decay_by_depth(build_model, depths, x, *, bn: str = "eval", seed: int = 1, labels=None,
                               per_example_blocks: bool = True) -> dict:
    """Lag-1 input-gradient correlation along the points `x` (N consecutive points on a line,
    NHWC) for nets of each depth in `depths` built by `build_model(depth)` (e.g. a one-stage
    `ResNet(stage_sizes=(depth,), ...)`); one SegmentCache serves every depth, so each distinct
    unit compiles once. With bn="batch" the N points are also the batch (BatchNorm couples
    them): `per_example_blocks` measures d z_i / d x_i (N * C VJPs per unit), and the summed
    rows d sum_j z_j / d x_i are reported beside them. Returns `{depth: {"blocks": [lag
    correlations], "summed_rows": [...]}}` (`gradient_correlations`)."""
    from jaxres.analysis.endtoend import end_to_end
    from jaxres.analysis.segments import SegmentCache

    cache = SegmentCache()
    labels = jnp.zeros(x.shape[0], jnp.int32) if labels is None else labels
    out = {}
    for depth in depths:
        model = build_model(depth)
        variables = model.init(jax.random.key(seed), x[:1])
        segments = cache.segments(model, variables, x.shape, bn, x.dtype)
        e2e = end_to_end(segments, x, labels, per_example_blocks=per_example_blocks)
        entry = {"summed_rows": gradient_correlations(e2e.input_grads_summed_rows).tolist()}
        if e2e.input_grads is not None:
            entry["blocks"] = gradient_correlations(e2e.input_grads).tolist()
        out[depth] = entry
    return out
