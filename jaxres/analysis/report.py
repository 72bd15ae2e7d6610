"""Writing a study: results.json (atomically), the compact table, library versions."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from jaxres.files import atomic_write


def versions() -> dict:
    import flax
    import jax
    import numpy

    import jaxres

    return {"jaxres": jaxres.__version__, "jax": jax.__version__, "flax": flax.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}


def _clean(value):
    """JSON-safe: non-finite floats become strings ("inf", "nan"), tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_results(results: dict, path) -> Path:
    """results.json (`StudyResults.to_json()`) with the library versions added."""
    payload = _clean({**results, "versions": versions()})
    atomic_write(Path(path), lambda f: f.write(json.dumps(payload, indent=1).encode()))
    return Path(path)


def _g(value, digits: int = 3) -> str:
    try:
        return f"{float(value):.{digits}g}"
    except (TypeError, ValueError):
        return str(value)


def _rates(items) -> str:
    return "/".join(_g(item["rate"]) for item in items) or "-"


def _theory(stages) -> str:
    cells = []
    for stage in stages:
        theory = stage.get("theory")
        cells.append("-" if not theory else f"{_g(theory['rate'])}±{100 * theory['tolerance']:.0f}%")
    return "/".join(cells) if any(c != "-" for c in cells) else "-"


def _estimate(entry: dict) -> str:
    """A median with its label: exact, or the estimate's interval and probe count."""
    cell = _g(entry["median"])
    if "ci" in entry:
        cell += f" [{_g(entry['ci'][0])},{_g(entry['ci'][1])}]"
    return cell


COLUMNS = (
    # key, title, width; every number is exact unless its column says otherwise
    ("model", "model", 22),
    ("setting", "setting", 14),
    ("first_last", "first/last", 10),
    ("summed_rows", "(summed rows)", 13),
    ("stage_rates", "stage rates", 19),
    ("theory", "theory", 26),
    ("transitions", "transitions", 12),
    ("gsc", "GSC unit_1", 10),
    ("input", "|dz/dx|", 9),
    ("cross", "cross e2e", 9),
    ("msv", "unit msv (95% CI if est.)", 25),
    ("sigma", "sigma_max", 9),
    ("corr", "grad corr", 9),
)


def weight_draws(results: dict) -> int | None:
    """The weight draws every measurement's rates are averaged over (None if they differ)."""
    draws = {m["summary"].get("weight_draws", 1) for m in results["measurements"]}
    return draws.pop() if len(draws) == 1 else None


def table_rows(results: dict) -> list[dict]:
    """One row of strings per measurement (from results.json's content)."""
    rows = []
    for m in results["measurements"]:
        s, summary = m["setting"], m["summary"]
        label = (f"BN-{s['bn']}" if s["norm"] == "batchnorm" else "no norm") + f" {s['activation']}"
        rows.append({
            "model": m["model"], "setting": label,
            "first_last": _g(summary["first_last_ratio"]),
            "summed_rows": _g(summary["first_last_ratio_summed_rows"]) if "first_last_ratio_summed_rows" in summary
            else "-",
            "stage_rates": _rates(summary["stages"]), "theory": _theory(summary["stages"]),
            "transitions": _rates(summary["transitions"]),
            "gsc": _g(summary["gradient_scale_unit_1"]), "input": _g(summary["input_logit_jac"]),
            "cross": _g(summary["cross_example_share_unit_1"], 2) if "cross_example_share_unit_1" in summary else "-",
            "msv": _estimate(summary["unit_msv"]), "sigma": _g(summary["unit_sigma_max"]["median"]),
            "corr": _g(summary["grad_correlation_lag1"], 2),
        })
    return rows


def table_legend(results: dict) -> str:
    """What the columns are, and which numbers are estimates (from the methods recorded)."""
    methods = sorted({m["summary"]["unit_msv"]["method"] for m in results["measurements"]})
    return (
        "first/last: median over examples of ||d z_i/d h_i|| (per-example block) at unit_1's input over the "
        "head's input (> 1: gradients grow towards the input); (summed rows): the same from "
        "||sum_j d z_j/d h_i|| (bn=batch); stage rates: per-stage geometric mean over shape-keeping units of "
        "||dz/dh_l|| / ||dz/dh_l+1||, of one weight draw (the study's seed; single draws of these 16-64-channel nets "
        "scatter by 5-11 % per stage); theory: the mean-field stage rate of the whole net (jaxres.analysis.theory."
        "predict_net_rates: borders, stem, head, BN's border pattern and head batch term, post-activation masks "
        "followed along the identity) +- its relative tolerance, which is for means over >= 4 weight draws "
        "(jaxres experiment theory; - where no theory covers the case); transitions: the same across each "
        "stage-opening unit; GSC unit_1: gradient scale coefficient ||dz/dh||_qm ||h|| / ||z|| (Philipp et al. "
        "2018); |dz/dx|: at the image; cross e2e: share of ||dz/dh_1||_F^2 outside the per-example blocks "
        "(bn=batch); unit msv: median over sampled units of the per-example (block) mean squared singular "
        f"value ({', '.join(methods)}; an interval marks estimates); sigma_max: median Lanczos sigma_max "
        "(to its tolerance); grad corr: correlation of neighbouring inputs' gradients. All other numbers exact."
    )


def format_table(results: dict) -> str:
    """The study as an aligned text table (columns: `table_legend`); the stage-rate column
    says how many weight draws its rates are averaged over."""
    draws = weight_draws(results)
    titles = {"stage_rates": "stage rates" + ("" if draws is None else f", {draws} draw{'s' if draws > 1 else ''}")}
    header = " ".join(f"{titles.get(key, title):<{width}}" for key, title, width in COLUMNS).rstrip()
    lines = [header, "-" * len(header)]
    for row in table_rows(results):
        lines.append(" ".join(f"{row[key]:<{width}}" for key, _, width in COLUMNS).rstrip())
    return "\n".join(lines)
