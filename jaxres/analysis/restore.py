"""Trained variables for the analysis: restore an orbax checkpoint and check it fits the model.

Expected layout (what the training stack saves with orbax): PATH is either
- one saved pytree (a `StandardCheckpointer`/`PyTreeCheckpointer` directory) whose top
  level holds `params` and, for BatchNorm models, `batch_stats` (other keys such as
  `opt_state` or `step` are ignored); or
- a `CheckpointManager` directory: the highest numeric step subdirectory is used, and inside
  it the item `state/` (what `jaxres train` saves: step, params, batch_stats, opt_state, rng),
  else `default/`, else the only item holding a pytree;
- a `jaxres train` workdir: its `checkpoints/` directory as above (`best/` can be passed
  explicitly).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxres.models import unstack_identical_units


def find_pytree_dir(path) -> Path:
    """The directory holding one saved pytree, following the layout in the module docstring."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    if (path / "_METADATA").exists():
        return path
    steps = _steps(path)
    if steps:
        return find_pytree_dir(max(steps, key=lambda p: int(p.name)))
    items = [p for p in path.iterdir() if p.is_dir() and (p / "_METADATA").exists()]
    preferred = [p for name in ("state", "default") for p in items if p.name == name]
    if preferred or len(items) == 1:
        return (preferred or items)[0]
    if (path / "checkpoints").is_dir():  # a `jaxres train` workdir: its latest checkpoint
        return find_pytree_dir(path / "checkpoints")
    raise ValueError(
        f"no orbax pytree found in {str(path)!r}: expected a directory saved by orbax "
        f"StandardCheckpointer (with a _METADATA file), a step directory with one item, or a "
        f"CheckpointManager directory with numeric step subdirectories"
    )


def _steps(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]


def restore_variables(path) -> dict:
    """`{"params": ..., "batch_stats": ...}` (batch_stats only if saved) from an orbax checkpoint."""
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(find_pytree_dir(path).resolve())
    if not isinstance(tree, dict) or "params" not in tree:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"checkpoint {str(path)!r} has no top-level 'params' (found {keys}); "
                         f"save a dict with 'params' and 'batch_stats'")
    return {k: tree[k] for k in ("params", "batch_stats") if k in tree}


def check_variables(model, variables, x, name: str = "model") -> dict:
    """Compares `variables` with the model's own tree at input `x`; a ValueError lists every
    missing, unexpected or mis-shaped entry at once."""
    # scan_units training runs save runs of identical blocks stacked; the analysis reads units.
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
