"""Training recipes: one module per family, each with `get_config(ARG)` returning the run's
`ml_collections.ConfigDict` (every field of `base.base_config()`, some overridden). Each
module's docstring says what it reproduces, how to run it, how long it takes and what to expect.

    jaxres train --config cifar10:resnet56 --workdir runs/c10_r56       # a recipe: NAME[:ARG]
    jaxres train --config path/to/mine.py:ARG --workdir runs/mine      # a file of your own

`jaxres.train.load_config` reads both. The recipes are modules of the installed package, so a
name works from any directory; `recipe_names()` lists them.
"""

from __future__ import annotations

import importlib
import pkgutil

from jaxres.choices import closest_names


def recipe_names() -> tuple[str, ...]:
    """The recipes by name: every module of this package but `base` (the defaults they start from)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"))


def recipe(name: str):
    """The recipe module `name`, or a ValueError that lists the recipes."""
    names = recipe_names()
    if name not in names:
        raise ValueError(f"no recipe {name!r}{closest_names(name, names)} (recipes: {', '.join(names)}); a config "
                         f"file of your own is named by its path: path/to/file.py[:ARG]")
    return importlib.import_module(f"{__name__}.{name}")
