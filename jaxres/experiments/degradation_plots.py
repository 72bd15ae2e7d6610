"""Figures and tables of the degradation experiment, from its workdirs alone (finished or partial).

Reads, for every run directory `OUT/runs/<model>`: `metrics.jsonl` (train lines: window-mean
`accuracy`; eval lines: `accuracy` on the whole test split) and `analysis.jsonl` (the gradient
monitor's records, `jaxres.analysis.monitor`), plus `OUT/runs/wall_time.jsonl` (one line per
`train_and_evaluate` invocation, written by `degradation.train_one`). A resumed run repeats
steps in both files: the later line for a (step, split) or (step, bn) counts. Non-finite
values (null, "nan", "inf") are skipped in the plots and written as null in results.json.

Writes, each atomically (temporary file + rename): degradation_errors.png (He et al. 2015
Fig. 6), gradient_heatmaps.png, gradient_ratio.png, response_std.png (Fig. 7), results.md and
results.json.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from jaxres.analysis.plots import pyplot, save_figure
from jaxres.analysis.monitor import read_analysis
from jaxres.files import read_jsonl, write_text_atomic

OUTPUTS = ("degradation_errors.png", "gradient_heatmaps.png", "gradient_ratio.png", "response_std.png",
           "results.md", "results.json")
WALL_TIME_FILE = "wall_time.jsonl"
ANALYSIS_BN = "batch"  # the recipe's policy: BatchNorm with the probe batch's statistics, as trained
FIRST_UNIT, LAST_UNIT = "unit_1", "head"
WALL_TIME_SOURCE = (f"sum of train_and_evaluate's wall_time_s over the invocations recorded in runs/{WALL_TIME_FILE} "
                    f"(setup, compilation, training, evaluation, analysis and checkpoints; an invocation killed "
                    f"before returning is not counted)")


def number(value) -> float:
    """A float, NaN for null, non-numbers and the strings "nan"/"inf" (non-finite for plots)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def latest(records: list[dict], field: str, value: str) -> list[dict]:
    """The records with `record[field] == value`, one per step (the last written), by step."""
    by_step = {r["step"]: r for r in records if r.get(field) == value and isinstance(r.get("step"), int)}
    return [by_step[s] for s in sorted(by_step)]


def _kind_depth(name: str) -> tuple[bool, int]:
    """(residual, depth) from a run name such as cifar_plain56 / cifar_resnet20."""
    match = re.fullmatch(r"\D*?(\d+)", name)
    return "plain" not in name, int(match.group(1)) if match else 0


def load_run(workdir) -> dict:
    """One run's curves and gradient records, as read from its workdir."""
    workdir = Path(workdir)
    metrics = read_jsonl(workdir / "metrics.jsonl")
    analysis = read_analysis(workdir)
    bns = [r.get("bn") for r in analysis]
    bn = ANALYSIS_BN if ANALYSIS_BN in bns or not bns else bns[0]
    config = json.loads((workdir / "config.json").read_text()) if (workdir / "config.json").is_file() else {}
    residual, depth = _kind_depth(workdir.name)
    return {
        "model": workdir.name, "residual": residual, "depth": depth, "num_steps": config.get("num_steps"),
        "train": [(r["step"], 1 - number(r.get("accuracy"))) for r in latest(metrics, "split", "train")],
        "eval": [(r["step"], 1 - number(r.get("accuracy"))) for r in latest(metrics, "split", "eval")],
        "analysis": latest(analysis, "bn", bn), "bn": bn if analysis else None,
        # time the gradient monitor took (every policy measured), first measurement's compile included
        "analysis_time_s": sum(number(r.get("time_s")) for b in set(bns) for r in latest(analysis, "bn", b)),
    }


def gradient_ratio(record: dict) -> float:
    """||dL/dh|| at the input of the first unit over that at the input of the head."""
    grads = record.get("dL_dh") or {}
    first, last = number(grads.get(FIRST_UNIT)), number(grads.get(LAST_UNIT))
    return first / last if last > 0 else math.nan


def collect_runs(out_dir) -> list[dict]:
    """Every run under OUT/runs (plain nets first, then by depth), with its wall time."""
    runs_dir = Path(out_dir) / "runs"
    names = sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    runs = [load_run(runs_dir / name) for name in names]
    wall = {}
    for record in read_jsonl(runs_dir / WALL_TIME_FILE):
        wall[record["model"]] = wall.get(record["model"], 0.0) + number(record.get("wall_time_s"))
    for run in runs:
        run["wall_time_s"] = wall.get(run["model"], math.nan)
    return sorted(runs, key=lambda r: (r["residual"], r["depth"], r["model"]))


def summary_rows(runs: list[dict]) -> list[dict]:
    """The results table: one row per run (NaN where a run has no such number yet)."""
    rows = []
    for run in runs:
        records = run["analysis"]
        start = [r for r in records if r["step"] == 0]
        steps = max([s for s, _ in run["train"] + run["eval"]], default=0)
        rows.append({
            "model": run["model"], "residual": run["residual"], "depth": run["depth"], "steps": steps,
            "num_steps": run["num_steps"],
            "finished": run["num_steps"] is not None and any(s >= run["num_steps"] for s, _ in run["eval"]),
            "final_train_error": run["train"][-1][1] if run["train"] else math.nan,
            "final_test_error": run["eval"][-1][1] if run["eval"] else math.nan,
            "gradient_ratio_start": gradient_ratio(start[0]) if start else math.nan,
            "gradient_ratio_end": gradient_ratio(records[-1]) if records else math.nan,
            "gradient_ratio_end_step": records[-1]["step"] if records else None,
            "wall_time_s": run["wall_time_s"],
            "analysis_time_s": run["analysis_time_s"],
        })
    return rows


def _nulls(value):
    """JSON-safe: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulls(v) for v in value]
    return value


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def markdown_table(results: dict) -> str:
    lines = ["| model | steps | train error % | test error % | unit_1/head grad, step 0 | at the end | wall time "
             "| of which gradient monitor |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["runs"]:
        def num(key, spec):
            return _fmt(number(row[key]), spec)

        pct = {k: _fmt(100 * number(row[k]), ".2f") for k in ("final_train_error", "final_test_error")}
        steps = f"{row['steps']} / {row['num_steps'] or '?'}"
        end_step = f" (step {row['gradient_ratio_end_step']})" if row["gradient_ratio_end_step"] is not None else ""
        wall = num("wall_time_s", ".0f")
        share = number(row["analysis_time_s"]) / number(row["wall_time_s"])
        monitor = f"{num('analysis_time_s', '.0f')} s ({_fmt(100 * share, '.1f')} %)" if math.isfinite(share) else "-"
        lines.append(f"| {row['model']} | {steps} | {pct['final_train_error']} | {pct['final_test_error']} | "
                     f"{num('gradient_ratio_start', '.3g')} | {num('gradient_ratio_end', '.3g')}{end_step} | "
                     f"{wall + ' s' if wall != '-' else wall} | {monitor} |")
    return "\n".join(lines)


def _colours(plt, runs):
    depths = sorted({run["depth"] for run in runs})
    return dict(zip(depths, plt.cm.viridis(np.linspace(0.0, 0.85, max(len(depths), 1)))))


def _kinds(runs):
    return (("plain", [r for r in runs if not r["residual"]]), ("residual", [r for r in runs if r["residual"]]))


def plot_errors(runs: list[dict], path) -> Path:
    """He et al. 2015 Fig. 6: training error (thin) and test error (bold) vs steps; plain nets
    left, residual nets right, one colour per depth."""
    plt = pyplot()
    colours = _colours(plt, runs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (kind, group) in zip(axes, _kinds(runs)):
        for run in group:
            colour = colours[run["depth"]]
            if run["train"]:
                steps, errors = zip(*run["train"])
                ax.plot(steps, 100 * np.array(errors), lw=0.8, alpha=0.8, color=colour,
                        label=None if run["eval"] else run["model"])
            if run["eval"]:
                steps, errors = zip(*run["eval"])
                ax.plot(steps, 100 * np.array(errors), lw=2.2, marker="o", ms=3, color=colour, label=run["model"])
        ax.set_title(f"{kind} nets", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=8, title="bold: test, thin: train", title_fontsize=7)
    axes[0].set_ylabel("error (%)")
    fig.suptitle("Fashion-MNIST: training (thin) and test (bold) error", fontsize=10)
    return save_figure(fig, path)


def gradient_matrix(run: dict) -> tuple[list[str], list[int], np.ndarray]:
    """(units, steps, log10 ||dL/dh||) of a run: units x steps, NaN where not finite."""
    records = run["analysis"]
    units = records[-1]["units"] if records else []
    values = np.array([[number((r.get("dL_dh") or {}).get(u)) for r in records] for u in units], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(values.reshape(len(units), len(records)))
    return units, [r["step"] for r in records], np.where(np.isfinite(logs), logs, np.nan)


def plot_gradient_heatmaps(runs: list[dict], path) -> Path:
    """Per run, log10 ||dL/dh_l|| (unit input l, probe batch) as a unit x step image on one shared
    colour scale; stem (input = the image) at the top."""
    plt = pyplot()
    matrices = [gradient_matrix(run) for run in runs]
    finite = np.concatenate([m[np.isfinite(m)] for _, _, m in matrices] or [np.zeros(0)])
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    cols = 2
    rows = max(1, math.ceil(len(runs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, run, (units, steps, logs) in zip(axes.flat, runs, matrices):
        if steps:
            edges = np.concatenate([steps, [steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1)]])
            image = ax.pcolormesh(edges, np.arange(len(units) + 1), np.ma.masked_invalid(logs), cmap="viridis",
                                  vmin=low, vmax=high, shading="flat")
            ax.invert_yaxis()
            ticks = sorted({0, len(units) // 2, len(units) - 1})
            ax.set_yticks([t + 0.5 for t in ticks], [units[t] for t in ticks], fontsize=7)
        ax.set_title(f"{run['model']} (BN {run['bn'] or '-'})", fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="log10 ||dL/dh|| at the unit input")
    return save_figure(fig, path)


def _style(run, colours):
    return {"color": colours[run["depth"]], "ls": "-" if run["residual"] else "--", "label": run["model"]}


def plot_gradient_ratio(runs: list[dict], path) -> Path:
    """||dL/dh|| at unit_1's input over that at the head's input vs step, every run (log scale)."""
    plt = pyplot()
    colours = _colours(plt, runs)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for run in runs:
        points = [(r["step"], gradient_ratio(r)) for r in run["analysis"]]
        points = [(s, v) for s, v in points if v > 0]
        if points:
            ax.semilogy(*zip(*points), marker=".", **_style(run, colours))
    ax.set_xlabel("step")
    ax.set_ylabel(f"||dL/dh|| {FIRST_UNIT} / {LAST_UNIT}")
    ax.set_title("Gradient reaching the first unit, relative to the head (solid: residual, dashed: plain)",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_response_std(runs: list[dict], path) -> Path:
    """He et al. 2015 Fig. 7 at the last measurement: std of each layer's response in forward
    order (top) and sorted by magnitude, descending (bottom)."""
    plt = pyplot()
    colours = _colours(plt, runs)
    fig, axes = plt.subplots(2, 1, figsize=(7, 6), layout="constrained")
    for run in runs:
        if not run["analysis"]:
            continue
        stds = np.array([number(v) for v in (run["analysis"][-1].get("response_std") or {}).values()])
        ranked = np.sort(stds[np.isfinite(stds)])[::-1]  # a non-finite std leaves a gap in forward order
        axes[0].plot(np.arange(1, len(stds) + 1), stds, marker=".", **_style(run, colours))
        axes[1].plot(np.arange(1, len(ranked) + 1), ranked, marker=".", **_style(run, colours))
    axes[0].set_xlabel("layer index (original order)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("std of the response")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("Layer responses at the end of training (solid: residual, dashed: plain)", fontsize=10)
    return save_figure(fig, path)


def write_outputs(out_dir) -> dict:
    """Reads every run under OUT/runs and writes the figures, results.md and results.json into
    OUT; returns the results."""
    out = Path(out_dir)
    runs = collect_runs(out)
    results = {
        "experiment": "degradation (He et al. 2015, Fig. 1/6/7) on Fashion-MNIST",
        "analysis_bn": ANALYSIS_BN,
        "gradient_ratio": f"||dL/dh|| at the input of {FIRST_UNIT} / at the input of {LAST_UNIT}, on the probe batch",
        "errors": "final_train_error: 1 - the last train window's mean accuracy; final_test_error: 1 - the last "
                  "evaluation's accuracy on the whole test split",
        "wall_time_source": WALL_TIME_SOURCE,
        "runs": summary_rows(runs),
    }
    plot_errors(runs, out / "degradation_errors.png")
    plot_gradient_heatmaps(runs, out / "gradient_heatmaps.png")
    plot_gradient_ratio(runs, out / "gradient_ratio.png")
    plot_response_std(runs, out / "response_std.png")
    write_text_atomic(out / "results.md", markdown_table(results) + "\n")
    payload = json.dumps(_nulls(results), indent=1, allow_nan=False)
    write_text_atomic(out / "results.json", payload)
    return results
