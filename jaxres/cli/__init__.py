"""The `jaxres` command: a thin layer over library functions users can also call.

Each subcommand lives in its own module here, exposing `register(subparsers)`, which adds
its parser and sets `run` as the parser's default `func(args) -> int`. Only the chosen
subcommand's module is imported: the others (and JAX, which takes seconds to import) stay
unloaded, so `jaxres --help` and `jaxres --version` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxres import __version__

# Subcommand modules with their one-line help, in the order `jaxres --help` lists them. Each
# line equals the help its module registers (tests/test_packaging.py holds them together).
COMMANDS = {
    "models": "list the model zoo: parameters, MACs, input size, paper",
    "convert": "convert published weights (torchvision VGG/ResNet) to a jaxres weights file",
    "train": "train a model from an experiments/configs recipe (resumes from the workdir)",
    "eval": "evaluate a training run's checkpoint on the full eval split",
    "data": "list, import (offline IDX files) or prepare (TFDS download) datasets",
    "bench": "time a training step: compile, step time, images/s, MFU (optionally vs PyTorch)",
    "analyze": "exact gradient-propagation study: plain vs residual twins at initialization",
    "experiment": "paper experiments over training + analysis (degradation: He et al. 2015 Fig. 1/6/7)",
}

# The optional-dependency extra (pyproject.toml) that installs each importable package a command
# may miss in a core-only install. A package shared by several extras maps to None: the command's
# own extra (COMMAND_EXTRAS) is named then.
PACKAGE_EXTRAS = {
    "optax": "train", "tensorflow_datasets": "train", "grain": "train", "ml_collections": "train",
    "tensorboardX": "train", "PIL": "train",
    "matplotlib": "analysis", "scipy": "analysis",
    "orbax": None, "tqdm": None,
    "huggingface_hub": "hub",
    "torch": "torch", "torchvision": "torch",
    "tensorflow": "prepare",
}
COMMAND_EXTRAS = {"train": "train", "eval": "train", "data": "train", "bench": "train",
                  "analyze": "analysis", "experiment": "train,analysis"}


def missing_extra_message(command: str, err: ModuleNotFoundError) -> str | None:
    """The one line to print when `command` failed because an optional dependency is not
    installed, naming the extra that installs it; None when `err` is not about one (a bug
    then, whose traceback should show)."""
    package = (err.name or "").split(".")[0]
    if package not in PACKAGE_EXTRAS:
        return None
    extra = PACKAGE_EXTRAS[package] or COMMAND_EXTRAS.get(command, "all")
    return (f"jaxres {command}: error: this command needs {package}, which is not installed; "
            f"install it with: pip install 'jaxres[{extra}]'")


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first argument that is not an option), if any."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `jaxres` parser with `command`'s full subparser; the other subcommands appear only
    by name and help, their modules unimported (`command=None` imports none)."""
    parser = argparse.ArgumentParser(
        prog="jaxres",
        description="VGG/ResNet model zoo, training and exact gradient-propagation analysis in JAX/Flax.",
    )
    parser.add_argument("--version", action="version", version=f"jaxres {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_line in COMMANDS.items():
        if name == command:
            importlib.import_module(f"jaxres.cli.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=help_line)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    try:
        args = build_parser(command).parse_args(argv)
        return args.func(args) or 0
    except ModuleNotFoundError as err:
        message = missing_extra_message(command or "", err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as err:
        # Library errors are written for people, and an OS error (disk full, permissions) names
        # its file: show the message, not a traceback.
        print(f"jaxres {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
