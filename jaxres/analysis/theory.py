"""Mean-field predictions for how ||d z / d h|| changes from unit to unit at initialization.

Every rate here is the factor by which the norm (not the square) of the end-to-end Jacobian
``||d z / d h||`` grows going one unit *towards the input*, in the bulk of a stage (units that
keep the shape of their input), for nets at initialization in the mean-field limit (width ->
inf, gradient independence: the backward weights are treated as independent of the forward
ones, Schoenholz et al. 2017, arXiv 1611.01232). Per weight layer the theories give a factor
``chi`` on the *squared* norm; a unit of ``L`` weight layers then scales the norm by
``chi ** (L / 2)`` (a CIFAR basic block: L = 2, so the per-unit norm rate equals the
per-layer squared-norm factor).

What is covered (`predict_unit_rate`):

- **BatchNorm in train mode, plain nets** (Yang et al. 2019, "A mean field theory of batch
  normalization", arXiv 1902.08129): chi = E[phi'(z)^2] / Var[phi(z)], z ~ N(0, 1), for a
  large batch; pi / (pi - 1) = 1.4669 for ReLU, whatever the weight variance (BN removes it).
  At a finite batch B the rate is the leading eigenvalue of Yang et al.'s gradient map, which
  `bn_layer_chi` computes by Monte Carlo from their fixed point (see there); it is larger at
  small B. Flax's BatchNorm averages over batch x height x width, so a conv net's effective
  batch is N * H * W. The theory's quantity is the whole gradient over the batch (||d z_i /
  d h||, all examples' rows); the per-example block ||d z_i / d h_i|| starts on example i
  alone and spreads over the batch layer by layer (the gradient covariance tends to
  I - 11^T / B), so over a finite depth it grows more slowly than chi(B) at small B (see
  `mlp_twin_rates(quantity=...)` and experiments/theory_check.py).
- **No normalization, plain nets** (Poole et al. 2016, arXiv 1606.05340; Schoenholz et al.
  2017): chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2] at the fixed point q* = sigma_w^2
  E[phi(sqrt(q*) z)^2], by Gauss-Hermite quadrature. He init (sigma_w^2 = 2): 1 for ReLU
  (He et al. 2015, arXiv 1502.01852), 1.1055 for tanh.
- **No normalization, residual ReLU nets**: pre-activation x + F(x) (He et al. 2016): the
  branch's Jacobian adds its own chi (1 under He init) to the identity's 1: rate sqrt(2) per
  block. Post-activation relu(x + F(x)) (He et al. 2015): the identity path passes the ReLU
  after the addition, open with the probability p that x + F(x) > 0, where x >= 0 is the
  previous block's output; rate sqrt(p (1 + chi_F)), with p from the stationary distribution
  of the forward recursion (`post_activation_relu_open_fraction`, p = 0.652, rate 1.399).
- **Zero padding** (`spatial`, `border_factor`, `mean_field_unit_norms`): a 3x3 conv with
  padding 1 on an H x H map has (3H - 2)^2 valid taps out of 9 H^2. Without normalization
  the backward pass of such a layer maps the per-position gradient second moments m to
  (1/9) A m A (times chi), A the tridiagonal matrix of ones: the spatially uniform gradient
  a global-average-pool head sends loses (1 - 2 / (3H))^2 at its first layer (0.979 / 0.958 /
  0.917 in norm on 32^2 / 16^2 / 8^2 maps), and deep in a stage each layer passes A's leading
  eigenvalue ((1 + 2 cos(pi / (H + 1))) / 3)^2 (0.994 / 0.977 / 0.921). For tanh the borders
  also lower the forward variance, which raises phi'^2 and undoes most of the loss. With BN
  the forward variance loses the same taps and BN divides it out: borders nearly cancel.
  `mean_field_unit_norms` runs this spatial mean field through a whole CIFAR-style net
  (stem, transitions, head) and predicts every unit's factor.

Transitions (`predict_transition_factor`): a stride-2 conv under He fan-out init that doubles
the channels passes half of the squared norm (the fan-out variance 2 / (9 C_out) is set for
twice the channels the backward sums over): 1 / sqrt(2) = 0.707 per transition unit in norm
without normalization; BN divides the same factor out of the forward pass, so with BN a
transition scales like a bulk unit.

No theory (None) for the rest: BN residual nets (their rate drifts towards 1 with depth,
De & Smith 2020), residual tanh nets, other initializers' transitions.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from jaxres.analysis.mean_field import (
    border_factor,
    bn_layer_chi,
    bn_layer_chi_large_batch,
    check_switches,
    fixed_point_chi,
    gaussian_expectation,
    post_activation_relu_moments,
    post_activation_relu_open_fraction,
    weight_variance,
)
from jaxres.analysis.mean_field_spatial import mean_field_unit_norms, stationary_stage_rate
from jaxres.choices import pick
from jaxres.models.layers import ACTIVATIONS, NORMS

__all__ = [
    "DEFAULT_TOLERANCE", "WIDE_TOLERANCE", "Prediction", "bn_layer_chi", "bn_layer_chi_large_batch", "border_factor",
    "fixed_point_chi", "gaussian_expectation", "mean_field_unit_norms", "mlp_twin_rates",
    "post_activation_relu_moments", "post_activation_relu_open_fraction", "predict_transition_factor",
    "predict_unit_rate",
]

DEFAULT_TOLERANCE = 0.05
WIDE_TOLERANCE = 0.02

YANG2019 = "Yang et al. 2019 (arXiv 1902.08129), BN mean field"
POOLE2016 = "Poole et al. 2016 / Schoenholz et al. 2017, mean-field chi_1"
RESIDUAL = "mean field of x + F(x) (Yang & Schoenholz 2017, arXiv 1712.08969), He init"


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A predicted per-unit factor of ||d z / d h|| going one unit towards the input.

    `rate`: per unit, in norm; `per_layer_sq`: the per-weight-layer factor on the squared
    norm it comes from (without the border factor); `tolerance`: relative acceptance of a
    measurement; `source`: the citation; `assumptions`: when the prediction holds."""

    rate: float
    tolerance: float
    source: str
    assumptions: str
    per_layer_sq: float = float("nan")

    def accepts(self, measured: float) -> bool:
        """Whether `measured` lies within the relative tolerance of the prediction."""
        return bool(abs(measured / self.rate - 1.0) <= self.tolerance)


def predict_unit_rate(*, norm: str, activation: str, residual: bool, preactivation: bool = False,
                      bn: str = "batch", layers_per_unit: int = 2, effective_batch: int | None = None,
                      spatial: int | None = None, kernel_init: str = "he_normal_fan_out",
                      tolerance: float = DEFAULT_TOLERANCE) -> Prediction | None:
    """The mean-field bulk rate of ||d z / d h|| per shape-keeping unit (see the module
    docstring), or None where there is no theory for the case.

    `norm`: "batchnorm" | "none"; `bn`: "batch" (train-mode statistics) | "eval" (running
    statistics; at initialization they are (0, 1), so BN-eval is the identity map and the
    net is treated as normalization-free); `effective_batch`: the number of values each BN
    statistic averages (N * H * W for Flax's BatchNorm on NHWC maps; None: large batch);
    `spatial`: the map's side (zero-padding border effect; None: no borders)."""
    check_switches(norm, activation, bn, layers_per_unit, effective_batch, spatial)
    sigma2 = weight_variance(kernel_init)
    batchnorm = norm == "batchnorm" and bn == "batch"
    if norm == "batchnorm" and bn == "eval":
        norm = "none"  # running statistics (0, 1) at initialization: BN is the identity
    if batchnorm:
        if residual or (effective_batch is not None and activation != "relu"):
            return None
        chi, _ = bn_layer_chi(activation, effective_batch)
        batch_text = "batch -> inf" if effective_batch is None else f"effective batch {effective_batch}"
        return Prediction(
            rate=chi ** (layers_per_unit / 2), tolerance=tolerance,
            source=YANG2019 + ("" if effective_batch is None else ", finite batch by Monte Carlo"),
            assumptions=(f"BN train mode, {batch_text}, width -> inf, plain net, {layers_per_unit} weight "
                         f"layers per unit; borders cancel to first order (BN divides out the lost taps)"),
            per_layer_sq=chi,
        )
    if sigma2 is None:
        return None
    where = ("no borders" if spatial is None
             else f"zero-padding borders of a {spatial}x{spatial} map, stationary (mid-stage) profile; "
                  f"`mean_field_unit_norms` gives the per-unit values near the head, the stem and transitions")
    if not residual:
        if activation not in ("relu", "tanh", "linear", "sigmoid"):
            return None
        q, chi = fixed_point_chi(activation, sigma2)
        fixed = "" if math.isnan(q) else f" at q* = {q:.4f}"
        rate = chi ** (layers_per_unit / 2)
        if spatial is not None and activation == "relu":  # linear backward recursion: exact eigenvalue
            rate = (chi * border_factor(spatial)) ** (layers_per_unit / 2)
        elif spatial is not None:  # borders also lower the forward variance, raising phi'
            rate = stationary_stage_rate(spatial, kernel_init, layers_per_unit, activation=activation, residual=False)
        return Prediction(
            rate=rate, tolerance=tolerance, source=POOLE2016,
            assumptions=(f"no normalization, sigma_w^2 = {sigma2:g} ({kernel_init}), width -> inf, chi_1 = "
                         f"{chi:.4f}{fixed}, {layers_per_unit} weight layers per unit, {where}"),
            per_layer_sq=chi,
        )
    if activation != "relu" or layers_per_unit != 2:
        return None
    if preactivation:
        # x + W2 relu(W1 relu(x)): each conv passes sigma_w^2, each ReLU 1/2 of the squared norm
        border = border_factor(spatial)
        return Prediction(
            rate=math.sqrt(1.0 + (sigma2 / 2.0) ** 2 * border**2), tolerance=tolerance, source=RESIDUAL,
            assumptions=(f"no normalization, pre-activation x + F(x), F = conv-relu-conv after relu, "
                         f"sigma_w^2 = {sigma2:g}, width -> inf, "
                         f"{'no borders' if spatial is None else 'stationary border factor of ' + str(spatial)}"),
            per_layer_sq=sigma2 / 2.0,
        )
    p = post_activation_relu_open_fraction(sigma2 * sigma2 / 2.0)
    rate = math.sqrt(p * (1.0 + sigma2 * sigma2 / 2.0))  # conv - relu - conv: sigma_w^2 * 1/2 * sigma_w^2
    if spatial is not None:
        rate = stationary_stage_rate(spatial, kernel_init, 2, activation="relu", residual=True)
    return Prediction(
        rate=rate, tolerance=tolerance, source=RESIDUAL + ", post-activation",
        assumptions=(f"no normalization, relu(x + F(x)) with x >= 0, open fraction p = {p:.4f} "
                     f"(stationary), sigma_w^2 = {sigma2:g}, width -> inf, {where}"),
        per_layer_sq=sigma2 / 2.0,
    )


def predict_transition_factor(*, norm: str, activation: str, residual: bool, bn: str = "batch",
                              layers_per_unit: int = 2, channel_ratio: float = 2.0, effective_batch: int | None = None,
                              spatial: int | None = None, kernel_init: str = "he_normal_fan_out",
                              tolerance: float = DEFAULT_TOLERANCE) -> Prediction | None:
    """The factor of ||d z / d h|| across a stride-2 transition unit (its first conv has
    stride 2 and multiplies the channels by `channel_ratio`), or None without a theory.

    Plain nets only. Without normalization the stride-2 conv's backward sums over C_out
    channels of variance sigma_w^2 / (9 C_out) (fan-out init) at 9/4 taps per input position
    over 4x the positions: it passes sigma_w^2 C_in / C_out... times the ReLU's 1/2, i.e. 1/2
    for He fan-out with doubled channels (0.707 in norm); the unit's other layers are bulk
    layers. `spatial`: the side of the map the unit *outputs* (its second conv's borders).
    With BN (train) the forward variance carries the same factor, which BN divides out: the
    transition scales like a bulk unit."""
    check_switches(norm, activation, bn, layers_per_unit, effective_batch, spatial)
    if residual:
        return None
    bulk = predict_unit_rate(norm=norm, activation=activation, residual=False, bn=bn, layers_per_unit=layers_per_unit,
                             effective_batch=effective_batch, spatial=spatial, kernel_init=kernel_init,
                             tolerance=tolerance)
    if bulk is None:
        return None
    if norm == "batchnorm" and bn == "batch":
        return dataclasses.replace(bulk, assumptions=bulk.assumptions + "; stride-2 transition: BN divides out the "
                                   "stride's and the channels' factors")
    if activation != "relu" or kernel_init not in ("he_normal_fan_out",):
        return None  # the forward variance changes at the transition (tanh) or fan-in scaling differs
    stride_layer = (2.0 / channel_ratio) / 2.0  # sigma_w^2 C_in / C_out * 1/2 (ReLU), fan-out init
    rest = (bulk.per_layer_sq * border_factor(spatial)) ** (layers_per_unit - 1)
    return Prediction(
        rate=math.sqrt(stride_layer * rest), tolerance=tolerance, source=POOLE2016 + ", stride-2 conv",
        assumptions=(f"no normalization, He fan-out init, stride-2 first conv with {channel_ratio:g}x channels "
                     f"(its borders ignored), {layers_per_unit - 1} more bulk layer(s) "
                     f"{'without borders' if spatial is None else f'on a {spatial}x{spatial} map'}"),
        per_layer_sq=stride_layer,
    )


# ---------------------------------------------------------------- the mean-field setting itself


def mlp_twin_rates(*, activation: str, norm: str, residual: bool = False, preactivation: bool = False,
                   width: int = 1024, depth: int = 12, batch: int = 64, examples: int = 8, skip: int = 2,
                   seed: int = 0, weight_variance: float = 2.0, quantity: str = "block") -> dict:
    """Measured per-layer (plain) or per-block (residual) factors of the per-example
    ||d z_i / d h_i|| in a wide MLP twin in plain JAX: the fully connected net the mean-field
    theory describes, without convolution borders.

    Plain: h_{l+1} = W_l phi(BN(h_l)) (norm="batchnorm": train-mode batch statistics,
    biased variance, epsilon 1e-5) or W_l phi(h_l) (norm="none"), W_l ~ N(0, sigma_w^2 / width).
    Residual (ReLU, no norm): h_{l+1} = relu(h_l + W2 relu(W1 h_l)) (post-activation) or
    h_l + W2 relu(W1 relu(h_l)) (`preactivation`). z_i = v . h_depth,i, one output (the rates
    do not depend on the readout). Inputs are N(0, q*) (the forward fixed point: no forward
    transient). The per-example blocks take the cotangent on one example only (batch
    statistics couple the examples), for the first `examples` examples. `quantity`: "block"
    measures ||d z_i / d h_i|| (the per-example block), "total" ||d z_i / d h|| (the whole
    gradient over the batch, Yang et al.'s quantity; equal without BN). Returns `{"rate":
    geometric mean over layers skip..depth-skip of the ratio, per example, then the median
    over examples, "per_layer": (depth,) medians}`:
    per weight layer for plain nets (compare with `Prediction.per_layer_sq ** 0.5`), per block
    for residual ones (compare with `Prediction.rate`)."""
    import jax
    import jax.numpy as jnp

    pick("normalization", norm, dict.fromkeys(NORMS))
    total = pick("quantity", quantity, {"block": False, "total": True})
    if residual and (activation != "relu" or norm != "none"):
        raise ValueError("the residual MLP twin is ReLU without normalization; got "
                         f"activation={activation!r}, norm={norm!r}")
    for name, value, low in (("width", width, 2), ("depth", depth, 2 * skip + 1), ("batch", batch, 4),
                             ("examples", examples, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    examples = min(examples, batch)
    phi = ACTIVATIONS[activation]
    keys = jax.random.split(jax.random.key(seed), 2 * depth + 2)
    scale = math.sqrt(weight_variance / width)
    w1 = [jax.random.normal(keys[2 * l], (width, width)) * scale for l in range(depth)]
    w2 = [jax.random.normal(keys[2 * l + 1], (width, width)) * scale for l in range(depth)]
    readout = jax.random.normal(keys[-1], (width,)) / math.sqrt(width)
    q = 1.0
    if not residual and norm == "none" and activation != "relu":
        q = fixed_point_chi(activation, weight_variance)[0]
    x = jax.random.normal(keys[-2], (batch, width)) * math.sqrt(q)

    def bn(h):
        mean = h.mean(0, keepdims=True)
        return (h - mean) / jnp.sqrt(jnp.mean(jnp.square(h - mean), 0, keepdims=True) + 1e-5)

    def layer(l, h):
        if residual:
            if preactivation:
                return h + jax.nn.relu(jax.nn.relu(h) @ w1[l]) @ w2[l]
            return jax.nn.relu(h + jax.nn.relu(h @ w1[l]) @ w2[l])
        return phi(bn(h) if norm == "batchnorm" else h) @ w1[l]

    @jax.jit
    def block_sq(x):
        # (depth + 1, examples): ||d z_i / d h_l,i||^2 with the cotangent on example i only,
        # chained layer by layer (one VJP per layer for all `examples` cotangents at once)
        hs, vjps = [x], []
        for l in range(depth):
            out, vjp = jax.vjp(functools.partial(layer, l), hs[-1])
            hs.append(out)
            vjps.append(vjp)
        cot = jnp.zeros((examples, batch, width)).at[jnp.arange(examples), jnp.arange(examples)].set(readout)
        def norm_sq(c):
            if total:
                return jnp.sum(jnp.square(c), (1, 2))
            return jnp.sum(jnp.square(c[jnp.arange(examples), jnp.arange(examples)]), -1)

        sq = [norm_sq(cot)]
        for vjp in reversed(vjps):
            cot = jax.vmap(lambda c, _vjp=vjp: _vjp(c)[0])(cot)
            sq.append(norm_sq(cot))
        return jnp.stack(sq[::-1])

    sq = np.asarray(block_sq(x), np.float64)
    ratios = np.sqrt(sq[:-1] / sq[1:])  # (depth, examples): factor across layer l towards the input
    bulk = ratios[skip:depth - skip]
    per_example = np.exp(np.mean(np.log(bulk), 0))
    return {"rate": float(np.median(per_example)), "per_layer": np.median(ratios, 1).tolist(),
            "width": width, "depth": depth, "batch": batch, "examples": examples}
