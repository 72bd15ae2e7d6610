"""The spatial mean field of a CIFAR-style conv net: per-position variance and gradient
maps through every 3x3 conv's valid taps, so zero-padding borders, the stem's forward
transient, stride-2 transitions and the head's uniform gradient are all predicted
(`mean_field_unit_norms`); see `theory` for the scalar rates it refines.

Beyond the per-position variances, three mechanisms (each tested against a measurement in
tests/test_analysis_theory.py and isolated by a control in jaxres/experiments/theory_check.py):

- **BatchNorm's border pattern.** A conv's output has, per channel, an example-independent
  mean at every position (the weights times the previous activation's mean, e.g. ReLU's
  positive one). In the interior it is the same at every position, and BN's per-channel
  centring removes it; at the borders fewer taps contribute, and the pattern that is left
  inflates BN's divisor without carrying any per-example signal. The mean field tracks it as
  the covariance over channels K(p, p') of the per-channel mean maps (the infinite-width
  kernel of the example-independent part): the conv maps the activation's pattern moment
  Lambda to K = c_in v sum_taps Lambda(p + t, p' + t), BN centres K over positions and
  divides by mean_p (q(p) + K_c(p, p)), and the activation's pattern moment is
  Lambda(p, p') = E[phi(z_p) phi(z_p')] with Cov(z_p, z_p') = K_c(p, p') (two different
  examples: only the pattern is shared). Odd activations (tanh) have no mean: no pattern.
- **The head's batch term** (`batch`): BN's backward pass removes the batch mean of its
  gradient, 1 / (N H W) of an incoherent gradient but 1 / N of the head's spatially uniform
  one (the cotangent sits on one example): the first BN from the head passes
  1 - (1 + 2/pi) / N + O(1/N^2) of the per-example block's squared norm for ReLU
  (`_head_bn_factors`, per position, exact to O(1/N^2) for positions independent within an
  example). Deeper BNs see gradients whose batch sum is already zero. Finite N H W elsewhere:
  each BN layer's factor times chi(N H W) / chi(inf) (`bn_layer_chi`).
- **Mask persistence in post-activation residual nets**: the stream relu(x + F(x)) is
  followed neuron by neuron (a population of `samples` values per position): a neuron whose
  x is large stays open block after block, and the gradient along the identity carries its
  own earlier masks (`mean_field.post_activation_trajectory`).
"""

from __future__ import annotations

import math

import numpy as np

from jaxres.analysis.mean_field import (
    _hermite,
    _np_activation,
    activation_moments,
    bn_layer_chi,
    bn_layer_chi_large_batch,
    check_switches,
)

# ---------------------------------------------------------------- taps


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


def _shift_sum(pattern: np.ndarray, size_out: int, stride: int, kernel: int = 3) -> np.ndarray:
    """K[a, b, a', b'] = sum over taps (tx, ty) of Lambda[s a + tx, s b + ty, s a' + tx, s b' + ty]
    (tap offsets centred, zero outside the map): the pattern covariance a conv (same weights
    for the same tap at every position) makes of its input's pattern moment, before the
    factor c_in * weight variance. `pattern`: (H, H, H, H); the taps separate into x and y."""
    pad = kernel // 2
    span = stride * (size_out - 1) + 1
    padded = np.pad(pattern, pad)
    along_y = sum(padded[:, t:t + span:stride, :, t:t + span:stride] for t in range(kernel))
    return sum(along_y[t:t + span:stride, :, t:t + span:stride, :] for t in range(kernel))


class _Conv:
    """One conv in the mean field: per-channel weight variance `variance` (fan-based), taps
    along each axis; maps per-position second moments forward and gradient second moments
    backward (gradient independence: the backward weights are fresh)."""

    def __init__(self, size_in: int, size_out: int, stride: int, c_in: int, c_out: int, variance: float,
                 kernel: int = 3):
        self.taps = _tap_matrix(size_in, size_out, stride, kernel)
        self.size_out, self.stride, self.kernel = size_out, stride, kernel
        self.c_in, self.c_out, self.variance = c_in, c_out, variance

    def forward(self, second: np.ndarray) -> np.ndarray:
        return self.c_in * self.variance * self.taps @ second @ self.taps.T

    def pattern(self, moment: np.ndarray) -> np.ndarray:
        """(n_out, n_out) pattern covariance from the input's (n_in, n_in) pattern moment."""
        side = round(math.sqrt(moment.shape[0]))
        k = _shift_sum(moment.reshape((side,) * 4), self.size_out, self.stride, self.kernel)
        return self.c_in * self.variance * k.reshape(self.size_out**2, self.size_out**2)

    def backward(self, m: np.ndarray) -> np.ndarray:
        return self.c_out * self.variance * self.taps.T @ m @ self.taps


# ---------------------------------------------------------------- activations


def _pattern_moment(activation: str, var: np.ndarray, cov: np.ndarray, order: int = 12) -> np.ndarray:
    """Lambda(p, p') = E[phi(z_p) phi(z_p')], z jointly Gaussian with variances `var` (n,) and
    covariance `cov` (n, n) (its diagonal: the pattern's own variance at p, below var). ReLU:
    the arc-cosine kernel (Cho & Saul 2009); otherwise Mehler's expansion
    sum_k rho^k / k! c_k(p) c_k(p'), c_k = E[phi(sigma u) He_k(u)], to `order`."""
    sigma = np.sqrt(var)
    outer = np.outer(sigma, sigma).astype(cov.dtype)
    rho = np.clip(cov / outer, -1.0, 1.0)
    if activation == "relu":  # sin(arccos rho) = sqrt(1 - rho^2)
        return outer / (2 * math.pi) * (np.sqrt(1.0 - rho * rho) + (math.pi - np.arccos(rho)) * rho)
    phi, _ = _np_activation(activation)
    nodes, weights = _hermite(101)
    coeff = (phi(sigma[:, None] * nodes) * weights) @ np.polynomial.hermite_e.hermevander(nodes, order)
    out = np.outer(coeff[:, 0], coeff[:, 0])
    if np.max(np.abs(rho)) > 1e-12:
        power = np.ones_like(rho)
        for k in range(1, order + 1):
            power = power * rho / k
            out += power * np.outer(coeff[:, k], coeff[:, k])
    return out


def _head_bn_factors(mom: dict, var: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The head's batch term at the first BN - phi from the head, whose upstream gradient is
    spatially uniform and sits on example i: per position, E[b_i(p)^2] (the per-example block)
    and sum_{j != i} E[b_j(p)^2] (what leaks to the other examples), in units of the uniform
    gradient's square, before BN's 1 / s^2.

    BN's backward (batch statistics, biased variance) maps g to g - S / (N n) - y R / (N n),
    S = sum g, R = sum g y over the batch's N x n positions, y the normalized pre-activation;
    here g = phi'(y_i) u on example i only. Taking the positions of one example as
    independent (the border pattern's correlation is left out) and u uniform, the moments
    a1 = E[phi'], a2 = E[phi'^2], e1 = E[phi' y], e2 = E[phi'^2 y^2], c = E[phi' y^2] give every
    term to O(1 / n) relative accuracy; ReLU on unit variance: 1 - (1 + 2/pi)/N + (1/2 + 1/pi)/N^2."""
    a1, a2 = mom["slope"].ravel(), mom["slope_sq"].ravel()
    e1, e2, c = mom["slope_z"].ravel(), mom["slope_sq_z2"].ravel(), mom["slope_z2"].ravel()
    v = np.asarray(var, np.float64).ravel()
    n = a1.size
    w = 1.0 / (batch * n)
    sum_a1, sum_e1 = a1.sum(), e1.sum()
    s = a1 * (sum_a1 - a1) + a2  # E[g(p) S]
    t4 = e2 + e1 * (sum_e1 - e1)  # E[g(p) y(p) R]
    t5 = c * (sum_a1 - a1) + t4  # E[S y(p) R]
    ss, r2 = s.sum(), t4.sum()  # E[S^2], E[R^2]
    block = a2 - 2 * w * s + w**2 * ss - 2 * w * t4 + 2 * w**2 * t5 + w**2 * v * r2
    others = (batch - 1) * w**2 * (ss + v * r2)
    shape = np.shape(mom["slope"])
    return block.reshape(shape), others.reshape(shape)


# ---------------------------------------------------------------- layers


class _NormAct:
    """BN (train mode, optional) then phi, on the output of `conv`. Forward: per-position
    variance q (per example, without the pattern) and the pattern covariance K in; the
    activation's per-example variance F and pattern moment Lambda out (with BN: see the
    module docstring; without: only the total second moment matters, returned as F, and
    Lambda is None). Backward: phi'^2 / s^2 (and the finite-batch factor)."""

    def __init__(self, activation: str, batchnorm: bool, batch: int | None):
        self.activation, self.batchnorm, self.batch = activation, batchnorm, batch
        self.at_head = False  # the first BN from the head (see `_head_bn_factors`)
        self.finite = 1.0  # chi(N H W) / chi(inf) with BN and a batch

    def forward(self, q: np.ndarray, pattern: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        side = q.shape[0]
        if not self.batchnorm:
            self.scale, self.var = 1.0, q
            self.mom = activation_moments(self.activation, q)
            return self.mom["second"], None
        n = side * side
        centred = np.zeros((n, n), np.float32) if pattern is None else (
            pattern - pattern.mean(0, keepdims=True) - pattern.mean(1, keepdims=True) + pattern.mean())
        pattern_var = float(np.trace(centred, dtype=np.float64) / n)
        self.scale = float(q.mean() + pattern_var)  # BN's divisor: the examples' variance and the pattern's
        self.pattern_share = pattern_var / self.scale
        cov = (centred / self.scale).astype(np.float32)  # float32: the pattern's 4D maps are large
        self.var = q / self.scale + np.diag(cov).reshape(side, side)
        self.mom = activation_moments(self.activation, self.var)
        if pattern is None and np.max(np.abs(self.mom["mean"])) <= 1e-12 * math.sqrt(np.max(self.var)):
            # odd phi (tanh), no pattern yet: none arises (its mean is 0 up to quadrature rounding)
            moment = None
            diagonal = 0.0
        else:
            moment = _pattern_moment(self.activation, self.var.ravel(), cov)
            diagonal = np.diag(moment).reshape(side, side)
        if self.batch is not None:
            chi, _ = bn_layer_chi(self.activation, self.batch * n)
            self.finite = chi / bn_layer_chi_large_batch(self.activation)
        return self.mom["second"] - diagonal, moment

    def backward(self, m: np.ndarray, quantity: str = "block") -> np.ndarray:
        if self.at_head:  # m is uniform there
            block, others = _head_bn_factors(self.mom, self.var, self.batch)
            slope = block if quantity == "block" else block + others
            return slope * m * self.finite / self.scale
        return self.mom["slope_sq"] * m * self.finite / self.scale


def _fan_variance(kernel_init: str, c_in: int, c_out: int, taps: int = 9) -> float | None:
    """The weight variance of a conv under `kernel_init` (He: 2 / fan, fan-out = taps C_out)."""
    scale = {"he_normal_fan_out": (2.0, "out"), "he_normal_fan_in": (2.0, "in"), "he_uniform_fan_in": (2.0, "in"),
             "lecun_normal": (1.0, "in"), "glorot_normal": (1.0, "avg"), "glorot_uniform": (1.0, "avg")}
    if kernel_init not in scale:
        return None
    gain, mode = scale[kernel_init]
    fan = {"in": taps * c_in, "out": taps * c_out, "avg": taps * (c_in + c_out) / 2}[mode]
    return gain / fan


# ---------------------------------------------------------------- whole nets


def mean_field_unit_norms(shapes, *, norm: str, activation: str, residual: bool, preactivation: bool = False,
                          bn: str = "batch", kernel_init: str = "he_normal_fan_out", input_variance: float = 1.0,
                          batch: int | None = None, quantity: str = "block", shortcut: str = "A",
                          samples: int = 2**19, seed: int = 0, follow_neurons: bool = True,
                          head_term: bool = True) -> np.ndarray | None:
    """Mean-field ||d z / d h|| at every unit input of a CIFAR-style net, relative to the
    head's input (= 1), with zero-padding borders, stride-2 transitions and the stem.

    `shapes`: `[(in_shape, out_shape)]` per unit, NHWC, stem first and head last (e.g.
    `[(s.in_shape, s.out_shape) for s in segments]`). Assumed architecture (the zoo's
    `cifar_resnet`): a 3x3 stem conv (+ BN) - act (pre-activation nets: the conv alone);
    basic blocks of two 3x3 convs (padding 1, the first strided where the map shrinks): plain
    and post-activation units conv (+ BN) - act - conv (+ BN) (+ shortcut) - act,
    pre-activation units act - conv - act - conv + shortcut (no normalization); shortcuts:
    identity, or at a transition option A (`shortcut="A"`: subsample + zero channels) or B (a
    1x1 stride-2 projection, of the pre-activation in pre-activation nets); a
    global-average-pool head (pre-activation nets: act first), which sends a spatially
    uniform gradient. Mean field: width -> inf, gradient independence, the weight variance
    of `kernel_init`, inputs N(0, `input_variance`).

    BN in train mode (`bn="batch"`) includes the border pattern, and with `batch` (the
    number of examples N) the head's batch term and chi(N H W) / chi(inf) per layer (see the
    module docstring); `quantity` "block" predicts the per-example block ||d z_i / d h_i||,
    "total" the whole gradient ||d z_i / d h||; `head_term=False` leaves the head's batch
    term out (the control). Post-activation residual nets follow each
    neuron's trajectory with `samples` stream values per unit (fixed `seed`: deterministic);
    `follow_neurons=False` shuffles each block's phi'(s)^2 over the neurons in the backward
    pass (the control: the stationary theory, masks independent of the gradient).
    Returns (units,) floats, stem first, or None without a theory here (residual nets with
    BN, unknown initializers)."""
    check_switches(norm, activation, bn, 2, None, None)
    if quantity not in ("block", "total"):
        raise ValueError(f"quantity must be 'block' or 'total', got {quantity!r}")
    if shortcut not in ("A", "B"):
        raise ValueError(f"shortcut must be 'A' (subsample + zero channels) or 'B' (projection), got {shortcut!r}")
    batchnorm = norm == "batchnorm" and bn == "batch"
    if residual and batchnorm:
        return None
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 2):
        raise ValueError(f"batch must be an integer >= 2 (the examples BN averages over) or None, got {batch!r}")
    shapes = [(tuple(a), tuple(b)) for a, b in shapes]
    if len(shapes) < 3:
        raise ValueError(f"shapes needs the stem, at least one unit and the head, got {len(shapes)} entries")
    convs = []
    for index, ((_, hi, _, ci), (_, ho, _, co)) in enumerate(shapes[:-1]):
        stride = hi // ho
        v1, v2 = _fan_variance(kernel_init, ci, co), _fan_variance(kernel_init, co, co)
        if v1 is None:
            return None
        first = _Conv(hi, ho, stride, ci, co, v1)
        if index == 0:
            convs.append((first,))
            continue
        proj = None
        if (hi, ci) != (ho, co) and shortcut == "B":
            proj = _Conv(hi, ho, stride, ci, co, _fan_variance(kernel_init, ci, co, taps=1), kernel=1)
        convs.append((first, _Conv(ho, ho, 1, co, co, v2), proj))
    if not residual:
        sums, head = _plain_net(convs, activation, batchnorm, batch if head_term else None, quantity, input_variance,
                                batch)
    elif preactivation:
        sums, head = _preactivation_net(convs, activation, input_variance)
    else:
        sums, head = _post_activation_net(convs, activation, input_variance, samples, seed, follow_neurons)
    channels = [in_shape[3] for in_shape, _ in shapes]
    norms = np.sqrt(np.array([c * m for c, m in zip(channels, sums + [head])]))
    return norms[:-1] / norms[-1]


def _option_a(conv: _Conv) -> bool:
    """Whether a unit with first conv `conv` changes the shape (a transition)."""
    return conv.stride > 1 or conv.c_in != conv.c_out


def _plain_net(convs, activation, batchnorm, head_batch, quantity, input_variance, batch):
    """Plain nets (conv (+ BN) - act, twice per unit): (per unit input, sum_p of the
    per-channel gradient second moment; the same at the head's input). `head_batch`: N for
    the head's batch term (None: left out); `batch`: N for the finite-batch factors."""
    size = convs[0][0].taps.shape[1]
    second, pattern = np.full((size, size), float(input_variance)), None
    layers = []
    for unit in convs:
        pairs = []
        for conv in unit[:2]:
            q = conv.forward(second)
            k = conv.pattern(pattern) if (batchnorm and pattern is not None) else None
            act = _NormAct(activation, batchnorm, batch)
            second, pattern = act.forward(q, k)
            pairs.append((conv, act))
        layers.append(pairs)
    if batchnorm and head_batch is not None:
        layers[-1][-1][1].at_head = True
    m = np.ones_like(second)
    head = float(m.sum())
    sums = []
    for pairs in reversed(layers):
        for conv, act in reversed(pairs):
            m = conv.backward(act.backward(m, quantity))
        sums.append(float(m.sum()))
    return sums[::-1], head


def _preactivation_net(convs, activation, input_variance):
    """x + conv2(phi(conv1(phi(x)))), no normalization: x stays a zero-mean Gaussian (a sum
    of independent ones), so per-position variances suffice; the gradient at phi(x) meets a
    fresh branch term (no mask persistence: the masks sit on the branch, not the identity).
    The head applies phi before its pool."""
    size = convs[0][0].taps.shape[1]
    stat = convs[0][0].forward(np.full((size, size), float(input_variance)))  # the stem: conv only
    cache = []
    for first, second, proj in convs[1:]:
        outer = activation_moments(activation, stat)
        inner = activation_moments(activation, first.forward(outer["second"]))
        branch = second.forward(inner["second"])
        sub = _tap_matrix(stat.shape[0], first.size_out, first.stride, kernel=1)
        if proj is not None:
            identity = proj.forward(outer["second"])
        elif _option_a(first):  # subsample; the new channels' identity is zero
            identity = (first.c_in / first.c_out) * (sub @ stat @ sub.T)
        else:
            identity = stat
        cache.append((first, second, proj, outer, inner, sub))
        stat = identity + branch
    m = activation_moments(activation, stat)["slope_sq"] * np.ones_like(stat)
    head = float(m.sum())
    sums = []
    for first, second, proj, outer, inner, sub in reversed(cache):
        branch = first.backward(inner["slope_sq"] * second.backward(m))
        if proj is not None:
            m = outer["slope_sq"] * (branch + proj.backward(m))
        elif _option_a(first):
            m = outer["slope_sq"] * branch + sub.T @ m @ sub
        else:
            m = outer["slope_sq"] * branch + m
        sums.append(float(m.sum()))
    stem = convs[0][0]
    sums.append(float(stem.backward(m).sum()))
    return sums[::-1], head


def _post_activation_net(convs, activation, input_variance, samples, seed, follow_neurons=True):
    """phi(x + conv2(phi(conv1(x)))), no normalization, followed neuron by neuron: at every
    position a population of stream values (`samples` spread over the stem's positions; a
    doubling transition keeps the old neurons, subsampled, and adds as many new ones whose
    identity is zero). The branch output at a neuron is Gaussian, independent of the neuron
    (mean field), with the variance the taps give; the backward pass keeps each neuron's
    conditional E[g^2] through phi'(s)^2 of its own trajectory and adds the branch's fresh
    term."""
    rng = np.random.default_rng(seed)
    phi, dphi = ((lambda x: np.maximum(x, 0.0)), (lambda x: (x > 0).astype(np.float64))) if activation == "relu" \
        else _np_activation(activation)
    stem = convs[0][0]
    size = stem.taps.shape[1]
    count = max(64, samples // (stem.size_out**2))
    q = stem.forward(np.full((size, size), float(input_variance)))
    z = np.sqrt(q) * rng.standard_normal((count,) + q.shape)
    h, stem_slope_sq = phi(z), dphi(z) ** 2
    cache = []
    for first, second, proj in convs[1:]:
        inner = activation_moments(activation, first.forward(np.mean(h**2, 0)))
        var = second.forward(inner["second"])
        keep = not _option_a(first)
        if keep:
            identity = h
        else:
            if first.c_out % first.c_in:
                raise ValueError(f"option-A transitions need c_out a multiple of c_in, got {first.c_in} -> "
                                 f"{first.c_out}")
            old = h[:, ::first.stride, ::first.stride]
            identity = np.concatenate([old, np.zeros((old.shape[0] * (first.c_out // first.c_in - 1),)
                                                     + old.shape[1:])])
        s = identity + np.sqrt(var) * rng.standard_normal(identity.shape)
        h = phi(s)
        slope_sq = dphi(s) ** 2 if follow_neurons else rng.permutation(dphi(s) ** 2)
        cache.append((first, second, inner, slope_sq, keep, len(h) // (first.c_out // first.c_in)))
    m = np.ones(h.shape)
    head = float(m.mean(0).sum())
    sums = []
    for first, second, inner, slope_sq, keep, old in reversed(cache):
        kept = slope_sq * m
        branch = first.backward(inner["slope_sq"] * second.backward(kept.mean(0)))
        if keep:
            m = kept + branch
        else:
            m = np.broadcast_to(branch, (old,) + branch.shape).copy()
            m[:, ::first.stride, ::first.stride] += kept[:old]
        sums.append(float(m.mean(0).sum()))
    sums.append(float(stem.backward(np.mean(stem_slope_sq * m, 0)).sum()))
    return sums[::-1], head


def border_pattern_share(spatial: int, activation: str = "relu", *, layers: int = 16,
                         kernel_init: str = "he_normal_fan_out") -> float:
    """The share of BN's divisor that is the border pattern (the spatial variance of the
    per-channel, example-independent mean map) at the conv outputs of a long plain BN stage
    of 64 channels on `spatial`^2 maps, after `layers` layers from N(0, 1) inputs (what
    `twins.conv_twin_rates` measures as `pattern_share`). 0 without borders or for odd phi."""
    conv = _Conv(spatial, spatial, 1, 64, 64, _fan_variance(kernel_init, 64, 64))
    second, pattern = np.ones((spatial, spatial)), None
    for _ in range(layers):
        act = _NormAct(activation, True, None)
        second, pattern = act.forward(conv.forward(second), None if pattern is None else conv.pattern(pattern))
    return act.pattern_share


def stationary_stage_rate(spatial: int, kernel_init: str, layers_per_unit: int, *, units: int | None = None,
                          **switches) -> float:
    """The mid-stage per-unit rate of `mean_field_unit_norms` on a long one-stage net of 64
    channels at `spatial` (`units` units, default 60, or 24 with BN, whose border pattern
    costs more per layer; geometric mean over the middle sixth, away from the stem's forward
    transient and the head's uniform gradient). Basic blocks only (2 layers per unit);
    `switches`: `mean_field_unit_norms`'s (norm, activation, residual, ...)."""
    if layers_per_unit != 2:
        raise ValueError(f"border-aware rates are computed for basic blocks (layers_per_unit=2), got {layers_per_unit}")
    if units is None:
        units = 24 if switches.get("norm") == "batchnorm" and switches.get("bn", "batch") == "batch" else 60
    c = 64
    shapes = ([((1, spatial, spatial, 3), (1, spatial, spatial, c))] + [((1, spatial, spatial, c),) * 2] * units
              + [((1, spatial, spatial, c), (1, 10))])
    norms = mean_field_unit_norms(shapes, kernel_init=kernel_init, **switches)
    if norms is None:
        raise ValueError(f"no spatial mean field for {switches}")
    low, high = 5 * units // 12, 7 * units // 12
    return float((norms[low] / norms[high]) ** (1 / (high - low)))
