"""`jaxres train --config NAME[:ARG] --workdir DIR [--config.FIELD=VALUE ...]`: a recipe of
`jaxres.configs` by name, or a config file of the user's own by its path (PATH.py[:ARG])."""

from __future__ import annotations

import argparse
import sys


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.FIELD=VALUE` / `--config.FIELD VALUE` items from the rest."""
    overrides, rest, items = [], [], list(args)
    while items:
        item = items.pop(0)
        if item.startswith("--config."):
            overrides.append(item)
            if "=" not in item and items:
                overrides.append(items.pop(0))
        else:
            rest.append(item)
    return overrides, rest


def accept_config_overrides(parser: argparse.ArgumentParser) -> None:
    """Lets `parser` take absl-style `--config.FIELD=VALUE` items into `args.overrides`
    (argparse cannot declare options with free names)."""
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        overrides, rest = split_overrides(sys.argv[1:] if args is None else args)
        namespace, extra = parse_known(rest, namespace)
        namespace.overrides = overrides
        return namespace, extra

    parser.parse_known_args = parse_known_args


def register(subparsers) -> None:
    from jaxres.configs import recipe_names

    parser = subparsers.add_parser(
        "train",
        help="train a model from a recipe (resumes from the workdir)",
        description="Train with a config recipe. Rerunning the same command resumes from the latest complete "
                    "checkpoint in --workdir; SIGTERM saves a checkpoint and exits. Metrics go to "
                    "WORKDIR/metrics.jsonl and WORKDIR/tensorboard.",
        epilog="example: jaxres train --config cifar10:resnet20 --workdir runs/r20 "
               "--config.num_steps=1000",
    )
    parser.add_argument("--config", required=True, metavar="NAME[:ARG]",
                        help=f"a recipe and its argument, e.g. cifar10:resnet56 (recipes: {', '.join(recipe_names())}), "
                             f"or a config file of your own: path/to/file.py[:ARG]")
    parser.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and TensorBoard logs")
    accept_config_overrides(parser)
    parser.set_defaults(func=run, on_interrupt="rerun the same command to resume from the last checkpoint")


def run(args) -> int:
    from jaxres.preemption import StopSignal

    # First thing, before JAX is imported (seconds): from here on a SIGTERM is a stop request that
    # the training loop takes over (it stops before its first step, or saves after the current
    # one, and exits 0), never the default kill.
    with StopSignal():
        from jaxres.train.distributed import initialize_distributed
        from jaxres.train import apply_overrides, load_config, train_and_evaluate

        config = apply_overrides(load_config(args.config), args.overrides)
        # Multi-host jobs: JAXRES_COORDINATOR/NUM_PROCESSES/PROCESS_ID, or JAXRES_DISTRIBUTED=auto
        # on clusters JAX detects; a single host does nothing.
        initialize_distributed()
        summary = train_and_evaluate(config, args.workdir)  # its errors: jaxres.cli.main reports them
    return 0 if summary["step"] >= config.num_steps or summary["stopped"] else 1
