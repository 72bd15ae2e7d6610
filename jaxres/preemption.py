"""SIGTERM (preemption) as a stop request: a flag that the training loop reads between steps,
then it saves a checkpoint and exits. No JAX here: `jaxres train` installs the handler first
thing, before it imports JAX, so that a SIGTERM during start-up is a stop request too rather
than the default kill."""

from __future__ import annotations

import signal
from typing import Callable


class StopSignal:
    """SIGTERM as a stop request that the loop reads between steps (then it saves and exits).

    One process: a handler turns the signal into the flag `received`. Entered while another
    StopSignal's handler is installed (the one `jaxres train` installs at start), it takes that
    request over: a signal either of them received counts for both. A multi-process job passes
    `synced_stop` (orbax's `reached_preemption(step)`): JAX's preemption service, started by
    `jax.distributed.initialize`, catches the SIGTERM on any host and agrees with the others on
    a step, so that every host saves the same checkpoint; its handler is left in place, and a
    request held by an outer handler is not taken over (one host alone must not stop).
    """

    def __init__(self, synced_stop: Callable[[int], bool] | None = None):
        self.synced_stop = synced_stop
        self.received = False
        self.previous = None
        self.outer: StopSignal | None = None

    def __enter__(self):
        if self.synced_stop is None:
            try:
                self.previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                self.previous = None
            outer = getattr(self.previous, "__self__", None)
            if isinstance(outer, StopSignal):
                self.outer = outer
                self.received = self.received or outer.received
        return self

    def poll(self, step: int) -> None:
        """Called after every step (orbax's sync point must see each step on every host)."""
        if self.synced_stop is not None and self.synced_stop(step):
            self.received = True

    def _handle(self, signum, frame):
        self.received = True
        if self.outer is not None:
            self.outer.received = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
