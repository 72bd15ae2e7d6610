"""Writing a study: results.json (atomically), the compact table, library versions."""

from __future__ import annotations

import json
import math
import platform
import re
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
    """results.json with every per-unit number, the settings, the seed and the versions."""
    payload = _clean({**results, "versions": versions()})
    atomic_write(Path(path), lambda f: f.write(json.dumps(payload, indent=1).encode()))
    return Path(path)


COLUMNS = (
    ("model", "model", "{:<16}"),
    ("setting", "setting", "{:<18}"),
    ("first_last_ratio", "first/last", "{:>10.3g}"),
    ("growth_per_unit", "growth/unit", "{:>11.3f}"),
    ("input_logit_jac", "|dz/dx|", "{:>9.3g}"),
    ("median_spectral_norm", "med sigma_max", "{:>13.3f}"),
    ("median_mean_sq_singular_value", "med msv", "{:>8.3f}"),
    ("grad_correlation_lag1", "grad corr", "{:>9.3f}"),
)


def table_rows(results: dict) -> list[dict]:
    rows = []
    for run in results["runs"]:
        s = run["setting"]
        label = (f"BN-{s['bn']}" if s["norm"] == "batchnorm" else "no norm") + f" {s['activation']}"
        rows.append({"model": run["model"], "setting": label, **run["summary"]})
    return rows


def _plain(fmt: str) -> str:
    return re.sub(r"\.\d+[gf]", "", fmt)


def format_table(results: dict) -> str:
    """One line per run. first/last: median ||d logits/d h|| at unit_1's input over the head's
    input (> 1: gradients grow towards the input); growth/unit: its per-unit geometric mean;
    |dz/dx|: at the image; med sigma_max / msv: median over units of sigma_max(J_l) and of
    ||J_l||_F^2 / n_in; grad corr: correlation of input gradients of neighbouring inputs."""
    header = " ".join(_plain(fmt).format(title) for _, title, fmt in COLUMNS)
    lines = [header, "-" * len(header)]
    for row in table_rows(results):
        cells = []
        for key, _, fmt in COLUMNS:
            value = row[key]
            try:
                cells.append(fmt.format(value))
            except (ValueError, TypeError):
                cells.append(_plain(fmt).format(str(value)))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    titles = [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in table_rows(results):
        cells = [row["model"], row["setting"]] + [f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k])
                                                  for k, _, _ in COLUMNS[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
