"""Figures and tables of the trained twins (`jaxres experiment twins`, `--plot-only`): from the
JSON files `TrainedNet.write_result` wrote under OUT (OUT/NET/ANALYSIS.json, the BatchNorm
controls in OUT/NET/bn_batch/), and from the training runs with sharpness recorded (OUT/NET/training/,
metrics.jsonl): lesion.png, landscape.png, sharpness.png, sharpness_training.png, spectrum.png,
paths.png and tables.md into OUT, for every net present (a net whose analysis is missing is left out of that
figure and table).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxres.analysis.plots import pyplot, save_figure
from jaxres.files import write_text_atomic
from jaxres.train.trained_net import result_path

NETS = ("cifar_plain20", "cifar_resnet20", "cifar_plain56", "cifar_resnet56")
COLOURS = {"cifar_plain20": "tab:orange", "cifar_resnet20": "tab:blue", "cifar_plain56": "tab:red",
           "cifar_resnet56": "tab:purple"}
TRAINING = "training"  # DIRECTORY/NET/training: a twin trained again with sharpness recorded (load_sharpness_training)
ANALYSES = ("lesion", "bn_batch/lesion", "landscape", "bn_batch/landscape", "sharpness", "spectrum", "paths")


def load(directory: Path, analysis: str) -> dict:
    """{net: the result of `analysis` ("lesion", "bn_batch/lesion", ...)} for every net of
    NETS whose DIRECTORY/NET/ANALYSIS.json exists."""
    found = {}
    for net in NETS:
        path = result_path(Path(directory) / net, analysis)
        if path.exists():
            found[net] = json.loads(path.read_text())
    return found


def pct(entry: dict) -> str:
    if "ci_low" not in entry:
        return f"{100 * entry['estimate']:.1f}"
    return f"{100 * entry['estimate']:.1f} [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"


def lesion_figure(results: dict, controls: dict, lines: list, directory: Path) -> Path | None:
    """`controls`: the same lesions with BatchNorm on batch statistics (dashed), where present."""
    if not results:
        return None
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
    lines += ["## Lesions", "", "Test error, % (exact on the images; [95% Wilson interval]; random sets: mean "
              "[95% t interval over the draws]).", "",
              "| net | images | intact | one unit removed: best / median / worst | k = 1 | k = 3 | k = 5 | k = max |",
              "|---|---|---|---|---|---|---|---|"]
    rows = [(net, r, "eval") for net, r in results.items()] + [(net, r, "batch") for net, r in controls.items()]
    for net, r, bn in rows:
        style = "o-" if bn == "eval" else "s--"
        errors = np.array([r["single"][u]["estimate"] for u in r["units"]])
        positions = np.arange(1, len(errors) + 1)
        label = net if bn == "eval" else f"{net}, BN batch statistics"
        ax1.plot(positions, 100 * errors, style, ms=3, color=COLOURS[net], label=label)
        if bn == "eval":
            ax1.axhline(100 * r["baseline"]["estimate"], color=COLOURS[net], ls=":", lw=1)
        ks = [e["k"] for e in r["random"]]
        est = np.array([e["estimate"] for e in r["random"]])
        low = np.array([e.get("ci_low", e["estimate"]) for e in r["random"]])
        high = np.array([e.get("ci_high", e["estimate"]) for e in r["random"]])
        ax2.errorbar(ks, 100 * est, yerr=100 * np.stack([est - low, high - est]), fmt=style, ms=3, capsize=2,
                     color=COLOURS[net], label=label)
        single = sorted(r["single"].values(), key=lambda e: e["estimate"])
        by_k = {e["k"]: e for e in r["random"]}
        lines.append(f"| {net}{'' if bn == 'eval' else ' (BN batch)'} | {r['num_images']} | {pct(r['baseline'])} | {pct(single[0])} / "
                     f"{pct(single[len(single) // 2])} / {pct(single[-1])} | "
                     + " | ".join(pct(by_k[k]) if k in by_k else "-" for k in (1, 3, 5)) + f" | "
                     f"{pct(r['random'][-1])} (k={r['random'][-1]['k']}) |")
    ax1.set(xlabel="shape-keeping unit removed (forward order)", ylabel="test error, %",
            title="one unit removed (dotted: intact net)")
    ax2.set(xlabel="k units removed at random", ylabel="test error, %", title="k random units (95% t over draws)")
    for ax in (ax1, ax2):
        ax.axhline(90, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = save_figure(fig, Path(directory) / "lesion.png", dpi=110)
    lines.append("")
    return path


def landscape_figure(results: dict, controls: dict, lines: list, directory: Path) -> Path | None:
    """One row of contours per BatchNorm policy (eval: `results`; batch: `controls`), one colour
    scale for all; the last column holds the linear paths."""
    if not results:
        return None
    rows = [("eval", results)] + ([("batch", controls)] if controls else [])
    nets = list(results)
    fig, axes = pyplot().subplots(len(rows), len(nets) + 1, figsize=(4.2 * (len(nets) + 1), 3.8 * len(rows)),
                             squeeze=False)
    everything = [r for _, group in rows for r in group.values()]
    # one colour scale for every net: log10 of the loss, from the lowest centre to a common cap
    levels = np.linspace(np.log10(min(r["slice"]["center"]["loss"] for r in everything)) - 0.05, 1.0, 22)
    lines += ["## Loss landscape", "", "Exact training loss (mean cross-entropy, float32) on the stated images; "
              "'share < 1': grid points with a loss below 1.", "",
              "| net | BN | grid | images | centre loss | share < 1 | slice max | wall time (slice / path) | "
              "path max, 0 < t < 1 |", "|---|---|---|---|---|---|---|---|---|"]
    for (bn, group), axrow in zip(rows, axes):
        for ax, net in zip(axrow, nets):
            if net not in group:
                ax.axis("off")
                continue
            s = group[net]["slice"]
            loss = np.log10(np.minimum(np.asarray(s["loss"], np.float64), 10.0))
            cs = ax.contourf(s["alpha"], s["beta"], loss, levels=levels, cmap="viridis", extend="both")
            ax.contour(s["alpha"], s["beta"], loss, levels=levels[::3], colors="k", linewidths=0.4)
            ax.plot(0, 0, "w+")
            ax.set(title=f"{net}, BN {bn} ({len(s['alpha'])}x{len(s['beta'])}, {s['num_images']} images)",
                   xlabel="alpha", ylabel="beta")
            path = group[net].get("path")
            inner = [v for t, v in zip(path["t"], path["loss"]) if 0 < t < 1] if path else []
            share = float(np.mean(np.asarray(s["loss"]) < 1))
            lines.append(f"| {net} | {bn} | {len(s['alpha'])}x{len(s['beta'])} on [{s['alpha'][0]:g}, "
                         f"{s['alpha'][-1]:g}]^2 | {s['num_images']} | {s['center']['loss']:.3f} | {share:.1%} | "
                         f"{np.nanmax(s['loss']):.3g} | {s['wall_time_s']:.0f} s / "
                         f"{path['wall_time_s'] if path else float('nan'):.0f} s | "
                         f"{max(inner) if inner else float('nan'):.3g} |")
        fig.colorbar(cs, ax=axrow[len(nets) - 1], label="log10 training loss (capped at 10)")
        ax = axrow[-1]
        for net in nets:
            path = group.get(net, {}).get("path")
            if path:
                ax.plot(path["t"], path["loss"], "o-", ms=3, color=COLOURS[net], label=net)
        ax.set(yscale="log", xlabel="t: (1 - t) init + t trained", ylabel="training loss",
               title=f"linear path, BN {bn}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = save_figure(fig, Path(directory) / "landscape.png", dpi=100)
    lines.append("")
    return path


def sharpness_figure(results: dict, lines: list, directory: Path) -> Path | None:
    if not results:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 4))
    lines += ["## Sharpness", "", "lambda_max of the training-loss Hessian on the monitor's probe batch "
              "(Lanczos on exact HVPs; relative Ritz residual <= tol).", "",
              "| net | when | lambda_max | residual / tol | HVPs | lr | 2/lr | (2+2 beta)/lr | loss |",
              "|---|---|---|---|---|---|---|---|---|"]
    for i, (net, r) in enumerate(results.items()):
        for j, when in enumerate(("initialization", "trained")):
            if when not in r:
                continue
            e = r[when]
            ax.bar(i + 0.35 * j, e["lambda_max"], 0.3, color=COLOURS[net], alpha=0.5 if j == 0 else 1.0,
                   label=f"{net} {when}")
            ax.plot([i + 0.35 * j - 0.15, i + 0.35 * j + 0.15], [e["thresholds"]["gd"]] * 2, "k-", lw=1)
            lines.append(f"| {net} | {when} (step {e['step']}) | {e['lambda_max']:.4g} | {e['residual']:.1e} / "
                         f"{e['tol']:g} | {e['iterations']} | {e['learning_rate']:g} | {e['thresholds']['gd']:.4g} | "
                         f"{e['thresholds']['momentum']:.4g} | {e['loss']:.3f} |")
    ax.set(yscale="log", ylabel="lambda_max (black: 2/lr of the next step)", xticks=range(len(results)),
           xticklabels=list(results), title="sharpness: initialization (light) and trained")
    fig.tight_layout()
    path = save_figure(fig, Path(directory) / "sharpness.png", dpi=110)
    lines.append("")
    return path


def load_sharpness_training(directory) -> dict[str, list[dict]]:
    """NET -> the "sharpness" lines (one per step, the current attempt's) of the training run in
    DIRECTORY/NET/TRAINING: `jaxres train --config degradation:NET --config.analysis_sharpness=N
    --workdir DIRECTORY/NET/training`, the monitor recording lambda_max on its schedule."""
    from jaxres.experiments.degradation_results import current_attempt, latest
    from jaxres.files import read_jsonl
    from jaxres.workdir import Workdir

    found = {}
    for net in NETS:
        workdir = Path(directory) / net / TRAINING
        metrics = Workdir(workdir).metrics_path if workdir.is_dir() else None
        lines = latest(current_attempt(read_jsonl(metrics)), "split", "sharpness") if metrics and metrics.is_file() else []
        if lines:
            found[net] = lines
    return found


def sharpness_training_figure(curves: dict, lines: list, directory: Path) -> Path | None:
    """lambda_max against the step for each twin trained with the monitor recording it, beside
    Cohen et al.'s thresholds 2/lr and (2 + 2 momentum)/lr of each step's learning rate."""
    from jaxres.analysis.sharpness import DEFAULT_TOL

    if not curves:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    for net, records in curves.items():
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["lambda_max"] for r in records], "o-", ms=3, color=COLOURS[net], label=net)
    reference = max(curves.values(), key=len)
    steps = [r["step"] for r in reference]
    ax.step(steps, [r["threshold_gd"] for r in reference], "k--", where="post", lw=1, label="2 / lr")
    ax.step(steps, [r["threshold_momentum"] for r in reference], "k:", where="post", lw=1,
            label="(2 + 2 momentum) / lr")
    ax.set_xscale("symlog", linthresh=10)
    ax.set(yscale="log", xlabel="step (linear below 10, logarithmic above)", ylabel="lambda_max on the probe batch",
           title="sharpness during training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = save_figure(fig, Path(directory) / "sharpness_training.png", dpi=110)
    lines += ["## Sharpness during training", "",
              "lambda_max of the training-loss Hessian on the monitor's probe batch at each measured step "
              f"(Lanczos on exact HVPs to a relative Ritz residual <= {DEFAULT_TOL:g}; not converged: the steps "
              "that did not reach it), over Cohen et al.'s thresholds of that step's learning rate, 2/lr and "
              "(2 + 2 momentum)/lr, in the phase of the first (largest) learning rate.", "",
              "| net | steps measured | not converged | max lambda_max / (2/lr), first lr (at step) "
              "| max lambda_max / ((2+2m)/lr), first lr | lambda_max at the first / last step | HVPs, median |",
              "|---|---|---|---|---|---|---|"]
    for net, records in curves.items():
        top_lr = max(r["learning_rate"] for r in records)
        first = [r for r in records if r["learning_rate"] >= 0.99 * top_lr]
        top = max(first, key=lambda r: r["lambda_max"] / r["threshold_gd"])
        hvps = sorted(r["iterations"] for r in records)[len(records) // 2]
        lines.append(f"| {net} | {len(records)} ({records[0]['step']}-{records[-1]['step']}) | "
                     f"{sum(not r['converged'] for r in records)} | {top['lambda_max'] / top['threshold_gd']:.3g} "
                     f"({top['step']}) | {max(r['lambda_max'] / r['threshold_momentum'] for r in first):.3g} | "
                     f"{records[0]['lambda_max']:.4g} / {records[-1]['lambda_max']:.4g} | {hvps} |")
    lines.append("")
    return path


def spectrum_figure(results: dict, lines: list, directory: Path) -> Path | None:
    """The isometry ratio m1^2/m2 per Jacobian (1: all singular values equal), initialization
    (hollow) and trained (filled): unlike the SLQ density, whose lowest node lumps every small
    singular value, it is a ratio of two unbiased estimates."""
    if not results:
        return None
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 4), sharey=True)
    panels = [("features", "feature extractor: unit_1 .. last unit"), ("own", "a unit's own Jacobian"),
              ("logits", "d logits / d h at a unit's input")]
    for ax, (kind, title) in zip(axes, panels):
        for i, net in enumerate(results):
            for when, fill in (("initialization", "none"), ("trained", COLOURS[net])):
                if when not in results[net]:
                    continue
                entry = results[net][when][kind]
                values = [entry] if kind == "features" else list(entry.values())
                est = np.array([v["isometry"]["estimate"] for v in values])
                low = np.array([v["isometry"]["ci_low"] for v in values])
                high = np.array([v["isometry"]["ci_high"] for v in values])
                x = i + (0.15 if when == "trained" else -0.15) + np.linspace(-0.06, 0.06, len(values))
                ax.errorbar(x, est, yerr=np.stack([est - low, high - est]), fmt="o", mfc=fill, mec=COLOURS[net],
                            ecolor=COLOURS[net], ms=6, capsize=2, label=f"{net} {when}" if kind == "features" else None)
        ax.set(yscale="log", title=title, xticks=range(len(results)),
               xticklabels=[n.replace("cifar_", "") for n in results])
    axes[0].set_ylabel("isometry m1^2/m2 (1: all sigma equal)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, Path(directory) / "spectrum.png", dpi=110)
    lines += ["## Jacobian spectra", "", "isometry = m1^2 / m2 of the squared singular values (1: all equal; ratio "
              "of unbiased estimates [95% bootstrap over probes, a guide]); mean sigma^2 = ||J||_F^2 / n [95% t over "
              "probes]; quantiles of log10 sigma (SLQ estimate [95% bootstrap over probes; quadrature error not "
              "covered]); null: share below 1e-5 sigma_max.", "",
              "| net | when | Jacobian | n | isometry m1^2/m2 | mean sigma^2 | sigma_max (lower bound) | q10 | q50 | "
              "q90 | null |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def q(e):
        return f"{e['estimate']:.2f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]"

    for net, r in results.items():
        for when in ("initialization", "trained"):
            if when not in r:
                continue
            f = r[when]["features"]
            rows = [("features " + f"{f['from']}..{f['to']}", f)]
            rows += [(f"d logits / d h({u})", e) for u, e in r[when]["logits"].items()]
            rows += [(f"own J of {u}", e) for u, e in r[when]["own"].items()]
            for label, e in rows:
                qs = e["log10_sigma_quantiles"]
                m = e["mean_sq_singular_value"]
                iso = e["isometry"]
                lines.append(f"| {net} | {when} | {label} | {e['num_singular_values']} | {iso['estimate']:.3g} "
                             f"[{iso['ci_low']:.3g}, {iso['ci_high']:.3g}] | {m['estimate']:.3g} [{m['ci_low']:.3g}, "
                             f"{m['ci_high']:.3g}] | {e['sigma_max']['estimate']:.3g} | {q(qs['q10'])} | {q(qs['q50'])} | "
                             f"{q(qs['q90'])} | {100 * e['null_share']['estimate']:.1f}% |")
    lines.append("")
    return path


def paths_figure(results: dict, lines: list, directory: Path) -> Path | None:
    """Veit et al.'s Fig. 6 for each residual net: the paths' length distribution, one path's
    gradient norm by length (their estimate), the gradient by length - their total C(n, k) x
    it beside the exact ||g_k||, each as a share of its sum over k (the absolute numbers are in
    the table: their total is far larger) - and how fast the partial sums reach the gradient."""
    if not results:
        return None
    fig, axes = pyplot().subplots(1, 4, figsize=(17, 3.8))
    lines += ["## Gradient by path length", "", "The gradient of each test image's cross-entropy at the residual "
              "stack's input (unit_1's input). Exact: ||g_k||, g_k the part through the paths of exactly k residual "
              "branches (sum_k g_k = g), mean over the images [95% t interval over the images]; truncation: "
              "||g - sum_{j<=k} g_j|| / ||g||, mean over the images. Veit et al.'s estimate: one random path's "
              "||gradient|| on one image, mean over the (path, image) draws [95% t interval over the draws, clipped "
              "at 0], and C(n, k) times it, their total.", "",
              "| net | n | images | draws per k | 50 / 90 / 99 % of sum_k ‖g_k‖ by k = | 50 / 90 / 99 % of Veit's "
              "total by k = | 50 / 90 / 99 % of the paths by k = | per-path decay per branch | check |",
              "|---|---|---|---|---|---|---|---|---|"]
    per_k = []
    for net, r in results.items():
        k, colour = np.asarray(r["k"]), COLOURS[net]
        exact, per_path, total = r["exact"]["norm_stack"], r["sampled"]["per_path"], r["sampled"]["total"]
        axes[0].plot(k, r["path_share"], "o-", ms=3, color=colour, label=f"{net} (n = {r['num_residual_units']})")
        for ax, entry, scale in ((axes[1], per_path, 1.0), (axes[2], total, np.sum(total["estimate"]))):
            low = np.asarray(entry["ci_low"]) / scale
            ax.plot(k, np.asarray(entry["estimate"]) / scale, "o-", ms=3, color=colour, label=f"{net}, Veit's estimate")
            ax.fill_between(k, np.where(low > 0, low, np.nan), np.asarray(entry["ci_high"]) / scale, color=colour,
                            alpha=0.2, lw=0)  # no band where the interval reaches 0 (log scale in (b))
        axes[2].plot(k, np.asarray(exact["estimate"]) / np.sum(exact["estimate"]), "s--", ms=3, color=colour,
                     label=f"{net}, exact ||g_k||")
        axes[3].plot(k[:-1], r["exact"]["truncation"]["estimate"][:-1], "o-", ms=3, color=colour, label=net)

        def reach(entry):
            return " / ".join(str(entry[level]) for level in ("0.5", "0.9", "0.99"))

        lines.append(f"| {net} | {r['num_residual_units']} | {r['num_images']} | {r['draws_per_k']} | "
                     f"{reach(r['exact']['k_reaching'])} | {reach(r['sampled']['k_reaching'])} | "
                     f"{reach(r['path_distribution_reaching'])} | {r['sampled']['decay_per_branch']:.3f} | "
                     f"{r['check']['max_relative_difference_stack']:.1e} |")
        per_k += ["", f"{net}:", "", "| k | C(n,k)/2^n | exact ‖g_k‖ | truncation | Veit: one path | Veit: total |",
                  "|---|---|---|---|---|---|"]
        for i in k:
            def ci(entry, i=i):
                return f"{entry['estimate'][i]:.3g} [{entry['ci_low'][i]:.3g}, {entry['ci_high'][i]:.3g}]"

            per_k.append(f"| {i} | {r['path_share'][i]:.3g} | {ci(exact)} | "
                         f"{r['exact']['truncation']['estimate'][i]:.3g} | {ci(per_path)} | {ci(total)} |")
    lines += per_k
    axes[0].set(xlabel="path length k (residual branches)", ylabel="share of the 2^n paths",
                title="(a) path lengths, C(n, k) / 2^n")
    axes[1].set(yscale="log", xlabel="path length k", ylabel="||gradient|| through one path",
                title="(b) one path (Veit's estimate, 95% t)")
    axes[2].set(xlabel="path length k", ylabel="share of the sum over k",
                title="(c) by length: C(n,k) x (b), and exact ||g_k||")
    axes[3].set(yscale="log", xlabel="k", ylabel="||g - sum_{j<=k} g_j|| / ||g||",
                title="(d) exact: paths of length <= k")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, Path(directory) / "paths.png", dpi=110)
    lines.append("")
    return path


def write_outputs(directory) -> list[Path]:
    """Draws every figure that has results under DIRECTORY and writes tables.md; returns the
    paths written."""
    directory = Path(directory)
    lines = ["# Tables of the trained twins (generated by `jaxres experiment twins`)", ""]
    written = [lesion_figure(load(directory, "lesion"), load(directory, "bn_batch/lesion"), lines, directory),
               landscape_figure(load(directory, "landscape"), load(directory, "bn_batch/landscape"), lines,
                                directory),
               sharpness_figure(load(directory, "sharpness"), lines, directory),
               sharpness_training_figure(load_sharpness_training(directory), lines, directory),
               spectrum_figure(load(directory, "spectrum"), lines, directory),
               paths_figure(load(directory, "paths"), lines, directory)]
    lines += ["## Wall times", "", "| net | analysis | wall time | load average (1, 5, 15 min) at the end |",
              "|---|---|---|---|"]
    for analysis in ANALYSES:
        for net, r in load(directory, analysis).items():
            lines.append(f"| {net} | {analysis} | {r['wall_time_s']:.0f} s | "
                         f"{', '.join(f'{v:.1f}' for v in r['load_average'])} |")
    written.append(write_text_atomic(directory / "tables.md", "\n".join(lines) + "\n"))
    return [p for p in written if p is not None]
