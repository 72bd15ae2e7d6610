"""Run configurations: the `ml_collections.ConfigDict` that `get_config(ARG)` returns, of a
recipe of `jaxres.configs` (`NAME[:ARG]`, e.g. `cifar10:resnet56`) or of a config file of the
user's own (`PATH.py[:ARG]`), overridden from the command line with `--config.FIELD=VALUE` (as
absl's config_flags, without absl). Every field and its default: `jaxres.configs.base`."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from pathlib import Path

import ml_collections

from jaxres import configs
from jaxres.choices import closest_names
# Read here by check_resumable and by config files of users' own, as before it moved to the recipes.
from jaxres.configs.base import base_config  # noqa: F401


def names_a_file(source: str) -> bool:
    """Whether the part before ":" of a `--config` is a file's path (a `.py` name, or a path with
    a directory) rather than a recipe's name."""
    return source.endswith(".py") or "/" in source or os.sep in source


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config(ARG)` (or `get_config()`) of `NAME[:ARG]`, a recipe of `jaxres.configs`
    (`cifar10:resnet56`), or of `PATH[:ARG]`, a config file (`path/to/mine.py:small`)."""
    source, _, arg = str(spec).partition(":")
    module = None
    if names_a_file(source):
        file = Path(source)
        if not file.is_file():
            hint = (f"; the recipes of jaxres are named without a path: --config {file.stem}{':' if arg else ''}{arg}"
                    if file.stem in configs.recipe_names() else f" (recipes: {', '.join(configs.recipe_names())})")
            raise FileNotFoundError(f"config file {source!r} does not exist{hint}")
    else:
        module = configs.recipe(source)  # a ValueError listing the recipes
        file = Path(module.__file__)
    try:
        if module is None:
            module_spec = importlib.util.spec_from_file_location(f"jaxres_config_{file.stem}", file)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        config = None if get_config is None else get_config(arg) if arg else get_config()
    except Exception as err:
        # A mistake in the config file: name its line, not a traceback through importlib.
        import traceback

        if isinstance(err, SyntaxError):
            lines = [err.lineno] if err.filename and Path(err.filename).resolve() == file.resolve() else []
        else:
            lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__)
                     if Path(frame.filename).resolve() == file.resolve()]
        if not lines:
            raise
        reason = f"{err.msg}: {(err.text or '').strip()}" if isinstance(err, SyntaxError) else str(err)
        where = source if names_a_file(source) else file
        raise ValueError(f"config file {where}, line {lines[-1]}: {type(err).__name__}: {reason}") from err
    if get_config is None:
        raise ValueError(f"config file {source} defines no get_config()")
    return config


def parse_value(text: str):
    """A Python literal when the text is one (3, 0.1, True, (1, 2), {"a": 1}), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=VALUE` (or `--config.a.b VALUE`) items to `config` in place."""
    items = list(overrides)
    while items:
        item = items.pop(0)
        if not item.startswith("--config."):
            raise ValueError(f"unexpected argument {item!r}; overrides look like --config.num_steps=1000")
        key, eq, value = item[len("--config."):].partition("=")
        if not eq:
            if not items:
                raise ValueError(f"{item} needs a value: {item}=VALUE")
            value = items.pop(0)
        set_field(config, key, parse_value(value))
    return config


# Sub-dicts whose keys are free (model fields, schedule boundaries): new keys are allowed.
FREE_FORM = {("model_overrides",), ("lr_boundaries",)}


# The type a field's current value asks of a new one: (current type, accepted types, in words);
# bool before int, which it subclasses.
FIELD_TYPES = ((bool, (bool,), "True or False"), (int, (int,), "an integer"), (float, (int, float), "a number"),
               (tuple, (tuple, list), "a tuple"))


def check_field_type(dotted: str, current, value) -> None:
    """Refuses a value of another type than the field's current one, naming both."""
    for kind, accepted, words in FIELD_TYPES:
        if isinstance(current, kind):
            if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
                raise TypeError(f"--config.{dotted} must be {words} (it is {current!r} now); got {value!r}")
            return


def set_field(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for depth, name in enumerate(parents):
        group = ".".join(parents[:depth + 1])
        if name not in node:  # node is a ConfigDict: checked below for the next name
            raise ValueError(f"config has no field {group!r}{closest_names(name, node.keys())}")
        node = node[name]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ValueError(f"--config.{dotted}: {group} is a value ({node!r}), not a group of fields; "
                             f"set it with --config.{group}=VALUE")
    if leaf not in node and tuple(parents) not in FREE_FORM:
        raise ValueError(f"config has no field {dotted!r}{closest_names(leaf, node.keys())}")
    current = node.get(leaf)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, str) and not isinstance(value, str):
        value = str(value)
    check_field_type(dotted, current, value)
    if isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
    try:
        node[leaf] = value
    except TypeError as err:
        raise TypeError(f"--config.{dotted}: {err}") from None
    if dotted.split(".")[0] == "lr_boundaries":
        schedule_boundaries(config)  # refused now, not after the workdir is made


def schedule_boundaries(config: ml_collections.ConfigDict) -> dict[int, float]:
    """`config.lr_boundaries` as {iteration: factor}: its keys are iteration numbers written as
    names ("32000"), its values the factors the learning rate is multiplied by there."""
    boundaries = {}
    for key, factor in config.lr_boundaries.items():
        if not str(key).isdigit():
            raise ValueError(f"lr_boundaries keys must be iteration numbers, e.g. --config.lr_boundaries.32000=0.1 "
                             f"(in a config file: {{'32000': 0.1}}); got {key!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ValueError(f"lr_boundaries.{key} must be a number, the factor of the learning rate from iteration "
                             f"{key} on (e.g. 0.1); got {factor!r}")
        boundaries[int(key)] = float(factor)
    return boundaries


def to_json(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe dict of the config (stored in every checkpoint)."""
    return json.loads(config.to_json())


def from_json(data: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(data)
