"""Shattered gradients (Balduzzi et al. 2017, arXiv 1702.08591): how fast input gradients
decorrelate between nearby inputs.

Balduzzi et al. feed a 1-D line of inputs and find that the gradients of deep plain nets
look like white noise along it (correlation between neighbours -> 0 with depth), while
residual nets keep them correlated (decaying like a power law, not exponentially). Here the
line is an arc through image space, x(theta) = cos(theta) a + sin(theta) b with a, b
independent N(0, 1) images: every point has the same marginal distribution, so the batch
is also a fair "random inputs" batch for the other measurements.
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
