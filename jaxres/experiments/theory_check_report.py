"""results.md and the figures of the theory check (`theory_check.run_theory_check`), from its
results dict alone, so that `--predict-only` redraws them without measuring: the acceptance
tables (each miss with its best explanation, `NOTES`, and the same row of the 4x wider net),
the controls, the sweeps, and bn_batch_sweep.png, rates.png, shattered.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxres.analysis.plots import pyplot, save_figure
from jaxres.files import write_text_atomic


# Best explanations for rows that miss, by net (the setting's label); a miss without one reads
# "unexplained". `_acceptance_lines` adds the same row of the 4x wider net (wider_cifar) where measured.
NOTES: dict[str, str] = {
    "He ReLU, no norm": "sampling and finite width: the net whose single draws scatter most (std of a draw in "
                        "brackets)",
    "post-act residual ReLU, no norm": "finite width: the excess over the mean field grows with depth at 16-64 "
                                       "channels (depth 20: within 1.2 %) and shrinks with the channels (one 16x16 "
                                       "stage, below: +3.2 / +0.8 / +0.5 % at 16 / 64 / 192 channels)",
    "pre-act residual ReLU, no norm": "sampling: single-unit transitions scatter most",
}


def _pct(x) -> str:
    return f"{100 * x:+.1f}%"


def _standard_errors(r) -> float:
    """A row's error in standard errors of its mean over draws."""
    return r["error"] / (r["std"] / len(r["measured_by_draw"]) ** 0.5 / r["predicted"])


def _miss_note(section: str, name: str, row: str, wider_nets: dict) -> str | None:
    """The explanation beside a missing row of net `name`, with the 4x wider net's same row."""
    label = name.split(": ", 1)[-1]
    note = NOTES.get(label) if section == "cifar_nets" else None
    if note is None:
        return None
    wider = {r["row"]: r for r in (lambda v: v["stages"] + v["transitions"] if v else [])(
        wider_nets.get("4x wider " + name))}
    if row not in wider:
        return note + "; the 4x wider net: not measured in this run"
    w = wider[row]
    return (note + f"; with 4x the channels (64-128-256) the same row is {_pct(w['error'])} "
            f"({_standard_errors(w):+.1f} SE, {len(w['measured_by_draw'])} draws){'' if w['ok'] else ', still a miss'}")


def _acceptance_lines(section, nets, wider_nets: dict) -> list[str]:
    lines = ["| net | row (units) | measured mean over draws (std of a draw) | predicted | error (in standard "
             "errors of the mean) | tolerance | pass |", "|---|---|---|---|---|---|---|"]
    for name, v in nets.items():
        for kind in ("stages", "transitions"):
            for r in v[kind]:
                note = None if r["ok"] else _miss_note(section, name, r["row"], wider_nets)
                verdict = "pass" if r["ok"] else ("miss: " + note if note else "miss (unexplained)")
                lines.append(f"| {name} | {r['row']} ({r['units']}) | {r['mean']:.4f} ({r['std']:.3f}) | "
                             f"{r['predicted']:.4f} | {_pct(r['error'])} ({_standard_errors(r):+.1f}) | "
                             f"{100 * r['tolerance']:.0f}% | {verdict} |")
    return lines


def write_outputs(results: dict, out) -> None:
    """results.md in `out` (every table, the acceptance with each miss's explanation, the runs' wall
    times) and the figures, from `results` (what `run_theory_check` wrote to results.json)."""
    out = Path(out)
    s = {**results["sections"], **results.get("compared", {})}
    wider_nets = s.get("wider_cifar", {})  # the 4x wider nets, quoted beside each miss
    draws = results["draws"]
    command = f"`jaxres experiment theory{' --quick' if results['quick'] else ''}`"
    runs = results.get("runs", [])
    if len(runs) > 1:  # --merge: say what each run measured
        timing = [f"{command}: {results['wall_s']:.0f} s ({results['wall_s'] / 60:.1f} min) of measured sections, "
                  f"from {len(runs)} runs on the 2-core machine shared with other work (a run from scratch takes their "
                  "sum, up to the 2-3x that the load makes):", ""]
        timing += [f"- {', '.join(r['sections'])}: wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s, load average "
                   f"{r['load_average_at_start'][0]:.1f} -> {r['load_average_at_end'][0]:.1f}, finished {r['finished']}"
                   + (f" ({r['note']})" if r.get("note") else "") for r in runs]
    else:
        timing = [f"{command}: wall {results['wall_s']:.0f} s ({results['wall_s'] / 60:.1f} min), CPU "
                  f"{results.get('cpu_s', float('nan')):.0f} s, load average {results['load_average_at_start'][0]:.1f} "
                  f"at the start and {results.get('load_average_at_end', [float('nan')])[0]:.1f} at the end (2-core "
                  "machine shared with other work)."]
    lines = [f"# Theory check (quick={results['quick']}, {draws} weight draws per net)", ""] + timing + [
        "", "Sections: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["timings_s"].items()) + ".", ""]
    if "cifar_nets" in s or "wide_twins" in s:
        lines += ["## Acceptance: per-stage bulk rates and transitions (per unit, norm of ||dz_i/dh_i||)", "",
                  f"Mean over {draws} weight draws (seeds 1..{draws}; {results['noisy_draws'] * draws} for the ReLU CIFAR nets "
                  "without normalization, whose single draws scatter most) of each draw's rate (geometric mean over "
                  "the stage's shape-keeping units, median over the batch's examples); predicted: "
                  "`theory.predict_net_rates` (the spatial mean field of the whole net, reduced the same way).", ""]
        for section in ("cifar_nets", "wide_twins"):
            if section in s:
                lines += [f"### {section}", ""] + _acceptance_lines(section, s[section], wider_nets) + [""]
        passed = {}
        for section in ("cifar_nets", "wide_twins"):
            for kind in ("stages", "transitions"):
                rows = [r for v in s.get(section, {}).values() for r in v[kind]]
                passed[(section, kind)] = (sum(r["ok"] for r in rows), len(rows))
        lines += ["Passing: " + "; ".join(f"{section} {kind} {ok} of {n}" for (section, kind), (ok, n) in passed.items()
                                          if n) + ".", ""]
        bn_whole = {k: v for k, v in s.get("cifar_nets", {}).items() if "stages_whole_gradient" in v}
        if bn_whole:
            lines += ["Whole gradient ||dz_i/dh|| of the BN-batch nets (per-example blocks and the leak to the "
                      "other examples), against the mean field's `quantity=\"total\"`:", "",
                      "| net | stage | measured mean | predicted | error |", "|---|---|---|---|---|"]
            for name, v in bn_whole.items():
                for r in v["stages_whole_gradient"]:
                    lines.append(f"| {name} | {r['row']} | {r['mean']:.4f} | {r['predicted']:.4f} | {_pct(r['error'])} |")
            lines.append("")
    if "mlp_twins" in s:
        m = s["mlp_twins"]
        t = m["_theory"]
        lines += ["## MLP twins (mean field, no borders; tolerance 1 %)", "",
                  "| case | measured by draw | mean | predicted | error | pass |", "|---|---|---|---|---|---|"]
        for k, v in m.items():
            if k.startswith("_"):
                continue
            lines.append(f"| {k} | {' / '.join(f'{x:.4f}' for x in v['measured_by_draw'])} | {v['mean']:.4f} | "
                         f"{v['predicted']:.4f} | {_pct(v['error'])} | {'pass' if v['ok'] else 'miss'} |")
        post = m["post-act residual ReLU (per block)"]
        lines += ["", f"Mask persistence (post-activation ReLU MLP twin): open fraction {post['open']:.4f} (theory "
                      f"{t['open']:.4f}), P(open | open in the previous block) {post['persistence']:.4f} (trajectory "
                      f"theory {t['persistence']:.4f}; independent masks would give p = {t['stationary_p']:.4f}). "
                      f"Stationary theory sqrt(3p) = {t['stationary_rate']:.4f}, trajectory theory "
                      f"{t['trajectory_rate']:.4f}.", ""]
    if "controls" in s:
        c = s["controls"]
        lines += ["## Controls", "", "### BN's border pattern (plain BN-ReLU conv twin, 64 channels, batch 8; per layer)",
                  "", "| map | padding | centring | measured by draw | mean | predicted | 'borders cancel' | "
                  "pattern share measured | predicted |", "|---|---|---|---|---|---|---|---|---|"]
        for r in c["border"]:
            pred = f"{r['predicted']:.4f}" if "predicted" in r else "-"
            prev = f"{r['previous_theory']:.4f}" if "previous_theory" in r else "-"
            share = f"{r['predicted_pattern_share']:.3f}" if "predicted_pattern_share" in r else "-"
            measured_share = f"{r['pattern_share']:.3f}" if r["centring"] == "channel" else "-"  # removed by design
            lines.append(f"| {r['map']} | {r['padding']} | {r['centring']} | "
                         f"{' / '.join(f'{x:.4f}' for x in r['measured_by_draw'])} | {r['mean']:.4f} | {pred} | {prev} | "
                         f"{measured_share} | {share} |")
        gaps = []
        for side in sorted({r["map"] for r in c["border"]}):
            rows = {(r["padding"], r["centring"]): r["mean"] for r in c["border"] if r["map"] == side}
            for centring in ("channel", "position"):
                if ("zero", centring) in rows and ("circular", centring) in rows:
                    gaps.append(f"{side}x{side} {centring} centring {_pct(rows[('zero', centring)] / rows[('circular', centring)] - 1)}")
        lines += ["", "Zero vs circular padding, per layer: " + "; ".join(gaps) + ".", "",
                  "### The head's batch term (plain BN-ReLU conv twin, 8x8, 64 channels: the last unit's factor)", "",
                  "| batch N | last unit, by draw | mean | predicted with the head term | without | bulk unit (measured / "
                  "predicted) |", "|---|---|---|---|---|---|"]
        for r in c["head"]:
            lines.append(f"| {r['batch']} | {' / '.join(f'{x:.4f}' for x in r['last_unit_by_draw'])} | "
                         f"{r['last_unit_mean']:.4f} | {r['predicted_with_head_term']:.4f} | {r['predicted_without']:.4f} | "
                         f"{r['bulk_unit_mean']:.4f} / {r['predicted_bulk']:.4f} |")
        lines.append("")
        post_rows = {k: v for k, v in s.get("cifar_nets", {}).items() if "stationary_masks_prediction" in v}
        if post_rows:
            lines += ["### Mask persistence in the CIFAR nets (post-activation, no norm): stage rates", "",
                      "| net | measured mean | masks followed (trajectory) | masks shuffled (stationary) |",
                      "|---|---|---|---|"]
            for name, v in post_rows.items():
                measured = " / ".join(f"{r['mean']:.4f}" for r in v["stages"])
                followed = " / ".join(f"{r['predicted']:.4f}" for r in v["stages"])
                shuffled = " / ".join(f"{x:.4f}" for x in v["stationary_masks_prediction"])
                lines.append(f"| {name} | {measured} | {followed} | {shuffled} |")
            lines.append("")
    if "wider_cifar" in s:
        lines += ["## Finite width: the missing ReLU nets built 4x wider (64-128-256 channels; diagnostic, not "
                  "acceptance)", ""] + _acceptance_lines("wider_cifar", s["wider_cifar"], wider_nets) + [""]
    if "width_spread" in s:
        lines += ["## Finite width: post-activation residual ReLU, one stage of 9 units on 16x16", "",
                  "| net | measured by draw | mean | predicted |", "|---|---|---|---|"]
        for name, v in s["width_spread"].items():
            r = v["stages"][0]
            lines.append(f"| {name} | {' / '.join(f'{x:.4f}' for x in r['measured_by_draw'])} | {r['mean']:.4f} | "
                         f"{r['predicted']:.4f} |")
        lines.append("")
    if "bn_batch_sweep" in s:
        lines += ["## BN batch sweep (MLP twin, per layer, squared norm)", "",
                  "| batch | chi(B) theory | measured whole gradient | measured per-example block |", "|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['predicted_sq']:.4f} +- {r['predicted_sq_stderr']:.4f} | "
                  f"{r['measured_sq_total']:.4f} | {r['measured_sq_block']:.4f} |" for r in s["bn_batch_sweep"]]
        lines.append("")
    if "shattered" in s:
        sh = s["shattered"]
        lines += ["## Shattered gradients: lag-1 correlation of input gradients, 64 points on a line", "",
                  "| net | " + " | ".join(f"{d} units" for d in sh["balduzzi_plain_2^-L"]) + " |",
                  "|---|" + "---|" * len(sh["balduzzi_plain_2^-L"])]
        for name, by in sh["by_depth"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v['lag1_blocks']:.3f} ({v['lag1_summed_rows']:.3f})"
                                                     for v in by.values()) + " |")
        arc = sh["arc_residual_bn_batch"]
        lines += ["", "(per-example blocks, summed rows in brackets)", "",
                  f"Residual BN-batch, {arc['units']} units, points on a quarter arc (the study's inputs): "
                  + "; ".join(f"{n} points: {v['lag1_blocks']:.3f} ({v['lag1_summed_rows']:.3f})"
                              for n, v in arc["by_points"].items()), ""]
    write_text_atomic(out / "results.md", "\n".join(lines) + "\n")
    _figures(s, out)


def _figures(s, out: Path):
    plt = pyplot()
    if "bn_batch_sweep" in s:
        sweep = s["bn_batch_sweep"]
        fig, ax = plt.subplots(figsize=(5, 4))
        b = [r["batch"] for r in sweep]
        ax.plot(b, [r["predicted_sq"] for r in sweep], "k-", label="mean field chi(B)")
        ax.plot(b, [r["measured_sq_total"] for r in sweep], "o", label="MLP twin, whole gradient")
        ax.plot(b, [r["measured_sq_block"] for r in sweep], "s", label="MLP twin, per-example block")
        ax.axhline(np.pi / (np.pi - 1), ls=":", color="gray", label="pi/(pi-1)")
        ax.set_xscale("log")
        ax.set_xlabel("effective batch B")
        ax.set_ylabel("per-layer factor, squared norm")
        ax.legend(fontsize=7)
        save_figure(fig, out / "bn_batch_sweep.png")
    nets = {**s.get("cifar_nets", {}), **s.get("wide_twins", {})}
    if nets:
        cols = 4
        rows = -(-len(nets) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
        for ax, (name, v) in zip(axes.ravel(), nets.items()):
            ax.plot(v["per_unit"]["measured_mean"], "o", ms=3, label=f"measured, mean of {v['draws']} draws")
            ax.plot(v["per_unit"]["predicted"], "-", label="mean field")
            ax.set_title(name, fontsize=6)
            ax.set_xlabel("unit", fontsize=7)
        for ax in axes.ravel()[len(nets):]:
            ax.axis("off")
        fig.subplots_adjust(hspace=0.5)  # the titles clear the x labels above them
        axes[0][0].set_ylabel("per-unit factor of ||dz/dh||")
        axes[0][0].legend(fontsize=6)
        save_figure(fig, out / "rates.png")
    if "shattered" in s:
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, by in s["shattered"]["by_depth"].items():
            ax.plot([int(d) for d in by], [v["lag1_blocks"] for v in by.values()], "o-", label=name)
        ax.set_xlabel("units (2 conv layers each)")
        ax.set_ylabel("lag-1 gradient correlation")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
        save_figure(fig, out / "shattered.png")
