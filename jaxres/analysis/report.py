"""Writing a study: results.json (atomically), the compact table, library versions."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

from jaxres.analysis import quantities as q
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
    # key, the quantity it shows (its name is the title, its meaning the legend), width; every
    # number is exact unless its column says otherwise
    ("model", None, 22),
    ("setting", None, 14),
    ("first_last", q.FIRST_LAST_RATIO, 10),
    ("summed_rows", q.FIRST_LAST_RATIO_SUMMED_ROWS, 13),
    ("stage_rates", q.STAGES, 19),
    ("theory", q.THEORY, 26),
    ("transitions", q.TRANSITIONS, 12),
    ("gsc", q.GRADIENT_SCALE_UNIT_1, 10),
    ("input", q.INPUT_LOGIT_JAC, 9),
    ("cross", q.CROSS_EXAMPLE_SHARE_UNIT_1, 9),
    ("msv", q.UNIT_MSV, 25),
    ("sigma", q.UNIT_SIGMA_MAX, 9),
    ("corr", q.GRAD_CORRELATION_LAG1, 9),
)
TITLES = {"model": "model", "setting": "setting", "msv": f"{q.UNIT_MSV.name} (95% CI if est.)"}  # else the name


def weight_draws(results: dict) -> int | None:
    """The weight draws every measurement's rates are averaged over (None if they differ)."""
    draws = {m["summary"].get(q.WEIGHT_DRAWS.key, 1) for m in results["measurements"]}
    return draws.pop() if len(draws) == 1 else None


def table_rows(results: dict) -> list[dict]:
    """One row of strings per measurement (from results.json's content)."""
    rows = []
    for m in results["measurements"]:
        s, summary = m["setting"], m["summary"]
        label = (f"BN-{s['bn']}" if s["norm"] == "batchnorm" else "no norm") + f" {s['activation']}"

        def optional(quantity, digits=3):
            return _g(summary[quantity.key], digits) if quantity.key in summary else "-"

        rows.append({
            "model": m["model"], "setting": label,
            "first_last": _g(summary[q.FIRST_LAST_RATIO.key]),
            "summed_rows": optional(q.FIRST_LAST_RATIO_SUMMED_ROWS),
            "stage_rates": _rates(summary[q.STAGES.key]), "theory": _theory(summary[q.STAGES.key]),
            "transitions": _rates(summary[q.TRANSITIONS.key]),
            "gsc": _g(summary[q.GRADIENT_SCALE_UNIT_1.key]), "input": _g(summary[q.INPUT_LOGIT_JAC.key]),
            "cross": optional(q.CROSS_EXAMPLE_SHARE_UNIT_1, 2),
            "msv": _estimate(summary[q.UNIT_MSV.key]), "sigma": _g(summary[q.UNIT_SIGMA_MAX.key]["median"]),
            "corr": _g(summary[q.GRAD_CORRELATION_LAG1.key], 2),
        })
    return rows


def table_legend(results: dict) -> str:
    """What the columns are (each column's quantity: `quantities`), and which numbers are
    estimates (from the methods recorded)."""
    methods = sorted({m["summary"][q.UNIT_MSV.key]["method"] for m in results["measurements"]})
    described = {q.UNIT_MSV.key: f" ({', '.join(methods)}; an interval marks estimates)"}
    items = [f"{quantity.name}: {quantity.meaning}{described.get(quantity.key, '')}"
             for _, quantity, _ in COLUMNS if quantity is not None]
    return "; ".join(items) + ". All other numbers exact."


def format_table(results: dict) -> str:
    """The study as an aligned text table (columns: `table_legend`); the stage-rate column
    says how many weight draws its rates are averaged over."""
    draws = weight_draws(results)
    titles = {**TITLES,
              "stage_rates": q.STAGES.name + ("" if draws is None else f", {draws} draw{'s' if draws > 1 else ''}")}
    header = " ".join(f"{titles.get(key) or quantity.name:<{width}}" for key, quantity, width in COLUMNS).rstrip()
    lines = [header, "-" * len(header)]
    for row in table_rows(results):
        lines.append(" ".join(f"{row[key]:<{width}}" for key, _, width in COLUMNS).rstrip())
    return "\n".join(lines)
