"""`jaxres eval --workdir DIR [--checkpoint latest|best|STEP] [--split SPLIT]`."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a training run's checkpoint on the full eval split",
        description="Evaluate a checkpoint of a `jaxres train` run on every example of its eval split "
                    "(the config is read from the checkpoint).",
    )
    parser.add_argument("--workdir", required=True, help="the run's directory")
    parser.add_argument("--checkpoint", default="latest", help="latest (default), best, or a step number")
    parser.add_argument("--split", default="", help="split to evaluate (default: the config's eval split)")
    parser.add_argument("--data-dir", default="", help="TFDS data dir (default: the config's)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from jaxres.train import evaluate_workdir

    evaluate_workdir(args.workdir, checkpoint=args.checkpoint, split=args.split, data_dir=args.data_dir)
    return 0
