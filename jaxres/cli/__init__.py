"""The `jaxres` command: a thin layer over library functions users can also call.

Each subcommand lives in its own module here, exposing `register(subparsers)`, which adds
its parser and sets `run` as the parser's default `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `jaxres --help` lists them.
COMMANDS = ("models", "convert", "train", "eval", "data", "bench", "analyze", "experiment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxres",
        description="VGG/ResNet model zoo, training and exact gradient-propagation analysis in JAX/Flax.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"jaxres.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, OSError) as err:
        # Library errors are written for people, and an OS error (disk full, permissions) names
        # its file: show the message, not a traceback.
        print(f"jaxres {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
