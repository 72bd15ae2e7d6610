"""The headline numbers of one measurement (`study.Measurement`), each labelled exact or
estimated (with its interval): what the table, the plots and README report."""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxres.analysis import theory
from jaxres.analysis.stages import UnitPlace, stage_rates


@functools.lru_cache(maxsize=None)
def _prediction(kind: str, **question):
    """A cached mean-field prediction (finite-batch BN rates are Monte Carlo, seconds each)."""
    predict = theory.predict_unit_rate if kind == "stage" else theory.predict_transition_factor
    found = predict(**question)
    if found is None:
        return None
    return {"rate": found.rate, "tolerance": found.tolerance, "source": found.source,
            "assumptions": found.assumptions}


def predicted_rates(measurement, rates: dict) -> None:
    """Adds `theory` (`theory.predict_unit_rate` / `predict_transition_factor`, with
    `accepts`: the measured rate within the prediction's relative tolerance) to every stage
    and transition of `rates`, None where no theory covers the case. BN in eval mode is left
    without: its statistics are the calibrated or trained ones, which no mean-field theory
    here describes. The effective batch of Flax's BatchNorm is N * H * W of the stage."""
    setting = measurement.setting
    units = {u["name"]: u for u in measurement.units}
    for entry, kind in [(s, "stage") for s in rates["stages"]] + [(t, "transition") for t in rates["transitions"]]:
        names = entry["units"] if kind == "stage" else [entry["unit"]]
        first = units[names[0]]
        n, side, _, channels = first["out_shape"]
        entry["theory"] = None
        if setting.norm == "batchnorm" and setting.bn == "eval":
            continue
        question = dict(norm=setting.norm, activation=setting.activation, residual=measurement.residual,
                        bn=setting.bn, layers_per_unit=max(len(first["probes"]), 1),
                        effective_batch=n * side * side if setting.norm == "batchnorm" else None, spatial=side)
        if kind == "stage":
            question["preactivation"] = "preact" in measurement.family
        else:
            question["channel_ratio"] = channels / first["in_shape"][-1]
        try:
            predicted = _prediction(kind, **question)
        except ValueError:  # outside the theory's domain (e.g. too small an effective batch)
            predicted = None
        if predicted is not None:
            measured = entry["rate"]
            accepts = math.isfinite(measured) and abs(measured / predicted["rate"] - 1) <= predicted["tolerance"]
            entry["theory"] = {**predicted, "accepts": bool(accepts)}


def _unit_value(values) -> float:
    """A unit's number: the mean over its measured examples (bn="eval" lists) or the scalar."""
    return float(np.mean(np.asarray(values, np.float64)))


def unit_msv(units: list[dict]) -> dict:
    """Median over the measured units of the mean squared singular value of their (per-example)
    Jacobians; for estimates also `ci`: [median of the units' 95% lower bounds, median of the
    upper bounds], which holds the true median whenever every unit's interval holds its value."""
    measured = [u["jacobian"]["mean_sq_singular_value"] for u in units if u["jacobian"]]
    if not measured:
        return {"median": float("nan"), "method": "not measured"}
    methods = sorted({m["method"] for m in measured})
    out = {"median": float(np.median([_unit_value(m["estimate"]) for m in measured])),
           "method": " + ".join(methods), "units": len(measured)}
    if any(m["method"] != "exact" for m in measured):
        low = [_unit_value(m.get("ci_low", m["estimate"])) for m in measured]
        high = [_unit_value(m.get("ci_high", m["estimate"])) for m in measured]
        out["ci"] = [float(np.median(low)), float(np.median(high))]
    return out


def unit_sigma_max(units: list[dict]) -> dict:
    measured = [u["jacobian"]["spectral_norm"] for u in units if u["jacobian"]]
    if not measured:
        return {"median": float("nan"), "method": "not measured"}
    return {"median": float(np.median([_unit_value(s["sigma"]) for s in measured])),
            "method": f"lanczos, relative Ritz residual <= {measured[0]['tol']:g}",
            "converged": all(all(s["converged"]) for s in measured), "of": measured[0]["of"]}


def _ratio(units, key: str) -> float:
    first = np.asarray(units[1][key]["per_example"], np.float64)  # unit_1's input (after the stem)
    last = np.asarray(units[-1][key]["per_example"], np.float64)  # the head's input
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.median(first / last))


def summarize(measurement) -> dict:
    """Headline numbers of one measurement (exact unless a `method` says otherwise):

    - `first_last_ratio`: median over examples of ||d z_i/d h_i|| at unit_1's input over that
      at the head's input (> 1: gradients grow towards the input); with bn="batch" also
      `first_last_ratio_summed_rows` from the summed rows;
    - `stages` / `transitions`: per-stage bulk rates over the shape-keeping units and each
      transition's rate (`stages.stage_rates`), each with the mean-field `theory` beside it
      (`predicted_rates`);
    - `input_logit_jac`: the median at the image; `gradient_scale_unit_1`: the median gradient
      scale coefficient at unit_1's input; `cross_example_share_unit_1` (bn="batch"): the
      end-to-end share of d z / d h_1 outside the per-example blocks;
    - `unit_msv`, `unit_sigma_max`: medians over the sampled units (`unit_msv` /
      `unit_sigma_max`); `grad_correlation_lag1`: correlation of neighbouring inputs' gradients.
    """
    units = measurement.units
    places = [UnitPlace(u["name"], u["kind"], u["stage"]) for u in units]
    rates = stage_rates(places, [u["logit_jac"]["per_example"] for u in units])
    predicted_rates(measurement, rates)
    corr = measurement.shattered["correlation_by_lag"]
    out = {
        "first_last_ratio": _ratio(units, "logit_jac"),
        "stages": rates["stages"],
        "transitions": rates["transitions"],
        "input_logit_jac": units[0]["logit_jac"]["median"],
        "gradient_scale_unit_1": units[1]["gradient_scale"]["median"],
        "unit_msv": unit_msv(units),
        "unit_sigma_max": unit_sigma_max(units),
        "grad_correlation_lag1": float(corr[0]) if len(corr) else float("nan"),
    }
    if "logit_jac_summed_rows" in units[1]:
        out["first_last_ratio_summed_rows"] = _ratio(units, "logit_jac_summed_rows")
        out["cross_example_share_unit_1"] = units[1]["cross_example_share"]["estimate"]
        summed = measurement.shattered.get("correlation_by_lag_summed_rows", [])
        out["grad_correlation_lag1_summed_rows"] = float(summed[0]) if len(summed) else float("nan")
    return out
