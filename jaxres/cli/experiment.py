"""`jaxres experiment degradation [--out DIR] [--quick] [--plot-only] [--models a,b] [--conditions c,d]
[--seeds N|a,b] [--num-steps N]` and `jaxres experiment theory [--out DIR] [--quick] [--draws N]
[--sections a,b] [--merge] [--predict-only]` and `jaxres experiment twins [--out DIR] [--nets a,b]
[--analyses a,b] [--weights DIR] [--plot-only]`: the experiments (jaxres.experiments)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="experiments: degradation (He et al. 2015 Fig. 1/6/7, with interventions), theory (mean field vs "
             "measurement), twins (analyses of trained nets)",
        description="Runs a whole experiment and writes its figures and tables into --out: degradation (several "
                    "`jaxres train` runs in OUT/runs/<condition>/<model>/seed<k>; rerunning continues where it stopped, "
                    "finished runs are not redone), theory (the mean-field theory against measurement) or twins "
                    "(lesions, loss landscapes, sharpness, Jacobian spectra and gradient paths of the degradation "
                    "grid's trained nets).",
    )
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    degr = experiments.add_parser(
        "degradation",
        help="plain vs residual nets of two depths on Fashion-MNIST over seeds, with interventions on the deep "
             "plain net; gradients measured during training",
        description="He et al. 2015 (Fig. 1, 6, 7) on Fashion-MNIST with the recipe degradation "
                    "(jaxres/configs/degradation.py): do deeper plain nets train worse, and is it because of their "
                    "gradients? Runs every condition x model x seed, then writes the figures (degradation_errors, "
                    "conditions_errors, gradient_heatmaps, gradient_ratio, kernel_steps, response_std .png), "
                    "results.md and results.json (means with 95% intervals over seeds, differences paired by seed) "
                    "into --out. Imports Fashion-MNIST from Debian's /usr/share/datasets/fashion-mnist when the data "
                    "dir lacks it.",
        epilog="example: jaxres experiment degradation --quick --out runs/degradation_quick",
    )
    degr.add_argument("--out", default="runs/degradation", help="output directory (default: %(default)s)")
    degr.add_argument("--quick", action="store_true",
                      help="depths 8 and 14, seeds 0 and 1, a 48-step schedule evaluated twice on 2,000 test and "
                           "2,000 training images: the whole grid in small, to check a setup before the real one")
    degr.add_argument("--plot-only", action="store_true",
                      help="train nothing: plot and tabulate the runs in --out as they are (finished or partial)")
    degr.add_argument("--models", default=None,
                      help="comma-separated cifar_plainD / cifar_resnetD names (default: cifar_plain20,cifar_plain56,"
                           "cifar_resnet20,cifar_resnet56; with --quick the depth-8 and -14 ones)")
    degr.add_argument("--conditions", default=None,
                      help="comma-separated recipe conditions: baseline runs on every model, the others on the deepest "
                           "plain model (skipinit: the deepest residual one); default: baseline,warmup,equalized,"
                           "delta_orthogonal,textbook. See jaxres/configs/degradation.py CONDITIONS")
    degr.add_argument("--seeds", default=None,
                      help="N (seeds 0 .. N-1) or a comma-separated list (one seed: '5,'); default 3 (with --quick 2)")
    degr.add_argument("--num-steps", type=int, default=None, help="steps per run (default: the recipe's)")
    degr.add_argument("--data-dir", default="", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    degr.set_defaults(func=run, on_interrupt="rerun the same command to continue; finished runs are not redone")
    theory = experiments.add_parser(
        "theory",
        help="the mean-field theory against exact measurements over weight draws, with controls per mechanism",
        description="jaxres.analysis.theory's predictions beside the measured per-unit and per-stage rates of the "
                    "default CIFAR nets (depths 20 and 56), wide and MLP twins, over weight draws, with controls that "
                    "isolate each mechanism, the BN batch sweep, signal propagation and shattered gradients. Writes "
                    "results.json (after every section), results.md and bn_batch_sweep/rates/signal_prop/shattered "
                    ".png into --out. The committed results: experiments/results/theory.",
        epilog="example: jaxres experiment theory --quick --out runs/theory_quick",
    )
    theory.add_argument("--out", default="runs/theory", help="output directory (default: %(default)s)")
    theory.add_argument("--quick", action="store_true", help="smaller nets, 2 draws: a smoke run")
    theory.add_argument("--draws", type=int, default=None, help="weight draws per net (default 8, --quick 2)")
    theory.add_argument("--sections", default=None,
                        help="comma-separated subset of mlp_twins, bn_batch_sweep, controls, cifar_nets, wide_twins, "
                             "width_spread, wider_cifar, signal_propagation, shattered (default: all)")
    theory.add_argument("--merge", action="store_true",
                        help="keep the other sections of an existing OUT/results.json (the wall time is then the sum "
                             "over runs); cifar_nets keeps its stored draws and measures only the missing seeds")
    theory.add_argument("--predict-only", action="store_true",
                        help="measure nothing: recompute the predictions beside the measurements in OUT/results.json "
                             "and redraw")
    theory.set_defaults(func=run_theory, on_interrupt="results.json keeps every finished section; rerun the "
                        "missing ones with --merge --sections ...")
    twins = experiments.add_parser(
        "twins",
        help="lesions, loss landscapes, sharpness, Jacobian spectra and gradient paths of the trained plain and "
             "residual twins",
        description="The analyses of `jaxres inspect` on the degradation grid's trained nets (seed 0 of the baseline: "
                    "cifar_plain20/56, cifar_resnet20/56 on Fashion-MNIST), each from its weights file "
                    "WEIGHTS/NET.safetensors with the arguments fixed in jaxres/experiments/trained_twins.py. Writes "
                    "OUT/NET/ANALYSIS.json (the BatchNorm-batch controls OUT/NET/bn_batch/; paths: the residual nets "
                    "only), then lesion, landscape, sharpness, spectrum, paths .png and tables.md into --out from "
                    "every result there. The committed "
                    "results: experiments/results/twins (minutes to half an hour per net and analysis on 2 CPU cores).",
        epilog="example: jaxres experiment twins --plot-only --out experiments/results/twins",
    )
    twins.add_argument("--out", default="runs/twins", help="output directory (default: %(default)s)")
    twins.add_argument("--nets", default=None,
                       help="comma-separated subset of cifar_plain20, cifar_resnet20, cifar_plain56, cifar_resnet56 "
                            "(default: all)")
    twins.add_argument("--analyses", default=None,
                       help="comma-separated subset of lesion, landscape, sharpness, spectrum, paths, lesion_bn_batch, "
                            "landscape_bn_batch (default: the first five)")
    twins.add_argument("--weights", default="experiments/results/twins/weights",
                       help="directory of the NET.safetensors files (default: %(default)s)")
    twins.add_argument("--plot-only", action="store_true",
                       help="run nothing: redraw the figures and tables.md from the results in --out")
    twins.add_argument("--data-dir", default="", help="TFDS data dir (default: $TFDS_DATA_DIR or "
                       "~/tensorflow_datasets; Fashion-MNIST is imported from Debian's files when it lacks it)")
    twins.set_defaults(func=run_twins, on_interrupt="every finished analysis is written; rerun the missing ones "
                       "with --nets and --analyses")


def _names(text, default) -> tuple[str, ...]:
    """A comma-separated list of names, or `default` where the option was not given."""
    return default if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def run_twins(args) -> int:
    from jaxres.experiments import trained_twins

    trained_twins.run_twins(args.out, nets=_names(args.nets, trained_twins.NETS),
                            analyses=_names(args.analyses, trained_twins.DEFAULT_ANALYSES), weights_dir=args.weights,
                            plot_only=args.plot_only, data_dir=args.data_dir)
    return 0


def run_theory(args) -> int:
    from jaxres.experiments import theory_check

    sections = theory_check.SECTIONS if args.sections is None else tuple(s.strip() for s in args.sections.split(","))
    theory_check.run_theory_check(args.out, sections=sections, quick=args.quick, draws=args.draws, merge=args.merge,
                                  predict_only=args.predict_only)
    print(f"wrote results.json, results.md and the figures to {args.out}/")
    return 0


def run(args) -> int:
    from jaxres.preemption import StopSignal

    from jaxres.experiments import degradation

    models = _names(args.models, degradation.MODELS)
    conditions = _names(args.conditions, degradation.CONDITIONS)
    seeds = degradation.SEEDS if args.seeds is None else degradation.parse_seeds(args.seeds)
    if args.num_steps is not None and args.num_steps < 1:
        raise ValueError(f"--num-steps must be >= 1, got {args.num_steps}")
    if not args.plot_only:
        use_compilation_cache(Path(args.out) / ".jax_cache")
    # SIGTERM from here on stops the grid after saving the run in progress (each run's loop takes
    # the request over), also between runs, never the default kill.
    with StopSignal():
        degradation.run_degradation(args.out, models=models, conditions=conditions, seeds=seeds, quick=args.quick,
                                    num_steps=args.num_steps, plot_only=args.plot_only, data_dir=args.data_dir)
    return 0


def use_compilation_cache(directory: Path) -> None:
    """Keeps this process's compiled programs in `directory` (unless JAX already has a cache):
    the grid's runs share models and shapes, so every seed after the first, and every condition
    that keeps the model, loads its programs instead of compiling them again."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
