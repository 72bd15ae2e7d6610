"""Benchmark cases: choosing them (`--only`) and running one in a Python process of its own.

A case run by `run_isolated` is `python -m jaxres.bench.cases MODULE FUNCTION KWARGS_JSON` (the
hidden entry below): a fresh process, so the case's peak resident memory (ru_maxrss) and its
compile time are its own, with nothing cached from earlier cases. It imports this jaxres,
whatever the Python's own installation holds, and prints the function's row (a dict) as JSON
on the last line of its stdout.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys
from typing import Callable, Iterable

import jaxres

ENTRY = "jaxres.bench.cases"


def selected(cases: Iterable, only: str | None, *, label: Callable[[object], str], suite: str) -> list:
    """The cases whose label contains one of `only`'s comma-separated strings (all of them when
    `only` is None); a ValueError naming the labels when none does."""
    cases = list(cases)
    if only is None:
        return cases
    needles = [s for s in only.split(",") if s]
    chosen = [c for c in cases if any(n in label(c) for n in needles)]
    if not chosen:
        labels = sorted(set(map(label, cases)))
        raise ValueError(f"--only {only!r} matches none of the {suite} suite's cases; they are: {', '.join(labels)}")
    return chosen


def run_isolated(module: str, function: str, **kwargs) -> dict:
    """`module.function(**kwargs)` (a jaxres.bench module; JSON-able keywords) in a fresh Python
    process; returns its row. A RuntimeError with the end of its stderr when it fails."""
    if not module.startswith("jaxres.bench."):
        raise ValueError(f"run_isolated runs benchmark cases of jaxres.bench modules; got {module!r}")
    root = str(pathlib.Path(jaxres.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-m", ENTRY, module, function, json.dumps(kwargs)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark case {module}.{function}({kwargs}) exited with code {out.returncode}; "
                           f"its stderr ends:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    module, function, kwargs = argv
    row = getattr(importlib.import_module(module), function)(**json.loads(kwargs))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
