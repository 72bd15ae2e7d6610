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


def activation_moments(activation: str, var) -> dict:
    """Gaussian moments of phi, elementwise over the array `var` (z ~ N(0, var)): second
    E[phi^2], slope_sq E[phi'^2], mean E[phi], slope E[phi'], slope_z E[phi' z], slope_sq_z2
    E[phi'^2 z^2], slope_z2 E[phi' z^2]; closed forms for ReLU, Gauss-Hermite otherwise."""
    var = np.asarray(var, np.float64)
    if activation == "relu":
        half = np.full_like(var, 0.5)
        root = np.sqrt(var / (2.0 * math.pi))
        return {"second": var / 2.0, "slope_sq": half, "mean": root, "slope": half, "slope_z": root,
                "slope_sq_z2": var / 2.0, "slope_z2": var / 2.0}
    phi, dphi = _np_activation(activation)
    nodes, weights = _hermite(101)
    z = np.sqrt(var)[..., None] * nodes
    f, d = phi(z), dphi(z)

    def e(values):
        return np.sum(weights * values, -1)

    return {"second": e(f**2), "slope_sq": e(d**2), "mean": e(f), "slope": e(d), "slope_z": e(d * z),
            "slope_sq_z2": e(d**2 * z**2), "slope_z2": e(d * z**2)}


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


def _bn_direction_moments(activation: str, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For z (M, B): per row, ||P D (P - u u^T)||_F^2 and the biased batch variance of
    phi(sqrt(B) u), where u = P z / |P z| (the direction of the centred batch), D =
    diag(phi'(sqrt(B) u)), P = I - 11^T / B. With s = |P z| / sqrt(B) the Jacobian of
    phi(BN(z)) is D (P - u u^T) / s (Flax's train-mode BN with the biased variance, epsilon -> 0).

    In closed form (P - u u^T is a projector and u _|_ 1; d the diagonal of D):
    ||P D (P - u u^T)||_F^2 = tr(D P D P) - u^T D P D u
                            = (1 - 2/B) sum d^2 + (sum d)^2 / B^2 - sum (d u)^2 + (sum d u)^2 / B.
    """
    b = z.shape[1]
    centred = z - z.mean(1, keepdims=True)
    u = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    x = np.sqrt(b) * u
    if activation == "relu":
        value, slope = np.maximum(x, 0.0), (x > 0).astype(np.float64)
    else:
        phi, dphi = _np_activation(activation)
        value, slope = phi(x), dphi(x)
    du = slope * u
    jsq = ((1 - 2 / b) * np.sum(slope**2, 1) + np.sum(slope, 1) ** 2 / b**2 - np.sum(du**2, 1)
           + np.sum(du, 1) ** 2 / b)
    return jsq, value.var(1)


@functools.lru_cache(maxsize=64)
def bn_layer_chi(activation: str, effective_batch: int | None = None, *, samples: int | None = None,
                 seed: int = 0) -> tuple[float, float]:
    """(chi, standard error): the per-layer squared-norm factor of a BN(train) - phi - linear
    layer at batch B = `effective_batch` (None: B -> inf, exact, error 0).

    Finite B, in Yang et al.'s (2019) mean field: one neuron's pre-activations over the batch,
    h in R^B, are N(0, Sigma*) with Sigma* the BSB1 fixed point; BN removes the batch mean and
    the scale, so G(h) = phi(BN(h)) = G(z) for z ~ N(0, I_B) and Sigma* = E[G(z) G(z)^T] needs
    no iteration (its q - c = E[batch variance of G] B / (B - 1)). The gradient covariance
    converges to the permutation-invariant eigenvector P = I - 11^T / B of Pi -> E[J^T Pi J]
    (BN's Jacobian kills the all-ones direction), so chi(B) = E||P J||_F^2 / ((q - c)(B - 1)),
    J taken at h ~ N(0, Sigma*). J = D (P - u u^T) / s splits into the centred batch's
    direction u and its scale, s^2 ~ chi^2_{B-1} / B independent of u, whose E[1 / s^2] =
    B / (B - 3) is exact (infinite at B = 3: the rate diverges); only the bounded direction
    part is sampled: `samples` directions (default 2^24 / B, at least 1024), standard error
    below 0.1%. Any activation with a mean-field table (relu, tanh, sigmoid, linear). Fixed
    seed: deterministic (and cached).
    """
    if effective_batch is None:
        return bn_layer_chi_large_batch(activation), 0.0
    if isinstance(effective_batch, bool) or not isinstance(effective_batch, int) or effective_batch < 4:
        raise ValueError(f"effective_batch must be an integer >= 4 (BN's gradient rate is infinite at a batch "
                         f"of 3), got {effective_batch!r}; pass None for the large-batch limit")
    if activation != "relu":
        _np_activation(activation)  # names the activations with a table
    b = effective_batch
    if samples is None:
        samples = int(max(1024, 2**24 // b))
    rng = np.random.default_rng(seed)
    jsq, gvar = [], []
    chunk = max(1, 2**21 // b)
    for start in range(0, samples, chunk):
        a, v = _bn_direction_moments(activation, rng.standard_normal((min(chunk, samples - start), b)))
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


def branch_moments(activation: str, stream_second: np.ndarray, weight_variance: float = 2.0):
    """(Var F, chi_F) of a residual branch F(h) = W2 phi(W1 h) in the mean field: the branch
    output's variance and the factor its backward pass puts on a squared gradient
    (sigma_w^2 E[phi'(z)^2] sigma_w^2, z ~ N(0, sigma_w^2 E[h^2])), elementwise over the
    array `stream_second` = E[h^2]."""
    moments = activation_moments(activation, weight_variance * np.asarray(stream_second, np.float64))
    return weight_variance * moments["second"], weight_variance * weight_variance * moments["slope_sq"]


@functools.lru_cache(maxsize=16)
def post_activation_trajectory(activation: str = "relu", weight_variance: float = 2.0, samples: int = 400_000,
                               blocks: int = 48, seed: int = 0, follow_neurons: bool = True) -> dict:
    """The per-block rate of ||d z / d h|| in a wide MLP of post-activation residual blocks
    h' = phi(h + W2 phi(W1 h)) (no normalization), with each neuron's mask followed along its
    own trajectory.

    Mean field (width -> inf): the branch output F at a neuron is Gaussian, independent of the
    neuron's own h (`branch_moments`); the backward branch term is a fresh Gaussian whose
    variance is chi_F times the population's E[phi'(s)^2 g^2]. What the stationary theory
    (`post_activation_relu_moments`: rate sqrt(p (1 + chi_F))) leaves out: phi'(s) at the
    addition and the gradient arriving at the same neuron are correlated, because the
    identity path carries each neuron's earlier masks (a neuron with a large h stays open
    block after block). Here `samples` neurons run forward through `blocks` blocks (stored
    phi'(s)^2), then the conditional second moment m of each neuron's gradient runs back:
    m = phi'(s)^2 m' + chi_F E[phi'(s)^2 m'] (exact given the masks; the branch noise is
    independent). Returns {"rate": geometric mean per block over the middle half, "open":
    P(s > 0) (ReLU), "persistence": P(open | open in the previous block) (ReLU)}. Fixed
    seed: deterministic (cached); sampling error ~1e-3 on the rate."""
    rng = np.random.default_rng(seed)
    phi = (lambda x: np.maximum(x, 0.0)) if activation == "relu" else _np_activation(activation)[0]
    dphi = (lambda x: (x > 0).astype(np.float64)) if activation == "relu" else _np_activation(activation)[1]
    h = rng.standard_normal(samples)
    if activation == "relu":
        h = np.abs(h)
    slopes, chis, opens, stays = [], [], [], []
    previous = None
    for _ in range(blocks):
        second = float(np.mean(h**2))
        var_f, chi_f = branch_moments(activation, np.array(second), weight_variance)
        s = h + np.sqrt(var_f) * rng.standard_normal(samples)
        h = phi(s)
        slopes.append(dphi(s) ** 2 if follow_neurons else rng.permutation(dphi(s) ** 2))
        chis.append(float(chi_f))
        if activation == "relu":
            opened = s > 0
            opens.append(opened.mean())
            if previous is not None:
                stays.append(np.mean(opened[previous]))
            previous = opened
            h /= math.sqrt(np.mean(h**2))  # homogeneous: only the law of h / |h| matters
    m = np.ones(samples)
    sq = [m.mean()]
    for slope, chi in zip(reversed(slopes), reversed(chis)):
        kept = slope * m
        m = kept + chi * kept.mean()
        sq.append(m.mean())
    sq = np.array(sq[::-1])  # sq[l]: at block l's input
    ratios = np.sqrt(sq[:-1] / sq[1:])
    middle = ratios[blocks // 4: 3 * blocks // 4]
    out = {"rate": float(np.exp(np.mean(np.log(middle))))}
    if activation == "relu":
        out["open"] = float(np.mean(opens[blocks // 4:]))
        out["persistence"] = float(np.mean(stays[blocks // 4:]))
    return out


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
