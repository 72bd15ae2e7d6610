"""`jaxres inspect ANALYSIS --checkpoint PATH`: analyses of one trained net (issue 22).

PATH is a `jaxres train` workdir (its latest checkpoint, or a step directory in it) or a jaxres
weights file that records its training config (`jaxres inspect export` writes one). The model,
dataset and seed come from that config; the data from its dataset (`--data-dir` to move it).

- `export`: the checkpoint's variables and config as a small `.safetensors` file;
- `lesion`: test error with each shape-keeping unit removed, and k random ones (Veit et al. 2016);
- `landscape`: the training loss on a 2-D filter-normalized slice and on the straight path from
  the initialization (rebuilt from the config's seed) to the trained weights (Li et al. 2018);
- `sharpness`: the top Hessian eigenvalue on the monitor's probe batch vs 2/learning-rate
  (Cohen et al. 2021);
- `spectrum`: singular-value densities of d logits/d h and of the feature extractor's Jacobian
  by stochastic Lanczos quadrature (Pennington et al. 2017);
- `paths`: a residual net's loss gradient split exactly by path length (the number of residual
  branches a path goes through), beside Veit et al.'s sampled estimate (Veit et al. 2016, Fig. 6).

Each writes `ANALYSIS.json` into `--out` (written whole at the end: an error leaves no partial
file) with the arguments, the wall time and the load average, and prints a table in which
every number says whether it is exact or an estimate, with its interval or tolerance. Every
argument is checked before the work starts.

A thin layer over `jaxres.train.trained_net.TrainedNet`, which loads the net, runs each analysis
(`TrainedNet.lesion`, ...: `jaxres.analysis`'s `lesion_study`, `landscape_study`, ... on the
analysis' images) and writes ANALYSIS.json; call it from Python the same way.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxres.train.trained_net import TrainedNet

HELP = "analyses of a trained net: lesions, loss landscape, sharpness, Jacobian spectra, gradient paths"
ANALYSES = ("export", "lesion", "landscape", "sharpness", "spectrum", "paths")


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.replace(",", " ").split() if t)


def run_export(args, net: TrainedNet) -> dict:
    from jaxres.train import config as config_lib
    from jaxres.weights.io import save_weights

    path = save_weights(args.out, net.variables, net.config.model, num_classes=net.spec.num_classes,
                        source=f"jaxres train workdir {args.checkpoint}", config=config_lib.to_json(net.config),
                        overwrite=args.overwrite)
    return {"weights": str(path), "bytes": os.path.getsize(path)}


def run_lesion(args, net: TrainedNet) -> dict:
    return net.lesion(images=args.images, bn=args.bn, units=_names(args.units) if args.units else None,
                      ks=_ints(args.ks, "--ks") if args.ks else None, draws=args.draws, seed=args.seed,
                      batch_size=args.batch_size)


def run_landscape(args, net: TrainedNet) -> dict:
    from jaxres.analysis.landscape import parse_axis

    return net.landscape(grid=parse_axis(args.grid, "--grid"), images=args.images, bn=args.bn, seed=args.seed,
                         path_grid=parse_axis(args.path_grid, "--path-grid") if args.path_grid else None,
                         batch_size=args.batch_size)


def run_sharpness(args, net: TrainedNet) -> dict:
    return net.sharpness(init=args.init, bn=args.bn, tol=args.tol, max_iter=args.max_iter, seed=args.seed)


def run_spectrum(args, net: TrainedNet) -> dict:
    return net.spectrum(init=args.init, images=args.images, units=_names(args.units) if args.units else None,
                        bn=args.bn, num_matvecs=args.num_matvecs, num_probes=args.num_probes, seed=args.seed)


def run_paths(args, net: TrainedNet) -> dict:
    return net.paths(images=args.images, split=args.split, bn=args.bn, draws=args.draws, batch_size=args.batch_size,
                     chunk=args.chunk, seed=args.seed)


RUNNERS = {"export": run_export, "lesion": run_lesion, "landscape": run_landscape, "sharpness": run_sharpness,
           "spectrum": run_spectrum, "paths": run_paths}


def _interval(entry: dict, scale: float = 1.0, digits: int = 3) -> str:
    if "ci_low" not in entry:
        return f"{entry['estimate'] * scale:.{digits}g}"
    return (f"{entry['estimate'] * scale:.{digits}g} [{entry['ci_low'] * scale:.{digits}g}, "
            f"{entry['ci_high'] * scale:.{digits}g}]")


def format_table(analysis: str, result: dict) -> str:
    """The printed table of one analysis; every number with how it was obtained."""
    lines = []
    if analysis == "export":
        return f"wrote {result['weights']} ({result['bytes']:,} bytes)"
    if analysis == "lesion":
        lines.append(f"test error, % (exact on {result['num_images']} test images; [95% Wilson interval]), "
                     f"BatchNorm {result['bn']}")
        lines.append(f"  intact net            {_interval(result['baseline'], 100)}")
        for unit, entry in result["single"].items():
            lines.append(f"  without {unit:<13} {_interval(entry, 100)}   ({result['kinds'][unit]})")
        lines.append("random lesions: mean over draws [95% t interval over the draws]")
        for entry in result["random"]:
            lines.append(f"  k={entry['k']:<3} {_interval(entry, 100)}")
    elif analysis == "landscape":
        s = result["slice"]
        import numpy as np

        loss = np.asarray(s["loss"], np.float64)
        lines.append(f"2-D slice: {len(s['alpha'])}x{len(s['beta'])} points on {s['num_images']} training images, "
                     f"BatchNorm {s['bn']}, {s['wall_time_s']:.0f} s; exact losses")
        lines.append(f"  centre loss {s['center']['loss']:.4g}, error {100 * s['center']['error']:.2f}%; "
                     f"slice min {np.nanmin(loss):.4g}, max {np.nanmax(loss):.4g}")
        if "path" in result:
            p = result["path"]
            lines.append(f"path init -> trained ({len(p['t'])} points, {p['wall_time_s']:.0f} s): "
                         + ", ".join(f"t={t:.2g}: {v:.3g}" for t, v in zip(p["t"], p["loss"])))
    elif analysis == "sharpness":
        for name in ("initialization", "trained"):
            if name in result:
                r = result[name]
                ok = "converged" if r["converged"] else "NOT converged"
                thresholds = r.get("thresholds", {})
                lines.append(f"{name:<15} lambda_max {r['lambda_max']:.4g} (Lanczos, {r['iterations']} HVPs, residual "
                             f"{r['residual']:.1e} <= tol {r['tol']:g}: {ok}); 2/lr = {thresholds.get('gd', 'n/a'):.4g}, "
                             f"(2+2 beta)/lr = {thresholds.get('momentum', 'n/a'):.4g}; loss {r['loss']:.4g}, BN "
                             f"{r['bn']}")
    elif analysis == "spectrum":
        for name in ("initialization", "trained"):
            if name not in result:
                continue
            entry = result[name]
            lines.append(f"{name}: log10 sigma quantiles q10 / q50 / q90 (SLQ estimate [95% bootstrap over probes]); "
                         f"mean sigma^2 [95% t over probes]; isometry (1 = all sigma equal) [bootstrap]")
            rows = [(f"d logits/d h({u})", r) for u, r in entry["logits"].items()]
            rows += [(f"own J of {u}", r) for u, r in entry["own"].items()]
            rows.append((f"features {entry['features']['from']}..{entry['features']['to']}", entry["features"]))
            for label, r in rows:
                q = r["log10_sigma_quantiles"]
                lines.append(f"  {label:<28} {_interval(q['q10'])} / {_interval(q['q50'])} / {_interval(q['q90'])}; "
                             f"mean sigma^2 {_interval(r['mean_sq_singular_value'])}; isometry m1^2/m2 "
                             f"{_interval(r['isometry'])}; null {100 * r['null_share']['estimate']:.1f}%")
    elif analysis == "paths":
        lines += _paths_table(result)
    return "\n".join(lines)


def _paths_table(r: dict) -> list[str]:
    exact, sampled = r["exact"], r["sampled"]
    lines = [f"gradient of each image's loss at the input of {r['residual_units'][0]} (the residual stack), by path "
             f"length k = residual branches passed; {r['num_residual_units']} residual units, {r['num_images']} "
             f"images, BatchNorm {r['bn']}",
             "  exact: ||g_k||, mean over the images [95% t]; truncation: ||g - sum_{j<=k} g_j|| / ||g||, mean; "
             f"Veit: one path's ||g||, mean over {r['draws_per_k']} (path, image) draws [95% t]; total = C(n, k) x it",
             f"  {'k':>3} {'C(n,k)/2^n':>10} {'exact ||g_k||':>30} {'truncation':>10} {'Veit per path':>30} "
             f"{'Veit total':>10}"]
    for k in r["k"]:
        def at(entry, i=k):
            return {key: value[i] for key, value in entry.items()}

        lines.append(f"  {k:>3} {r['path_share'][k]:>10.3g} {_interval(at(exact['norm_stack'])):>30} "
                     f"{exact['truncation']['estimate'][k]:>10.3g} {_interval(at(sampled['per_path'])):>30} "
                     f"{sampled['total']['estimate'][k]:>10.3g}")

    def reach(entry):
        return ", ".join(f"{100 * float(level):g}% by k = {k}" for level, k in entry.items())

    lines += [f"  cumulative share of sum_k ||g_k|| (exact): {reach(exact['k_reaching'])}",
              f"  cumulative share of Veit's total: {reach(sampled['k_reaching'])}",
              f"  the paths themselves, C(n,k)/2^n: {reach(r['path_distribution_reaching'])}",
              f"  check: ||sum_k g_k - g|| / ||g|| <= {r['check']['max_relative_difference_stack']:.1e}, g the ordinary "
              f"gradient"]
    return lines


def run(args) -> int:
    from jaxres.cli.paths import check_output_dir

    if args.analysis == "export":
        if not str(args.out).endswith(".safetensors"):
            raise ValueError(f"--out of export is the weights file to write, e.g. NET.safetensors; got {args.out!r}")
        if os.path.exists(args.out) and not args.overwrite:
            raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
        check_output_dir(os.path.dirname(os.path.abspath(args.out)))
    else:
        out = check_output_dir(args.out)
    check_arguments(args)
    from jaxres.train.trained_net import TrainedNet

    net = TrainedNet(args.checkpoint, args.data_dir)
    start = time.perf_counter()
    result = RUNNERS[args.analysis](args, net)
    seconds = time.perf_counter() - start
    print(format_table(args.analysis, result))
    if args.analysis == "export":
        return 0
    path = net.write_result(out, args.analysis, result, seconds=seconds,
                            arguments={k: v for k, v in vars(args).items() if k != "func"})
    print(f"{args.analysis} of {net.config.model} in {seconds:.0f} s; wrote {path}")
    return 0


def check_arguments(args) -> None:
    """What can be refused from the arguments alone, before the checkpoint is read."""
    from jaxres.analysis.segments import check_bn

    if args.analysis == "export":
        return
    check_bn(args.bn)
    if args.analysis == "landscape":
        from jaxres.analysis.landscape import parse_axis

        parse_axis(args.grid, "--grid")
        if args.path_grid:
            parse_axis(args.path_grid, "--path-grid")
    if args.analysis == "sharpness":
        from jaxres.analysis.sharpness import check_tolerance

        check_tolerance(args.tol, args.max_iter)
    for name in ("images", "batch_size", "draws", "num_matvecs", "num_probes", "chunk"):
        value = getattr(args, name, 1)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.analysis == "paths" and args.images % args.batch_size and args.images > args.batch_size:
        raise ValueError(f"--images ({args.images}) must be a multiple of --batch-size ({args.batch_size}): every "
                         f"batch has the shape the units are compiled for")


def register(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help=HELP, description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    def common(name, help_line, bn):
        p = sub.add_parser(name, help=help_line)
        p.add_argument("--checkpoint", required=True,
                       help="a jaxres train workdir (latest checkpoint), a step directory in it, or a weights file "
                       "with its training config")
        p.add_argument("--data-dir", default="", help="TFDS data dir (default: the config's)")
        if name != "export":
            p.add_argument("--out", default=f"runs/inspect", help="output directory (default: %(default)s)")
            p.add_argument("--bn", default=bn, help=f"BatchNorm policy: eval (running statistics) or batch (batch "
                           f"statistics, as trained) (default: {bn})")
            p.add_argument("--seed", type=int, default=0, help="images, directions, probes (default: 0)")
        return p

    p = common("export", "write the checkpoint's variables and training config as a weights file", None)
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")

    p = common("lesion", "test error with units removed (Veit et al. 2016, Fig. 3 and 5)", "eval")
    p.add_argument("--images", type=int, default=2000, help="test images (default: %(default)s)")
    p.add_argument("--units", default="", help="units to remove one at a time (default: every shape-keeping one)")
    p.add_argument("--ks", default="", help="numbers of random units removed together (default: 1..min(10, units))")
    p.add_argument("--draws", type=int, default=5, help="random sets per k (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=250, help="images per evaluation batch (default: %(default)s)")

    p = common("landscape", "loss on a 2-D filter-normalized slice and the init-to-trained path (Li et al. 2018)",
               "eval")
    p.add_argument("--grid", default="-1:1:11", help="both axes of the slice, LOW:HIGH:POINTS; write --grid=-1:1:11 (a leading minus) (default: %(default)s)")
    p.add_argument("--path-grid", default="-0.25:1.25:13",
                   help="t of the path (1 - t) init + t trained, LOW:HIGH:POINTS; empty: no path (default: %(default)s)")
    p.add_argument("--images", type=int, default=500, help="training images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=250, help="images per evaluation chunk (default: %(default)s)")

    p = common("sharpness", "top Hessian eigenvalue of the training loss vs 2/lr (Cohen et al. 2021)", "batch")
    p.add_argument("--tol", type=float, default=1e-3, help="Lanczos relative residual (default: %(default)s)")
    p.add_argument("--max-iter", type=int, default=100, help="Hessian-vector products at most (default: %(default)s)")
    p.add_argument("--init", action="store_true", help="also at the initialization (rebuilt from the config's seed)")

    p = common("spectrum", "singular-value densities of Jacobians by SLQ (Pennington et al. 2017)", "eval")
    p.add_argument("--images", type=int, default=2, help="test images in the batch (default: %(default)s)")
    p.add_argument("--units", default="", help="units whose input h the Jacobians start at (default: 3 evenly spaced)")
    p.add_argument("--num-matvecs", type=int, default=64, help="Golub-Kahan steps per probe (default: %(default)s)")
    p.add_argument("--num-probes", type=int, default=8, help="Rademacher probes (default: %(default)s)")
    p.add_argument("--init", action="store_true", help="also at the initialization (rebuilt from the config's seed)")

    p = common("paths", "a residual net's loss gradient by path length, exact and Veit et al.'s estimate (Veit et "
               "al. 2016, Fig. 6)", "eval")
    p.add_argument("--images", type=int, default=64, help="images (default: %(default)s)")
    p.add_argument("--split", default="eval", choices=("eval", "train"),
                   help="the config's test (eval) or training split (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per batch; it divides --images (default: %(default)s)")
    p.add_argument("--draws", type=int, default=1,
                   help="random paths of each length per image, for Veit et al.'s estimate (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=8, help="cotangents per compiled call (default: %(default)s)")
    parser.set_defaults(func=run)
