"""The `jaxres` command: a thin layer over library functions users can also call.

Each subcommand lives in its own module here, exposing `register(subparsers)`, which adds
its parser and sets `run` as the parser's default `func(args) -> int`. Only the chosen
subcommand's module is imported: the others (and JAX, which takes seconds to import) stay
unloaded, so `jaxres --help` and `jaxres --version` answer at once.

`main` is the one error boundary of every subcommand (`reported_error` holds the rule). An
error written for people ends in one line, `jaxres COMMAND: error: MESSAGE`, and an exit status:

- 2, the input is refused: ValueError, TypeError and OSError (an OS error names its file), their
  jaxres subclasses (CheckpointMismatchError, CheckpointWriteError, ConversionError,
  WeightsUnavailableError), an ImportError that jaxres raised with its own message, and a
  missing optional dependency (named with the extra that installs it);
- 1, a run failed as the library foresaw: any other exception class that jaxres defines
  (WorkdirBusyError, NonFiniteLossError), whose message says what to do;
- 130, interrupted (Ctrl-C): the subcommand's `on_interrupt` default says what rerunning does.

Anything else (KeyError, IndexError, AttributeError, ZeroDivisionError, a RuntimeError from a
dependency, ...) is a bug: bad input should have been refused with one of the errors above, so
its traceback shows. Subcommands catch only what is theirs alone.
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
    "train": "train a model from a recipe (resumes from the workdir)",
    "eval": "evaluate a training run's checkpoint on the full eval split",
    "data": "list, import (offline IDX files) or prepare (TFDS download) datasets",
    "bench": "benchmarks: a training step (images/s, MFU, vs PyTorch) and the suites conv, compile, analysis, monitor",
    "analyze": "exact gradient-propagation study: plain vs residual twins at initialization",
    "experiment": "experiments: degradation (He et al. 2015 Fig. 1/6/7, with interventions), theory (mean field vs "
                  "measurement), twins (analyses of trained nets)",
    "inspect": "analyses of a trained net: lesions, loss landscape, sharpness, Jacobian spectra, gradient paths",
}

# The optional-dependency extra (pyproject.toml) that installs each importable package a command
# may miss in a core-only install. A package shared by several extras maps to None: the command's
# own extra (COMMAND_EXTRAS) is named then.
PACKAGE_EXTRAS = {
    "optax": "train", "tensorflow_datasets": "train", "grain": "train", "ml_collections": "train",
    "tensorboardX": "train", "PIL": "train",
    "matplotlib": "analysis", "scipy": "analysis", "matfree": "analysis",
    "orbax": None, "tqdm": None,
    "huggingface_hub": "hub",
    "torch": "torch", "torchvision": "torch",
    "tensorflow": "prepare",
}
COMMAND_EXTRAS = {"train": "train", "eval": "train", "data": "train", "bench": "train",
                  "analyze": "analysis", "experiment": "train,analysis", "inspect": "train,analysis"}


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


def reported_error(command: str, err: BaseException) -> tuple[str, int] | None:
    """(the one line to print, the exit status) for an error written for people; None for a
    bug, whose traceback should show (the rule is in the module docstring)."""
    if isinstance(err, ImportError):
        if err.name is None:  # raised by jaxres with its own message (the import system names the module)
            return f"jaxres {command}: error: {err}", 2
        message = missing_extra_message(command, err) if isinstance(err, ModuleNotFoundError) else None
        return (message, 2) if message else None
    if isinstance(err, (ValueError, TypeError, OSError)):
        return f"jaxres {command}: error: {err}", 2
    if type(err).__module__.split(".")[0] == "jaxres":
        return f"jaxres {command}: error: {err}", 1
    return None


# What a subcommand that sets no `on_interrupt` default tells a user who pressed Ctrl-C.
ON_INTERRUPT = "rerun the same command to start again"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(argv)
    args = None
    try:
        args = build_parser(command).parse_args(argv)
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"jaxres {command}: interrupted; {getattr(args, 'on_interrupt', ON_INTERRUPT)}", file=sys.stderr)
        return 130
    except Exception as err:
        reported = reported_error(command or "", err)
        if reported is None:
            raise
        print(reported[0], file=sys.stderr)
        return reported[1]


if __name__ == "__main__":
    sys.exit(main())
