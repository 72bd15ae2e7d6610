"""The headline numbers of one measurement (`study.Measurement`), each labelled exact or
estimated (with its interval): what the table, the plots and README report."""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxres.analysis import quantities as q
from jaxres.analysis import theory
from jaxres.analysis.stages import UnitPlace, stage_rates


WEIGHT_DRAWS = 1  # the study measures each model at one initialization (its seed)


def _as_dict(prediction) -> dict:
    return {"rate": prediction.rate, "tolerance": prediction.tolerance, "source": prediction.source,
            "assumptions": prediction.assumptions}


@functools.lru_cache(maxsize=None)
def _prediction(kind: str, **question):
    """A cached stationary mean-field prediction (finite-batch BN rates are Monte Carlo)."""
    predict = theory.predict_unit_rate if kind == "stage" else theory.predict_transition_factor
    found = predict(**question)
    return None if found is None else _as_dict(found)


@functools.lru_cache(maxsize=None)
def _net_prediction(shapes: tuple, places: tuple, **switches):
    """A cached whole-net prediction (`theory.predict_net_rates`): stages and transitions."""
    found = theory.predict_net_rates(shapes, [UnitPlace(*p) for p in places], **switches)
    if found is None:
        return None
    return {"stages": [_as_dict(p) for p in found["stages"]],
            "transitions": [_as_dict(p) for p in found["transitions"]]}


def _cifar_layout(units: list[dict]) -> bool:
    """Whether the net is laid out as `mean_field_unit_norms` assumes: a stride-1 stem, basic
    blocks (two weight layers each), a pool head."""
    stem, inner = units[0], units[1:-1]
    return (stem["in_shape"][1] == stem["out_shape"][1] and bool(inner)
            and all(len(u[q.PROBES.key]) == 2 for u in inner) and len(units[-1]["out_shape"]) == 2)


def predicted_rates(measurement, rates: dict) -> None:
    """Adds `theory` (with `accepts`: the measured rate within the prediction's relative
    tolerance, and `weight_draws`: how many draws the measured rate is averaged over) to every
    stage and transition of `rates`, None where no theory covers the case.

    For nets laid out like the zoo's CIFAR nets, the whole net's spatial mean field
    (`theory.predict_net_rates`: borders, stem, transitions, the head; BN's border pattern,
    finite batch N and the head's batch term; post-activation masks followed along the
    identity; option-A shortcuts, projections for the pre-activation family), reduced like
    the measurement; otherwise the stationary rate of each stage (`predict_unit_rate`,
    effective BN batch N * H * W). BN in eval mode is left without: its statistics are the
    calibrated or trained ones, which no mean-field theory here describes."""
    setting = measurement.setting
    units = measurement.units
    entries = [(s, "stage") for s in rates[q.STAGES.key]] + [(t, "transition") for t in rates[q.TRANSITIONS.key]]
    for entry, _ in entries:
        entry[q.THEORY.key] = None
    if setting.norm == "batchnorm" and setting.bn == "eval":
        return
    preactivation = "preact" in measurement.family
    if _cifar_layout(units):
        found = _net_prediction(
            tuple((tuple(u["in_shape"]), tuple(u["out_shape"])) for u in units),
            tuple((u["name"], u["kind"], u["stage"]) for u in units), norm=setting.norm,
            activation=setting.activation, residual=measurement.residual, preactivation=preactivation,
            bn=setting.bn, batch=units[0]["in_shape"][0] if setting.norm == "batchnorm" else None,
            shortcut="B" if preactivation else "A")
        if found is not None:
            for (entry, _), predicted in zip(entries, found["stages"] + found["transitions"]):
                _attach(entry, predicted)
        return
    by_name = {u["name"]: u for u in units}
    for entry, kind in entries:
        first = by_name[(entry["units"] if kind == "stage" else [entry["unit"]])[0]]
        n, side, _, channels = first["out_shape"]
        question = dict(norm=setting.norm, activation=setting.activation, residual=measurement.residual,
                        bn=setting.bn, layers_per_unit=max(len(first[q.PROBES.key]), 1),
                        effective_batch=n * side * side if setting.norm == "batchnorm" else None, spatial=side)
        if kind == "stage":
            question["preactivation"] = preactivation
        else:
            question["channel_ratio"] = channels / first["in_shape"][-1]
        try:
            predicted = _prediction(kind, **question)
        except ValueError:  # outside the theory's domain (e.g. too small an effective batch)
            predicted = None
        if predicted is not None:
            _attach(entry, predicted)


def _attach(entry: dict, predicted: dict) -> None:
    measured = entry["rate"]
    accepts = math.isfinite(measured) and abs(measured / predicted["rate"] - 1) <= predicted["tolerance"]
    entry[q.THEORY.key] = {**predicted, "accepts": bool(accepts), q.WEIGHT_DRAWS.key: WEIGHT_DRAWS}


def _unit_value(values) -> float:
    """A unit's number: the mean over its measured examples (bn="eval" lists) or the scalar."""
    return float(np.mean(np.asarray(values, np.float64)))


def unit_msv(units: list[dict]) -> dict:
    """Median over the measured units of the mean squared singular value of their (per-example)
    Jacobians; for estimates also `ci`: [median of the units' 95% lower bounds, median of the
    upper bounds], which holds the true median whenever every unit's interval holds its value."""
    measured = [u[q.JACOBIAN.key]["mean_sq_singular_value"] for u in units if u[q.JACOBIAN.key]]
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
    measured = [u[q.JACOBIAN.key]["spectral_norm"] for u in units if u[q.JACOBIAN.key]]
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
    """Headline numbers of one measurement, `quantities.SUMMARY` (each defined there; exact
    unless a `method` says otherwise):

    - `first_last_ratio`: median over examples of ||d z_i/d h_i|| at unit_1's input over that
      at the head's input (> 1: gradients grow towards the input); with bn="batch" also
      `first_last_ratio_summed_rows` from the summed rows;
    - `stages` / `transitions`: per-stage bulk rates over the shape-keeping units and each
      transition's rate (`stages.stage_rates`), each with the mean-field `theory` beside it
      (`predicted_rates`); `weight_draws`: the draws each rate is averaged over (1: the
      study's seed; the theory's tolerances are for means over >= 4 draws);
    - `input_logit_jac`: the median at the image; `gradient_scale_unit_1`: the median gradient
      scale coefficient at unit_1's input; `cross_example_share_unit_1` (bn="batch"): the
      end-to-end share of d z / d h_1 outside the per-example blocks;
    - `unit_msv`, `unit_sigma_max`: medians over the sampled units (`unit_msv` /
      `unit_sigma_max`); `grad_correlation_lag1`: correlation of neighbouring inputs' gradients.
    """
    units = measurement.units
    places = [UnitPlace(u["name"], u["kind"], u["stage"]) for u in units]
    rates = stage_rates(places, [u[q.LOGIT_JAC.key]["per_example"] for u in units])
    predicted_rates(measurement, rates)
    corr = measurement.shattered["correlation_by_lag"]
    out = {
        q.FIRST_LAST_RATIO.key: _ratio(units, q.LOGIT_JAC.key),
        q.STAGES.key: rates[q.STAGES.key],
        q.TRANSITIONS.key: rates[q.TRANSITIONS.key],
        q.WEIGHT_DRAWS.key: WEIGHT_DRAWS,
        q.INPUT_LOGIT_JAC.key: units[0][q.LOGIT_JAC.key]["median"],
        q.GRADIENT_SCALE_UNIT_1.key: units[1][q.GRADIENT_SCALE.key]["median"],
        q.UNIT_MSV.key: unit_msv(units),
        q.UNIT_SIGMA_MAX.key: unit_sigma_max(units),
        q.GRAD_CORRELATION_LAG1.key: float(corr[0]) if len(corr) else float("nan"),
    }
    if q.LOGIT_JAC_SUMMED_ROWS.key in units[1]:
        out[q.FIRST_LAST_RATIO_SUMMED_ROWS.key] = _ratio(units, q.LOGIT_JAC_SUMMED_ROWS.key)
        out[q.CROSS_EXAMPLE_SHARE_UNIT_1.key] = units[1][q.CROSS_EXAMPLE_SHARE.key]["estimate"]
        summed = measurement.shattered.get("correlation_by_lag_summed_rows", [])
        out[q.GRAD_CORRELATION_LAG1_SUMMED_ROWS.key] = float(summed[0]) if len(summed) else float("nan")
    return out
