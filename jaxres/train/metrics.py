"""Where metrics go: a JSON-lines file and TensorBoard event files in the work dir, plus
the final summary table printed at the end of a run."""

from __future__ import annotations

import math
import time
from pathlib import Path

from jaxres.files import JsonlAppender


class MetricsWriter:
    """Appends `{"step": s, "split": "train"|"eval", "time": t, name: value...}` lines to
    `<workdir>/metrics.jsonl` and the same scalars to TensorBoard under `<workdir>/tensorboard`
    (tags `train/loss`, `eval/accuracy`, ...). Appending keeps the history of resumed runs;
    steps replayed after a resume appear twice, the later line being the one that counts."""

    def __init__(self, workdir, *, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lines = JsonlAppender(self.path)  # one line per write: a kill loses at most a line
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, scalars: dict) -> None:
        values = {k: float(v) for k, v in scalars.items()}
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
        self.lines.write({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()})
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(f"{split}/{name}", value, int(step))

    def event(self, step: int, text: str) -> None:
        """A non-scalar line (resumed, stopped, ...) in the JSONL file."""
        self.lines.write({"step": int(step), "split": "event", "time": round(time.time(), 3), "event": text})

    def close(self) -> None:
        self.lines.close()
        if self.tb is not None:
            self.tb.close()


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A two-column text table (`name  value`) for the end of a run."""
    width = max(len(name) for name, _ in rows)
    rule = "-" * (width + 2 + max(len(value) for _, value in rows))
    return "\n".join([rule, *(f"{name:<{width}}  {value}" for name, value in rows), rule])
