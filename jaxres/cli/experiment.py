"""`jaxres experiment degradation [--out DIR] [--quick] [--plot-only] [--models a,b] [--num-steps N]`:
paper experiments that compose training and the gradient analysis (jaxres.experiments)."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="paper experiments over training + analysis (degradation: He et al. 2015 Fig. 1/6/7)",
        description="Runs a whole experiment: several `jaxres train` runs in OUT/runs/<model>, one after the "
                    "other, then its figures and tables. Rerunning continues where it stopped; finished runs "
                    "are not redone.",
    )
    experiments = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    degr = experiments.add_parser(
        "degradation",
        help="plain vs residual nets of two depths on Fashion-MNIST, gradients measured during training",
        description="He et al. 2015 (Fig. 1, 6, 7) on Fashion-MNIST with the recipe "
                    "experiments/configs/degradation.py: deeper plain nets train worse, residual nets do not. "
                    "Writes degradation_errors.png, gradient_heatmaps.png, gradient_ratio.png, response_std.png, "
                    "results.md and results.json into --out. Imports Fashion-MNIST from Debian's "
                    "/usr/share/datasets/fashion-mnist when the data dir lacks it.",
        epilog="example: jaxres experiment degradation --quick --out runs/degradation_quick",
    )
    degr.add_argument("--out", default="runs/degradation", help="output directory (default: %(default)s)")
    degr.add_argument("--quick", action="store_true",
                      help="depths 8 and 20 and a short schedule: about 10 minutes on 2 CPU cores")
    degr.add_argument("--plot-only", action="store_true",
                      help="train nothing: plot and tabulate the runs in --out as they are (finished or partial)")
    degr.add_argument("--models", default="",
                      help="comma-separated cifar_plainD / cifar_resnetD names (default: cifar_plain20,cifar_plain56,"
                           "cifar_resnet20,cifar_resnet56; with --quick the depth-8 and -20 ones)")
    degr.add_argument("--num-steps", type=int, default=None, help="steps per run (default: the recipe's)")
    degr.add_argument("--data-dir", default="", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from jaxres.experiments import degradation

    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) or degradation.MODELS
    if args.num_steps is not None and args.num_steps < 1:
        raise ValueError(f"--num-steps must be >= 1, got {args.num_steps}")
    try:
        degradation.run_degradation(args.out, models=models, quick=args.quick, num_steps=args.num_steps,
                                    plot_only=args.plot_only, data_dir=args.data_dir)
    except KeyboardInterrupt:
        print("jaxres experiment: interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0
