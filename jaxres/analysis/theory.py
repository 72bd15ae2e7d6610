"""Mean-field predictions for how ||d z / d h|| changes from unit to unit at initialization.

Every rate here is the factor by which the norm (not the square) of the end-to-end Jacobian
``||d z / d h||`` grows going one unit *towards the input*, for nets at initialization in
the mean-field limit (width -> inf, gradient independence: the backward weights are treated
as independent of the forward ones, Schoenholz et al. 2017, arXiv 1611.01232). Per weight
layer the theories give a factor ``chi`` on the *squared* norm; a unit of ``L`` weight
layers then scales the norm by ``chi ** (L / 2)`` (a CIFAR basic block: L = 2, so the
per-unit norm rate equals the per-layer squared-norm factor).

Two entry points:

- `predict_net_rates(shapes, places, ...)`: the whole net in the spatial mean field
  (`mean_field_spatial.mean_field_unit_norms`: zero-padding borders per position, the
  stem's forward transient, transitions, the head), reduced to per-stage and per-transition
  rates exactly as the measurements are (`stages.stage_rates`). What `jaxres analyze` and
  jaxres/experiments/theory_check.py (`jaxres experiment theory`) put beside their measurements.
- `predict_unit_rate` / `predict_transition_factor`: the stationary mid-stage rate of a
  setting (no stem, no head), for a quick number.

The pieces (each a documented part of `Prediction.assumptions`):

- **BatchNorm in train mode, plain nets** (Yang et al. 2019, "A mean field theory of batch
  normalization", arXiv 1902.08129): chi = E[phi'(z)^2] / Var[phi(z)], z ~ N(0, 1), for a
  large batch; pi / (pi - 1) = 1.4669 for ReLU, 1.1778 for tanh, whatever the weight
  variance (BN removes it). At a finite batch B the rate is the leading eigenvalue of Yang
  et al.'s gradient map (`bn_layer_chi`, Monte Carlo from their fixed point); Flax's
  BatchNorm averages over N * H * W, the effective batch. On zero-padded maps BN does *not*
  cancel the borders: ReLU's positive mean passes fewer taps at the border, which leaves a
  per-channel, example-independent mean pattern that per-channel centring cannot remove; it
  inflates BN's divisor without carrying per-example signal (the border pattern,
  `mean_field_spatial`; -4.3 / -2.2 / -0.8 % per layer on the squared norm on 8^2 / 16^2 / 32^2
  maps, measured -4.2 / -1.8 / -0.9 %; none for tanh, which has no mean). The head's spatially uniform gradient loses ~(1 + 2/pi) / N of its
  per-example squared norm at the first BN from the head (N examples; the head's batch
  term). The per-example block ||d z_i / d h_i|| starts on example i alone and spreads over
  the batch layer by layer; at N H W >= 256 its bulk rate equals the whole gradient's to
  < 0.5 %, at small batches it grows more slowly (`twins.mlp_twin_rates(quantity=...)`).
- **No normalization, plain nets** (Poole et al. 2016, arXiv 1606.05340; Schoenholz et al.
  2017): chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2] at the fixed point q* = sigma_w^2
  E[phi(sqrt(q*) z)^2], by Gauss-Hermite quadrature. He init (sigma_w^2 = 2): 1 for ReLU
  (He et al. 2015, arXiv 1502.01852), 1.1055 for tanh. Zero padding: a 3x3 conv on an
  H x H map has (3H - 2)^2 valid taps out of 9 H^2; the backward pass maps per-position
  gradient second moments m to (1/9) A m A (times chi), A tridiagonal ones: a uniform
  gradient loses (1 - 2 / (3H))^2 at its first layer, and deep in a stage each layer passes
  ((1 + 2 cos(pi / (H + 1))) / 3)^2 (`border_factor`). For tanh the borders also lower the
  forward variance, which raises phi'^2.
- **Residual nets without normalization.** Pre-activation x + F(x) (He et al. 2016): the
  branch adds its chi (1 under He init for ReLU) to the identity's 1: sqrt(2) per block for
  ReLU; x stays Gaussian, so the spatial mean field needs only variances (tanh: the stream's
  variance grows, and the rate falls towards 1 with depth). Post-activation phi(x + F(x))
  (He et al. 2015): the identity path passes phi' after the addition. The stationary theory
  takes that mask independent of the gradient at the same neuron (rate sqrt(p (1 + chi_F)),
  p = 0.652 open for ReLU: 1.399); but the mask persists along the identity (P(open | open
  in the previous block) = 0.734), and following each neuron's trajectory
  (`post_activation_trajectory`) gives 1.4304.

Transitions: with the whole-net mean field, stride-2 units (a stride-2 conv, doubled
channels, option-A or projection shortcuts) are predicted like any other unit;
`predict_transition_factor` keeps the closed forms (1 / sqrt(2) per plain He ReLU
transition without normalization; with BN a transition scales like a bulk unit).

No theory (None) for BN residual nets (their rate drifts towards 1 with depth, De & Smith
2020) and for unknown initializers.
"""
from __future__ import annotations

import dataclasses
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
    post_activation_trajectory,
    weight_variance,
)
from jaxres.analysis.mean_field_spatial import mean_field_unit_norms, stationary_stage_rate
from jaxres.analysis.stages import stage_rates
from jaxres.analysis.twins import mlp_twin_rates

__all__ = [
    "DEFAULT_TOLERANCE", "STAGE_TOLERANCE", "TRANSITION_TOLERANCE", "WIDE_TOLERANCE", "Prediction",
    "bn_layer_chi", "bn_layer_chi_large_batch", "border_factor", "fixed_point_chi", "gaussian_expectation",
    "mean_field_unit_norms", "mlp_twin_rates", "post_activation_relu_moments", "post_activation_relu_open_fraction",
    "post_activation_trajectory", "predict_net_rates", "predict_transition_factor", "predict_unit_rate",
]

# Acceptance (issue 21), for means over >= 4 weight draws: a single draw of a 16-64-channel
# CIFAR net scatters by 5-11 % per stage.
STAGE_TOLERANCE = 0.02  # bulk stage rates of the CIFAR nets
TRANSITION_TOLERANCE = 0.05  # stride-2 transition units
WIDE_TOLERANCE = 0.01  # MLP twins and wide (256-channel) conv twins
DEFAULT_TOLERANCE = STAGE_TOLERANCE

YANG2019 = "Yang et al. 2019 (arXiv 1902.08129), BN mean field"
POOLE2016 = "Poole et al. 2016 / Schoenholz et al. 2017, mean-field chi_1"
RESIDUAL = "mean field of residual nets, He init"
SPATIAL = "spatial mean field of the whole net (jaxres.analysis.mean_field_spatial)"


@dataclasses.dataclass(frozen=True)
class Prediction:
    """A predicted per-unit factor of ||d z / d h|| going one unit towards the input.

    `rate`: per unit, in norm; `per_layer_sq`: the per-weight-layer factor on the squared
    norm it comes from (without borders; nan where none applies); `tolerance`: relative
    acceptance of a measurement (a mean over weight draws); `source`: the citation;
    `assumptions`: when the prediction holds, and which mechanisms it includes."""

    rate: float
    tolerance: float
    source: str
    assumptions: str
    per_layer_sq: float = float("nan")

    def accepts(self, measured: float) -> bool:
        """Whether `measured` lies within the relative tolerance of the prediction."""
        return bool(abs(measured / self.rate - 1.0) <= self.tolerance)


def _finite_batch(activation: str, effective_batch: int | None) -> float:
    """chi(B) / chi(inf): the finite-batch factor on a BN layer's squared norm (1 for None)."""
    if effective_batch is None:
        return 1.0
    return bn_layer_chi(activation, effective_batch)[0] / bn_layer_chi_large_batch(activation)


def predict_unit_rate(*, norm: str, activation: str, residual: bool, preactivation: bool = False,
                      bn: str = "batch", layers_per_unit: int = 2, effective_batch: int | None = None,
                      spatial: int | None = None, kernel_init: str = "he_normal_fan_out",
                      tolerance: float = DEFAULT_TOLERANCE) -> Prediction | None:
    """The stationary mean-field bulk rate of ||d z / d h|| per shape-keeping unit, away from
    the stem and the head (see the module docstring), or None where there is no theory.

    `norm`: "batchnorm" | "none"; `bn`: "batch" (train-mode statistics) | "eval" (running
    statistics; at initialization they are (0, 1), so BN-eval is the identity map and the
    net is treated as normalization-free); `effective_batch`: the number of values each BN
    statistic averages (N * H * W for Flax's BatchNorm on NHWC maps; None: large batch);
    `spatial`: the map's side (zero-padding borders, and BN's border pattern; None: no
    borders). For a whole net, stem and head included, use `predict_net_rates`."""
    check_switches(norm, activation, bn, layers_per_unit, effective_batch, spatial)
    sigma2 = weight_variance(kernel_init)
    batchnorm = norm == "batchnorm" and bn == "batch"
    if norm == "batchnorm" and bn == "eval":
        norm = "none"  # running statistics (0, 1) at initialization: BN is the identity
    where = "no borders" if spatial is None else f"zero-padding borders of a {spatial}x{spatial} map, mid-stage"
    if batchnorm:
        if residual:
            return None
        chi, _ = bn_layer_chi(activation, effective_batch)
        rate = chi ** (layers_per_unit / 2)
        if spatial is not None:
            if layers_per_unit != 2:
                return None
            rate = stationary_stage_rate(spatial, kernel_init, 2, norm="batchnorm", activation=activation,
                                         residual=False) * _finite_batch(activation, effective_batch)
        batch_text = "batch -> inf" if effective_batch is None else f"effective batch {effective_batch}"
        return Prediction(
            rate=rate, tolerance=tolerance,
            source=YANG2019 + ("" if effective_batch is None else ", finite batch by Monte Carlo"),
            assumptions=(f"BN train mode, {batch_text}, width -> inf, plain net, {layers_per_unit} weight "
                         f"layers per unit, {where}"
                         + ("" if spatial is None else "; BN's border pattern included (per-channel, "
                            "example-independent means that centring leaves at the borders)")),
            per_layer_sq=chi,
        )
    if sigma2 is None:
        return None
    if not residual:
        if activation not in ("relu", "tanh", "linear", "sigmoid"):
            return None
        q, chi = fixed_point_chi(activation, sigma2)
        fixed = "" if math.isnan(q) else f" at q* = {q:.4f}"
        rate = chi ** (layers_per_unit / 2)
        if spatial is not None and activation == "relu":  # linear backward recursion: exact eigenvalue
            rate = (chi * border_factor(spatial)) ** (layers_per_unit / 2)
        elif spatial is not None:  # borders also lower the forward variance, raising phi'
            if layers_per_unit != 2:
                return None
            rate = stationary_stage_rate(spatial, kernel_init, 2, norm="none", activation=activation, residual=False)
        return Prediction(
            rate=rate, tolerance=tolerance, source=POOLE2016,
            assumptions=(f"no normalization, sigma_w^2 = {sigma2:g} ({kernel_init}), width -> inf, chi_1 = "
                         f"{chi:.4f}{fixed}, {layers_per_unit} weight layers per unit, {where}"),
            per_layer_sq=chi,
        )
    if layers_per_unit != 2 or activation not in ("relu", "tanh"):
        return None
    if preactivation:
        if activation != "relu":
            return None  # the stream's variance grows: no stationary rate (see predict_net_rates)
        # x + W2 relu(W1 relu(x)): each conv passes sigma_w^2, each ReLU 1/2 of the squared norm
        rate = math.sqrt(1.0 + (sigma2 / 2.0) ** 2)
        if spatial is not None:
            rate = stationary_stage_rate(spatial, kernel_init, 2, norm="none", activation="relu", residual=True,
                                         preactivation=True)
        return Prediction(
            rate=rate, tolerance=tolerance, source=RESIDUAL + ", pre-activation x + F(x)",
            assumptions=(f"no normalization, pre-activation x + F(x), F = conv-relu-conv after relu, "
                         f"sigma_w^2 = {sigma2:g}, width -> inf, {where}"),
            per_layer_sq=sigma2 / 2.0,
        )
    walk = post_activation_trajectory(activation, sigma2)
    rate = walk["rate"]
    if spatial is not None:
        rate = stationary_stage_rate(spatial, kernel_init, 2, norm="none", activation=activation, residual=True)
    opened = (f", open fraction {walk['open']:.3f}, P(open | open before) {walk['persistence']:.3f}"
              if "open" in walk else "")
    return Prediction(
        rate=rate, tolerance=tolerance, source=RESIDUAL + ", post-activation phi(x + F(x))",
        assumptions=(f"no normalization, {activation}(x + F(x)), each neuron's mask followed along the identity "
                     f"(trajectory mean field{opened}), sigma_w^2 = {sigma2:g}, width -> inf, {where}"),
    )


def predict_transition_factor(*, norm: str, activation: str, residual: bool, bn: str = "batch",
                              layers_per_unit: int = 2, channel_ratio: float = 2.0, effective_batch: int | None = None,
                              spatial: int | None = None, kernel_init: str = "he_normal_fan_out",
                              tolerance: float = TRANSITION_TOLERANCE) -> Prediction | None:
    """The factor of ||d z / d h|| across a stride-2 transition unit (its first conv has
    stride 2 and multiplies the channels by `channel_ratio`), or None without a theory.

    Plain nets only. Without normalization the stride-2 conv's backward sums over C_out
    channels of variance sigma_w^2 / (9 C_out) (fan-out init) at 9/4 taps per input position
    over 4x the positions: it passes sigma_w^2 C_in / C_out times the ReLU's 1/2, i.e. 1/2
    for He fan-out with doubled channels (0.707 in norm); the unit's other layers are bulk
    layers. `spatial`: the side of the map the unit *outputs* (its second conv's borders).
    With BN (train) the forward variance carries the same factor, which BN divides out: the
    transition scales like a bulk unit. `predict_net_rates` predicts every transition of a
    given net, residual ones included."""
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


def _net_assumptions(*, norm, activation, residual, preactivation, bn, batch, quantity, shortcut, kernel_init,
                     follow_neurons) -> tuple[str, str]:
    """(source, assumptions) of `predict_net_rates` for these switches."""
    parts = [f"{SPATIAL}: width -> inf, gradient independence, {kernel_init} weights, inputs N(0, 1), "
             f"zero-padding borders per position, the stem's forward transient, the head's spatially uniform gradient"]
    batchnorm = norm == "batchnorm" and bn == "batch"
    if batchnorm:
        source = YANG2019 + " + " + SPATIAL
        parts.append("BN train mode (divisor from the per-example variance and the border pattern: per-channel, "
                     "example-independent means that per-channel centring leaves at the borders)")
        if batch is None:
            parts.append("large batch, no head term")
        else:
            parts.append(f"N = {batch} examples: chi(N H W) / chi(inf) per BN layer; the head's batch term at the first "
                         f"BN from the head (its uniform gradient loses ~(1 + 2/pi) / N there), positions of an "
                         f"example independent in that term")
    elif residual and preactivation:
        source = RESIDUAL + ", pre-activation x + F(x)"
        parts.append(f"no normalization, x + F(x) with x Gaussian, shortcut option {shortcut} at transitions")
    elif residual:
        source = RESIDUAL + ", post-activation phi(x + F(x))"
        parts.append(("each neuron's mask followed along the identity (population of stream values per position, "
                      "fixed seed)" if follow_neurons else "masks shuffled over the neurons (stationary theory)")
                     + f", shortcut option {shortcut} at transitions")
    else:
        source = POOLE2016 + " + " + SPATIAL
        parts.append("no normalization")
    parts.append("per-example block ||dz_i/dh_i||" if quantity == "block" else "whole gradient ||dz_i/dh||")
    parts.append("stage rate: geometric mean of the predicted per-unit factors over the stage's shape-keeping "
                 "units, as the measurement is reduced")
    return source, "; ".join(parts)


def predict_net_rates(shapes, places, *, norm: str, activation: str, residual: bool, preactivation: bool = False,
                      bn: str = "batch", batch: int | None = None, quantity: str = "block", shortcut: str = "A",
                      kernel_init: str = "he_normal_fan_out", follow_neurons: bool = True, samples: int = 2**19,
                      tolerance: float = STAGE_TOLERANCE,
                      transition_tolerance: float = TRANSITION_TOLERANCE) -> dict | None:
    """Per-stage and per-transition predictions for one net, from the spatial mean field of
    the whole net (`mean_field_unit_norms`: borders, stem, transitions, head; BN's border
    pattern, finite batch and head term; post-activation masks followed along the identity),
    reduced like the measurements (`stages.stage_rates`).

    `shapes`: `[(in_shape, out_shape)]` per unit, stem first, head last; `places`: their
    `stages.UnitPlace`s; `batch`: the examples N of the measured batch (BN's finite-batch and
    head terms; None: large batch); `quantity`: "block" (||d z_i / d h_i||, the study's
    headline) or "total"; `shortcut`: "A" (the zoo's CIFAR ResNets) or "B" (its pre-activation
    ResNets: projections); `samples`: stream values per unit of the post-activation
    population (`mean_field_unit_norms`). Returns {"stages": [Prediction], "transitions": [Prediction],
    "per_unit": the predicted per-unit factors (units before the head)} in the order of
    `stage_rates`, or None without a theory (BN residual nets, unknown initializers)."""
    switches = dict(norm=norm, activation=activation, residual=residual, preactivation=preactivation, bn=bn)
    norms = mean_field_unit_norms(shapes, kernel_init=kernel_init, batch=batch, quantity=quantity, shortcut=shortcut,
                                  follow_neurons=follow_neurons, samples=samples, **switches)
    if norms is None:
        return None
    source, assumptions = _net_assumptions(batch=batch, quantity=quantity, shortcut=shortcut, kernel_init=kernel_init,
                                           follow_neurons=follow_neurons, **switches)
    values = [np.array([v]) for v in norms] + [np.array([1.0])]
    rates = stage_rates(places, values)
    return {
        "stages": [Prediction(s["rate"], tolerance, source, assumptions) for s in rates["stages"]],
        "transitions": [Prediction(t["rate"], transition_tolerance, source, assumptions)
                        for t in rates["transitions"]],
        "per_unit": (norms / np.append(norms[1:], 1.0)).tolist(),
    }


