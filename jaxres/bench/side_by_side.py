"""Two frameworks' steps timed side by side, each in a long-lived process of its own.

Each side is a `jaxres.bench.worker` process (its own Python, so JAX may come from one venv
and PyTorch from another). After both have compiled and warmed up, the steps alternate
A B / B A round by round, so drifts in the machine's load hit both alike; each round gives a
ratio A/B. Reported per side: step time min and median, cores busy (process CPU time / wall
time of a step: 2.0 keeps both cores of a 2-core machine busy), resident memory after
importing the library (the baseline) and its peak during the timed steps above it; and the
ratio's min and median over the rounds, with the load average before and after.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

import jaxres

MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Side:
    """One worker: `framework` ("jax" or "torch") run by `python` with `env` added."""

    framework: str
    python: str = sys.executable
    env: dict = dataclasses.field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.framework


class Worker:
    """A running `jaxres.bench.worker`; its stderr goes to a temporary file, shown on failure."""

    def __init__(self, side: Side, spec: dict):
        self.side = side
        # The worker imports this jaxres, whatever the other Python has installed.
        env = {**os.environ, **side.env}
        root = str(pathlib.Path(jaxres.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (side.env.get("PYTHONPATH", root), os.environ.get("PYTHONPATH")) if p)
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [side.python, "-m", "jaxres.bench.worker", json.dumps({"framework": side.framework, **spec})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=tempfile.gettempdir())
        self.ready = self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise RuntimeError(f"the {self.side.name} worker ({self.side.python}) exited with code "
                               f"{self.process.returncode}; its stderr ends:\n{tail}")
        message = json.loads(line)
        if "error" in message:
            raise RuntimeError(f"the {self.side.name} worker: {message['error']}")
        return message

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


def summary(side: Side, ready: dict, steps: list[dict], end: dict) -> dict:
    walls = [s["wall_s"] for s in steps]
    busy = [s["cpu_s"] / s["wall_s"] for s in steps]
    return {
        **{k: ready[k] for k in ("framework", "python", "executable", "jaxres", "first_s", "onednn") if k in ready},
        "step_s_min": min(walls), "step_s_median": statistics.median(walls), "step_s": walls,
        "cores_busy_median": statistics.median(busy), "cores_busy_min": min(busy), "cores_busy_max": max(busy),
        "baseline_mb": ready["baseline_bytes"] / MB, "peak_mb": end["peak_bytes"] / MB,
        "peak_above_baseline_mb": (end["peak_bytes"] - ready["baseline_bytes"]) / MB, "peak_since": end["peak_since"],
    }


def interleaved(a: Side, b: Side, spec: dict, rounds: int) -> dict:
    """Times `rounds` steps of each side, alternating A B / B A, on the step `spec` describes
    (model, batch_size, input_size, num_classes, dtype, mode, warmup, ...); returns one row
    with per-side summaries under a.name and b.name and the per-round ratios A/B."""
    row = interleaved_sides([a, b], spec, rounds)
    pair = row.pop("pairs")[f"{a.name}/{b.name}"]
    return {**row, "ratio": f"{a.name}/{b.name}", "ratio_min": pair["min"], "ratio_median": pair["median"],
            "ratios": pair["ratios"]}


def interleaved_sides(sides: list[Side], spec: dict, rounds: int) -> dict:
    """`interleaved` for two or more sides: round r runs them in the order rotated by r (A B C,
    B C A, C A B, ...), so each side is first, middle and last equally often; returns one row with
    per-side summaries under each side's name and, under "pairs", the per-round ratios of every
    pair "X/Y" (X before Y in `sides`) with their min and median."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    names = [side.name for side in sides]
    if len(sides) < 2 or len(set(names)) < len(names):
        raise ValueError(f"side by side needs two or more sides with distinct names; got {names}")
    load_before = os.getloadavg()
    workers = []
    try:
        for side in sides:  # one after the other: none compiles while another warms up
            workers.append(Worker(side, spec))
        steps = {name: [] for name in names}
        for r in range(rounds):
            shift = r % len(workers)
            for w in workers[shift:] + workers[:shift]:
                steps[w.side.name].append(w.ask("step"))
        ends = [w.ask("quit") for w in workers]
    finally:
        for w in workers:
            w.close()
    pairs = {}
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            ratios = [u["wall_s"] / v["wall_s"] for u, v in zip(steps[x], steps[y])]
            pairs[f"{x}/{y}"] = {"min": min(ratios), "median": statistics.median(ratios), "ratios": ratios}
    return {
        **{k: spec[k] for k in ("model", "mode", "batch_size", "input_size", "dtype") if k in spec},
        "rounds": rounds, "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(),
        **{side.name: summary(side, w.ready, steps[side.name], end) for side, w, end in zip(sides, workers, ends)},
        "pairs": pairs,
    }


def format_sides_table(rows: list[dict], names: list[str]) -> str:
    """Rows of `interleaved_sides` as a text table: each side's step time and cores busy, then
    every pair's ratio (min / median)."""
    pairs = [f"{x}/{y}" for i, x in enumerate(names) for y in names[i + 1:]]
    header = (f"{'model':<16} {'mode':<9} {'batch':>5} " + " ".join(f"{n + ' ms min/med':>17}" for n in names)
              + " " + " ".join(f"{p + ' min/med':>21}" for p in pairs) + f" {'cores ' + '/'.join(names):>22}")
    lines = [header, "-" * len(header)]
    for r in rows:
        busy = "/".join(format(r[n]["cores_busy_median"], ".2f") for n in names)
        lines.append(
            f"{r['model']:<16} {r['mode']:<9} {r['batch_size']:>5} "
            + " ".join(f"{1e3 * r[n]['step_s_min']:>8.0f}/{1e3 * r[n]['step_s_median']:<8.0f}" for n in names) + " "
            + " ".join(f"{r['pairs'][p]['min']:>16.2f}/{r['pairs'][p]['median']:<4.2f}" for p in pairs)
            + f" {busy:>22} (n={r['rounds']})")
    return "\n".join(lines)


def format_table(rows: list[dict], a: str = "jax", b: str = "torch") -> str:
    """Rows of `interleaved` as a text table (milliseconds, MB)."""
    header = (f"{'model':<16} {'mode':<9} {'batch':>5} {a + ' ms min/med':>17} {b + ' ms min/med':>19} "
              f"{a + '/' + b + ' min/med (n)':>24} {'cores ' + a + '/' + b:>16} {'MB above base ' + a + '/' + b:>24}")
    lines = [header, "-" * len(header)]
    for r in rows:
        x, y = r[a], r[b]
        lines.append(
            f"{r['model']:<16} {r['mode']:<9} {r['batch_size']:>5} "
            f"{1e3 * x['step_s_min']:>8.0f}/{1e3 * x['step_s_median']:<8.0f} "
            f"{1e3 * y['step_s_min']:>10.0f}/{1e3 * y['step_s_median']:<8.0f} "
            f"{r['ratio_min']:>15.2f}/{r['ratio_median']:.2f} ({r['rounds']}) "
            f"{x['cores_busy_median']:>10.2f}/{y['cores_busy_median']:<5.2f} "
            f"{x['peak_above_baseline_mb']:>14.0f}/{y['peak_above_baseline_mb']:<9.0f}")
    return "\n".join(lines)
