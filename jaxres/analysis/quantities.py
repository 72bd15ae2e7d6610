"""Every quantity the analysis writes, defined once: its JSON key, what it is, where it is
measured, its form per entry, exact or estimate, and how it is reduced.

The study (`study`, `summary`: results.json of `jaxres analyze`), the training monitor
(`monitor`: one `MonitorRecord` per line of a run's analysis.jsonl), the report, the plots and
the degradation experiment read keys, symbols and words from here; renaming or adding a
quantity starts here (tests/test_analysis_quantities.py checks that what the study and the
monitor write is what this module defines, and the other way round). The JSON keys are the
files' format: files written before keep loading only while the keys stay.

Notation (as in `endtoend`): a batch x (N, H, W, C_in), logits z (N, C), L the mean
cross-entropy over the N examples, h the input of a unit (the image for `stem`), W a kernel.

Ground floor of the analysis package: numpy only, nothing of jaxres, no JAX.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Where a quantity is measured.
UNIT_INPUT = "unit input"  # h_l, the input of unit l (the image for stem)
LAYER_PROBE = "layer probe"  # a weight layer's normalized output inside a unit (before activation / addition)
KERNEL = "kernel"  # a weight W, by its path "unit/layer/kernel" in variables["params"]
UNIT = "unit"  # the unit's own map h -> unit(h), J = d unit(h) / d h
NET = "whole net"  # one number for the model on the batch
STAGE = "stage"  # a run of shape-keeping units (`stages.stage_rates`), or a transition between stages

# Forms of an entry.
OVER_EXAMPLES = "{median, mean, q10, q90, per_example: (N,), method}"  # `over_examples`
QUANTILES = "{median, q10, q90}"  # `median_q10_q90`
ESTIMATE = "{estimate, method}"


@dataclasses.dataclass(frozen=True)
class Quantity:
    """One analysis quantity.

    key: its JSON key; name: short words; symbol: the formula as plain text ("" if none);
    meaning: what it is, in words; where: UNIT_INPUT, LAYER_PROBE, KERNEL, UNIT, NET or STAGE;
    form: the value of one entry (per unit, probe or kernel where `where` says so); method:
    "exact", or the estimator and its interval; reduction: how the measured numbers become
    the entry; e2e_key: the key of `endtoend.end_to_end`'s entry it is drawn from, where that
    differs from `key`.
    """

    key: str
    name: str
    symbol: str
    meaning: str
    where: str
    form: str
    method: str = "exact"
    reduction: str = ""
    e2e_key: str = ""

    @property
    def source(self) -> str:
        """The `endtoend` entry key it is drawn from."""
        return self.e2e_key or self.key

    def label(self) -> str:
        """The symbol, else the name (axis labels, legends)."""
        return self.symbol or self.name


def over_examples(values) -> dict:
    """The study's per-example entry (OVER_EXAMPLES): quantiles and every example's value, float64."""
    v = np.asarray(values, np.float64).ravel()
    return {"median": float(np.median(v)), "mean": float(v.mean()), "q10": float(np.quantile(v, 0.1)),
            "q90": float(np.quantile(v, 0.9)), "per_example": v.tolist(), "method": "exact"}


def median_q10_q90(values) -> dict:
    """The monitor's per-unit entry (QUANTILES) over examples, float64."""
    q10, median, q90 = np.quantile(np.asarray(values, np.float64), [0.1, 0.5, 0.9])
    return {"median": float(median), "q10": float(q10), "q90": float(q90)}


def whole_batch_norm(per_example_norms) -> float:
    """||v|| over the whole batch tensor from the per-example norms: sqrt(sum_i ||v_i||^2)."""
    return float(np.sqrt(np.sum(np.square(np.asarray(per_example_norms, np.float64)))))


# ---------------------------------------------------------------- end to end, per example (study)

LOSS = Quantity("loss", "loss", "L", "mean cross-entropy over the batch", NET, "scalar")
LOGIT_JAC = Quantity(
    "logit_jac", "end-to-end Jacobian norm", "||d z_i / d h_i||_F",
    "the per-example block of the Jacobian from h to the logits (the headline); bn=batch: N*C VJPs, e_c on "
    "example i only", UNIT_INPUT + ", " + LAYER_PROBE, OVER_EXAMPLES, reduction="quantiles over the N examples")
LOGIT_JAC_SUMMED_ROWS = Quantity(
    "logit_jac_summed_rows", "summed-row Jacobian norm", "||sum_j d z_j / d h_i||_F",
    "the C rows one backward pass of sum_j z_jc gives (e_c on every example): equal to logit_jac with bn=eval, "
    "with bn=batch it adds the cross-example terms of batch statistics (study: bn=batch only)",
    UNIT_INPUT + ", " + LAYER_PROBE, OVER_EXAMPLES, reduction="quantiles over the N examples")
CROSS_EXAMPLE_SHARE = Quantity(
    "cross_example_share", "cross-example share", "1 - sum_i ||d z_i/d h_i||_F^2 / ||d z/d h||_F^2",
    "share of the whole batch map's squared Frobenius norm (end to end) outside the per-example blocks "
    "(bn=batch)", UNIT_INPUT, ESTIMATE, reduction="over the whole batch")
GRADIENT_SCALE = Quantity(
    "gradient_scale", "gradient scale coefficient", "",
    "GSC = ||d z_i/d h_i||_qm ||h_i|| / ||z_i|| with ||J||_qm = ||J||_F / sqrt(n_h) (Philipp et al. 2018, "
    "arXiv 1712.05577): invariant to rescaling h, 1 for an identity map", UNIT_INPUT, OVER_EXAMPLES,
    reduction="quantiles over the N examples")
LOSS_GRAD = Quantity(
    "loss_grad", "loss gradient norm", "||dL / d h_i||",
    "the gradient training sees, per example (includes the 1/N of the batch mean; bn=batch: the exact gradient "
    "of the batch loss)", UNIT_INPUT + ", " + LAYER_PROBE, OVER_EXAMPLES, reduction="quantiles over the N examples")
LOGIT_JAC_SINGULAR_VALUES = Quantity(
    "logit_jac_singular_values", "singular values of d z_i / d h_i", "sigma_1 >= ... >= sigma_C",
    "the C singular values of each example's d z_i / d h_i (float64 eigenvalues of the rows' Gram matrix, "
    "stored float32)", UNIT_INPUT, "(N, C) list", reduction="none: every example", e2e_key="singular_values")
LOGIT_JAC_SINGULAR_VALUES_SUMMED_ROWS = Quantity(
    "logit_jac_singular_values_summed_rows", "singular values of the summed rows", "",
    "the same of the summed rows sum_j d z_j / d h_i (bn=batch)", UNIT_INPUT, "(N, C) list",
    reduction="none: every example", e2e_key="singular_values_summed_rows")
PROBES = Quantity(
    "probes", "layer probes", "",
    "logit_jac, loss_grad (and logit_jac_summed_rows with bn=batch) at each weight layer's normalized output",
    LAYER_PROBE, "{probe: {key: " + OVER_EXAMPLES + "}}", reduction="quantiles over the N examples")
FORWARD_STD = Quantity(
    "forward_std", "response std", "std(response)",
    "std over all N*H*W*C elements of each layer probe's response and of the unit's output (He et al. 2015, "
    "Fig. 7)", LAYER_PROBE, "{probe or 'out': float}", method="exact (float32 rounding)",
    reduction="over the whole batch", e2e_key="forward")
PARAM_GRAD = Quantity(
    "param_grad", "kernel gradient norm", "||dL/dW||", "Frobenius norm of the loss gradient of every kernel of the "
    "unit", KERNEL, "{'layer/kernel': float}", reduction="over the whole batch")
IDENTITY_SHORTCUT = Quantity(
    "identity_shortcut", "identity shortcut", "",
    "whether the unit adds its input unchanged to its branch, recognized from the outside (`segments.identity_unit`)",
    UNIT, "bool")
JACOBIAN = Quantity(
    "jacobian", "unit Jacobian", "J = d unit(h) / d h",
    "frobenius_sq ||J||_F^2, mean_sq_singular_value (of the per-example blocks), spectral_norm sigma_max, the "
    "identity/branch split (`unit_groups.measure_group`); None for units not sampled", UNIT,
    "{frobenius_sq, mean_sq_singular_value, spectral_norm, ...} or None",
    method="exact (basis JVP/VJPs) or hutchinson-K with a 95% interval; sigma_max by Lanczos to a relative "
           "Ritz residual", reduction="bn=eval: the first examples' per-example Jacobians; bn=batch: the batch map")
SPECTRUM = Quantity(
    "spectrum", "exact unit spectrum", "sigma_i(J)", "every singular value of one unit's J (opt-in: "
    "StudyConfig.spectrum_max_dim)", UNIT, "{singular_values, shape, of, ...}", reduction="the first example")

UNIT_FIELDS = ("name", "kind", "stage", "in_shape", "out_shape")  # what a study unit is, before what it measures
STUDY_UNIT = (LOGIT_JAC, GRADIENT_SCALE, LOSS_GRAD, LOGIT_JAC_SINGULAR_VALUES, LOGIT_JAC_SUMMED_ROWS,
              CROSS_EXAMPLE_SHARE, LOGIT_JAC_SINGULAR_VALUES_SUMMED_ROWS, PROBES, FORWARD_STD, PARAM_GRAD,
              IDENTITY_SHORTCUT, JACOBIAN, SPECTRUM)  # a study unit's entries, in the order written
BATCH_ONLY = (LOGIT_JAC_SUMMED_ROWS, CROSS_EXAMPLE_SHARE, LOGIT_JAC_SINGULAR_VALUES_SUMMED_ROWS)  # bn=batch
STUDY_PROBE = (LOGIT_JAC, LOGIT_JAC_SUMMED_ROWS, LOSS_GRAD)  # each probe's entries (summed rows: bn=batch)

# ---------------------------------------------------------------- summary of a measurement (study)

FIRST_LAST_RATIO = Quantity(
    "first_last_ratio", "first/last", "",
    "median over examples of ||d z_i/d h_i|| (per-example block) at unit_1's input over the head's input (> 1: "
    "gradients grow towards the input)", NET, "scalar", reduction="median over examples of the ratio")
FIRST_LAST_RATIO_SUMMED_ROWS = Quantity(
    "first_last_ratio_summed_rows", "(summed rows)", "", "the same from ||sum_j d z_j/d h_i|| (bn=batch)", NET,
    "scalar", reduction="median over examples of the ratio")
STAGES = Quantity(
    "stages", "stage rates", "",
    "per-stage geometric mean over shape-keeping units of ||dz/dh_l|| / ||dz/dh_l+1||, of one weight draw (the "
    "study's seed; single draws of these 16-64-channel nets scatter by 5-11 % per stage)", STAGE,
    "[{units, rate, theory, ...}]", reduction="geometric mean over the stage's units")
THEORY = Quantity(
    "theory", "theory", "",
    "the mean-field stage rate of the whole net (jaxres.analysis.theory.predict_net_rates: borders, stem, head, "
    "BN's border pattern and head batch term, post-activation masks followed along the identity) +- its "
    "relative tolerance, which is for means over >= 4 weight draws (jaxres experiment theory; - where no theory "
    "covers the case)", STAGE, "{rate, tolerance, source, assumptions, accepts, weight_draws} or None",
    method="prediction")
TRANSITIONS = Quantity(
    "transitions", "transitions", "", "the same across each stage-opening unit", STAGE, "[{unit, rate, theory, ...}]")
WEIGHT_DRAWS = Quantity(
    "weight_draws", "weight draws", "", "the weight draws each rate is averaged over (1: the study's seed)", NET,
    "int")
INPUT_LOGIT_JAC = Quantity(
    "input_logit_jac", "|dz/dx|", "", "at the image", NET, "scalar", reduction="median over examples")
GRADIENT_SCALE_UNIT_1 = Quantity(
    "gradient_scale_unit_1", "GSC unit_1", "", "gradient scale coefficient ||dz/dh||_qm ||h|| / ||z|| (Philipp et "
    "al. 2018)", NET, "scalar", reduction="median over examples, at unit_1's input")
CROSS_EXAMPLE_SHARE_UNIT_1 = Quantity(
    "cross_example_share_unit_1", "cross e2e", "", "share of ||dz/dh_1||_F^2 outside the per-example blocks "
    "(bn=batch)", NET, "scalar")
UNIT_MSV = Quantity(
    "unit_msv", "unit msv", "", "median over sampled units of the per-example (block) mean squared singular value",
    NET, "{median, method, units, ci?}", method="exact or hutchinson-K (ci: medians of the units' 95% bounds)",
    reduction="median over the sampled units")
UNIT_SIGMA_MAX = Quantity(
    "unit_sigma_max", "sigma_max", "", "median Lanczos sigma_max (to its tolerance)", NET,
    "{median, method, converged, of}", method="lanczos, relative Ritz residual <= tol",
    reduction="median over the sampled units")
GRAD_CORRELATION_LAG1 = Quantity(
    "grad_correlation_lag1", "grad corr", "", "correlation of neighbouring inputs' gradients", NET, "scalar")
GRAD_CORRELATION_LAG1_SUMMED_ROWS = Quantity(
    "grad_correlation_lag1_summed_rows", "grad corr (summed rows)", "", "the same from the summed rows (bn=batch)",
    NET, "scalar")

SUMMARY = (FIRST_LAST_RATIO, STAGES, TRANSITIONS, WEIGHT_DRAWS, INPUT_LOGIT_JAC, GRADIENT_SCALE_UNIT_1, UNIT_MSV,
           UNIT_SIGMA_MAX, GRAD_CORRELATION_LAG1, FIRST_LAST_RATIO_SUMMED_ROWS, CROSS_EXAMPLE_SHARE_UNIT_1,
           GRAD_CORRELATION_LAG1_SUMMED_ROWS)

# ---------------------------------------------------------------- the training monitor's record

DL_DH = Quantity(
    "dL_dh", "loss gradient norm", "||dL/dh||",
    "||dL/dh|| over the whole batch tensor h (N, ...); bn=batch: the exact gradient of the batch loss, cross-example "
    "BN terms included", UNIT_INPUT, "{unit: float}", reduction="sqrt(sum_i ||dL/dh_i||^2) of loss_grad",
    e2e_key="loss_grad")
DLOGITS_DH = Quantity(
    "dlogits_dh", "end-to-end Jacobian norm", "||sum_j d z_j / d h_i||_F",
    "logit_jac_summed_rows (C rows: e_c on every example): bn=eval the per-example ||d z_i / d h_i||_F, bn=batch "
    "with the cross-example terms of batch statistics (the blocks would cost N*C backward rows instead of C)",
    UNIT_INPUT, "{unit: " + QUANTILES + "}", reduction="quantiles over the N examples",
    e2e_key="logit_jac_summed_rows")
DL_DW = Quantity(
    "dL_dW", "kernel gradient norm", "||dL/dW||", "Frobenius norm of the loss gradient of every kernel", KERNEL,
    "{'unit/layer/kernel': float}", reduction="over the whole batch", e2e_key="param_grad")
DL_DW_REL = Quantity(
    "dL_dW_rel", "relative kernel gradient", "||dL/dW|| / ||W||", "a kernel's gradient relative to its weights "
    "(Frobenius norms)", KERNEL, "{'unit/layer/kernel': float}", reduction="over the whole batch")
RESPONSE_STD = Quantity(
    "response_std", "response std", "std(response)",
    "std over all N*H*W*C elements of each layer probe's response (He et al. 2015, Fig. 7), in forward order "
    "(units, then layer1, layer2, ...)", LAYER_PROBE, "{'unit/layerK': float}",
    method="exact (float32 rounding: the unit chain's values, not one whole-model pass)",
    reduction="over the whole batch", e2e_key="forward")
UNIT_JACOBIAN = Quantity(
    "unit_jacobian", "unit Jacobian", "J = d unit(h) / d h",
    "only with unit_jacobians > 0, for that many evenly spaced inner units: frobenius_sq ||J||_F^2, sigma_max, "
    "exact (False: Hutchinson)", UNIT, "{unit: {frobenius_sq, sigma_max, exact}}",
    method="frobenius_sq exact (basis JVP/VJPs) or Hutchinson with 8 probes when a unit needs > 256 of them; "
           "sigma_max by Lanczos to a relative Ritz residual of 1e-2 (<= 32 steps)",
    reduction="bn=eval: example 0's per-example Jacobian; bn=batch: the whole batch map (N n_out) x (N n_in)")

MONITOR = (LOSS, DL_DH, DLOGITS_DH, DL_DW, DL_DW_REL, RESPONSE_STD, UNIT_JACOBIAN)

QUANTITIES = {q.key: q for q in (LOSS,) + STUDY_UNIT + SUMMARY + (THEORY,) + MONITOR}


def quantity(key: str) -> Quantity:
    """The definition of `key`, or a ValueError naming the keys there are."""
    if key not in QUANTITIES:
        raise ValueError(f"unknown analysis quantity {key!r}; known: {sorted(QUANTITIES)}")
    return QUANTITIES[key]


@dataclasses.dataclass(frozen=True)
class MonitorRecord:
    """One line of a run's analysis log (the training monitor's record): which measurement,
    then the `MONITOR` quantities (field names are the JSON keys, in the order written).

    step, bn ("batch": BatchNorm with the probe batch's statistics, as in training; "eval":
    running statistics), probe_size N, time_s (seconds this policy's measurement took, the
    first one including compilation; file and TensorBoard writes excluded), units (the model's
    unit names, in order). Numbers are as written: non-finite ones as the strings "nan",
    "inf", "-inf" (`float(value)` reads both forms). `unit_jacobian` is None when not measured
    (the key is then absent from the line).
    """

    step: int
    bn: str
    probe_size: int | None = None
    time_s: float | None = None
    loss: float | str | None = None
    units: list = dataclasses.field(default_factory=list)
    dL_dh: dict = dataclasses.field(default_factory=dict)  # field names are the JSON keys
    dlogits_dh: dict = dataclasses.field(default_factory=dict)
    dL_dW: dict = dataclasses.field(default_factory=dict)
    dL_dW_rel: dict = dataclasses.field(default_factory=dict)
    response_std: dict = dataclasses.field(default_factory=dict)
    unit_jacobian: dict | None = None

    def to_json(self) -> dict:
        """The JSON object of the line (keys in field order; `unit_jacobian` only when measured)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.unit_jacobian is None:
            del out[UNIT_JACOBIAN.key]
        return out

    @classmethod
    def from_json(cls, record: dict) -> MonitorRecord:
        """From a line's JSON object; a quantity a line lacks (older files) is empty. Keys
        this version does not define are ignored."""
        if "step" not in record or "bn" not in record:
            raise ValueError(f"a monitor record needs 'step' and 'bn'; got keys {sorted(record)}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(MonitorRecord))
