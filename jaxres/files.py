"""Files that readers never see torn: atomic replacement, append-only JSON lines and TensorBoard
event files, whose write errors name the file.

Every file jaxres writes for people or for a later run goes through here: results, figures,
configs and weights' neighbours by `atomic_write` (a temporary file in the same directory,
fsync, rename), logs by `JsonlAppender` (one whole line per write, a torn last line set aside
before appending), TensorBoard scalars and images by `TensorBoardEvents` (written in the
calling thread). A failed write raises `FileWriteError`, whose message names the file (the
OS's own error for a failed write names none).
"""

from __future__ import annotations

import itertools
import json
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable


class FileWriteError(OSError):
    """A file could not be written (disk full, read-only, ...): `str()` is the message alone,
    which names the file and the OS's reason (`errno` keeps the OS's code)."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_failed(err: OSError, path, what: str = "") -> FileWriteError:
    """`err` (an OSError from writing `path`) as a FileWriteError naming `path`."""
    if isinstance(err, FileWriteError):
        return err
    reason = os.strerror(err.errno) if err.errno else str(err)
    return FileWriteError(err.errno, f"could not write {what or ''}{' to ' if what else ''}{path} ({reason})")


def atomic_write(path, write) -> Path:
    """Calls `write(binary_file)` on a temporary file next to `path`, syncs it and renames it
    into place: readers see the old file or the new one, and an error leaves no partial file
    (an OSError is raised as a FileWriteError naming `path`)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise write_failed(err, path) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        os.unlink(tmp)
        if isinstance(err, OSError):
            raise write_failed(err, path) from err
        raise
    return path


def write_text_atomic(path, text: str) -> Path:
    """`atomic_write` of a text (UTF-8)."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def read_jsonl(path) -> list[dict]:
    """The records of a JSON-lines file, skipping a torn last line ([] when it is missing)."""
    records = []
    path = Path(path)
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False


def _line_start(handle, end: int, block: int = 1 << 16) -> int:
    """The offset just after the last b"\\n" before `end` in a binary file (0: none)."""
    position = end
    while position > 0:
        start = max(0, position - block)
        handle.seek(start)
        found = handle.read(position - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        position = start
    return 0


def repair_jsonl_tail(path) -> tuple[str, Path | None] | None:
    """Makes a JSON-lines file end with a whole record and a newline, so that the next append
    starts a line of its own. A last line without its newline that is a whole record gets the
    newline; otherwise a torn last line (no newline, or not a JSON object: a kill or a full disk
    cut it) is moved into `<name>.torn-<unix time>` next to the file (appended there; kept,
    never deleted). Returns None when nothing was wrong, else (what was done, the kept file)."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return None
        tail_start = _line_start(handle, size)
        handle.seek(tail_start)
        tail = handle.read()
        if not tail:  # ends with a newline: is the last line a record?
            cut = _line_start(handle, size - 1)
            handle.seek(cut)
            last = handle.read()
            if not last.strip() or _is_record(last):
                return None
        elif _is_record(tail):
            handle.seek(size)
            handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())
            return "its last record had no newline; added it", None
        else:
            cut = tail_start
        handle.seek(cut)
        torn = handle.read()
        kept = path.with_name(f"{path.name}.torn-{int(time.time())}")
        try:
            with open(kept, "ab") as out:
                out.write(torn)
                out.flush()
                os.fsync(out.fileno())
        except OSError as err:
            raise write_failed(err, kept, "the torn last line of " + str(path)) from err
        handle.truncate(cut)
        handle.flush()
        os.fsync(handle.fileno())
    return f"its last line was torn ({len(torn)} bytes, cut by a kill or a full disk); moved it to {kept}", kept


class JsonlAppender:
    """Appends JSON lines to a file, one unbuffered write (+ fsync if asked) per record.

    Opening repairs the file's end (`repair_jsonl_tail`): a torn last line is set aside into a
    kept file and reported, so that no record is ever glued to another. A file that disappears
    while the run goes on (deleted or moved by hand) is reopened and that is reported too:
    records are never lost silently. `report(text)` gets each report; `note(record, text)`, if
    given, also makes it a line of the file (a dict, written before `record`, the next one
    written). A failed write raises FileWriteError naming the file.
    """

    def __init__(self, path, *, fsync: bool = False, report: Callable[[str], object] = print,
                 note: Callable[[dict, str], dict] | None = None):
        self.path = Path(path)
        self.fsync = fsync
        self.report = report
        self.note = note
        self.file = None
        self.pending: list[str] = []
        try:
            repaired = repair_jsonl_tail(self.path)
        except OSError as err:
            raise write_failed(err, self.path) from err
        if repaired is not None:
            self._tell(f"{self.path}: {repaired[0]}")
        self._open()

    def _open(self):
        try:
            self.file = open(self.path, "ab", buffering=0)
        except OSError as err:
            raise write_failed(err, self.path) from err
        self._inode = os.fstat(self.file.fileno()).st_ino

    def _tell(self, text: str) -> None:
        self.report(text)
        if self.note is not None:
            self.pending.append(text)

    def write(self, record: dict) -> None:
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current != self._inode:
            self.file.close()
            self._open()
            self._tell(f"{self.path.name} was missing; reopened (earlier lines are lost)")
        while self.pending:
            self._write(self.note(record, self.pending[0]))
            self.pending.pop(0)
        self._write(record)

    def _write(self, record: dict) -> None:
        data = memoryview((json.dumps(record, allow_nan=False) + "\n").encode())
        try:
            while data:  # a raw write may take part of the line
                data = data[self.file.write(data):]
            if self.fsync:
                os.fsync(self.file.fileno())
        except OSError as err:
            raise write_failed(err, self.path, "a line") from err

    def sync(self) -> None:
        """Makes the lines written so far durable (fsync)."""
        try:
            os.fsync(self.file.fileno())
        except OSError as err:
            raise write_failed(err, self.path) from err

    def rewrite(self, records: list[dict], line: Callable[[dict], str] | None = None) -> None:
        """Replaces the whole file by `records` (atomically: readers see the old file or the new
        one); `line(record)` is each record's text with its newline (default: json.dumps)."""
        line = line or (lambda r: json.dumps(r, allow_nan=False) + "\n")
        self.close()
        write_text_atomic(self.path, "".join(line(r) for r in records))
        self._open()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


_event_files = itertools.count()


class TensorBoardEvents:
    """A TensorBoard event file in `logdir` (`events.out.tfevents.<time>.<host>.<pid>.<n>`, TFRecord
    framing), written unbuffered in the calling thread: a failed write (a full disk) raises
    FileWriteError naming the file where the caller can report it, not in a background thread
    (tensorboardX's SummaryWriter prints such errors as thread tracebacks, and again at exit).
    `purge_step` (a resumed run's first step): TensorBoard hides the events of earlier files at
    steps >= it, as SummaryWriter's `purge_step` does. Summaries are built by tensorboardX."""

    def __init__(self, logdir, *, purge_step: int | None = None):
        import socket

        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        self.file = None
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_event_files)}"
        self.path = Path(logdir) / name
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "ab", buffering=0)
        except OSError as err:
            raise write_failed(err, self.path, "TensorBoard events") from err
        self._write_event(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._write_event(Event(step=int(purge_step), wall_time=time.time(),
                                    session_log=SessionLog(status=SessionLog.START)))

    def _write_event(self, event) -> None:
        from tensorboardX.record_writer import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        record = memoryview(header + struct.pack("<I", masked_crc32c(header)) + data
                            + struct.pack("<I", masked_crc32c(data)))
        try:
            while record:
                record = record[self.file.write(record):]
        except OSError as err:
            raise write_failed(err, self.path, "TensorBoard events") from err

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self._write_event(self._event(summary=scalar(tag, float(value)), step=int(step), wall_time=time.time()))

    def add_image(self, tag: str, image_hwc, step: int) -> None:
        """`image_hwc`: uint8 (H, W, 3)."""
        from tensorboardX.summary import image

        self._write_event(self._event(summary=image(tag, image_hwc, dataformats="HWC"), step=int(step),
                                      wall_time=time.time()))

    def flush(self) -> None:
        """Makes the events written so far durable (each write is already in the OS's hands)."""
        try:
            os.fsync(self.file.fileno())
        except OSError as err:
            raise write_failed(err, self.path, "TensorBoard events") from err

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
