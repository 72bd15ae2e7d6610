"""Trained variables for the analysis: restore a checkpoint and check it fits the model.

PATH is either
- a `jaxres train` workdir, its `checkpoints/` or `best/` directory, or one step directory in
  them (read through `jaxres.workdir`, which owns that format; the latest step is used); or
- one saved pytree (an orbax `StandardCheckpointer`/`PyTreeCheckpointer` directory with a
  `_METADATA` file) whose top level holds `params` and, for BatchNorm models, `batch_stats`
  (other keys such as `opt_state` or `step` are ignored); or
- another orbax `CheckpointManager` directory: the highest numeric step subdirectory is used,
  and inside it the item `default/`, else the only item holding a pytree.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxres.models import unstack_identical_units
from jaxres.workdir import describe_error, find_checkpoint, is_workdir_layout


def find_pytree_dir(path) -> Path:
    """The directory holding one saved pytree (a plain orbax checkpoint, not a workdir)."""
    path = Path(path)
    if path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} is a file; pass the checkpoint's directory (an orbax "
                         f"checkpoint or a `jaxres train` workdir)")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if (path / "_METADATA").exists():
        return path
    steps = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
    if steps:
        return find_pytree_dir(max(steps, key=lambda p: int(p.name)))
    items = [p for p in path.iterdir() if p.is_dir() and (p / "_METADATA").exists()]
    preferred = [p for p in items if p.name == "default"]
    if preferred or len(items) == 1:
        return (preferred or items)[0]
    raise ValueError(
        f"no orbax pytree found in {str(path)!r}: expected a `jaxres train` workdir, a directory saved by "
        f"orbax StandardCheckpointer (with a _METADATA file), a step directory with one item, or a "
        f"CheckpointManager directory with numeric step subdirectories"
    )


def restore_variables(path) -> dict:
    """`{"params": ..., "batch_stats": ...}` (batch_stats only if saved) from a checkpoint."""
    if is_workdir_layout(path):
        workdir, kind, step = find_checkpoint(path)
        with workdir:
            return _readable(path, lambda: workdir.restore_variables(step, kind))
    import orbax.checkpoint as ocp

    directory = find_pytree_dir(path).resolve()
    tree = _readable(path, lambda: ocp.StandardCheckpointer().restore(directory))
    if not isinstance(tree, dict) or "params" not in tree:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"checkpoint {str(path)!r} has no top-level 'params' (found {keys}); "
                         f"save a dict with 'params' and 'batch_stats'")
    return {k: tree[k] for k in ("params", "batch_stats") if k in tree}


def _readable(path, read):
    """`read()`, with any failure to read the files turned into one message that names `path`."""
    try:
        return read()
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({describe_error(err)}): its files "
                         f"are damaged or it is not an orbax checkpoint") from None


def check_variables(model, variables, x, name: str = "model") -> dict:
    """Compares `variables` with the model's own tree at input `x`; a ValueError lists every
    missing, unexpected or mis-shaped entry at once."""
    # training with scan_units saves identical consecutive blocks stacked; the analysis reads units.
    variables = unstack_identical_units(model, variables)
    expected = jax.eval_shape(model.init, jax.random.key(0), x)
    want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(dict(expected))[0]}
    got = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(dict(variables))[0]}
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: checkpoint {got[k]} vs model {want[k]}" for k in sorted(set(want) & set(got))
                 if want[k] != got[k]]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(f"checkpoint does not match {name}: {shown}. Pass the model the checkpoint was "
                         f"trained as (--models NAME, same --norm)")
    return jax.tree.map(jax.numpy.asarray, dict(variables))
