"""The numbers of the degradation experiment, from its workdirs alone (finished or partial).

Reads every run directory `OUT/runs/<condition>/<model>/seed<k>`: `metrics.jsonl` (train
lines: the logging window's mean minibatch accuracy, train mode, each batch scored before its
update; `train_eval` lines: eval-mode accuracy on the fixed training subset; eval lines:
accuracy on the whole test split), `analysis.jsonl` (the gradient monitor's records,
`jaxres.analysis.quantities.MonitorRecord`), `config.json`, and `OUT/runs/wall_time.jsonl` (one line per
`train_and_evaluate` invocation of a run, or its divergence). A resumed run repeats steps in
these files: the later line for a (step, split) or (step, bn) counts. Non-finite values (null,
"nan", "inf") are skipped and written as null in results.json.

`collect(OUT)` returns the per-run rows, the per-(condition, model) groups with means and
95 % intervals over seeds (jaxres.experiments.intervals), and the comparisons paired by seed:
the depth gap of every family within a condition, and every intervention against the
baseline of the same model and against the baseline's shallowest plain net.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from jaxres.analysis import quantities as q
from jaxres.analysis.monitor import read_analysis
from jaxres.experiments.intervals import Interval, geometric_mean, holm, paired_difference, t_interval, verdict
from jaxres.files import read_jsonl
from jaxres.workdir import Workdir

WALL_TIME_FILE = "wall_time.jsonl"
ANALYSIS_BN = "batch"  # the recipe's policy: BatchNorm with the probe batch's statistics, as trained
BASELINE = "baseline"
FIRST_UNIT, LAST_UNIT = "unit_1", "head"
EARLY_END = 96  # the early phase: measurements at steps 1 .. EARLY_END (the recipe's dense schedule)
ERRORS = {  # key -> (metrics.jsonl split, what it is)
    "train_error": ("train_eval", "error of the net in eval mode (running BatchNorm statistics) on the fixed subset of "
                                  "training images, at the last evaluation"),
    "window_error": ("train", "1 - mean minibatch accuracy over the last logging window's steps (train mode, batch "
                              "statistics, each batch scored before its update)"),
    "test_error": ("eval", "error on all 10,000 test images (eval mode), at the last evaluation"),
}
RATIOS = {  # of the monitor's dL_dh (quantities.DL_DH)
    "unit1_head": f"{q.DL_DH.symbol} at the input of {FIRST_UNIT} over that at the input of {LAST_UNIT}",
    "min_head": f"the smallest {q.DL_DH.symbol} over the inner units' inputs ({FIRST_UNIT} .. the last unit) over "
                f"that at the input of {LAST_UNIT}",
}
WALL_TIME_SOURCE = (f"sum over the run's invocations: train_and_evaluate's wall_time_s where runs/{WALL_TIME_FILE} "
                    f"records it (setup, compilation, training, evaluation, analysis and checkpoints), else, for an "
                    f"invocation killed before returning, the span of its records in metrics.jsonl (its start event "
                    f"to its last line: its setup is left out, the steps it lost are counted)")


def number(value) -> float:
    """A float, NaN for null, non-numbers and the strings "nan"/"inf" (non-finite for plots)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def latest(records: list[dict], field: str, value: str) -> list[dict]:
    """The records with `record[field] == value`, one per step (the last written), by step."""
    by_step = {r["step"]: r for r in records if r.get(field) == value and isinstance(r.get("step"), int)}
    return [by_step[s] for s in sorted(by_step)]


def latest_records(records: list[q.MonitorRecord], bn: str) -> list[q.MonitorRecord]:
    """The monitor's records of policy `bn`, one per step (the last written), by step."""
    by_step = {r.step: r for r in records if r.bn == bn and isinstance(r.step, int)}
    return [by_step[s] for s in sorted(by_step)]


def current_attempt(metrics: list[dict]) -> list[dict]:
    """The metrics.jsonl records that count: at every start event (`"start": true`, written at
    each process start) at step S, the lines after S written before it came from a killed
    attempt and are dropped (the resumed run writes them again)."""
    kept: list[dict] = []
    for record in metrics:
        if record.get("split") == "event" and record.get("start") and isinstance(record.get("step"), int):
            kept = [r for r in kept if r.get("split") == "event" or not isinstance(r.get("step"), int)
                    or r["step"] <= record["step"]]
        kept.append(record)
    return kept


def attempt_spans(metrics: list[dict]) -> list[tuple[float, float]]:
    """(start, last record) times of each process that wrote `metrics` (all of metrics.jsonl),
    one per start event: what a killed invocation, which records no wall time, cost."""
    spans: list[list[float]] = []
    for record in metrics:
        when = number(record.get("time"))
        if record.get("split") == "event" and record.get("start") and math.isfinite(when):
            spans.append([when, when])
        elif spans and math.isfinite(when):
            spans[-1][1] = max(spans[-1][1], when)
    return [(start, end) for start, end in spans]


def wall_time(spans: list[tuple[float, float]], recorded: list[tuple[float, float]]) -> float:
    """A run's wall time: each recorded invocation's (end time, wall_time_s), plus the span of every
    attempt (`attempt_spans`) that no recorded invocation ended within (a killed one); NaN with
    neither."""
    total = sum(seconds for _, seconds in recorded)
    for k, (start, _) in enumerate(spans):
        until = spans[k + 1][0] if k + 1 < len(spans) else math.inf
        if not any(start <= end < until for end, _ in recorded):
            total += spans[k][1] - start
    return total if recorded or spans else math.nan


def window_error(train_lines: list[dict], end: int, width: int) -> float:
    """1 - the mean minibatch accuracy over steps (end - width, end], each train line weighted by
    the steps it averages (`steps`; in files older than that field, the distance to the previous
    line): a window cut short by a preemption counts for what it covers, no more."""
    total = weight = 0.0
    previous = 0
    for record in train_lines:
        steps = record.get("steps") or record["step"] - previous
        previous = record["step"]
        if end - width < record["step"] <= end and record["step"] - steps >= end - width:
            total += steps * number(record.get("accuracy"))
            weight += steps
    return 1 - total / weight if weight else math.nan


def kind_depth(model: str) -> tuple[bool, int]:
    """(residual, depth) from a model name such as cifar_plain56 / cifar_resnet20."""
    match = re.fullmatch(r"\D*?(\d+)", model)
    return "plain" not in model, int(match.group(1)) if match else 0


@dataclasses.dataclass
class Run:
    """One run's curves and gradient records, as read from its workdir."""

    condition: str
    model: str
    seed: int
    num_steps: int | None
    curves: dict  # error key -> [(step, error)]
    analysis: list[q.MonitorRecord]  # the monitor's records of policy `bn`, one per step
    bn: str | None
    analysis_time_s: float
    final_window: float = math.nan  # window_error over the last logging window
    wall_time_s: float = math.nan
    attempts: list = dataclasses.field(default_factory=list)  # attempt_spans of its metrics.jsonl
    diverged: str | None = None
    # whose convolutions its recorded invocations ran ("onednn", "xla"; "+"-joined where they
    # differ); "-" where no invocation recorded it (those before the field existed)
    convolutions: str = "-"

    @property
    def name(self) -> str:
        return f"{self.condition}/{self.model}/seed{self.seed}"

    @property
    def residual(self) -> bool:
        return kind_depth(self.model)[0]

    @property
    def depth(self) -> int:
        return kind_depth(self.model)[1]

    @property
    def steps(self) -> int:
        return max([s for curve in self.curves.values() for s, _ in curve], default=0)

    @property
    def finished(self) -> bool:
        return self.num_steps is not None and any(s >= self.num_steps for s, _ in self.curves["test_error"])

    def final(self, key: str) -> float:
        if key == "window_error":
            return self.final_window
        curve = self.curves[key]
        return curve[-1][1] if curve else math.nan


def load_run(workdir, condition: str, model: str, seed: int) -> Run:
    workdir = Workdir(workdir)
    every_record = read_jsonl(workdir.metrics_path)
    metrics = current_attempt(every_record)
    analysis = [q.MonitorRecord.from_json(r) for r in read_analysis(workdir.path)]
    bns = [r.bn for r in analysis]
    bn = ANALYSIS_BN if ANALYSIS_BN in bns or not bns else bns[0]
    config = json.loads(workdir.config_path.read_text()) if workdir.config_path.is_file() else {}
    curves = {key: [(r["step"], 1 - number(r.get("accuracy"))) for r in latest(metrics, "split", split)]
              for key, (split, _) in ERRORS.items()}
    train_lines = latest(metrics, "split", "train")
    last = train_lines[-1] if train_lines else {"step": 0}
    final_window = window_error(train_lines, last["step"], config.get("log_every_steps") or last.get("steps") or 1)
    return Run(condition, model, seed, config.get("num_steps"), curves, latest_records(analysis, bn),
               bn if analysis else None,
               # time the gradient monitor took (every policy measured), first measurement's compile included
               sum(number(r.time_s) for b in set(bns) for r in latest_records(analysis, b)),
               final_window=final_window, attempts=attempt_spans(every_record))


def collect_runs(out_dir) -> list[Run]:
    """Every run under OUT/runs/<condition>/<model>/seed<k>, with its wall time and divergence."""
    runs_dir = Path(out_dir) / "runs"
    runs = []
    for workdir in sorted(runs_dir.glob("*/*/seed*")) if runs_dir.is_dir() else []:
        if workdir.is_dir() and workdir.name[4:].isdigit():
            runs.append(load_run(workdir, workdir.parent.parent.name, workdir.parent.name, int(workdir.name[4:])))
    by_name = {run.name: run for run in runs}
    recorded: dict[str, list] = {}
    convolutions: dict[str, list[str]] = {}
    for record in read_jsonl(runs_dir / WALL_TIME_FILE):
        run = by_name.get(record.get("run"))
        if run is None:
            continue
        recorded.setdefault(run.name, []).append((number(record.get("time")), number(record.get("wall_time_s"))))
        convolutions.setdefault(run.name, [])
        if record.get("convolutions") not in (None, *convolutions[run.name]):
            convolutions[run.name].append(record["convolutions"])
        if record.get("diverged"):
            run.diverged = record["diverged"]
    for run in runs:
        run.wall_time_s = wall_time(run.attempts, recorded.get(run.name, []))
        run.convolutions = "+".join(convolutions.get(run.name, [])) or "-"
    return sorted(runs, key=lambda r: (r.condition != BASELINE, r.condition, r.residual, r.depth, r.seed))


def ratios(record: q.MonitorRecord) -> dict[str, float]:
    """The RATIOS of one monitor record (NaN where a gradient is missing or not finite)."""
    grads = record.dL_dh or {}
    head = number(grads.get(LAST_UNIT))
    inner = [number(grads.get(u)) for u in record.units or [] if u.startswith("unit_")]
    if not head > 0:
        return dict.fromkeys(RATIOS, math.nan)
    smallest = min(inner) if inner and all(math.isfinite(v) for v in inner) else math.nan
    return {"unit1_head": number(grads.get(FIRST_UNIT)) / head, "min_head": smallest / head}


def kernel_step_spread(record: q.MonitorRecord) -> float:
    """min over kernels of ||dL/dW|| / ||W||, over its median: how far the least-moved layer's
    gradient (relative to its weights) lies below the typical layer's."""
    rel = np.array([number(v) for v in (record.dL_dW_rel or {}).values()])
    rel = rel[np.isfinite(rel)]
    return float(rel.min() / np.median(rel)) if rel.size and np.median(rel) > 0 else math.nan


def kernel_norms(record: q.MonitorRecord) -> dict[str, float]:
    """{kernel: ||W||} of one monitor record, from its ||dL/dW|| and ||dL/dW|| / ||W|| (NaN where
    either is missing or the gradient is 0)."""
    grads, rel = record.dL_dW or {}, record.dL_dW_rel or {}
    return {k: number(grads.get(k)) / number(rel[k]) if number(rel[k]) > 0 else math.nan for k in rel}


def kernel_norm_growth(first: q.MonitorRecord, last: q.MonitorRecord) -> dict[str, float]:
    """{kernel: ||W|| at `last` over ||W|| at `first`}: under BatchNorm the loss does not change when
    a kernel is scaled, so its effective learning rate falls as 1 / ||W||^2 while its norm grows."""
    before, after = kernel_norms(first), kernel_norms(last)
    return {k: after[k] / before[k] if k in before and before[k] > 0 else math.nan for k in after}


def run_row(run: Run) -> dict:
    """The row of one run: final errors, gradient ratios at step 0 / early minimum / the end."""
    row = {"run": run.name, "condition": run.condition, "model": run.model, "seed": run.seed,
           "residual": run.residual, "depth": run.depth, "steps": run.steps, "num_steps": run.num_steps,
           "finished": run.finished, "diverged": run.diverged}
    row.update({key: run.final(key) for key in ERRORS})
    records = run.analysis
    start = [r for r in records if r.step == 0]
    early = [r for r in records if 0 < r.step <= EARLY_END]
    for key in RATIOS:
        row[f"{key}_start"] = ratios(start[0])[key] if start else math.nan
        values = [ratios(r)[key] for r in early]
        row[f"{key}_early_min"] = min(values) if values and all(math.isfinite(v) for v in values) else math.nan
        row[f"{key}_end"] = ratios(records[-1])[key] if records else math.nan
    row["kernel_step_spread_end"] = kernel_step_spread(records[-1]) if records else math.nan
    growth = np.array(list(kernel_norm_growth(start[0], records[-1]).values())) if start else np.array([])
    growth = growth[np.isfinite(growth)]
    row["kernel_norm_growth_max"] = float(growth.max()) if growth.size else math.nan
    row["log10_kernel_norm_growth"] = math.log10(row["kernel_norm_growth_max"]) if growth.size else math.nan
    row["end_step"] = records[-1].step if records else None
    row["wall_time_s"] = run.wall_time_s
    row["analysis_time_s"] = run.analysis_time_s
    row["convolutions"] = run.convolutions
    return row


RATIO_COLUMNS = [f"{key}_{when}" for key in RATIOS for when in ("start", "early_min", "end")] + [
    "kernel_step_spread_end", "kernel_norm_growth_max"]


def group_rows(rows: list[dict]) -> list[dict]:
    """One row per (condition, model): errors as mean and interval over its finished seeds,
    gradient ratios as geometric means over them, diverged seeds counted apart."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["condition"], row["model"]), []).append(row)
    out = []
    for (condition, model), members in groups.items():
        done = [r for r in members if r["finished"]]
        group = {"condition": condition, "model": model, "residual": members[0]["residual"],
                 "depth": members[0]["depth"], "seeds": sorted(r["seed"] for r in done),
                 "diverged_seeds": sorted(r["seed"] for r in members if r["diverged"]),
                 "unfinished_seeds": sorted(r["seed"] for r in members if not r["finished"] and not r["diverged"]),
                 "wall_time_s": float(np.nansum([r["wall_time_s"] for r in members])) if members else math.nan}
        for key in ERRORS:
            group[key] = t_interval([r[key] for r in done])
        for key in RATIO_COLUMNS:
            group[key] = geometric_mean([r[key] for r in done])
        out.append(group)
    return out


def _by_seed(rows: list[dict], condition: str, model: str, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in rows if r["condition"] == condition and r["model"] == model and r["finished"]}


# The candidate mechanism the interventions test (experiments/results/degradation/README.md): the
# initial gradient explosion grows the first kernels' norms, which under BatchNorm shrinks their
# effective learning rate as 1 / ||W||^2. Compared like the errors, paired by seed, in log10.
MECHANISM = {"log10_kernel_norm_growth": "log10 of the largest kernel-norm growth from step 0 to the end "
                                         "(kernel_norm_growth_max)"}


def comparisons(rows: list[dict], keys=None) -> list[dict]:
    """Differences paired by seed, with their words, of each of `keys` (default: the errors, in
    error points as fractions here; `MECHANISM`: the norm growth, in log10):
    - "depth": within each condition and family (plain / residual), deepest minus shallowest;
    - "effect": every other condition's model minus the baseline's same model;
    - "vs shallow plain": every other condition's model minus the baseline's shallowest plain net
      (how much of the degradation is left)."""
    keys = ERRORS if keys is None else keys
    mechanism = keys is MECHANISM
    models = {(r["condition"], r["model"]): (r["residual"], r["depth"]) for r in rows}
    out = []

    def add(kind, condition, a, b, reference_condition):
        for key in keys:
            diff = paired_difference(_by_seed(rows, condition, a, key), _by_seed(rows, reference_condition, b, key))
            more, less = ("grows the kernel norms more", "grows them less") if mechanism else (None, None)
            if kind == "depth":
                words = verdict(diff, more or "degrades (deeper is worse)", less or "deeper is better")
            elif kind == "effect":
                words = verdict(diff, more or "raises the error", less or "lowers the error")
            else:
                words = verdict(diff, more or f"still worse than {b}", less or f"better than {b}")
            out.append({"kind": kind, "condition": condition, "model": a, "reference": f"{reference_condition}/{b}",
                        "error": key, "difference": diff, "verdict": words})

    for condition in dict.fromkeys(c for c, _ in models):
        for residual in (False, True):
            family = sorted((d, m) for (c, m), (res, d) in models.items() if c == condition and res == residual)
            if len(family) >= 2:
                add("depth", condition, family[-1][1], family[0][1], condition)
    baseline_plain = sorted((d, m) for (c, m), (res, d) in models.items() if c == BASELINE and not res)
    for (condition, model) in models:
        if condition == BASELINE:
            continue
        if (BASELINE, model) in models:
            add("effect", condition, model, model, BASELINE)
        if baseline_plain and baseline_plain[0][1] != model:
            add("vs shallow plain", condition, model, baseline_plain[0][1], BASELINE)
    return out


# The comparisons the question is asked of, named before the grid ran (issue 20): He et al.'s
# training error of each depth gap and of each intervention on the same net.
PRIMARY = "the eval-mode training error of the depth gaps and of each condition against the baseline's same net"


def is_primary(c: dict) -> bool:
    return c["error"] == "train_error" and c["kind"] in ("depth", "effect")


def collect(out_dir) -> tuple[dict, list[Run]]:
    """(results, runs) of every run under OUT/runs: the results dict holds the definitions, the
    per-run rows, the groups and the comparisons; `runs` the curves and records to plot."""
    runs = collect_runs(out_dir)
    rows = [run_row(run) for run in runs]
    errors, mechanism = comparisons(rows), comparisons(rows, MECHANISM)
    family = errors + mechanism  # every verdict results.md prints
    for c, held in zip(family, holm([c["difference"].p for c in family])):
        c["holm"] = held
    primary = [c for c in errors if is_primary(c)]
    for c, held in zip(primary, holm([c["difference"].p for c in primary])):
        c["holm_primary"] = held
    return {
        "experiment": "degradation (He et al. 2015, Fig. 1/6/7) on Fashion-MNIST, with interventions",
        "analysis_bn": ANALYSIS_BN,
        "errors": {key: what for key, (_, what) in ERRORS.items()},
        "ratios": dict(RATIOS, early_min=f"the minimum over the measurements at steps 1-{EARLY_END}",
                       kernel_step_spread_end=f"min over kernels of {q.DL_DW_REL.symbol} over its median, at the end",
                       kernel_norm_growth_max="max over kernels of ||W|| at the end over ||W|| at step 0"),
        "intervals": "mean over finished seeds and its 95 % Student-t interval; differences paired by seed",
        "wall_time_source": WALL_TIME_SOURCE,
        "runs": rows,
        "groups": group_rows(rows),
        "comparisons": errors,
        "mechanism": dict(MECHANISM, comparisons=mechanism),
        "multiplicity": {"tests": sum(c["holm"] is not None for c in family),
                         "primary_tests": sum(c["holm_primary"] is not None for c in primary),
                         "method": "Holm's step-down, family-wise error 5 %, over every comparison with at least 2 "
                                   "seeds (holm) and over the primary ones (holm_primary: " + PRIMARY + ")"},
    }, runs


def to_json(value):
    """JSON-safe: Intervals as dicts, non-finite floats as null."""
    if isinstance(value, Interval):
        return value.to_json()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def _fmt(value: float, spec: str) -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def markdown(results: dict) -> str:
    """results.md: the groups table, the comparisons and what their intervals say."""
    lines = ["Errors in %: mean over finished seeds [95 % interval]; gradient ratios: geometric mean over seeds "
             f"(step 0 / minimum over steps 1-{EARLY_END} / end).", "",
             "| condition | model | seeds | train error (eval mode) | train error (last window) | test error | "
             "unit_1/head grad | smallest/head grad | least-moved kernel / median, end | largest kernel-norm growth | "
             "wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in results["groups"]:
        seeds = ",".join(map(str, g["seeds"])) or "-"
        if g["diverged_seeds"]:
            seeds += f" (diverged: {','.join(map(str, g['diverged_seeds']))})"
        if g["unfinished_seeds"]:
            seeds += f" (running: {','.join(map(str, g['unfinished_seeds']))})"
        grads = {k: " / ".join(_fmt(g[f"{k}_{w}"], ".3g") for w in ("start", "early_min", "end")) for k in RATIOS}
        errors = " | ".join(g[key].format(100) for key in ERRORS)
        lines.append(f"| {g['condition']} | {g['model']} | {seeds} | {errors} | {grads['unit1_head']} | "
                     f"{grads['min_head']} | {_fmt(g['kernel_step_spread_end'], '.2g')} | "
                     f"{_fmt(g['kernel_norm_growth_max'], '.3g')}x | "
                     f"{_fmt(g['wall_time_s'], '.0f')} s |")
    tests = results["multiplicity"]["tests"]
    lines += ["", "Differences in error points, paired by seed [95 % interval]; p: Student's paired t-test; each "
              f"verdict is at 95 % on its own, so among the {tests} comparisons with two or more seeds about "
              f"{tests / 20:.1f} would read as a difference by chance if nothing differed. \"Holm\" says whether "
              f"it holds with the chance of any false verdict among all {tests} kept at 5 % (Holm's step-down); "
              f"\"Holm, primary\": the same over the {results['multiplicity']['primary_tests']} primary comparisons "
              f"only ({PRIMARY}).", "",
              "| comparison | error | difference | seeds | p | verdict | Holm | Holm, primary |",
              "|---|---|---|---|---|---|---|---|"]
    for c in results["comparisons"]:
        lines.append(f"| {_what(c)} | {c['error']} | {c['difference'].format(100)} | {c['difference'].n} | "
                     f"{_fmt(c['difference'].p, '.2g')} | {c['verdict']} | {_held(c)} | {_held(c, 'holm_primary')} |")
    lines += ["", "The candidate mechanism, paired by seed [95 % interval]: the difference in "
              f"{MECHANISM['log10_kernel_norm_growth']} (1 = ten times more growth):", "",
              "| comparison | difference (log10) | seeds | p | verdict | Holm |", "|---|---|---|---|---|---|"]
    for c in results["mechanism"]["comparisons"]:
        lines.append(f"| {_what(c)} | {c['difference'].format(1)} | {c['difference'].n} | "
                     f"{_fmt(c['difference'].p, '.2g')} | {c['verdict']} | {_held(c)} |")
    return "\n".join(lines)


def _what(c: dict) -> str:
    return (f"{c['condition']}: {c['model']} - {c['reference'].split('/')[1]}" if c["kind"] == "depth"
            else f"{c['condition']}/{c['model']} - {c['reference']}")


def _held(c: dict, key: str = "holm") -> str:
    """A Holm column: whether a verdict that is not "cannot tell" survives the correction."""
    if c.get(key) is None or c["verdict"].startswith("cannot tell"):
        return "-"
    return "holds" if c[key] else "does not hold"


def markdown_runs(results: dict) -> str:
    """A table of every run (for the log of `jaxres experiment degradation`)."""
    lines = ["| run | steps | train error % (eval) | window % | test error % | unit_1/head: 0 / early min / end | "
             "wall time | of which gradient monitor | convolutions |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["runs"]:
        pct = {k: _fmt(100 * number(row[k]), ".2f") for k in ERRORS}
        grads = " / ".join(_fmt(row[f"unit1_head_{w}"], ".3g") for w in ("start", "early_min", "end"))
        share = number(row["analysis_time_s"]) / number(row["wall_time_s"])
        monitor = f"{_fmt(row['analysis_time_s'], '.0f')} s ({_fmt(100 * share, '.1f')} %)" if math.isfinite(share) \
            else "-"
        steps = f"{row['steps']} / {row['num_steps'] or '?'}" + (" diverged" if row["diverged"] else "")
        lines.append(f"| {row['run']} | {steps} | {pct['train_error']} | {pct['window_error']} | {pct['test_error']} | "
                     f"{grads} | {_fmt(row['wall_time_s'], '.0f')} s | {monitor} | {row['convolutions']} |")
    return "\n".join(lines)
