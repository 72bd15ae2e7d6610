"""The checkpoints of a training run's directory (layout: `jaxres.workdir`): orbax managers
per kind, and saving, reading, refusing and quarantining checkpoints.

`CheckpointStore(path, keep)` is the half of `jaxres.workdir.Workdir` that talks to orbax
(`jaxres.orbax_manager` holds orbax's side); `Workdir` adds the lock, the config and the
records. The rule for a checkpoint that does not fit: one whose config or array shapes differ
from what the caller expects is *refused* (CheckpointMismatchError, nothing moved); only one
whose files cannot be read is *quarantined* into `<kind>.corrupt/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import shutil
import time
from pathlib import Path
from typing import Callable

import jax

from jaxres.files import FileWriteError
from jaxres.orbax_errors import OS_REASONS, describe_error, failure_reason, os_error_in, thread_errors_held
from jaxres.orbax_manager import checkpoint_manager, restore_target
from jaxres.trees import differences, leaf_table, listed

KINDS = ("checkpoints", "best")


class CheckpointWriteError(FileWriteError):
    """A checkpoint could not be written (disk full, read-only file system, ...); the earlier
    checkpoints are intact. `str()` is the message alone."""


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another run (its config or array shapes differ); nothing was moved."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One restored checkpoint."""

    step: int
    state: dict  # the arrays: step, params, batch_stats, opt_state, rng (+ loss_scale)
    data: dict  # the training iterator's state
    config: dict  # the run's config (JSON)
    meta: dict  # step, time, eval metrics if any


class CheckpointStore:
    """The checkpoints under `path` (checkpoints/, and an older workdir's best/): `keep` of the
    latest are kept, and the best evaluated one besides them. Opens orbax managers on first use;
    `close` drops them."""

    def __init__(self, path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.path = Path(path).absolute()
        self.keep = keep
        self._managers: dict[str, object] = {}

    def directory(self, kind: str = "checkpoints") -> Path:
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
        return self.path / kind

    def _manager(self, kind: str):
        if kind not in self._managers:
            self._managers[kind] = checkpoint_manager(self.directory(kind), keep=self.keep, read_only=kind == "best")
        return self._managers[kind]

    def steps(self, kind: str = "checkpoints") -> list[int]:
        """The complete checkpoints' steps, ascending ([] when there are none)."""
        directory = self.directory(kind)
        if not directory.is_dir():
            return []
        return sorted(self._manager(kind).all_steps())

    def latest_step(self, kind: str = "checkpoints") -> int | None:
        steps = self.steps(kind)
        return steps[-1] if steps else None

    def best(self) -> tuple[str, int] | None:
        """(kind, step) of the checkpoint with the highest eval accuracy (the latest of equals),
        or None when no checkpoint was evaluated; an older workdir's `best/` directory is read
        when checkpoints/ holds no evaluated one."""
        if self.directory().is_dir():
            step = self._manager("checkpoints").best_step()
            if step is not None:
                return "checkpoints", int(step)
        legacy = self.latest_step("best")
        return ("best", legacy) if legacy is not None else None

    def best_eval(self, report=print) -> dict | None:
        """The eval metrics of the best checkpoint, with its `step`, or None; a best checkpoint of
        an older workdir whose meta cannot be read is reported and skipped, never moved."""
        found = self.best()
        if found is None:
            return None
        kind, step = found
        if kind == "checkpoints":
            metrics = self._manager(kind).metrics(step)
        else:
            try:
                metrics = self.stored_json(step, "meta", kind).get("eval")
            except Exception as err:  # noqa: BLE001 - its files cannot be read
                report(f"best checkpoint {step} in {self.directory(kind)} is unreadable ({describe_error(err)}); "
                       f"the best eval accuracy starts again from this run's evaluations")
                return None
        return dict(metrics, step=step) if metrics else None

    def reached_preemption(self, step: int) -> bool:
        """Whether every host of a multi-process job has reached the step at which to save after
        a preemption notice (SIGTERM); JAX's preemption service, started by
        `jax.distributed.initialize`, agrees on it. Call it after every step, on every host."""
        return self._manager("checkpoints").reached_preemption(int(step))

    def _path_of(self, kind: str, step: int) -> Path:
        return self.directory(kind) / str(step)

    def stored_json(self, step: int, item: str = "config", kind: str = "checkpoints") -> dict:
        """One small JSON item of checkpoint `step` ("config", "meta" or "data"), read alone."""
        import orbax.checkpoint as ocp

        return self._manager(kind).restore(int(step), args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def stored_shapes(self, step: int, kind: str = "checkpoints") -> dict:
        """{path: (shape, dtype)} of the arrays in checkpoint `step`, from orbax's metadata alone."""
        metadata = self._manager(kind).item_metadata(int(step))["state"]
        return leaf_table(getattr(metadata, "tree", metadata))

    def restore(self, step: int, target, kind: str = "checkpoints") -> Checkpoint:
        """Checkpoint `step`; `target` is a tree (arrays or ShapeDtypeStructs) with the
        structure, shapes and dtypes it must have. A differing tree raises
        CheckpointMismatchError before any array is read."""
        import orbax.checkpoint as ocp

        problems = differences(self.stored_shapes(step, kind), leaf_table(target), needs="this run needs")
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {step} in {self.directory(kind)} holds other arrays than this run expects "
                f"({listed(problems, 6)}); it was written by another model or version of the code")
        abstract = jax.tree.map(restore_target, target)
        out = self._manager(kind).restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return Checkpoint(int(step), out["state"], out["data"], out["config"], out["meta"])

    def restore_variables(self, step: int, kind: str = "checkpoints") -> dict:
        """`{"params", "batch_stats"}` of checkpoint `step` as saved, for readers that have no
        training state to shape a target (the analysis); the caller checks them against its model."""
        import orbax.checkpoint as ocp

        state = self._manager(kind).restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        return {k: v for k, v in state["state"].items() if k in ("params", "batch_stats") and v}

    def restore_latest_good(self, target, *, check_config: Callable[[dict], None] = lambda saved: None,
                            kind: str = "checkpoints", report=print) -> Checkpoint | None:
        """The newest checkpoint that fits and reads back, or None when there is none.

        For each checkpoint, newest first: its config goes to `check_config` (which raises to
        refuse it: nothing is moved) and its array shapes are compared with `target` (refused the
        same way); then it is read. A checkpoint whose files cannot be read is reported, moved to
        `<kind>.corrupt/` (so a later save cannot collide with it) and the previous one is tried."""
        for step in reversed(self.steps(kind)):
            try:
                saved_config = self.stored_json(step, "config", kind)
            except Exception as err:  # noqa: BLE001 - the files of this checkpoint cannot be read
                self.quarantine(kind, step, err, report)
                continue
            check_config(saved_config)
            try:
                return self.restore(step, target, kind)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - it fits, yet cannot be read: damaged
                self.quarantine(kind, step, err, report)
        return None

    def quarantine(self, kind: str, step: int, err: BaseException, report) -> None:
        target = self.path / f"{kind}.corrupt" / f"{step}-{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self._path_of(kind, step)), str(target))
        self._manager(kind).reload()
        report(f"checkpoint {step} in {self.directory(kind)} is unreadable ({describe_error(err)}); moved it to "
               f"{target} and trying the previous one")

    def save(self, step: int, tree: dict, data_state: dict, config: dict, eval_metrics: dict | None = None) -> None:
        """Writes one complete checkpoint at `step` (synchronously); `eval_metrics` (with an
        `accuracy`) makes it a candidate for the best checkpoint. A failed write (disk full,
        read-only, ...) raises CheckpointWriteError naming the checkpoints that are intact."""
        import orbax.checkpoint as ocp

        kind = "checkpoints"
        meta = {"step": int(step), "time": time.time(), **({"eval": eval_metrics} if eval_metrics else {})}
        with thread_errors_held():
            try:
                self.directory(kind).mkdir(parents=True, exist_ok=True)
                manager = self._manager(kind)
                manager.save(int(step), args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree), data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(config), meta=ocp.args.JsonSave(meta)),
                    metrics=dict(eval_metrics) if eval_metrics else None, force=True)
                manager.wait_until_finished()
            except Exception as err:  # noqa: BLE001 - orbax wraps OS errors in several types
                self._drop_manager(kind)
                intact = [s for s in self.steps(kind) if s != step]
                reason = failure_reason(err)
                raise CheckpointWriteError(
                    getattr(os_error_in(err), "errno", None) or OS_REASONS.get(reason, errno.EIO),
                    f"could not write checkpoint {step} to {self.directory(kind)} ({reason}). Earlier "
                    f"checkpoints are intact ({f'latest: {intact[-1]}' if intact else 'none saved yet'}); fix "
                    f"the cause (free disk space, permissions) and rerun the same command to resume") from err

    def _drop_manager(self, kind: str) -> None:
        manager = self._managers.pop(kind, None)
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()

    def close(self) -> None:
        for kind in list(self._managers):
            self._drop_manager(kind)
