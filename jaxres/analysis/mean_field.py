"""Scalar mean-field quantities behind `jaxres.analysis.theory` (width -> inf, gradient
independence): Gaussian expectations by Gauss-Hermite quadrature, the variance fixed point
and chi_1 of a plain net (Poole et al. 2016), BatchNorm's gradient factor at any batch size
(Yang et al. 2019), the stationary law of post-activation residual ReLU blocks, and the
per-layer cost of zero-padding borders. See `theory` for what each predicts.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxres.choices import pick
from jaxres.models.layers import ACTIVATIONS, KERNEL_INITS, NORMS

# sigma_w^2 (weight variance times fan) of a shape-keeping conv (C_in = C_out, so fan-in,
# fan-out and their average agree); other initializers have no entry (no prediction).
WEIGHT_VARIANCE = {
    "he_normal_fan_out": 2.0,
    "he_normal_fan_in": 2.0,
    "he_uniform_fan_in": 2.0,
    "lecun_normal": 1.0,
    "glorot_normal": 1.0,
    "glorot_uniform": 1.0,
}

# ---------------------------------------------------------------- Gaussian expectations


@functools.lru_cache(maxsize=8)
def _hermite(order: int):
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)  # weight exp(-z^2 / 2)
    return nodes, weights / weights.sum()


def gaussian_expectation(f, variance: float = 1.0, order: int = 201) -> float:
    """E[f(sqrt(variance) z)], z ~ N(0, 1), by Gauss-Hermite quadrature (`order` nodes;
    exact for polynomials of degree < 2 order, fast for smooth f)."""
    nodes, weights = _hermite(order)
    return float(np.sum(weights * f(math.sqrt(variance) * nodes)))


def _np_activation(activation: str):
    """(phi, phi') as numpy functions; ReLU's moments are closed-form elsewhere."""
    table = {
        "tanh": (np.tanh, lambda x: 1.0 - np.tanh(x) ** 2),
        "linear": (lambda x: x, lambda x: np.ones_like(x)),
        "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), lambda x: np.exp(-x) / (1 + np.exp(-x)) ** 2),
    }
    return pick("activation with a mean-field theory", activation, table)


def fixed_point_chi(activation: str, weight_variance: float = 2.0, bias_variance: float = 0.0,
                    iterations: int = 500) -> tuple[float, float]:
    """(q*, chi_1): the fixed point of the variance map q -> sigma_w^2 E[phi(sqrt(q) z)^2] +
    sigma_b^2 and chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2] there (Poole et al. 2016), by
    iterating the map with Gauss-Hermite quadrature. ReLU is homogeneous: no fixed point
    (q just scales by sigma_w^2 / 2), chi_1 = sigma_w^2 / 2 exactly; q* is returned as nan."""
    if activation == "relu":
        return float("nan"), weight_variance / 2.0
    phi, dphi = _np_activation(activation)
    q = 1.0
    for _ in range(iterations):
        new = weight_variance * gaussian_expectation(lambda x: phi(x) ** 2, q) + bias_variance
        if abs(new - q) <= 1e-14 * max(1.0, q):
            q = new
            break
        q = new
    return q, weight_variance * gaussian_expectation(lambda x: dphi(x) ** 2, q)


# ---------------------------------------------------------------- BatchNorm (Yang et al. 2019)


def bn_layer_chi_large_batch(activation: str) -> float:
    """E[phi'(z)^2] / Var[phi(z)], z ~ N(0, 1): Yang et al.'s per-layer squared-norm factor of
    a BN - phi - linear layer for a batch -> inf. BN standardizes each pre-activation over the
    batch, so the next layer's batch variance is sigma_w^2 Var[phi(z)], and the backward pass
    through phi and the weights multiplies the squared norm by sigma_w^2 E[phi'(z)^2] and
    through BN divides it by that variance. ReLU: (1/2) / ((pi - 1) / (2 pi)) = pi / (pi - 1)."""
    if activation == "relu":
        return math.pi / (math.pi - 1.0)
    phi, dphi = _np_activation(activation)
    mean = gaussian_expectation(phi)
    var = gaussian_expectation(lambda x: phi(x) ** 2) - mean**2
    return gaussian_expectation(lambda x: dphi(x) ** 2) / var


def _relu_bn_direction_moments(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For z (M, B): per row, ||P D (P - u u^T)||_F^2 and the biased batch variance of
    relu(sqrt(B) u), where u = P z / |P z| (the direction of the centred batch), D =
    diag(u > 0), P = I - 11^T / B. With s = |P z| / sqrt(B) the Jacobian of relu(BN(z)) is
    D (P - u u^T) / s (Flax's train-mode BN with the biased variance, epsilon -> 0).

    In closed form (P - u u^T is a projector, u _|_ 1, d = D 1 with k ones):
    ||P D (P - u u^T)||_F^2 = tr(D P D (P - u u^T))
                            = k (1 - 1/B) - sum_open u_i^2 - (k - k^2 / B) / B + (sum_open u_i)^2 / B.
    """
    b = z.shape[1]
    centred = z - z.mean(1, keepdims=True)
    u = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    open_ = u > 0
    k = open_.sum(1).astype(np.float64)
    u_open = np.where(open_, u, 0.0)
    jsq = k * (1 - 1 / b) - np.sum(u_open**2, 1) - (k - k**2 / b) / b + np.sum(u_open, 1) ** 2 / b
    return jsq, np.maximum(np.sqrt(b) * u, 0.0).var(1)


def bn_layer_chi(activation: str, effective_batch: int | None = None, *, samples: int | None = None,
                 seed: int = 0) -> tuple[float, float]:
    """(chi, standard error): the per-layer squared-norm factor of a BN(train) - phi - linear
    layer at batch B = `effective_batch` (None: B -> inf, exact, error 0).

    Finite B, ReLU only, in Yang et al.'s (2019) mean field: one neuron's pre-activations over
    the batch, h in R^B, are N(0, Sigma*) with Sigma* the BSB1 fixed point; BN removes the
    batch mean and the scale, so G(h) = relu(BN(h)) = G(z) for z ~ N(0, I_B) and Sigma* =
    E[G(z) G(z)^T] needs no iteration (its q - c = E[batch variance of G] B / (B - 1)). The
    gradient covariance converges to the permutation-invariant eigenvector P = I - 11^T / B of
    Pi -> E[J^T Pi J] (BN's Jacobian kills the all-ones direction), so chi(B) =
    E||P J||_F^2 / ((q - c)(B - 1)), J taken at h ~ N(0, Sigma*). J = D (P - u u^T) / s splits
    into the centred batch's direction u and its scale, s^2 ~ chi^2_{B-1} / B independent of
    u, whose E[1 / s^2] = B / (B - 3) is exact (infinite at B = 3: the rate diverges); only
    the bounded direction part is sampled: `samples` directions (default 2^24 / B, at least
    1024), standard error below 0.1%. Fixed seed: deterministic.
    """
    if effective_batch is None:
        return bn_layer_chi_large_batch(activation), 0.0
    if isinstance(effective_batch, bool) or not isinstance(effective_batch, int) or effective_batch < 4:
        raise ValueError(f"effective_batch must be an integer >= 4 (BN's gradient rate is infinite at a batch "
                         f"of 3), got {effective_batch!r}; pass None for the large-batch limit")
    if activation != "relu":
        raise ValueError(f"the finite-batch BN rate is implemented for relu only, got {activation!r}; "
                         f"pass effective_batch=None for the large-batch limit")
    b = effective_batch
    if samples is None:
        samples = int(max(1024, 2**24 // b))
    rng = np.random.default_rng(seed)
    jsq, gvar = [], []
    chunk = max(1, 2**21 // b)
    for start in range(0, samples, chunk):
        a, v = _relu_bn_direction_moments(rng.standard_normal((min(chunk, samples - start), b)))
        jsq.append(a)
        gvar.append(v)
    jsq, gvar = np.concatenate(jsq), np.concatenate(gvar)
    q_minus_c = gvar.mean() * b / (b - 1)
    chi = (b / (b - 3)) * jsq.mean() / (q_minus_c * (b - 1))
    # standard error of the ratio of the two sample means (delta method)
    rel = np.sqrt(np.var(jsq / jsq.mean() - gvar / gvar.mean()) / len(jsq))
    return float(chi), float(chi * rel)


# ---------------------------------------------------------------- residual ReLU nets


@functools.lru_cache(maxsize=8)
def post_activation_relu_moments(branch_gain: float = 2.0, samples: int = 1_000_000,
                                 iterations: int = 60, seed: int = 0) -> tuple[float, float]:
    """(p, rho) at the stationary state of h' = relu(h + F(h)), h >= 0: p = P(h + F(h) > 0),
    the open fraction of the ReLU after the addition, and rho = E[h'^2] / E[(h + F(h))^2].

    Mean field: F(h) is Gaussian, independent of h at the same neuron, with variance
    `branch_gain` E[h^2] (He init, two convs with a ReLU between: 2 * 1/2 * 2 = 2); the law of
    h (rescaled) settles within ~10 blocks. Population dynamics over `samples` values with a
    fixed seed (deterministic; standard error ~5e-4), averaged over the second half."""
    rng = np.random.default_rng(seed)
    h = np.abs(rng.standard_normal(samples))
    opens, ratios = [], []
    for step in range(iterations):
        s = h + math.sqrt(branch_gain * np.mean(h**2)) * rng.standard_normal(samples)
        h = np.maximum(s, 0.0)
        if step >= iterations // 2:
            opens.append(np.mean(s > 0))
            ratios.append(np.mean(h**2) / np.mean(s**2))
        h /= math.sqrt(np.mean(h**2))
    return float(np.mean(opens)), float(np.mean(ratios))


def post_activation_relu_open_fraction(branch_gain: float = 2.0) -> float:
    """p of `post_activation_relu_moments`: 0.652 under He init."""
    return post_activation_relu_moments(branch_gain)[0]


# ---------------------------------------------------------------- borders


def border_factor(spatial: int | None, *, stationary: bool = True) -> float:
    """Per-layer factor on the squared norm that zero padding costs a stride-1 3x3 conv
    (padding 1) on a `spatial` x `spatial` map, for a net without normalization.

    In the mean field the backward pass of such a layer maps the per-position gradient
    second moments m (H x H) to (1/9) A m A (times chi), A the H x H tridiagonal matrix of
    ones (the valid taps along one axis). A spatially uniform gradient (the head's global
    average pool sends one) loses (1 - 2 / (3H))^2 at the first layer (`stationary=False`:
    0.979 / 0.958 / 0.917 in norm on 32 / 16 / 8 maps); deeper in a stage the profile
    settles on A's leading eigenvector (a product of sines) and each layer passes
    ((1 + 2 cos(pi / (H + 1))) / 3)^2 (`stationary=True`: 0.994 / 0.977 / 0.921 in squared
    norm). None: no borders, 1."""
    if spatial is None:
        return 1.0
    if isinstance(spatial, bool) or not isinstance(spatial, int) or spatial < 1:
        raise ValueError(f"spatial must be the map's side length (a positive integer) or None, got {spatial!r}")
    if stationary:
        return ((1.0 + 2.0 * math.cos(math.pi / (spatial + 1))) / 3.0) ** 2
    return (1.0 - 2.0 / (3.0 * spatial)) ** 2


def weight_variance(kernel_init: str) -> float | None:
    pick("kernel initializer", kernel_init, KERNEL_INITS)
    return WEIGHT_VARIANCE.get(kernel_init)


def check_switches(norm: str, activation: str, bn: str, layers_per_unit: int, effective_batch, spatial):
    pick("normalization", norm, dict.fromkeys(NORMS))
    pick("activation", activation, ACTIVATIONS)
    pick("BatchNorm policy (bn)", bn, {"batch": 0, "eval": 0})
    if isinstance(layers_per_unit, bool) or not isinstance(layers_per_unit, int) or layers_per_unit < 1:
        raise ValueError(f"layers_per_unit must be a positive integer (2 for a basic block), got {layers_per_unit!r}")
    if spatial is not None:
        border_factor(spatial)
    if effective_batch is not None and (isinstance(effective_batch, bool) or not isinstance(effective_batch, int)
                                        or effective_batch < 4):
        raise ValueError(f"effective_batch must be an integer >= 4 or None (large batch), got {effective_batch!r}")
