"""What orbax and tensorstore do when a checkpoint cannot be read or written, in jaxres's words.

They re-raise OS errors as other types (`os_error_in`, `failure_reason` find the OS's reason),
and a save that fails on the file system (a full disk) fails in their worker threads too: each
prints a traceback, some of them after the caller got the error. `thread_errors_held` holds
those back around a save, so that the caller's one-line message is all that is shown.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import sys

# What orbax and tensorstore say for an OS error they do not pass on as an OSError, and its errno.
OS_REASONS = {"No space left on device": errno.ENOSPC, "Read-only file system": errno.EROFS,
              "Permission denied": errno.EACCES, "Disk quota exceeded": errno.EDQUOT}


def describe_error(err: BaseException) -> str:
    """`Type: first line of the message` (orbax and tensorstore errors run to many lines)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


@contextlib.contextmanager
def thread_errors_held():
    """While orbax saves: its worker threads' tracebacks (absl ERROR logs, and what is printed
    to stderr) are held back. The error reaches the caller of `save` (orbax re-raises it there),
    which reports it in one line; when the save succeeds, or fails for another reason than the
    file system, what was held is printed after all. After a file-system failure the writes
    still in flight fail later, after the error was reported: `drop_failed_save_leftovers`."""
    held, absl = io.StringIO(), logging.getLogger("absl")

    def hold(record) -> bool:
        if record.levelno >= logging.ERROR and "raised an exception" in str(record.msg):
            held.write(f"{record.getMessage()}\n")
            return False
        return True

    stderr, sys.stderr = sys.stderr, held
    absl.addFilter(hold)
    try:
        yield
    except Exception as err:
        if failure_reason(err) in OS_REASONS:
            drop_failed_save_leftovers()
        else:
            stderr.write(held.getvalue())
        raise
    else:
        stderr.write(held.getvalue())
    finally:
        absl.removeFilter(hold)
        sys.stderr = stderr


def drop_failed_save_leftovers() -> None:
    """After a save failed on the file system (and was reported in one line), the work orbax
    and tensorstore still had in flight fails later, in their threads, each failure a traceback:
    absl ERROR logs of orbax's threads ("... raised an exception"), asyncio's "Future/Task
    exception was never retrieved" as the failed writes' futures are collected, and tensorstore
    calling back into orbax's event loop, closed by then (an unraisable RuntimeError "Event loop
    is closed"). From then on those three are dropped in this process; nothing else is."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_failed_save_leftovers", False):
        return

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    def leftover(record) -> bool:
        text = str(record.msg)
        return not ((record.name == "absl" and record.levelno >= logging.ERROR and "raised an exception" in text)
                    or (record.name == "asyncio" and "exception was never retrieved" in text))

    hook.drops_failed_save_leftovers = True
    sys.unraisablehook = hook
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(leftover)


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind `err` (orbax and tensorstore re-raise OS errors as other types)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def failure_reason(err: BaseException) -> str:
    """The OS's reason for a failed read or write ("No space left on device"), else `describe_error`."""
    os_error = os_error_in(err)
    if os_error is not None:
        return os.strerror(os_error.errno)
    text = str(err)
    for marker in OS_REASONS:
        if marker in text:
            return marker
    return describe_error(err)
