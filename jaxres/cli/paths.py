"""Checks on the paths a command will write, made before the command does any work."""

from __future__ import annotations

import os
from pathlib import Path


def check_output_dir(directory, option: str = "--out", expected: str = "a directory") -> Path:
    """Refuses, before any work, an output directory that could not be created or written at
    the end: an existing file, a path under a file, a directory without write permission."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == directory else f"is under {existing}, which is a file"
        raise NotADirectoryError(f"{option} {directory} {where}; {option} must be {expected}: choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        action = "write into" if existing == directory else f"create it in {existing}"
        raise PermissionError(f"{option} {directory}: no permission to {action}; choose a writable path")
    return directory
