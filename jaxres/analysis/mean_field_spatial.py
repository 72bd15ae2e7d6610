"""The spatial mean field of a CIFAR-style conv net: per-position variance and gradient
maps through every 3x3 conv's valid taps, so zero-padding borders, the stem's forward
transient, stride-2 transitions and the head's uniform gradient are all predicted
(`mean_field_unit_norms`); see `theory` for the scalar rates it refines.
"""

from __future__ import annotations

import math

import numpy as np

from jaxres.analysis.mean_field import _hermite, _np_activation, check_switches, post_activation_relu_moments

def _tap_matrix(size_in: int, size_out: int, stride: int, kernel: int = 3) -> np.ndarray:
    """(size_out, size_in) 0/1 matrix of the valid taps along one axis of a `kernel` conv with
    padding kernel // 2 and `stride`: T[o, i] = 1 iff input i feeds output o."""
    t = np.zeros((size_out, size_in))
    for o in range(size_out):
        for tap in range(kernel):
            i = stride * o + tap - kernel // 2
            if 0 <= i < size_in:
                t[o, i] = 1.0
    return t


def _activation_moments(activation: str, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E[phi(sqrt(q) z)^2], E[phi'(sqrt(q) z)^2]) elementwise over the array q."""
    if activation == "relu":
        return q / 2.0, np.full_like(q, 0.5)
    phi, dphi = _np_activation(activation)
    nodes, weights = _hermite(101)
    x = np.sqrt(q)[..., None] * nodes
    return np.sum(weights * phi(x) ** 2, -1), np.sum(weights * dphi(x) ** 2, -1)


def _fan_variance(kernel_init: str, c_in: int, c_out: int, taps: int = 9) -> float | None:
    """The weight variance of a conv under `kernel_init` (He: 2 / fan, fan-out = taps C_out)."""
    scale = {"he_normal_fan_out": (2.0, "out"), "he_normal_fan_in": (2.0, "in"), "he_uniform_fan_in": (2.0, "in"),
             "lecun_normal": (1.0, "in"), "glorot_normal": (1.0, "avg"), "glorot_uniform": (1.0, "avg")}
    if kernel_init not in scale:
        return None
    gain, mode = scale[kernel_init]
    fan = {"in": taps * c_in, "out": taps * c_out, "avg": taps * (c_in + c_out) / 2}[mode]
    return gain / fan


class _Layer:
    """One conv (taps T, C_in -> C_out, weight variance v) + optional BN + activation in the
    spatial mean field: `forward(stat)` maps the input's per-position statistic (E[a^2], or
    without the batch mean under BN) to the activation's (E[phi^2], batch variance), keeping
    phi'^2 and the BN scale for `backward(m)` (per-channel gradient second moments at the
    activation's output -> at the conv's input)."""

    def __init__(self, taps: np.ndarray, c_in: int, c_out: int, variance: float, activation: str | None,
                 batchnorm: bool):
        self.taps, self.c_in, self.c_out, self.variance = taps, c_in, c_out, variance
        self.activation, self.batchnorm = activation, batchnorm

    def preactivation(self, stat: np.ndarray) -> np.ndarray:
        q = self.c_in * self.variance * self.taps @ stat @ self.taps.T
        self.scale = float(q.mean()) if self.batchnorm else 1.0  # BN divides by the spatial mean
        return q / self.scale

    def forward(self, stat: np.ndarray) -> np.ndarray:
        q = self.preactivation(stat)
        second, self.dphi_sq = _activation_moments(self.activation, q)
        if self.batchnorm:  # the next BN sees the batch variance: remove E[phi]^2
            mean = _activation_mean(self.activation, q)
            return second - mean**2
        return second

    def backward(self, m: np.ndarray, through_activation: bool = True) -> np.ndarray:
        if through_activation:
            m = self.dphi_sq * m
        return self.c_out * self.variance * self.taps.T @ (m / self.scale) @ self.taps


def _activation_mean(activation: str, q: np.ndarray) -> np.ndarray:
    """E[phi(sqrt(q) z)] elementwise."""
    if activation == "relu":
        return np.sqrt(q / (2.0 * math.pi))
    phi, _ = _np_activation(activation)
    nodes, weights = _hermite(101)
    return np.sum(weights * phi(np.sqrt(q)[..., None] * nodes), -1)


def mean_field_unit_norms(shapes, *, norm: str, activation: str, residual: bool, bn: str = "batch",
                          kernel_init: str = "he_normal_fan_out", input_variance: float = 1.0) -> np.ndarray | None:
    """Mean-field ||d z / d h|| at every unit input of a CIFAR-style net, relative to the
    head's input (= 1), with zero-padding borders, stride-2 transitions and the stem.

    `shapes`: `[(in_shape, out_shape)]` per unit, NHWC, stem first and head last (e.g.
    `[(s.in_shape, s.out_shape) for s in segments]`). Assumed architecture: a 3x3 stem conv
    (+ BN) - act; basic blocks of two 3x3 convs (padding 1, the first strided where the map
    shrinks), each (+ BN) followed by the activation; when `residual`, identity shortcuts
    (option A: subsample + zero channels at transitions) added before the last activation;
    a global-average-pool head, which sends a spatially uniform gradient. The recursion
    tracks per-position H x H maps of the pre-activation variance (forward) and of the
    per-channel gradient second moment (backward) through each conv's valid taps, with the
    weight variance of `kernel_init` (mean field: width -> inf, gradient independence).
    BN in train mode (`bn="batch"`) standardizes with the spatial mean of the variance map
    and divides the backward pass by it (large batch). Residual ReLU nets use the stationary
    open fraction and second moment of relu(x + F(x)) (`post_activation_relu_open_fraction`).
    Returns (units,) floats, stem first, or None without a theory here (residual nets with BN
    or an activation other than ReLU, unknown initializers)."""
    check_switches(norm, activation, bn, 2, None, None)
    batchnorm = norm == "batchnorm" and bn == "batch"
    if residual and (batchnorm or activation != "relu"):
        return None
    shapes = [(tuple(a), tuple(b)) for a, b in shapes]
    if len(shapes) < 3:
        raise ValueError(f"shapes needs the stem, at least one unit and the head, got {len(shapes)} entries")
    p_open, rho = post_activation_relu_moments() if residual else (None, None)
    units = []
    (_, h0, _, _), _ = shapes[0]
    stat = np.full((h0, h0), float(input_variance))
    for index, (in_shape, out_shape) in enumerate(shapes[:-1]):
        _, hi, _, ci = in_shape
        _, ho, _, co = out_shape
        stride = hi // ho
        v1, v2 = _fan_variance(kernel_init, ci, co), _fan_variance(kernel_init, co, co)
        if v1 is None:
            return None
        first = _Layer(_tap_matrix(hi, ho, stride), ci, co, v1, activation, batchnorm)
        if index == 0:
            stat = first.forward(stat)
            units.append((first,))
            continue
        second = _Layer(_tap_matrix(ho, ho, 1), co, co, v2, activation, batchnorm)
        branch = first.forward(stat)
        if not residual:
            stat = second.forward(branch)
            units.append((first, second))
            continue
        q2 = second.preactivation(branch)  # the branch's output variance (no activation yet)
        keep = (hi, ci) == (ho, co)
        sub = _tap_matrix(hi, ho, stride, kernel=1)
        identity = stat if keep else sub @ stat @ sub.T
        # relu(x + F(x)): the kept channels hold x >= 0 with the stationary law; the zero
        # channels of an option-A transition hold F(x) alone (a symmetric Gaussian).
        stat = (ci * rho * (identity + q2) + (co - ci) * q2 / 2.0) / co
        units.append((first, second, keep, sub, ci, co))
    _, hh, _, ch = shapes[-1][0]
    m = np.ones((hh, hh))
    norms = [ch * m.sum()]
    for index in reversed(range(len(units))):
        layers = units[index]
        if len(layers) == 1:
            m = layers[0].backward(m)
        elif len(layers) == 2:
            m = layers[0].backward(layers[1].backward(m))
        else:
            first, second, keep, sub, ci, co = layers
            kept = p_open * m  # the ReLU after the addition
            mixed = (ci * kept + (co - ci) * 0.5 * m) / co
            branch = first.backward(second.backward(mixed, through_activation=False))
            m = kept + branch if keep else sub.T @ kept @ sub + branch
        norms.append(shapes[index][0][3] * m.sum())
    norms = np.sqrt(np.array(norms[::-1]))
    return norms[:-1] / norms[-1]


def stationary_stage_rate(spatial: int, kernel_init: str, layers_per_unit: int, **switches) -> float:
    """The mid-stage per-unit rate of `mean_field_unit_norms` on a long one-stage net at
    `spatial` (60 units, geometric mean over units 25-35: away from the stem's forward
    transient and the head's uniform gradient). Basic blocks only (2 layers per unit)."""
    if layers_per_unit != 2:
        raise ValueError(f"border-aware rates are computed for basic blocks (layers_per_unit=2), got {layers_per_unit}")
    c = 64
    shapes = ([((1, spatial, spatial, 3), (1, spatial, spatial, c))] + [((1, spatial, spatial, c),) * 2] * 60
              + [((1, spatial, spatial, c), (1, 10))])
    norms = mean_field_unit_norms(shapes, norm="none", kernel_init=kernel_init, **switches)
    return float((norms[25] / norms[35]) ** (1 / 10))
