"""Mean-field theory beside measurement: `jaxres.analysis.theory` predictions vs
exact end-to-end norms, the BN batch-size sweep, signal-propagation plots and shattered
gradients. Writes experiments/results/theory/{results.json,results.md,*.png}.

    .venv/bin/python experiments/theory_check.py            # the full check (see README for its time)
    .venv/bin/python experiments/theory_check.py --quick    # smaller nets, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis import theory
from jaxres.analysis.endtoend import end_to_end
from jaxres.analysis.plots import pyplot, save_figure
from jaxres.analysis.segments import SegmentCache
from jaxres.analysis.shattered import arc_inputs, balduzzi_plain_relu, correlation_decay_by_depth, line_inputs
from jaxres.analysis.signal_prop import plot_signal_propagation, signal_propagation
from jaxres.analysis.stages import stage_rates, unit_places
from jaxres.models import ResNet
from jaxres.models.resnet import cifar_resnet

OUT = Path(__file__).parent / "results" / "theory"
SETTINGS = {  # label: (model config, bn policy, theory switches)
    "He ReLU, no norm": (dict(residual=False, norm="none"), "eval", dict(norm="none", activation="relu", residual=False)),
    "He tanh, no norm": (dict(residual=False, norm="none", activation="tanh"), "eval",
                         dict(norm="none", activation="tanh", residual=False)),
    "post-act residual ReLU, no norm": (dict(residual=True, norm="none"), "eval",
                                        dict(norm="none", activation="relu", residual=True)),
    "BN-batch ReLU (plain)": (dict(residual=False), "batch", dict(norm="batchnorm", activation="relu", residual=False)),
}


def measure_net(model, x, bn, seed=1):
    variables = model.init(jax.random.key(seed), x[:1])
    segments = SegmentCache().segments(model, variables, x.shape, bn, x.dtype)
    e2e = end_to_end(segments, x, jnp.zeros(x.shape[0], jnp.int32))
    norms = [e2e.units[s.name]["input"]["logit_jac"] for s in segments]
    whole = None
    if bn == "batch":  # the whole batch map's Frobenius norm, Yang et al.'s quantity
        whole = [np.array([np.sqrt(np.sum(e2e.units[s.name]["input"]["logit_jac"] ** 2)
                                   / (1.0 - e2e.units[s.name]["input"]["cross_example_share"]))])
                 for s in segments]
    return segments, norms, whole


def net_check(label, model, x, tolerance, seed=1):
    config, bn, switches = SETTINGS[label]
    segments, norms, whole = measure_net(model, x, bn, seed)
    places = unit_places(segments)
    measured = stage_rates(places[1:], norms[1:])
    whole_rates = stage_rates(places[1:], whole[1:])["stages"] if whole else None
    shapes = [(s.in_shape, s.out_shape) for s in segments]
    field = theory.mean_field_unit_norms(shapes, bn=bn, **switches)
    predicted = stage_rates(places[1:], [np.array([v]) for v in field[1:]] + [np.array([1.0])])
    rows = []
    for k, (m, p) in enumerate(zip(measured["stages"], predicted["stages"])):
        side = segments[[s.name for s in segments].index(m["units"][0])].in_shape[1]
        batch = x.shape[0] * side * side if bn == "batch" else None  # Flax BN: over N x H x W
        bulk = theory.predict_unit_rate(bn=bn, spatial=None if bn == "batch" else side, tolerance=tolerance,
                                        effective_batch=batch, **switches)
        rows.append({"stage": m["stage"], "map": side, "units": len(m["units"]), "measured": m["rate"],
                     "measured_whole_batch_map": whole_rates[k]["rate"] if whole_rates else None,
                     "effective_batch": batch,
                     "mean_field_with_borders": p["rate"], "stationary_prediction": bulk.rate if bulk else None,
                     "within_tolerance_of_mean_field": abs(m["rate"] / p["rate"] - 1) <= tolerance})
    trans = [{"unit": m["unit"], "measured": m["rate"], "mean_field_with_borders": p["rate"]}
             for m, p in zip(measured["transitions"], predicted["transitions"])]
    per_unit = {"measured": [float(np.median(a) / np.median(b)) for a, b in zip(norms[1:-1], norms[2:])],
                "mean_field": (field[1:] / np.append(field[2:], 1.0)).tolist()}
    return {"stages": rows, "transitions": trans, "per_unit": per_unit}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    t_start = time.time()
    results = {"quick": quick, "jax": jax.__version__, "machine": platform.machine(), "sections": {}}
    timings = {}

    # 1. MLP twins: the mean-field setting itself (no borders), within 2%
    t0 = time.time()
    width = 256 if quick else 1024
    mlp = {}
    cases = {
        "He ReLU, no norm (per layer)": (dict(activation="relu", norm="none"), 1.0),
        "He tanh, no norm (per layer)": (dict(activation="tanh", norm="none"),
                                         theory.fixed_point_chi("tanh")[1] ** 0.5),
        "BN ReLU, batch 256, whole gradient (per layer)": (dict(activation="relu", norm="batchnorm", batch=256,
                                                                quantity="total"),
                                                           theory.bn_layer_chi("relu", 256)[0] ** 0.5),
        "post-act residual ReLU (per block)": (dict(activation="relu", norm="none", residual=True),
                                               theory.predict_unit_rate(norm="none", activation="relu", residual=True).rate),
        "pre-act residual ReLU (per block)": (dict(activation="relu", norm="none", residual=True, preactivation=True),
                                              2**0.5),
    }
    for label, (kw, predicted) in cases.items():
        r = theory.mlp_twin_rates(width=width, depth=16, skip=3, **kw)
        mlp[label] = {"measured": r["rate"], "predicted": predicted, "width": width,
                      "ok_2pct": abs(r["rate"] / predicted - 1) <= theory.WIDE_TOLERANCE}
    results["sections"]["mlp_twins"] = mlp
    timings["mlp_twins"] = time.time() - t0

    # 2. BN batch sweep (MLP twin): whole gradient and per-example block vs chi(B)
    t0 = time.time()
    sweep = []
    for b in ((8, 32) if quick else (8, 16, 32, 64, 128)):
        chi, err = theory.bn_layer_chi("relu", b)
        row = {"batch": b, "predicted_sq": chi, "predicted_sq_stderr": err, "large_batch_sq": np.pi / (np.pi - 1)}
        for q in ("total", "block"):
            row[f"measured_sq_{q}"] = theory.mlp_twin_rates(activation="relu", norm="batchnorm", width=width // 2,
                                                            batch=b, depth=16, skip=4, quantity=q)["rate"] ** 2
        sweep.append(row)
    results["sections"]["bn_batch_sweep"] = sweep
    timings["bn_batch_sweep"] = time.time() - t0

    # 3. default CIFAR nets and a wide twin: per-stage bulk rates vs the spatial mean field
    t0 = time.time()
    depths = (20,) if quick else (20, 56)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    cifar = {}
    for depth in depths:
        for label, (config, _, _) in SETTINGS.items():
            cifar[f"cifar depth {depth}: {label}"] = net_check(label, cifar_resnet(depth, **config), x,
                                                               theory.DEFAULT_TOLERANCE)
    xw = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    wide = {}
    for label, (config, _, _) in SETTINGS.items():
        model = ResNet(stage_sizes=(6,), widths=(64 if quick else 256,), stem="cifar", num_classes=10, **config)
        wide[f"wide twin 8x8: {label}"] = net_check(label, model, xw, theory.WIDE_TOLERANCE)
    results["sections"]["cifar_nets"] = cifar
    results["sections"]["wide_twins"] = wide
    timings["nets"] = time.time() - t0

    # 3b. how much of a miss is one weight draw of a 16-64-channel net: seeds, and width
    t0 = time.time()
    spread = {}
    for label in ("He ReLU, no norm", "post-act residual ReLU, no norm"):
        runs = [net_check(label, cifar_resnet(depths[-1], **SETTINGS[label][0]), x, theory.DEFAULT_TOLERANCE, seed=s)
                for s in range(1, 3 if quick else 5)]
        measured = np.array([[r["measured"] for r in run["stages"]] for run in runs])
        spread[f"cifar depth {depths[-1]}: {label}"] = {
            "seeds": len(runs), "measured_by_seed": measured.tolist(), "mean": measured.mean(0).tolist(),
            "mean_field_with_borders": [r["mean_field_with_borders"] for r in runs[0]["stages"]]}
    x16 = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    for width in ((16, 64) if quick else (16, 64, 192)):
        model = ResNet(stage_sizes=(9,), widths=(width,), stem="cifar", num_classes=10, residual=True, norm="none")
        stage = net_check("post-act residual ReLU, no norm", model, x16, theory.DEFAULT_TOLERANCE)["stages"][0]
        spread[f"post-act residual ReLU, 16x16, width {width}"] = {
            "seeds": 1, "measured_by_seed": [[stage["measured"]]], "mean": [stage["measured"]],
            "mean_field_with_borders": [stage["mean_field_with_borders"]]}
    results["sections"]["seed_and_width_spread"] = spread
    timings["seed_and_width_spread"] = time.time() - t0

    # 4. signal propagation (Brock et al. 2021 Fig. 1)
    t0 = time.time()
    sp_depth = 20 if quick else 56
    xs = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    signal = {}
    for label, config in {"plain BN": dict(residual=False), "post-act BN": dict(residual=True),
                          "pre-act BN": dict(preact=True), "pre-act no norm": dict(preact=True, norm="none")}.items():
        model = cifar_resnet(sp_depth, **config)
        signal[label] = signal_propagation(model, model.init(jax.random.key(1), xs[:1]), xs, bn="batch")
    plot_signal_propagation(signal, OUT / "signal_prop.png", f"CIFAR depth {sp_depth}, batch 8, at initialization")
    results["sections"]["signal_propagation"] = {k: v.as_dict() for k, v in signal.items()}
    timings["signal_propagation"] = time.time() - t0

    # 5. shattered gradients: 64 points on a line
    t0 = time.time()
    xl = line_inputs(jax.random.key(2), 64, (16, 16, 3), span=1.0)
    shatter_depths = (1, 4) if quick else (1, 2, 4, 8, 16)
    shattered = {}
    for label, (config, bn) in {"plain, no norm": (dict(residual=False, norm="none"), "eval"),
                                "residual, no norm": (dict(residual=True, norm="none"), "eval"),
                                "plain, BN-batch": (dict(residual=False), "batch"),
                                "residual, BN-batch": (dict(residual=True), "batch")}.items():
        build = lambda d, c=config: ResNet(stage_sizes=(d,), widths=(16,), stem="cifar", num_classes=1, **c)  # noqa: E731
        res = correlation_decay_by_depth(build, shatter_depths, xl, bn=bn)
        shattered[label] = {str(d): {"lag1_blocks": v.get("blocks", v["summed_rows"])[0],
                                     "lag1_summed_rows": v["summed_rows"][0]} for d, v in res.items()}
    # the study's setting: 4 points on a quarter arc (neighbours 30 degrees apart) vs 64 on the same arc
    arc = {}
    residual_bn = lambda d: ResNet(stage_sizes=(d,), widths=(16,), stem="cifar", num_classes=1, residual=True)  # noqa: E731
    for n in (4, 64):
        res = correlation_decay_by_depth(residual_bn, (shatter_depths[-1],), arc_inputs(jax.random.key(2), n, (16, 16, 3)),
                                         bn="batch")[shatter_depths[-1]]
        arc[str(n)] = {"lag1_blocks": res["blocks"][0], "lag1_summed_rows": res["summed_rows"][0]}
    results["sections"]["shattered"] = {"points": 64, "span": 1.0, "width": 16, "map": 16, "by_depth": shattered,
                                        "balduzzi_plain_2^-L": {str(d): float(balduzzi_plain_relu(2 * d))
                                                                for d in shatter_depths},
                                        "arc_residual_bn_batch": {"units": shatter_depths[-1], "by_points": arc}}
    timings["shattered"] = time.time() - t0

    results["timings_s"] = timings
    results["wall_s"] = time.time() - t_start
    write_outputs(results)


def write_outputs(results):
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1, default=float))
    plt = pyplot()
    s = results["sections"]
    lines = [f"# Theory check (quick={results['quick']}), wall {results['wall_s']:.0f} s", ""]
    lines += ["## MLP twins (mean field, no borders; tolerance 2%)", "", "| case | measured | predicted | ok |",
              "|---|---|---|---|"]
    lines += [f"| {k} | {v['measured']:.4f} | {v['predicted']:.4f} | {v['ok_2pct']} |" for k, v in s["mlp_twins"].items()]
    lines += ["", "## BN batch sweep (MLP twin, per layer, squared norm)", "",
              "| batch | chi(B) theory | measured whole gradient | measured per-example block |", "|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['predicted_sq']:.4f} +- {r['predicted_sq_stderr']:.4f} | {r['measured_sq_total']:.4f} "
              f"| {r['measured_sq_block']:.4f} |" for r in s["bn_batch_sweep"]]
    for section in ("cifar_nets", "wide_twins"):
        lines += ["", f"## {section}: per-stage bulk rates (per unit, norm)", "",
                  "| net | stage (map, units) | measured | mean field with borders | stationary | ok |", "|---|---|---|---|---|---|"]
        for name, v in s[section].items():
            for r in v["stages"]:
                stat = "-" if r["stationary_prediction"] is None else f"{r['stationary_prediction']:.4f}"
                whole = "" if r["measured_whole_batch_map"] is None else f" (whole map {r['measured_whole_batch_map']:.4f})"
                lines.append(f"| {name} | {r['stage']} ({r['map']}x{r['map']}, {r['units']}) | {r['measured']:.4f}{whole} | "
                             f"{r['mean_field_with_borders']:.4f} | {stat} | {r['within_tolerance_of_mean_field']} |")
            for t in v["transitions"]:
                lines.append(f"| {name} | transition {t['unit']} | {t['measured']:.4f} | {t['mean_field_with_borders']:.4f} | - | - |")
    lines += ["", "## Spread over weight draws and widths (per-stage bulk rates)", "",
              "| net | seeds | measured per seed | mean | mean field with borders |", "|---|---|---|---|---|"]
    for name, v in s["seed_and_width_spread"].items():
        per_seed = "; ".join(" / ".join(f"{r:.3f}" for r in row) for row in v["measured_by_seed"])
        lines.append(f"| {name} | {v['seeds']} | {per_seed} | {' / '.join(f'{r:.4f}' for r in v['mean'])} | "
                     f"{' / '.join(f'{r:.4f}' for r in v['mean_field_with_borders'])} |")
    lines += ["", "## Shattered gradients: lag-1 correlation of input gradients, 64 points on a line", "",
              "| net | " + " | ".join(f"{d} units" for d in s["shattered"]["balduzzi_plain_2^-L"]) + " |",
              "|---|" + "---|" * len(s["shattered"]["balduzzi_plain_2^-L"])]
    for name, by in s["shattered"]["by_depth"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v['lag1_blocks']:.3f} ({v['lag1_summed_rows']:.3f})" for v in by.values()) + " |")
    arc = s["shattered"]["arc_residual_bn_batch"]
    lines += ["", "(per-example blocks, summed rows in brackets)", "",
              f"Residual BN-batch, {arc['units']} units, points on a quarter arc (the study's inputs): "
              + "; ".join(f"{n} points: {v['lag1_blocks']:.3f} ({v['lag1_summed_rows']:.3f})" for n, v in arc["by_points"].items()),
              "", f"timings (s): {results['timings_s']}"]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")

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
    save_figure(fig, OUT / "bn_batch_sweep.png")

    nets = {**s["cifar_nets"], **s["wide_twins"]}
    fig, axes = plt.subplots(1, len(nets), figsize=(3.2 * len(nets), 3), squeeze=False)
    for ax, (name, v) in zip(axes[0], nets.items()):
        ax.plot(v["per_unit"]["measured"], "o", ms=3, label="measured")
        ax.plot(v["per_unit"]["mean_field"], "-", label="mean field")
        ax.set_title(name, fontsize=6)
        ax.set_xlabel("unit")
    axes[0][0].set_ylabel("per-unit factor of ||dz/dh||")
    axes[0][0].legend(fontsize=6)
    save_figure(fig, OUT / "rates.png")

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, by in s["shattered"]["by_depth"].items():
        ax.plot([int(d) for d in by], [v["lag1_blocks"] for v in by.values()], "o-", label=name)
    ax.set_xlabel("units (2 conv layers each)")
    ax.set_ylabel("lag-1 gradient correlation")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    save_figure(fig, OUT / "shattered.png")


if __name__ == "__main__":
    main()
