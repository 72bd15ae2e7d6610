"""Where metrics go: the run's metrics log and TensorBoard events (handed out by its `Workdir`),
plus the final summary table printed at the end of a run and the step timer of a logging window."""

from __future__ import annotations

import contextlib
import math
import time

from jaxres.workdir import Workdir


class MetricsWriter:
    """Appends `{"step": s, "split": "train"|"eval"|"train_eval", "time": t, name: value...}` lines
    to the run's metrics log (`Workdir.metrics_log`) and the same scalars to its TensorBoard
    events (`Workdir.tensorboard`, shared with the gradient monitor; tags `train/loss`,
    `eval/accuracy`, ...), each written unbuffered in this thread. Appending keeps the history of
    resumed runs; steps replayed after a resume appear twice, the later line being the one that
    counts. Opening sets a torn last line aside, noted in an event line; a failed write raises
    `FileWriteError` naming the file. The workdir closes both.
    purge_step: a resumed run's first step, for TensorBoard (it hides earlier files' events
    from there on)."""

    def __init__(self, workdir: Workdir, *, tensorboard: bool = True, purge_step: int | None = None, report=print):
        # one line per write: a kill loses at most a line, and the next run sets a torn one aside
        self.lines = workdir.metrics_log(note=self._note, report=report)
        self.path = self.lines.path
        self.tb = workdir.tensorboard(purge_step=purge_step) if tensorboard else None

    @staticmethod
    def _note(record: dict, text: str) -> dict:
        return {"step": record.get("step"), "split": "event", "time": round(time.time(), 3), "event": text}

    def write(self, step: int, split: str, scalars: dict) -> None:
        values = {k: v if isinstance(v, int) and not isinstance(v, bool) else float(v) for k, v in scalars.items()}
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
        self.lines.write({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()})
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(f"{split}/{name}", value, int(step))

    def event(self, step: int, text: str, **fields) -> None:
        """A non-scalar line (started, resumed, stopped, ...) in the JSONL file, with `fields`."""
        self.lines.write({"step": int(step), "split": "event", "time": round(time.time(), 3), "event": text, **fields})

    def sync(self) -> None:
        """Makes the lines so far durable (before a checkpoint, so that none it covers is lost)."""
        self.lines.sync()


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A two-column text table (`name  value`) for the end of a run."""
    width = max(len(name) for name, _ in rows)
    rule = "-" * (width + 2 + max(len(value) for _, value in rows))
    return "\n".join([rule, *(f"{name:<{width}}  {value}" for name, value in rows), rule])


class StepTimer:
    """Step throughput of a logging window: its wall time less the time the loop spent on other
    work inside it (its periodic actions: each runs in `paused(state)`). A process's first step
    (compilation) is timed apart by `first_step_done`, so `images_per_second` counts steps alone."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.steps = 0
        self.first_step_time = None

    def step(self) -> None:
        self.steps += 1

    def first_step_done(self, outputs) -> float:
        """Waits for the first step's `outputs`, keeps its wall time (compilation included) for
        the next `lap` and starts the step clock after it; returns that time in seconds."""
        import jax

        jax.block_until_ready(outputs)
        self.first_step_time = time.perf_counter() - self.start - self.excluded
        self.start, self.excluded, self.steps = time.perf_counter(), 0.0, 0
        return self.first_step_time

    @contextlib.contextmanager
    def paused(self, state=None):
        """Excludes the enclosed work from step time. Waits first for the steps already
        dispatched on `state`, so that their device time stays counted. A `lap` inside (the
        logging action's) ends the window there: the next one excludes only what follows it."""
        if state is not None:
            import jax

            jax.block_until_ready(state)
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - max(began, self.start)

    def lap(self) -> dict:
        """The window since the last lap, then starts the next: `step_time` (s) and
        `images_per_second` when it holds timed steps, `first_step_time` (s, compilation
        included) in the window of a process's first step."""
        now = time.perf_counter()
        seconds = max(now - self.start - self.excluded, 1e-9)
        out = {}
        if self.steps:
            out = {"step_time": seconds / self.steps, "images_per_second": self.batch_size * self.steps / seconds}
        if self.first_step_time is not None:
            out["first_step_time"], self.first_step_time = self.first_step_time, None
        self.start, self.excluded, self.steps = now, 0.0, 0
        return out
