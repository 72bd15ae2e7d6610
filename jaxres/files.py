"""Files that readers never see torn: atomic replacement and append-only JSON lines.

Every file jaxres writes for people or for a later run goes through here: results, figures,
configs and weights' neighbours by `atomic_write` (a temporary file in the same directory,
fsync, rename), logs by `JsonlAppender` (one whole line per write).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Calls `write(binary_file)` on a temporary file next to `path`, syncs it and renames it
    into place: readers see the old file or the new one, and an error leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
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
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class JsonlAppender:
    """Appends JSON lines to a file, one write (+ flush, + fsync if asked) per record, and
    reopens the file if it disappears while the run goes on (deleted or moved by hand), saying
    so in the new file: records are never lost silently."""

    def __init__(self, path, *, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self.file = None
        self._open()

    def _open(self):
        self.file = open(self.path, "a", buffering=1)
        self._inode = os.fstat(self.file.fileno()).st_ino

    def write(self, record: dict) -> None:
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current != self._inode:
            self.file.close()
            self._open()
            self._write({"step": record.get("step"), "split": "event", "time": round(time.time(), 3),
                         "event": f"{self.path.name} was missing; reopened (earlier lines are lost)"})
        self._write(record)

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        if self.fsync:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
