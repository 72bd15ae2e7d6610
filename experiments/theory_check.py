"""Mean-field theory beside measurement, over weight draws: `jaxres.analysis.theory`
predictions vs exact end-to-end norms of the default CIFAR nets, wide twins and MLP twins
(the acceptance table), controls that isolate each mechanism of the theory (circular vs
zero padding and per-position centring for BN's border pattern, small vs large batch for
the head's batch term, shuffled masks for mask persistence), the BN batch-size sweep,
signal-propagation plots and shattered gradients. Writes
experiments/results/theory/{results.json,results.md,*.png}.

    .venv/bin/python experiments/theory_check.py                 # the full check: ~53 min at load 5 on 2 cores
    .venv/bin/python experiments/theory_check.py --quick         # smaller nets and fewer draws, a smoke run
    .venv/bin/python experiments/theory_check.py --sections controls --out /tmp/check   # some sections only
    .venv/bin/python experiments/theory_check.py --merge --sections cifar_nets   # add draws, stored ones kept
    .venv/bin/python experiments/theory_check.py --predict-only  # new predictions beside stored measurements

results.md states the measured time of every run and section; experiments/results/theory/README.md
says what the results show.

Acceptance (issue 21): means over >= 4 weight draws (8; 32 for the noisiest nets); bulk stage rates of the CIFAR nets
within 2 % of the prediction, transitions within 5 %, MLP and wide twins within 1 %. Misses
are reported with the best explanation in NOTES, never by widening a tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis import theory
from jaxres.analysis.endtoend import end_to_end
from jaxres.analysis.mean_field import bn_layer_chi, post_activation_relu_moments, post_activation_trajectory
from jaxres.analysis.mean_field_spatial import border_pattern_share, mean_field_unit_norms
from jaxres.analysis.plots import pyplot, save_figure
from jaxres.analysis.segments import SegmentCache
from jaxres.analysis.shattered import arc_inputs, balduzzi_plain_relu, correlation_decay_by_depth, line_inputs
from jaxres.analysis.signal_prop import plot_signal_propagation, signal_propagation
from jaxres.analysis.stages import UnitPlace, stage_rates, unit_places
from jaxres.analysis.twins import conv_twin_rates, mlp_twin_rates
from jaxres.models import ResNet
from jaxres.models.resnet import cifar_resnet

OUT = Path(__file__).parent / "results" / "theory"
SECTIONS = ("mlp_twins", "bn_batch_sweep", "controls", "cifar_nets", "wide_twins", "width_spread", "wider_cifar",
            "signal_propagation", "shattered")
# label: (model config, bn policy, theory switches, shortcut option at the transitions)
SETTINGS = {
    "BN-batch ReLU (plain)": (dict(residual=False), "batch", dict(norm="batchnorm", activation="relu", residual=False)),
    "BN-batch tanh (plain)": (dict(residual=False, activation="tanh"), "batch",
                              dict(norm="batchnorm", activation="tanh", residual=False)),
    "He ReLU, no norm": (dict(residual=False, norm="none"), "eval", dict(norm="none", activation="relu", residual=False)),
    "He tanh, no norm": (dict(residual=False, norm="none", activation="tanh"), "eval",
                         dict(norm="none", activation="tanh", residual=False)),
    "post-act residual ReLU, no norm": (dict(residual=True, norm="none"), "eval",
                                        dict(norm="none", activation="relu", residual=True)),
    "post-act residual tanh, no norm": (dict(residual=True, norm="none", activation="tanh"), "eval",
                                        dict(norm="none", activation="tanh", residual=True)),
    "pre-act residual ReLU, no norm": (dict(residual=True, preact=True, norm="none", shortcut="B"), "eval",
                                       dict(norm="none", activation="relu", residual=True, preactivation=True)),
    "pre-act residual tanh, no norm": (dict(residual=True, preact=True, norm="none", shortcut="B", activation="tanh"),
                                       "eval", dict(norm="none", activation="tanh", residual=True, preactivation=True)),
}
# Single draws of the ReLU nets without normalization scatter by 3-8 % per stage (std): they get
# NOISY_DRAWS times the draws, so that their means resolve the 2 % tolerance.
NOISY = ("He ReLU, no norm", "post-act residual ReLU, no norm", "pre-act residual ReLU, no norm")
NOISY_DRAWS = 4
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


def _shortcut(config) -> str:
    return config.get("shortcut", "A")


def _draw_rates(model, x, bn, seed, cache) -> dict:
    """One weight draw: per-example norms at every unit input (the per-example blocks; with
    bn="batch" also the whole gradient's), reduced to stage and transition rates."""
    variables = model.init(jax.random.key(seed), x[:1])
    segments = cache.segments(model, variables, x.shape, bn, x.dtype)
    e2e = end_to_end(segments, x, jnp.zeros(x.shape[0], jnp.int32))
    places = unit_places(segments)
    norms = [np.asarray(e2e.units[s.name]["input"]["logit_jac"], np.float64) for s in segments]
    out = {"block": stage_rates(places, norms), "per_unit": [float(np.median(a) / np.median(b))
                                                             for a, b in zip(norms[:-1], norms[1:])]}
    if bn == "batch":  # the whole gradient ||d z_i / d h||: blocks over (1 - cross-example share)
        whole = [np.sqrt(np.asarray(e2e.units[s.name]["input"]["logit_jac"], np.float64) ** 2
                         / (1.0 - e2e.units[s.name]["input"]["cross_example_share"])) for s in segments]
        out["total"] = stage_rates(places, whole)
    return out, segments, places


def _rows(kind, draws, predicted, key) -> list[dict]:
    """Acceptance rows of one net: per stage (kind "stages") or transition, the mean over
    draws of the measured rate beside the prediction."""
    rows = []
    for k, pred in enumerate(predicted[kind]):
        values = np.array([d[key][kind][k]["rate"] for d in draws])
        first = draws[0][key][kind][k]
        name = f"stage {first['stage']}" if kind == "stages" else f"transition {first['unit']}"
        mean = float(values.mean())
        rows.append({"row": name, "units": len(first.get("units", [1])), "measured_by_draw": values.tolist(),
                     "mean": mean, "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
                     "predicted": pred.rate, "tolerance": pred.tolerance, "error": mean / pred.rate - 1.0,
                     "ok": bool(pred.accepts(mean))})
    return rows


def measure_net(label, build, x, seeds, cache=None, earlier=None) -> dict:
    """One net over weight draws `seeds`: each draw's stage and transition rates, and the
    shapes and places the predictions need (stored, so `compare` can be rerun alone).
    `earlier`: a stored result of the same net and inputs (`--merge`), whose draws are kept
    for the seeds it has (only the missing seeds are measured)."""
    _, bn, _ = SETTINGS[label]
    cache = cache or SegmentCache()
    stored = {}
    if earlier and earlier["batch"] == x.shape[0]:
        stored = dict(zip(earlier.get("seeds", range(1, len(earlier["draws"]) + 1)), earlier["draws"]))
    draws, segments = [], None
    for seed in seeds:
        if seed in stored:
            draws.append(stored[seed])
            continue
        rates, segments, places = _draw_rates(build(), x, bn, seed, cache)
        draws.append(rates)
    if segments is None:  # every draw was stored
        return {**earlier, "seeds": list(seeds), "draws": draws}
    return {"label": label, "batch": x.shape[0], "seeds": list(seeds), "draws": draws,
            "shapes": [[list(s.in_shape), list(s.out_shape)] for s in segments],
            "places": [[p.name, p.kind, p.stage] for p in places]}


def compare(measured, *, wide=False) -> dict:
    """The whole-net mean field (`theory.predict_net_rates`) beside a `measure_net` result."""
    config, bn, switches = SETTINGS[measured["label"]]
    draws = measured["draws"]
    shapes = [tuple(map(tuple, pair)) for pair in measured["shapes"]]
    places = [UnitPlace(*p) for p in measured["places"]]
    tol = dict(tolerance=theory.WIDE_TOLERANCE, transition_tolerance=theory.WIDE_TOLERANCE) if wide else {}
    batchnorm = bn == "batch"
    kw = dict(shortcut=_shortcut(config), bn=bn, **switches, **tol)
    predicted = theory.predict_net_rates(shapes, places, batch=measured["batch"] if batchnorm else None, **kw)
    out = {"draws": len(draws), "batch": measured["batch"], "assumptions": predicted["stages"][0].assumptions,
           "stages": _rows("stages", draws, predicted, "block"),
           "transitions": _rows("transitions", draws, predicted, "block"),
           "per_unit": {"measured_mean": np.mean([d["per_unit"] for d in draws], 0).tolist(),
                        "predicted": predicted["per_unit"]}}
    if batchnorm:
        total = theory.predict_net_rates(shapes, places, batch=measured["batch"], quantity="total", **kw)
        out["stages_whole_gradient"] = _rows("stages", draws, total, "total")
    if switches["residual"] and not switches.get("preactivation"):  # the control: masks shuffled
        control = theory.predict_net_rates(shapes, places, follow_neurons=False, **kw)
        out["stationary_masks_prediction"] = [p.rate for p in control["stages"]]
    return out


# ---------------------------------------------------------------- sections


def mlp_twins(quick, draws):
    """The mean-field setting itself (no borders), means over draws, 1 %; and the
    mask-persistence control: the same post-activation twin with its masks shuffled."""
    width = 256 if quick else 1024
    post = post_activation_trajectory("relu")
    cases = {
        "He ReLU, no norm (per layer)": (dict(activation="relu", norm="none"), 1.0),
        "He tanh, no norm (per layer)": (dict(activation="tanh", norm="none"), theory.fixed_point_chi("tanh")[1] ** 0.5),
        "BN ReLU, batch 256, whole gradient (per layer)": (dict(activation="relu", norm="batchnorm", batch=256,
                                                                quantity="total"), bn_layer_chi("relu", 256)[0] ** 0.5),
        "BN tanh, batch 256, whole gradient (per layer)": (dict(activation="tanh", norm="batchnorm", batch=256,
                                                                quantity="total"), bn_layer_chi("tanh", 256)[0] ** 0.5),
        "post-act residual ReLU (per block)": (dict(activation="relu", norm="none", residual=True), post["rate"]),
        "post-act residual tanh (per block)": (dict(activation="tanh", norm="none", residual=True),
                                               post_activation_trajectory("tanh")["rate"]),
        "pre-act residual ReLU (per block)": (dict(activation="relu", norm="none", residual=True, preactivation=True),
                                              2**0.5),
        "control: post-act residual ReLU, masks shuffled (per block)": (
            dict(activation="relu", norm="none", residual=True, shuffle_masks=True),
            post_activation_trajectory("relu", follow_neurons=False)["rate"]),
    }
    out = {}
    for label, (kw, predicted) in cases.items():
        runs = [mlp_twin_rates(width=width, depth=16, skip=3, seed=s, **kw) for s in range(draws)]
        values = np.array([r["rate"] for r in runs])
        out[label] = {"measured_by_draw": values.tolist(), "mean": float(values.mean()), "predicted": predicted,
                      "width": width, "error": float(values.mean() / predicted - 1),
                      "ok": bool(abs(values.mean() / predicted - 1) <= theory.WIDE_TOLERANCE)}
        if "open" in runs[0]:
            out[label]["open"] = float(np.mean([r["open"] for r in runs]))
            out[label]["persistence"] = float(np.mean([r["persistence"] for r in runs]))
    p, _ = post_activation_relu_moments()
    out["_theory"] = {"open": post["open"], "persistence": post["persistence"], "stationary_p": p,
                      "stationary_rate": (3 * p) ** 0.5, "trajectory_rate": post["rate"]}
    return out


def bn_batch_sweep(quick, width):
    sweep = []
    for b in ((8, 32) if quick else (8, 16, 32, 64, 128)):
        chi, err = bn_layer_chi("relu", b)
        row = {"batch": b, "predicted_sq": chi, "predicted_sq_stderr": err, "large_batch_sq": np.pi / (np.pi - 1)}
        for q in ("total", "block"):
            row[f"measured_sq_{q}"] = mlp_twin_rates(activation="relu", norm="batchnorm", width=width // 2,
                                                     batch=b, depth=16, skip=4, quantity=q)["rate"] ** 2
        sweep.append(row)
    return sweep


def controls(quick, draws):
    """Each mechanism made a measured fact or ruled out by a control."""
    out = {"border": [], "head": []}
    # (a) BN's border pattern: zero vs circular padding, channel vs per-position centring
    maps = (8,) if quick else (8, 16, 32)
    for side in maps:
        depth, skip = (17, 6) if side == 32 else (25, 8)
        chi_b = bn_layer_chi("relu", 8 * side * side)[0]
        pattern = theory.predict_unit_rate(norm="batchnorm", activation="relu", residual=False, spatial=side,
                                           effective_batch=8 * side * side)
        for padding, centring in (("zero", "channel"), ("circular", "channel"), ("zero", "position"),
                                  ("circular", "position")):
            if side == 32 and centring == "position":
                continue
            runs = [conv_twin_rates(spatial=side, padding=padding, centring=centring, depth=depth, skip=skip, seed=s)
                    for s in range(draws)]
            values = np.array([r["rate"] for r in runs])
            row = {"map": side, "padding": padding, "centring": centring, "measured_by_draw": values.tolist(),
                   "mean": float(values.mean()), "pattern_share": float(np.mean([r["pattern_share"] for r in runs]))}
            if centring == "channel":
                row["predicted"] = (pattern.rate ** 0.5) if padding == "zero" else chi_b**0.5
                row["predicted_pattern_share"] = border_pattern_share(side) if padding == "zero" else 0.0
                row["previous_theory"] = chi_b**0.5  # "borders cancel under BN"
            out["border"].append(row)
    # (b) the head's batch term: the last unit of a BN-ReLU twin at small and large batch
    for batch in ((4, 16) if quick else (4, 8, 16, 64)):
        runs = [conv_twin_rates(spatial=8, width=64, depth=13, skip=4, batch=batch, seed=s) for s in range(draws)]
        last = np.array([np.median(np.sqrt(np.asarray(r["norms_sq"])[11] / np.asarray(r["norms_sq"])[13]))
                         for r in runs])
        bulk = np.array([r["rate"] ** 2 for r in runs])
        shapes = [((batch, 8, 8, 64), (batch, 8, 8, 64))] * 7 + [((batch, 8, 8, 64), (batch, 10))]
        kw = dict(norm="batchnorm", activation="relu", residual=False, input_variance=1.0)
        with_head = mean_field_unit_norms(shapes, batch=batch, **kw)
        without = mean_field_unit_norms(shapes, batch=batch, head_term=False, **kw)
        out["head"].append({"batch": batch, "last_unit_by_draw": last.tolist(), "last_unit_mean": float(last.mean()),
                            "bulk_unit_mean": float(bulk.mean()), "predicted_with_head_term": float(with_head[-1]),
                            "predicted_without": float(without[-1]),
                            "predicted_bulk": float(with_head[3] / with_head[4])})
    return out


def cifar_nets(quick, draws, earlier=None):
    """The default CIFAR nets at depths 20 and 56, batch 8 (measurements only; `earlier`: a
    stored cifar_nets section whose draws are kept, see `measure_net`)."""
    depths = (20,) if quick else (20, 56)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    out = {}
    for label, (config, _, _) in SETTINGS.items():
        cache = SegmentCache()  # one per architecture: the draws share compiled units
        count = draws * (NOISY_DRAWS if label in NOISY else 1)
        for depth in depths:
            name = f"cifar depth {depth}: {label}"
            out[name] = measure_net(label, lambda c=config, d=depth: cifar_resnet(d, **c), x, range(1, count + 1),
                                    cache=cache, earlier=(earlier or {}).get(name))
            print(f"  cifar depth {depth}: {label}", flush=True)
    return out


def wide_twins(quick, draws):
    """One stage of 6 units, 256 channels on 8x8 maps, batch 4 (measurements only)."""
    xw = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    out = {}
    width = 64 if quick else 256
    for label, (config, _, _) in SETTINGS.items():
        build = lambda c=config, w=width: ResNet(stage_sizes=(6,), widths=(w,), stem="cifar", num_classes=10, **c)  # noqa: E731
        out[f"wide twin 8x8, {width} channels: {label}"] = measure_net(label, build, xw, range(1, draws + 1))
        print(f"  wide twin: {label}", flush=True)
    return out


def width_spread(quick, draws):
    """Finite width: one stage of 9 post-activation residual ReLU units on 16x16 maps."""
    x16 = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    out = {}
    for width in ((16, 64) if quick else (16, 64, 192)):
        build = lambda w=width: ResNet(stage_sizes=(9,), widths=(w,), stem="cifar", num_classes=10,  # noqa: E731
                                       residual=True, norm="none")
        out[f"post-act residual ReLU, 16x16, width {width}"] = measure_net(
            "post-act residual ReLU, no norm", build, x16, range(1, draws + 1))
    return out


def wider_cifar(quick, draws):
    """Finite width: the ReLU nets without normalization that miss at 16-32-64 channels, built
    4x wider (64-128-256 channels, the same depths, shortcuts and inputs)."""
    depths = (20,) if quick else (20, 56)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    out = {}
    for label in NOISY:
        config = {"shortcut": "A", **SETTINGS[label][0]}  # cifar_resnet's option A unless the setting says B
        cache = SegmentCache()
        for depth in depths:
            n = (depth - 2) // 6
            build = lambda c=config, n=n: ResNet(stage_sizes=(n, n, n), widths=(64, 128, 256), stem="cifar",  # noqa: E731
                                                 num_classes=10, **c)
            out[f"4x wider cifar depth {depth}: {label}"] = measure_net(label, build, x, range(1, draws + 1), cache=cache)
            print(f"  4x wider cifar depth {depth}: {label}", flush=True)
    return out


MEASURED = ("cifar_nets", "wide_twins", "width_spread", "wider_cifar")  # stored measurements, compared in `predictions`


def predictions(sections) -> dict:
    """The predictions beside every stored net measurement (cheap: rerun with --predict-only)."""
    return {name: {net: compare(m, wide=name == "wide_twins") for net, m in sections[name].items()}
            for name in MEASURED if name in sections}


def signal_prop(quick):
    sp_depth = 20 if quick else 56
    xs = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    signal = {}
    for label, config in {"plain BN": dict(residual=False), "post-act BN": dict(residual=True),
                          "pre-act BN": dict(preact=True), "pre-act no norm": dict(preact=True, norm="none")}.items():
        model = cifar_resnet(sp_depth, **config)
        signal[label] = signal_propagation(model, model.init(jax.random.key(1), xs[:1]), xs, bn="batch")
    plot_signal_propagation(signal, OUT / "signal_prop.png", f"CIFAR depth {sp_depth}, batch 8, at initialization")
    return {k: v.as_dict() for k, v in signal.items()}


def shattered(quick):
    xl = line_inputs(jax.random.key(2), 64, (16, 16, 3), span=1.0)
    shatter_depths = (1, 4) if quick else (1, 2, 4, 8, 16)
    by_depth = {}
    for label, (config, bn) in {"plain, no norm": (dict(residual=False, norm="none"), "eval"),
                                "residual, no norm": (dict(residual=True, norm="none"), "eval"),
                                "plain, BN-batch": (dict(residual=False), "batch"),
                                "residual, BN-batch": (dict(residual=True), "batch")}.items():
        build = lambda d, c=config: ResNet(stage_sizes=(d,), widths=(16,), stem="cifar", num_classes=1, **c)  # noqa: E731
        res = correlation_decay_by_depth(build, shatter_depths, xl, bn=bn)
        by_depth[label] = {str(d): {"lag1_blocks": v.get("blocks", v["summed_rows"])[0],
                                    "lag1_summed_rows": v["summed_rows"][0]} for d, v in res.items()}
    # the study's setting: 4 points on a quarter arc (neighbours 30 degrees apart) vs 64 on the same arc
    arc = {}
    residual_bn = lambda d: ResNet(stage_sizes=(d,), widths=(16,), stem="cifar", num_classes=1, residual=True)  # noqa: E731
    for n in (4, 64):
        res = correlation_decay_by_depth(residual_bn, (shatter_depths[-1],), arc_inputs(jax.random.key(2), n, (16, 16, 3)),
                                         bn="batch")[shatter_depths[-1]]
        arc[str(n)] = {"lag1_blocks": res["blocks"][0], "lag1_summed_rows": res["summed_rows"][0]}
    return {"points": 64, "span": 1.0, "width": 16, "map": 16, "by_depth": by_depth,
            "balduzzi_plain_2^-L": {str(d): float(balduzzi_plain_relu(2 * d)) for d in shatter_depths},
            "arc_residual_bn_batch": {"units": shatter_depths[-1], "by_points": arc}}


def main():
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller nets, 2 draws: a smoke run")
    parser.add_argument("--draws", type=int, default=None, help="weight draws per net (default 8, --quick 2)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--out", default=str(OUT), help="output directory (default: %(default)s)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other sections of an existing OUT/results.json (their timings are kept too: "
                        "the wall time is then the sum over runs); cifar_nets keeps its stored draws and measures only "
                        "the missing seeds")
    parser.add_argument("--predict-only", action="store_true",
                        help="recompute the predictions beside the measurements stored in OUT/results.json")
    args = parser.parse_args()
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.predict_only:
        results = json.loads((OUT / "results.json").read_text())
        results["compared"] = predictions(results["sections"])
        (OUT / "results.json").write_text(json.dumps(results, indent=1, default=float))
        write_outputs(results)
        return
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    quick, draws = args.quick, args.draws or (2 if args.quick else 8)
    t_start, cpu_start = time.time(), os.times()
    results = {"quick": quick, "draws": draws, "jax": jax.__version__, "machine": platform.machine(),
               "load_average_at_start": os.getloadavg(), "sections": {}, "timings_s": {}}
    if args.merge and (OUT / "results.json").exists():
        earlier = json.loads((OUT / "results.json").read_text())
        results["sections"], results["timings_s"] = earlier["sections"], earlier["timings_s"]
        results["runs"] = earlier.get("runs", [])
        results["merged_runs"] = earlier.get("merged_runs", 1) + 1
    width = 256 if quick else 1024
    run = {"mlp_twins": lambda: mlp_twins(quick, draws), "bn_batch_sweep": lambda: bn_batch_sweep(quick, width),
           "controls": lambda: controls(quick, draws),
           "cifar_nets": lambda: cifar_nets(quick, draws, results["sections"].get("cifar_nets")),  # --merge: kept
           "wide_twins": lambda: wide_twins(quick, draws), "width_spread": lambda: width_spread(quick, draws),
           "wider_cifar": lambda: wider_cifar(quick, draws),
           "signal_propagation": lambda: signal_prop(quick), "shattered": lambda: shattered(quick)}
    for name in sections:
        t0 = time.time()
        print(f"{name} ...", flush=True)
        results["sections"][name] = run[name]()
        extended = results["timings_s"].get(name, 0.0) if name == "cifar_nets" else 0.0  # stored draws kept
        results["timings_s"][name] = extended + time.time() - t0
        results["wall_s"] = sum(results["timings_s"].values()) if args.merge else time.time() - t_start
        (OUT / "results.json").write_text(json.dumps(results, indent=1, default=float))  # after every section
    results["compared"] = predictions(results["sections"])
    cpu = os.times()
    results["cpu_s"] = (cpu.user - cpu_start.user) + (cpu.system - cpu_start.system)
    results["load_average_at_end"] = os.getloadavg()
    results["wall_s"] = sum(results["timings_s"].values()) if args.merge else time.time() - t_start
    results.setdefault("runs", []).append({
        "sections": sections, "wall_s": time.time() - t_start, "cpu_s": results["cpu_s"],
        "load_average_at_start": results["load_average_at_start"], "load_average_at_end": results["load_average_at_end"],
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    (OUT / "results.json").write_text(json.dumps(results, indent=1, default=float))
    write_outputs(results)


# ---------------------------------------------------------------- results.md and figures


def _pct(x) -> str:
    return f"{100 * x:+.1f}%"


_WIDER: dict = {}  # the wider_cifar comparison, set by write_outputs for the notes


def _standard_errors(r) -> float:
    """A row's error in standard errors of its mean over draws."""
    return r["error"] / (r["std"] / len(r["measured_by_draw"]) ** 0.5 / r["predicted"])


def _miss_note(section: str, name: str, row: str) -> str | None:
    """The explanation beside a missing row of net `name`, with the 4x wider net's same row."""
    label = name.split(": ", 1)[-1]
    note = NOTES.get(label) if section == "cifar_nets" else None
    if note is None:
        return None
    wider = {r["row"]: r for r in (lambda v: v["stages"] + v["transitions"] if v else [])(
        _WIDER.get("4x wider " + name))}
    if row not in wider:
        return note + "; the 4x wider net: not measured in this run"
    w = wider[row]
    return (note + f"; with 4x the channels (64-128-256) the same row is {_pct(w['error'])} "
            f"({_standard_errors(w):+.1f} SE, {len(w['measured_by_draw'])} draws){'' if w['ok'] else ', still a miss'}")


def _acceptance_lines(section, nets) -> list[str]:
    lines = ["| net | row (units) | measured mean over draws (std of a draw) | predicted | error (in standard "
             "errors of the mean) | tolerance | pass |", "|---|---|---|---|---|---|---|"]
    for name, v in nets.items():
        for kind in ("stages", "transitions"):
            for r in v[kind]:
                note = None if r["ok"] else _miss_note(section, name, r["row"])
                verdict = "pass" if r["ok"] else ("miss: " + note if note else "miss (unexplained)")
                lines.append(f"| {name} | {r['row']} ({r['units']}) | {r['mean']:.4f} ({r['std']:.3f}) | "
                             f"{r['predicted']:.4f} | {_pct(r['error'])} ({_standard_errors(r):+.1f}) | "
                             f"{100 * r['tolerance']:.0f}% | {verdict} |")
    return lines


def write_outputs(results):
    s = {**results["sections"], **results.get("compared", {})}
    _WIDER.clear()
    _WIDER.update(s.get("wider_cifar", {}))
    draws = results["draws"]
    command = f"`.venv/bin/python experiments/theory_check.py{' --quick' if results['quick'] else ''}`"
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
                  f"Mean over {draws} weight draws (seeds 1..{draws}; {NOISY_DRAWS * draws} for the ReLU CIFAR nets "
                  "without normalization, whose single draws scatter most) of each draw's rate (geometric mean over "
                  "the stage's shape-keeping units, median over the batch's examples); predicted: "
                  "`theory.predict_net_rates` (the spatial mean field of the whole net, reduced the same way).", ""]
        for section in ("cifar_nets", "wide_twins"):
            if section in s:
                lines += [f"### {section}", ""] + _acceptance_lines(section, s[section]) + [""]
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
                lines.append(f"| {name} | {' / '.join(f'{r['mean']:.4f}' for r in v['stages'])} | "
                             f"{' / '.join(f'{r['predicted']:.4f}' for r in v['stages'])} | "
                             f"{' / '.join(f'{x:.4f}' for x in v['stationary_masks_prediction'])} |")
            lines.append("")
    if "wider_cifar" in s:
        lines += ["## Finite width: the missing ReLU nets built 4x wider (64-128-256 channels; diagnostic, not "
                  "acceptance)", ""] + _acceptance_lines("wider_cifar", s["wider_cifar"]) + [""]
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
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    _figures(s)


def _figures(s):
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
        save_figure(fig, OUT / "bn_batch_sweep.png")
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
        save_figure(fig, OUT / "rates.png")
    if "shattered" in s:
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
