"""Trees of arrays compared leaf by leaf: path, shape and dtype.

One comparison serves every place that checks arrays against what a model or a run expects
before using them: a checkpoint against the run resuming it (`jaxres.workdir`), a weights file
against a model (`jaxres.weights.io`), restored variables against the model the analysis
rebuilds (`jaxres.analysis.restore`). Every difference is listed at once, in words.
"""

from __future__ import annotations

import jax
import numpy as np


def path_name(path) -> str:
    """`opt_state/1/0/trace/stem/conv1/kernel`: a tree path by its names alone, so that a
    NamedTuple field (a live optimizer state) and the dict key orbax stores for it agree."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    return "/".join(name(k) for k in path)


def leaf_table(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype name)} of a tree of arrays, ShapeDtypeStructs or orbax ArrayMetadata
    (a flat {"a/b": array} dict is a tree whose paths are its keys)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_name(p): (tuple(np.shape(v)), np.dtype(v.dtype).name) for p, v in leaves}


def differences(have: dict, want: dict, *, needs: str = "the model needs") -> list[str]:
    """What differs between two `leaf_table`s, one phrase per leaf: "missing P", "unexpected P",
    "P has shape A, <needs> B", "P has dtype A, <needs> B"."""
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    for k in sorted(set(have) & set(want)):
        (shape, dtype), (wanted_shape, wanted_dtype) = have[k], want[k]
        if shape != wanted_shape:
            problems.append(f"{k} has shape {shape}, {needs} {wanted_shape}")
        elif dtype != wanted_dtype:
            problems.append(f"{k} has dtype {dtype}, {needs} {wanted_dtype}")
    return problems


def listed(problems: list[str], limit: int, separator: str = "; ") -> str:
    """The first `limit` problems joined, and how many there are in all when some are left out."""
    shown = separator.join(problems[:limit])
    return shown + (f"{separator}... ({len(problems)} in all)" if len(problems) > limit else "")
