"""A training run's directory: the one module that knows its format.

    DIR/.lock                  held (flock) by the process that trains in DIR; holds its PID
    DIR/config.json            the latest invocation's config, for people (checkpoints hold their own)
    DIR/checkpoints/<step>/    orbax checkpoints, four items each:
                                 state   step, params, batch_stats, opt_state, rng (+ loss_scale): arrays
                                 data    the grain training iterator's state (JSON)
                                 config  the run's config (JSON)
                                 meta    step, time, eval metrics if any (JSON)
                               and, at evaluated steps, orbax's `metrics` item (the eval metrics).
                               One orbax manager keeps the latest `keep` and the best by eval
                               accuracy (its preservation policies LatestN + BestN).
    DIR/checkpoints.corrupt/   checkpoints that could not be read, moved aside (never deleted)
    DIR/best/<step>/           workdirs written before the best checkpoint moved into
                               checkpoints/ keep it here; read, never written
    DIR/metrics.jsonl          train/eval metrics (jaxres.train.metrics)
    DIR/analysis.jsonl         gradient propagation during training (jaxres.analysis.monitor),
                               one record per (step, BatchNorm policy)
    DIR/*.jsonl.torn-<time>    a JSON-lines file's torn last line, set aside before appending
    DIR/tensorboard/           the same scalars for TensorBoard, metrics and analysis in one run

Training, `jaxres eval` and the analysis all read a run through `Workdir`, and training writes
its records through the logs it hands out (`metrics_log`, `analysis_log`, `tensorboard`; it
closes them). Orbax's side of the checkpoints is `jaxres.orbax_manager`. The rule for a
checkpoint that does not fit: one whose config or array shapes differ from what the caller
expects is *refused* (an error, nothing moved); only one whose files cannot be read (I/O or
format errors) is *quarantined* into `checkpoints.corrupt/` so the previous one can be used.
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-save leaves no half checkpoint in the step list.

A run is *finished* (`Workdir.finished`) when its latest checkpoint is at its last step and that
step's records are on disk (`jaxres.records.RecordSchedule.wanted`): a run killed between its
final checkpoint and its records is not, and rerunning it makes them without training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable

import jax

from jaxres.files import FileWriteError, JsonlAppender, TensorBoardEvents, read_jsonl, write_failed, write_text_atomic
from jaxres.orbax_errors import OS_REASONS, describe_error, failure_reason, os_error_in, thread_errors_held
from jaxres.orbax_manager import checkpoint_manager, restore_target
from jaxres.trees import differences, leaf_table, listed
from jaxres.records import RecordSchedule

KINDS = ("checkpoints", "best")


class WorkdirBusyError(RuntimeError):
    """Another process is training in this workdir."""


class CheckpointWriteError(FileWriteError):
    """A checkpoint could not be written (disk full, read-only file system, ...); the earlier
    checkpoints are intact. `str()` is the message alone."""


class RecordWriteError(FileWriteError):
    """A record of a training run (a metrics or analysis line, TensorBoard events) could not be
    written mid-run; the message names the file, the step and the latest intact checkpoint."""


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


class Workdir:
    """The directory of one training run (see the module docstring for the layout).

    `Workdir(path)` only reads; `create=True` makes the directory (and checks it can be
    written) for a trainer. `keep` is how many of the latest checkpoints to keep; the best
    evaluated one is kept besides them.
    """

    def __init__(self, path, *, create: bool = False, keep: int = 3):
        self.path = Path(path).absolute()
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"workdir {str(path)!r} is a file, not a directory; choose another --workdir")
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.keep = keep
        if create:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                probe = self.path / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as err:
                raise OSError(err.errno, f"cannot write to workdir {str(path)!r} ({err.strerror}); "
                                         f"choose a writable --workdir") from None
        elif not self.path.is_dir():
            raise FileNotFoundError(f"workdir {str(path)!r} does not exist; train first with "
                                    f"`jaxres train --workdir {path}`")
        self._managers: dict[str, object] = {}
        self._handed_out: list = []  # the logs handed out, closed with the workdir
        self._tensorboard: TensorBoardEvents | None = None

    # -- paths ------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        """The run's config as JSON, rewritten at every start (the checkpoints hold their own copy)."""
        return self.path / "config.json"

    @property
    def analysis_path(self) -> Path:
        return self.path / "analysis.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def directory(self, kind: str = "checkpoints") -> Path:
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
        return self.path / kind

    # -- the lock ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """Holds an exclusive lock on the workdir for a trainer. The OS drops it when the process
        exits in any way (SIGKILL included), so no stale lock is ever left; a second trainer is
        refused with the holder's PID."""
        path = self.path / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise WorkdirBusyError(
                    f"{self.path} is in use by another training process (PID {holder}); wait for it to "
                    f"finish, stop it (SIGTERM saves a checkpoint), or choose another --workdir") from None
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            except OSError as err:
                raise write_failed(err, path, "the trainer's PID") from None
            yield self
        finally:
            os.close(fd)  # releases the lock

    # -- checkpoints ------------------------------------------------------------------------
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
        for log in self._handed_out:
            log.close()
        self._handed_out, self._tensorboard = [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the config of the latest invocation ------------------------------------------------
    def write_config(self, config_json: str) -> None:
        write_text_atomic(self.config_path, config_json)

    # -- records: the logs handed out to the loop and the monitor, and what they hold -----------
    def metrics_log(self, *, note: Callable[[dict, str], dict] | None = None, report=print) -> JsonlAppender:
        """metrics.jsonl, opened for appending: a torn last line is set aside and reported (and,
        through `note`, noted as a line of the file; `JsonlAppender`)."""
        return self._hand_out(JsonlAppender(self.metrics_path, report=report, note=note))

    def analysis_log(self, *, keep_through: int | None = None, report=print) -> tuple[JsonlAppender, list[dict]]:
        """analysis.jsonl, opened for appending (each line fsynced), and the records it keeps: one
        per (step, bn), the last written, none after step `keep_through` (a resumed run's restored
        step: later ones are a killed attempt's). The file is rewritten (atomically) to hold just
        them. An OSError here is a FileWriteError naming the file."""
        try:
            existed = self.analysis_path.exists()
            lines = self._hand_out(JsonlAppender(self.analysis_path, fsync=True, report=report))
            kept = [r for r in self.analysis_records() if keep_through is None or r["step"] <= keep_through]
            last = {(r["step"], r["bn"]): i for i, r in enumerate(kept)}
            kept = [r for i, r in enumerate(kept) if last[(r["step"], r["bn"])] == i]
            if existed:
                lines.rewrite(kept)
        except OSError as err:
            reason = os.strerror(err.errno) if err.errno else str(err)
            raise FileWriteError(err.errno, f"cannot rewrite or append to {self.analysis_path} ({reason}); pass a "
                                            f"writable workdir") from err
        return lines, kept

    def analysis_records(self) -> list[dict]:
        """The records of analysis.jsonl in file order (a torn line, or one without `step` and
        `bn`, is skipped)."""
        return [r for r in read_jsonl(self.analysis_path) if isinstance(r, dict) and {"step", "bn"} <= r.keys()]

    def tensorboard(self, *, purge_step: int | None = None) -> TensorBoardEvents:
        """The run's TensorBoard events under tensorboard/, one writer per Workdir, which the
        metrics and the gradient monitor share. The first call opens it with `purge_step` (a
        resumed run's first step: TensorBoard hides earlier files' events from there on)."""
        if self._tensorboard is None:
            self._tensorboard = self._hand_out(TensorBoardEvents(self.tensorboard_dir, purge_step=purge_step))
        return self._tensorboard

    def _hand_out(self, log):
        self._handed_out.append(log)
        return log

    def records_at(self, step: int) -> set[str]:
        """The records on disk at `step`: the metrics.jsonl splits with a line there ("train",
        "eval", "train_eval", ...) and "analysis:<bn>" per analysis.jsonl policy."""
        found = {r.get("split") for r in read_jsonl(self.metrics_path) if r.get("step") == step}
        found |= {f"analysis:{r['bn']}" for r in self.analysis_records() if r["step"] == step}
        return {name for name in found if isinstance(name, str) and name != "event"}

    def finished(self, config) -> bool:
        """Whether the run of `config` (a ConfigDict or its JSON dict) has finished: its latest
        checkpoint is at step >= `config.num_steps` and the records that step must have are on
        disk - its eval line(s) in metrics.jsonl and, when the gradient monitor is on, its
        analysis.jsonl records (`RecordSchedule.wanted`). A run killed between its final
        checkpoint and those records is not finished; `jaxres train` then makes them, untrained."""
        schedule = RecordSchedule.from_config(config)
        step = self.latest_step()
        return step is not None and step >= schedule.num_steps and schedule.wanted(step) <= self.records_at(step)

    def record_write_failed(self, err: OSError, step: int) -> RecordWriteError:
        """The error that ends a run whose record at `step` could not be written (`err` names the
        file): it names the latest intact checkpoint, from which a rerun remakes the records."""
        latest = self.latest_step()
        where = (f"latest: {latest} in {self.directory()}; the rerun resumes from it and writes the records after "
                 f"it again" if latest is not None else "none saved yet; the rerun starts again")
        return RecordWriteError(err.errno or errno.EIO,
                                f"{err} at step {step}; training stopped. Checkpoints are intact ({where}). Fix the "
                                f"cause (free disk space, permissions) and rerun the same command")


def find_checkpoint(path, step: int | str = "latest") -> tuple[Workdir, str, int]:
    """`(workdir, kind, step)` for a path to a workdir, its `checkpoints/` or `best/` directory,
    or one step directory in them; `step` is "latest", "best" or a number. `WORKDIR/best` names
    the best checkpoint, in checkpoints/ or an older workdir's best/ directory."""
    root, kind, named = _parts(Path(path).absolute())
    workdir = Workdir(root)
    if named is not None:
        return workdir, kind, named
    if step == "best" or (kind == "best" and step == "latest"):
        found = workdir.best()
        if found is None:
            raise FileNotFoundError(f"{workdir.path} holds no evaluated checkpoint, so no best one; evaluate during "
                                    f"training (eval_every_steps) or name a step")
        return workdir, *found
    steps = workdir.steps(kind)
    if not steps:
        raise FileNotFoundError(f"{workdir.directory(kind)} holds no checkpoint")
    if step == "latest":
        return workdir, kind, steps[-1]
    if not str(step).isdigit() or int(step) not in steps:
        raise ValueError(f"no checkpoint {step!r} in {workdir.directory(kind)}; available: {steps}")
    return workdir, kind, int(step)


def _parts(path: Path) -> tuple[Path, str, int | None]:
    """(workdir, kind, step or None) that a path to a workdir, a kind directory or a step names."""
    if path.name.isdigit() and path.parent.name in KINDS:
        return path.parent.parent, path.parent.name, int(path.name)
    if path.name in KINDS:
        return path.parent, path.name, None
    return path, "checkpoints", None


def is_workdir_layout(path) -> bool:
    """True for a path that `find_checkpoint` understands (a workdir, its checkpoint kinds, a step)."""
    root, kind, step = _parts(Path(path))
    if kind == "best" and step is None and not (root / kind).is_dir():
        kind = "checkpoints"  # the best checkpoint lives among the others
    return (root / kind if step is None else root / kind / str(step) / "state").is_dir()
