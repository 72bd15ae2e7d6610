"""Figures and tables of the degradation experiment (`degradation_results.collect` draws the
numbers; this module draws them and writes every output).

Writes, each atomically (temporary file + rename): degradation_errors.png (He et al. 2015
Fig. 6 with bands over seeds), conditions_errors.png (the interventions on the deep plain
net against the baselines), gradient_heatmaps.png, gradient_ratio.png, kernel_steps.png,
response_std.png (Fig. 7), results.md and results.json. Steps run on a symlog axis, so the
dense early measurements stay visible.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from jaxres.analysis import quantities as q
from jaxres.analysis.plots import pyplot, save_figure
from jaxres.experiments import degradation_results as dr
from jaxres.files import write_text_atomic

OUTPUTS = ("degradation_errors.png", "conditions_errors.png", "gradient_heatmaps.png", "gradient_ratio.png",
           "kernel_steps.png", "response_std.png", "results.md", "results.json")
WALL_TIME_FILE = dr.WALL_TIME_FILE
LINTHRESH = 16  # steps: linear below, logarithmic above


def _groups(runs: list[dr.Run]) -> dict[tuple[str, str], list[dr.Run]]:
    """Runs by (condition, model), in the order collect_runs sorted them."""
    groups: dict[tuple[str, str], list[dr.Run]] = {}
    for run in runs:
        groups.setdefault((run.condition, run.model), []).append(run)
    return groups


def _mean_band(curves: list[list[tuple[int, float]]]):
    """(steps, mean, low, high) over the seeds' curves at the steps every curve has (the 95 %
    t-interval; no band with one seed)."""
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
    if not common:
        return None
    values = [[dict(c)[s] for c in curves] for s in common]
    intervals = [dr.t_interval(v) for v in values]
    return (np.array(common), np.array([i.mean for i in intervals]), np.array([i.low for i in intervals]),
            np.array([i.high for i in intervals]))


def _draw(ax, runs: list[dr.Run], key: str, colour, label: str, **style):
    band = _mean_band([r.curves[key] for r in runs if r.curves[key]])
    if band is None:
        return
    steps, mean, low, high = band
    ax.plot(steps, 100 * mean, color=colour, label=label, **style)
    if np.isfinite(low).any():
        ax.fill_between(steps, 100 * low, 100 * high, color=colour, alpha=0.18, lw=0)


def _step_axis(ax):
    ax.set_xscale("symlog", linthresh=LINTHRESH)
    low, high = ax.get_xlim()
    if high < 10 * max(low, LINTHRESH):  # under a decade: no labelled power of ten falls inside, label the data's steps
        steps = sorted({int(x) for line in ax.lines for x in line.get_xdata()})
        ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("step")
    ax.grid(alpha=0.3, which="both")


def _colours(plt, depths):
    depths = sorted(set(depths))
    return dict(zip(depths, plt.cm.viridis(np.linspace(0.0, 0.85, max(len(depths), 1)))))


def plot_errors(runs: list[dr.Run], path) -> Path:
    """He et al. 2015 Fig. 6 for the baseline: the training error in eval mode on the fixed
    training subset (thin) and the test error (bold), mean over seeds with its 95 % band, and the
    last-window minibatch error (dotted); plain nets left, residual nets right."""
    plt = pyplot()
    baseline = {k: v for k, v in _groups(runs).items() if k[0] == dr.BASELINE}
    colours = _colours(plt, [v[0].depth for v in baseline.values()])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, residual in zip(axes, (False, True)):
        for (_, model), group in baseline.items():
            if group[0].residual != residual:
                continue
            colour = colours[group[0].depth]
            n = len([r for r in group if r.curves["test_error"]])
            _draw(ax, group, "window_error", colour, None, lw=0.7, ls=":", alpha=0.8)
            _draw(ax, group, "train_error", colour, f"{model} train (eval mode)", lw=1.0)
            _draw(ax, group, "test_error", colour, f"{model} test, {n} seed{'s' * (n != 1)}", lw=2.2, marker="o",
                  ms=3)
        ax.set_title(f"{'residual' if residual else 'plain'} nets", fontsize=10)
        _step_axis(ax)
        if ax.lines:
            ax.legend(fontsize=7, title="dotted: last-window minibatch error", title_fontsize=7)
    axes[0].set_ylabel("error (%)")
    fig.suptitle("Fashion-MNIST, baseline recipe: mean over seeds, band = 95 % interval", fontsize=10)
    return save_figure(fig, path)


def plot_conditions(runs: list[dr.Run], path) -> Path:
    """Every condition's nets against the baselines: training error in eval mode (left) and
    test error (right), mean over seeds with 95 % bands."""
    plt = pyplot()
    groups = _groups(runs)
    colours = plt.cm.tab10(np.arange(len(groups)) % 10)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, title in zip(axes, ("train_error", "test_error"), ("training error (eval mode)", "test error")):
        for colour, ((condition, model), group) in zip(colours, groups.items()):
            style = {"ls": "-" if group[0].residual else "--", "lw": 2.0 if condition != dr.BASELINE else 1.2}
            _draw(ax, group, key, colour, f"{condition}/{model}", marker=".", **style)
        ax.set_title(title, fontsize=10)
        _step_axis(ax)
    axes[0].set_ylabel("error (%)")
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    fig.suptitle("Conditions (bold) against the baselines: mean over seeds, band = 95 % interval "
                 "(dashed: plain, solid: residual)", fontsize=9)
    return save_figure(fig, path)


def gradient_matrix(run: dr.Run) -> tuple[list[str], list[int], np.ndarray]:
    """(units, steps, log10 ||dL/dh||) of a run: units x steps, NaN where not finite."""
    records = run.analysis
    units = records[-1].units if records else []
    values = np.array([[dr.number((r.dL_dh or {}).get(u)) for r in records] for u in units], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(values.reshape(len(units), len(records)))
    return units, [r.step for r in records], np.where(np.isfinite(logs), logs, np.nan)


def _first_seeds(runs: list[dr.Run]) -> list[dr.Run]:
    """The run of the smallest seed of every (condition, model)."""
    return [min(group, key=lambda r: r.seed) for group in _groups(runs).values()]


def plot_gradient_heatmaps(runs: list[dr.Run], path) -> Path:
    """Per (condition, model), its first seed: log10 ||dL/dh_l|| (unit input l, probe batch) as a
    unit x step image on one shared colour scale; stem (input = the image) at the top."""
    plt = pyplot()
    shown = _first_seeds(runs)
    matrices = [gradient_matrix(run) for run in shown]
    finite = np.concatenate([m[np.isfinite(m)] for _, _, m in matrices] or [np.zeros(0)])
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    cols = 2 if len(shown) <= 4 else 3
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    image = None
    for ax, run, (units, steps, logs) in zip(axes.flat, shown, matrices):
        if steps:
            edges = np.concatenate([steps, [steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1)]])
            image = ax.pcolormesh(edges, np.arange(len(units) + 1), np.ma.masked_invalid(logs), cmap="viridis",
                                  vmin=low, vmax=high, shading="flat")
            ax.invert_yaxis()
            ticks = sorted({0, len(units) // 2, len(units) - 1})
            ax.set_yticks([t + 0.5 for t in ticks], [units[t] for t in ticks], fontsize=7)
            ax.set_xscale("symlog", linthresh=LINTHRESH)
        ax.set_title(f"{run.condition}/{run.model} seed {run.seed}", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label=f"log10 {q.DL_DH.symbol} at the unit input")
    return save_figure(fig, path)


def plot_gradient_ratio(runs: list[dr.Run], path) -> Path:
    """unit_1/head (left) and smallest/head (right) ||dL/dh|| vs step: per (condition, model)
    the geometric mean over seeds (line) and the seeds' range (band)."""
    plt = pyplot()
    groups = _groups(runs)
    colours = plt.cm.tab10(np.arange(len(groups)) % 10)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key in zip(axes, dr.RATIOS):
        for colour, ((condition, model), group) in zip(colours, groups.items()):
            per_step: dict[int, list[float]] = {}
            for run in group:
                for record in run.analysis:
                    per_step.setdefault(record.step, []).append(dr.ratios(record)[key])
            steps = [s for s in sorted(per_step) if any(v > 0 for v in per_step[s])]
            if not steps:
                continue
            mean = [dr.geometric_mean(per_step[s]) for s in steps]
            lows = [min(v for v in per_step[s] if v > 0) for s in steps]
            highs = [max(v for v in per_step[s] if v > 0) for s in steps]
            ax.plot(steps, mean, color=colour, marker=".", ls="-" if group[0].residual else "--",
                    label=f"{condition}/{model}")
            if len(group) > 1:
                ax.fill_between(steps, lows, highs, color=colour, alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(dr.RATIOS[key], fontsize=8)
        _step_axis(ax)
    axes[0].set_ylabel("ratio (geometric mean over seeds; band: range)")
    if axes[1].lines:
        axes[1].legend(fontsize=7)
    return save_figure(fig, path)


def plot_kernel_steps(runs: list[dr.Run], path) -> Path:
    """Every kernel in forward order at the end of training (first seed per (condition, model)):
    ||dL/dW|| / ||W|| (top) and ||W|| over its value at step 0 (bottom). Under BatchNorm a kernel's
    effective step shrinks as 1 / ||W||^2, so a layer whose norm grew far more than the others' and
    whose relative gradient lies far below theirs barely moves."""
    plt = pyplot()
    shown = _first_seeds(runs)
    colours = plt.cm.tab10(np.arange(len(shown)) % 10)
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, layout="constrained")
    for colour, run in zip(colours, shown):
        if not run.analysis:
            continue
        style = {"marker": ".", "color": colour, "ls": "-" if run.residual else "--",
                 "label": f"{run.condition}/{run.model} (step {run.analysis[-1].step})"}
        rel = [dr.number(v) for v in (run.analysis[-1].dL_dW_rel or {}).values()]
        axes[0].semilogy(np.arange(1, len(rel) + 1), rel, **style)
        start = [r for r in run.analysis if r.step == 0]
        if start:
            growth = list(dr.kernel_norm_growth(start[0], run.analysis[-1]).values())
            axes[1].semilogy(np.arange(1, len(growth) + 1), growth, **style)
    axes[0].set_ylabel(f"{q.DL_DW_REL.symbol}, probe batch")
    axes[1].set_ylabel("||W|| / ||W|| at step 0")
    axes[1].set_xlabel("kernel (forward order: stem, units, head)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("Each kernel at the end of training, first seed: its gradient relative to its weights (top), "
                 "its norm's growth (bottom)", fontsize=9)
    return save_figure(fig, path)


def plot_response_std(runs: list[dr.Run], path) -> Path:
    """He et al. 2015 Fig. 7 at the last measurement (first seed per (condition, model)): std of
    each layer's response in forward order (top) and sorted by magnitude, descending (bottom)."""
    plt = pyplot()
    shown = _first_seeds(runs)
    colours = plt.cm.tab10(np.arange(len(shown)) % 10)
    fig, axes = plt.subplots(2, 1, figsize=(7, 6), layout="constrained")
    for colour, run in zip(colours, shown):
        if not run.analysis:
            continue
        stds = np.array([dr.number(v) for v in (run.analysis[-1].response_std or {}).values()])
        ranked = np.sort(stds[np.isfinite(stds)])[::-1]  # a non-finite std leaves a gap in forward order
        style = {"color": colour, "ls": "-" if run.residual else "--", "label": f"{run.condition}/{run.model}"}
        axes[0].plot(np.arange(1, len(stds) + 1), stds, marker=".", **style)
        axes[1].plot(np.arange(1, len(ranked) + 1), ranked, marker=".", **style)
    axes[0].set_xlabel("layer index (original order)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("std of the response")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("Layer responses at the end of training, first seed (solid: residual, dashed: plain)", fontsize=10)
    return save_figure(fig, path)


def markdown_table(results: dict) -> str:
    """The per-run table and the summary with intervals (what `jaxres experiment degradation` prints)."""
    return dr.markdown_runs(results) + "\n\n" + dr.markdown(results)


def write_outputs(out_dir) -> dict:
    """Reads every run under OUT/runs and writes the figures, results.md and results.json into
    OUT; returns the results."""
    out = Path(out_dir)
    results, runs = dr.collect(out)
    plot_errors(runs, out / "degradation_errors.png")
    plot_conditions(runs, out / "conditions_errors.png")
    plot_gradient_heatmaps(runs, out / "gradient_heatmaps.png")
    plot_gradient_ratio(runs, out / "gradient_ratio.png")
    plot_kernel_steps(runs, out / "kernel_steps.png")
    plot_response_std(runs, out / "response_std.png")
    write_text_atomic(out / "results.md", dr.markdown(results) + "\n\n" + dr.markdown_runs(results) + "\n")
    write_text_atomic(out / "results.json", json.dumps(dr.to_json(results), indent=1, allow_nan=False))
    return results
