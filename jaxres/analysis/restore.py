"""Trained variables for the analysis: restore a checkpoint and check it fits the model.

PATH is either
- a `jaxres train` workdir, its `checkpoints/` or `best/` directory, or one step directory in
  them (read through `jaxres.workdir`, which owns that format; the latest step is used); or
- one saved pytree (an orbax `StandardCheckpointer`/`PyTreeCheckpointer` directory with a
  `_METADATA` file) whose top level holds `params` and, for BatchNorm models, `batch_stats`
  (other keys such as `opt_state` or `step` are ignored); or
- another orbax `CheckpointManager` directory: the highest numeric step subdirectory is used,
  and inside it the item `default/`, else the only item holding a pytree; or
- a jaxres weights file (`.safetensors`, `jaxres.weights.io`), e.g. the trained nets exported
  under experiments/results/twins/weights/: its variables, and the training config it records
  (`config` metadata) as the stored config.
"""

from __future__ import annotations

from pathlib import Path

import jax

from jaxres.models import unstack_identical_units
from jaxres.weights.io import SUFFIX as WEIGHTS_SUFFIX
from jaxres.weights.io import read_weights, read_weights_info
from jaxres.trees import differences, leaf_table, listed
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


def is_weights_file(path) -> bool:
    """True for a path that names a jaxres weights file (by its suffix; read to check)."""
    return str(path).endswith(WEIGHTS_SUFFIX)


def stored_config(path) -> dict:
    """The training config stored in a `jaxres train` checkpoint, or recorded in a weights file
    (PATH as for `restore_variables`); {} for any other checkpoint, or a weights file without
    one (then `{"model": its registry name}`)."""
    if is_weights_file(path):
        info = read_weights_info(path)
        return dict(info.config) if info.config else {"model": info.model}
    if not is_workdir_layout(path):
        return {}
    workdir, kind, step = find_checkpoint(path)
    with workdir:
        return _readable(path, lambda: workdir.stored_json(step, "config", kind), (workdir, kind, step))


def study_settings(path) -> dict:
    """The study settings that rebuild a trained net as it was trained (`StudyConfig` fields:
    `models` its registry name, `norm`, `activation`, `in_channels`), from the training config
    stored at PATH (as for `restore_variables`); {} when PATH stores none, or names a model
    outside the registry (`ResNet` / `VGG` built from overrides alone). The values are the built
    model's own: its registry defaults with the run's `model_overrides` applied, and the
    dataset's channels where the run did not set `in_channels` (as `jaxres train` builds it)."""
    from jaxres.data import dataset_spec
    from jaxres.models import create_model, model_names

    stored = stored_config(path)
    if not stored or stored.get("model") not in model_names():
        return {}
    overrides = {k: v for k, v in (stored.get("model_overrides") or {}).items()
                 if k in ("norm", "activation", "in_channels")}
    if "dataset" in stored:
        overrides.setdefault("in_channels", dataset_spec(stored["dataset"]).channels)
    model = create_model(stored["model"], **overrides)
    return {"models": stored["model"], "norm": model.norm, "activation": model.activation,
            "in_channels": model.in_channels}


def restore_variables(path) -> dict:
    """`{"params": ..., "batch_stats": ...}` (batch_stats only if saved) from a checkpoint."""
    if is_weights_file(path):
        variables, _ = read_weights(path)
        return {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    if is_workdir_layout(path):
        workdir, kind, step = find_checkpoint(path)
        with workdir:
            return _readable(path, lambda: workdir.restore_variables(step, kind), (workdir, kind, step))
    import orbax.checkpoint as ocp

    directory = find_pytree_dir(path).resolve()
    tree = _readable(path, lambda: ocp.StandardCheckpointer().restore(directory), directory)
    if not isinstance(tree, dict) or "params" not in tree:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"checkpoint {str(path)!r} has no top-level 'params' (found {keys}); "
                         f"save a dict with 'params' and 'batch_stats'")
    return {k: tree[k] for k in ("params", "batch_stats") if k in tree}


def _readable(path, read, where):
    """`read()`, with any failure to read the files turned into one message that names `path`,
    the empty files in it (what a write cut short leaves: orbax writes none) and what to do.
    `where`: the pytree's directory, or `(workdir, kind, step)` of a `jaxres train` checkpoint."""
    try:
        return read()
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many types for damaged files
        reason = describe_error(err)
    if isinstance(where, tuple):
        workdir, kind, step = where
        directory = workdir.directory(kind) / str(step)
        earlier = [s for s in workdir.steps(kind) if s < step]
        what = f"checkpoint {step} in {workdir.directory(kind)}"
        fix = ((f"pass an earlier checkpoint ({workdir.directory(kind) / str(earlier[-1])}), or " if earlier else "")
               + f"rerun `jaxres train --workdir {workdir.path}`, which sets it aside and resumes from the one before")
    else:
        directory, what = Path(where), f"checkpoint {str(path)!r}"
        fix = "its files are damaged or it is not an orbax checkpoint: save it again"
    empty = sorted(str(f) for f in directory.rglob("*") if f.is_file() and f.stat().st_size == 0)
    found = f"; empty file{'s' if len(empty) > 1 else ''}: {', '.join(empty)}" if empty else ""
    raise ValueError(f"{what} cannot be read ({reason}){found}; {fix}") from None


def check_variables(model, variables, x, name: str = "model") -> dict:
    """Compares `variables` with the model's own tree at input `x`; a ValueError lists every
    missing, unexpected or mis-shaped entry at once."""
    # training with scan_units saves identical consecutive blocks stacked; the analysis reads units.
    variables = unstack_identical_units(model, variables)
    expected = jax.eval_shape(model.init, jax.random.key(0), x)
    # shapes only: a float32 checkpoint is measured by a bfloat16 model and the reverse
    shapes = lambda tree: {k: (shape, "") for k, (shape, _) in leaf_table(dict(tree)).items()}  # noqa: E731
    problems = differences(shapes(variables), shapes(expected))
    if problems:
        raise ValueError(f"checkpoint does not match {name}: {listed(problems, 8)}. Pass the model the checkpoint "
                         f"was trained as (--models NAME, same --norm)")
    return jax.tree.map(jax.numpy.asarray, dict(variables))
