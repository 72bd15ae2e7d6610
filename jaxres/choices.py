"""Checking a user's choice against the valid ones, with errors that name the fix.

The ground floor: imports nothing from jaxres, so every layer (data, models, train,
analysis, weights, cli) can use it without pointing upwards.
"""

from __future__ import annotations

import difflib


def closest_names(name: str, choices) -> str:
    """A '; did you mean ...' suffix for error messages (empty when nothing is close)."""
    close = difflib.get_close_matches(str(name), list(choices), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def pick(kind: str, name: str, table: dict):
    """Looks `name` up in `table`, or raises a ValueError that lists the valid names."""
    if name not in table:
        raise ValueError(
            f"unknown {kind} {name!r}{closest_names(name, table)} "
            f"(valid: {', '.join(sorted(table))})"
        )
    return table[name]

