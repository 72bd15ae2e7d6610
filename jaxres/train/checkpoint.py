"""Checkpoints with orbax-checkpoint: the last K by step, and the best by eval accuracy.

A checkpoint `<dir>/<step>/` holds four items:
- `state`: step, params, batch_stats, opt_state, rng (arrays, exact dtypes);
- `data`: the grain training iterator's state (JSON);
- `config`: the run's config (JSON);
- `meta`: step, eval metrics if any, wall time (JSON).
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
run killed mid-save leaves no half checkpoint in the step list; a checkpoint that is in the
list but cannot be read (a truncated file) is reported, moved aside into `<dir>.corrupt/`
(never deleted) and the previous one is used.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpoints:
    """An orbax CheckpointManager over `directory`, keeping the `keep` newest checkpoints."""

    def __init__(self, directory, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            # Synchronous: a save has finished (and is renamed into place) when save() returns,
            # so a checkpoint named in the log is on disk even if the process dies next.
            enable_async_checkpointing=False,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, tree: dict, data_state: dict, config: dict, meta: dict | None = None) -> None:
        """Saves one complete checkpoint at `step` (synchronously)."""
        meta = {"step": int(step), "time": time.time(), **(meta or {})}
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, target: dict) -> tuple[dict, dict, dict, dict]:
        """(state tree, data state, config, meta) of checkpoint `step`; `target` is a tree
        with the expected structure, shapes and dtypes (e.g. a freshly created state)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["data"], out["config"], out["meta"]

    def restore_latest_good(self, target: dict, report=print):
        """The newest checkpoint that reads back completely, as `(step, state, data, config,
        meta)`, or None when there is none. Unreadable ones are reported through `report`
        and moved to `<directory>.corrupt/<step>` so a later save cannot collide with them."""
        for step in reversed(self.steps()):
            try:
                return (step, *self.restore(step, target))
            except Exception as err:  # noqa: BLE001 - any read failure means "not usable"
                moved = self.quarantine(step)
                report(f"checkpoint {step} in {self.directory} is unreadable ({type(err).__name__}: "
                       f"{str(err).splitlines()[0][:200]}); moved it to {moved} and trying the previous one")
        return None

    def quarantine(self, step: int) -> Path:
        target = self.directory.parent / f"{self.directory.name}.corrupt" / f"{step}-{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.close()
