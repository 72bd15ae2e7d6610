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
  by stochastic Lanczos quadrature (Pennington et al. 2017).

Each writes `ANALYSIS.json` into `--out` (written whole at the end: an error leaves no partial
file) with the arguments, the wall time and the load average, and prints a table in which
every number says whether it is exact or an estimate, with its interval or tolerance. Every
argument is checked before the work starts.
"""

from __future__ import annotations

import os
import time

HELP = "analyses of a trained net: lesions, loss landscape, sharpness, Jacobian spectra"
ANALYSES = ("export", "lesion", "landscape", "sharpness", "spectrum")


class TrainedNet:
    """A trained net as the analyses see it: `model` (units one by one), `variables`, the
    training `config` (an ml_collections ConfigDict) and its dataset `spec`."""

    def __init__(self, path, data_dir: str = ""):
        from jaxres.analysis.restore import check_variables, restore_variables, stored_config
        from jaxres.data import dataset_spec
        from jaxres.train import config as config_lib
        from jaxres.train.run import build_model

        stored = stored_config(path)
        if "dataset" not in stored:
            raise ValueError(f"{path} records no training config (model, dataset, seed); pass a `jaxres train` workdir, "
                             f"or a weights file exported from one with `jaxres inspect export`")
        self.path = str(path)
        self.config = config_lib.from_json(stored)
        if data_dir:
            self.config.data_dir = data_dir
        self.spec = dataset_spec(self.config.dataset)
        self.train_model = build_model(self.config, self.spec)
        self.model = self.train_model.clone(scan_units=False, remat_units=False)
        self.input_shape = (1, self.spec.image_size, self.spec.image_size, self.spec.channels)
        import jax.numpy as jnp

        self.variables = check_variables(self.model, restore_variables(path), jnp.zeros(self.input_shape),
                                         self.config.model)

    def initial_variables(self) -> dict:
        """The variables training started from: `create_train_state`'s draw from the config's seed."""
        import jax
        import jax.numpy as jnp

        from jaxres.analysis.restore import check_variables

        init_rng, _ = jax.random.split(jax.random.PRNGKey(self.config.seed))
        variables = jax.jit(lambda key: self.train_model.init(key, jnp.zeros(self.input_shape), False))(init_rng)
        return check_variables(self.model, variables, jnp.zeros(self.input_shape), self.config.model)

    def images(self, split: str, count: int, seed: int = 0):
        """(images float32 NHWC, labels int32): `count` examples of `split` ("train" or "eval":
        the config's splits), the first of a seed-`seed` permutation, eval transform."""
        from jaxres import data

        name, source = self._source(split)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(source):
            raise ValueError(f"--images must lie in 1..{len(source)} (the {name} split), got {count!r}")
        batch = data.probe_batch(source, transform=self._transform(), size=count, seed=seed)
        return batch["image"], batch["label"]

    def _transform(self):
        from jaxres import data

        return data.eval_transform(self.config.augment or self.spec.augment, self.spec.image_size,
                                   self.spec.mean, self.spec.std)

    def _source(self, split: str):
        """The random-access source of `split` ("train" or "eval": the config's splits)."""
        from jaxres import data

        name = {"train": self.config.train_split or self.spec.train_split,
                "eval": self.config.eval_split or self.spec.eval_split}[split]
        return name, data.load_source(self.config.dataset, name, self.config.data_dir or None)

    def probe_batch(self):
        """The training monitor's probe batch (`Run.probe_batch`): the same images as its records."""
        from jaxres import data

        _, source = self._source("train")
        batch = data.probe_batch(source, transform=self._transform(), size=self.config.analysis_batch_size,
                                 seed=self.config.seed)
        return batch["image"], batch["label"]

    def learning_rate(self, step: int) -> float:
        """The config's learning rate at `step` (the optimizer's schedule, as `Run` makes it)."""
        from jaxres.train.optim import make_schedule

        _, source = self._source("train")
        return float(make_schedule(self.config, max(1, len(source) // self.config.batch_size))(step))


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
    from jaxres.analysis.lesion import lesion_study

    images, labels = net.images("eval", args.images, args.seed)
    ks = _ints(args.ks, "--ks") if args.ks else None
    units = _names(args.units) if args.units else None
    return lesion_study(net.model, net.variables, images, labels, bn=args.bn, units=units, ks=ks, draws=args.draws,
                        seed=args.seed, batch_size=args.batch_size)


def run_landscape(args, net: TrainedNet) -> dict:
    from jaxres.analysis import landscape

    grid = landscape.parse_axis(args.grid, "--grid")
    path_grid = landscape.parse_axis(args.path_grid, "--path-grid") if args.path_grid else None
    images, labels = net.images("train", args.images, args.seed)
    start = time.perf_counter()
    result = {"slice": landscape.slice_2d(net.model, net.variables, images, labels, alphas=grid, betas=grid,
                                          seed=args.seed, bn=args.bn, chunk=args.batch_size)}
    result["slice"]["wall_time_s"] = time.perf_counter() - start
    if path_grid is not None:
        start = time.perf_counter()
        result["path"] = landscape.linear_path(net.model, net.initial_variables(), net.variables, images, labels,
                                               ts=path_grid, bn=args.bn, chunk=args.batch_size)
        result["path"]["wall_time_s"] = time.perf_counter() - start
    return {"analysis": "landscape", "images": "training split, first of a permutation (seed "
            f"{args.seed}), eval transform", **result}


def run_sharpness(args, net: TrainedNet) -> dict:
    from jaxres.analysis.sharpness import stability_thresholds, top_hessian_eigenvalue

    images, labels = net.probe_batch()
    step = _trained_step(args.checkpoint)
    out = {"analysis": "sharpness", "images": f"the training monitor's probe batch ({len(labels)} training "
           f"examples, seed {net.config.seed})", "reference": "Cohen et al. 2021 (arXiv 2103.00065)"}
    rows = [("trained", step, net.variables)] + ([("initialization", 0, net.initial_variables())] if args.init else [])
    for name, at, variables in rows:
        result = top_hessian_eigenvalue(net.model, variables, images, labels, bn=args.bn, tol=args.tol,
                                        max_iter=args.max_iter, seed=args.seed)
        if at is not None:
            lr = net.learning_rate(at)
            result.update(step=at, learning_rate=lr, thresholds=stability_thresholds(lr, net.config.momentum))
        out[name] = result
    return out


def _trained_step(path):
    """The step of a workdir's checkpoint, or the weights file's recorded step; None if unknown."""
    from jaxres.analysis.restore import is_weights_file
    from jaxres.workdir import find_checkpoint, is_workdir_layout

    if is_weights_file(path):
        from jaxres.analysis.restore import stored_config

        return int(stored_config(path).get("num_steps", 0)) or None
    if is_workdir_layout(path):
        return find_checkpoint(path)[2]
    return None


def run_spectrum(args, net: TrainedNet) -> dict:
    import jax.numpy as jnp

    from jaxres.analysis.lesion import unit_inputs
    from jaxres.analysis.segments import SegmentCache, check_bn
    from jaxres.analysis.spectrum import jacobian_spectrum

    check_bn(args.bn)
    images, _ = net.images("eval", args.images, args.seed)
    x = jnp.asarray(images)
    cache = SegmentCache()
    names = list(net.model.unit_names())
    starts = _names(args.units) if args.units else tuple(names[1:-1:max(1, (len(names) - 2) // 3)])
    for unit in starts:
        if unit not in names[:-1]:
            raise ValueError(f"--units: {unit!r} is not a unit before the head of {net.config.model} "
                             f"({', '.join(names[:-1])})")
    features = (names[1], names[-2])  # Pennington et al.'s input-output Jacobian of the feature extractor
    out = {"analysis": "spectrum", "images": f"{args.images} test images (seed {args.seed}), eval transform",
           "reference": "Pennington, Schoenholz & Ganguli 2017 (arXiv 1711.04735)"}
    variants = [("trained", net.variables)] + ([("initialization", net.initial_variables())] if args.init else [])
    for name, variables in variants:
        segments = cache.segments(net.model, variables, x.shape, args.bn)
        hs = unit_inputs(segments, x)
        entry = {"logits": {}, "own": {}}
        for unit in starts:  # d logits / d h: at most C * N singular values, all of them with k = C * N
            entry["logits"][unit] = jacobian_spectrum(segments, hs, unit, names[-1], num_matvecs=args.num_matvecs,
                                                      num_probes=args.num_probes, seed=args.seed)
            entry["own"][unit] = jacobian_spectrum(segments, hs, unit, unit, num_matvecs=args.num_matvecs,
                                                   num_probes=args.num_probes, seed=args.seed)
        entry["features"] = jacobian_spectrum(segments, hs, *features, num_matvecs=args.num_matvecs,
                                              num_probes=args.num_probes, seed=args.seed)
        out[name] = entry
    return out


RUNNERS = {"export": run_export, "lesion": run_lesion, "landscape": run_landscape, "sharpness": run_sharpness,
           "spectrum": run_spectrum}


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
    return "\n".join(lines)


def run(args) -> int:
    from jaxres.cli.paths import check_output_dir
    from jaxres.files import write_text_atomic

    if args.analysis == "export":
        if not str(args.out).endswith(".safetensors"):
            raise ValueError(f"--out of export is the weights file to write, e.g. NET.safetensors; got {args.out!r}")
        if os.path.exists(args.out) and not args.overwrite:
            raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
        check_output_dir(os.path.dirname(os.path.abspath(args.out)))
    else:
        out = check_output_dir(args.out)
    check_arguments(args)
    net = TrainedNet(args.checkpoint, args.data_dir)
    start = time.perf_counter()
    result = RUNNERS[args.analysis](args, net)
    seconds = time.perf_counter() - start
    print(format_table(args.analysis, result))
    if args.analysis == "export":
        return 0
    import json

    from jaxres.analysis.monitor import json_safe

    result = {**result, "checkpoint": str(args.checkpoint), "model": net.config.model,
              "dataset": net.config.dataset, "arguments": {k: v for k, v in vars(args).items() if k != "func"},
              "wall_time_s": seconds, "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count()}
    write_text_atomic(out / f"{args.analysis}.json", json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
    print(f"{args.analysis} of {net.config.model} in {seconds:.0f} s; wrote {out / (args.analysis + '.json')}")
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
    for name in ("images", "batch_size", "draws", "num_matvecs", "num_probes"):
        value = getattr(args, name, 1)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


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
    parser.set_defaults(func=run)
