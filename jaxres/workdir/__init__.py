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
closes them). The checkpoints are `jaxres.workdir.checkpoints` (`CheckpointStore`, which
`Workdir` extends with the lock, the config and the records); orbax's side of them is
`jaxres.orbax_manager`. The rule for a
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
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Callable

from jaxres.files import FileWriteError, JsonlAppender, TensorBoardEvents, read_jsonl, write_failed, write_text_atomic
from jaxres.orbax_errors import describe_error
from jaxres.records import RecordSchedule
from jaxres.workdir.checkpoints import (KINDS, Checkpoint, CheckpointMismatchError, CheckpointStore,
                                       CheckpointWriteError)

__all__ = ["KINDS", "Checkpoint", "CheckpointMismatchError", "CheckpointStore", "CheckpointWriteError",
           "RecordWriteError", "Workdir", "WorkdirBusyError", "describe_error", "find_checkpoint",
           "is_workdir_layout"]


class WorkdirBusyError(RuntimeError):
    """Another process is training in this workdir."""


class RecordWriteError(FileWriteError):
    """A record of a training run (a metrics or analysis line, TensorBoard events) could not be
    written mid-run; the message names the file, the step and the latest intact checkpoint."""


class Workdir(CheckpointStore):
    """The directory of one training run (see the module docstring for the layout).

    `Workdir(path)` only reads; `create=True` makes the directory (and checks it can be
    written) for a trainer. `keep` is how many of the latest checkpoints to keep; the best
    evaluated one is kept besides them. The checkpoint methods (`steps`, `save`, `restore`,
    `best`, ...) are `CheckpointStore`'s.
    """

    def __init__(self, path, *, create: bool = False, keep: int = 3):
        if Path(path).exists() and not Path(path).is_dir():
            raise FileExistsError(f"workdir {str(path)!r} is a file, not a directory; choose another --workdir")
        super().__init__(path, keep)
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

    def close(self) -> None:
        super().close()
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

    def finished_records_only(self, config) -> bool:
        """Whether this holds the small files of a finished run whose checkpoints were removed (the
        degradation grid commits metrics.jsonl, analysis.jsonl and config.json, and a later sitting
        on another machine starts from those): no checkpoint at all, and the final step has every
        record it must have, one of them a gradient-monitor record, which is written only after the
        final checkpoint was saved. Without the monitor no record proves that, so this is False."""
        schedule = RecordSchedule.from_config(config)
        wanted = schedule.wanted(schedule.num_steps)
        return (self.latest_step() is None and any(name.startswith("analysis:") for name in wanted)
                and wanted <= self.records_at(schedule.num_steps))

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
