"""`train_and_evaluate(config, workdir)`: the training loop around the pure step functions.

It builds the run from the config (`jaxres.train.run.Run`: data, model, optimizer, state),
resumes from the newest readable checkpoint in `workdir`, runs `train_step` through a parallel
driver (jaxres.train.drivers: one device, pmap or jit+shard_map) and after every step runs its
periodic actions (jaxres.train.actions) in a fixed order: the train log, the evaluation, the
checkpoint, the gradient measurement and the SIGTERM stop, each due as
`jaxres.records.RecordSchedule` says. The state after step k depends only on (config, k): a run
killed at any moment and restarted with the same command ends bitwise identical (on CPU) to an
uninterrupted run, and with the same records: a resumed run makes the records its restored step
lacks.
"""

from __future__ import annotations

import contextlib
import time

import jax

from jaxres import data
from jaxres.files import FileWriteError
from jaxres.preemption import StopSignal
from jaxres.records import SCHEDULE_FIELDS, RecordSchedule, schedule_fields
from jaxres.train import config as config_lib
from jaxres.train.actions import ActionList, Checkpoint, Evaluate, LogTrain, Measure, Preempt, Sharpness
from jaxres.train.metrics import MetricsWriter, StepTimer, summary_table
from jaxres.train.optim import schedule_reads_num_steps
from jaxres.train.run import Run
from jaxres.train.state import checkpoint_tree
from jaxres.workdir import CheckpointMismatchError, CheckpointWriteError, Workdir, describe_error, find_checkpoint

# Fields that do not change the trajectory: a resumed run may change them (the record schedule
# among them: analysis_*, train_eval_examples).
BOOKKEEPING = {"parallel", "keep_checkpoints", "num_data_threads", "device_prefetch", "progress_bar", "num_steps",
               "data_dir", "eval_batch_size", "eval_split", *SCHEDULE_FIELDS}


def check_resumable(saved: dict, config, workdir) -> None:
    """Refuses to continue a run whose trajectory-defining fields differ from `config`:
    everything but the bookkeeping fields, and `num_steps` when the schedule reads it. A field
    that a run saved by an older jaxres lacks counts as its default (`base_config`), the value
    that run trained with."""
    now = config_lib.to_json(config)
    saved = {**config_lib.to_json(config_lib.base_config()), **saved}
    free = BOOKKEEPING - ({"num_steps"} if schedule_reads_num_steps(config) else set())
    changed = [k for k in sorted(set(now) | set(saved)) if k not in free and saved.get(k) != now.get(k)]
    if not changed:
        return
    diffs = [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in changed]
    why = ""
    if "num_steps" in changed:
        why = (f" The {config.schedule} schedule reads num_steps, so it is part of the recipe here; it may "
               f"change on resume only with schedules that do not read it (piecewise, step, constant).")
    raise CheckpointMismatchError(
        f"{workdir} holds a run with a different config ({'; '.join(diffs)}); nothing was restored or moved."
        f"{why} Resume with the same config, or start a new run from this one's latest checkpoint with the "
        f"new config: --workdir NEW --config.init_from={workdir}")


def train_and_evaluate(config, workdir, *, report=print) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns a summary
    dict: final step, last train metrics, final eval (and train_eval) and best eval metrics, wall
    time, stopped (True after SIGTERM). Raises NonFiniteLossError on a NaN/inf loss,
    WorkdirBusyError when another process trains in `workdir`, CheckpointMismatchError when it
    holds another run, CheckpointWriteError / RecordWriteError when a checkpoint or a record
    cannot be written (naming the file and the latest intact checkpoint). SIGTERM, from the
    start on (or already held by a caller's StopSignal, as `jaxres train` installs one first
    thing), stops it with a checkpoint of the last step trained."""
    t0 = time.time()
    schedule = RecordSchedule.from_config(config)  # a bad schedule is refused before the workdir is made
    wd = Workdir(workdir, create=True, keep=config.keep_checkpoints)
    # One trainer per workdir; in a multi-host job process 0 holds the lock for all. The workdir
    # closes the logs it hands out when the run ends, however it ends.
    with (wd.lock() if jax.process_index() == 0 else contextlib.nullcontext()), wd, \
            StopSignal(wd.reached_preemption if jax.process_count() > 1 else None) as stop:
        summary = _train(config, wd, schedule, stop, report)
    summary["wall_time_s"] = time.time() - t0
    report(format_summary(config, summary))
    return summary


def _start_state(config, wd: Workdir, run: Run, report):
    """(checkpoint or None, how, resumed): the newest usable checkpoint of this run (resumed), else
    the one named by `config.init_from` (a new run continuing another's state), else None (step 0)."""
    target = checkpoint_tree(run.state)
    restored = wd.restore_latest_good(target, check_config=lambda saved: check_resumable(saved, config, wd.path),
                                      report=report)
    if restored is not None:
        return restored, f"resumed from checkpoint {restored.step} in {wd.directory()}", True
    if config.init_from:
        source, kind, step = find_checkpoint(config.init_from)
        with source:
            restored = source.restore(step, target, kind)
        return restored, f"started from checkpoint {step} in {source.directory(kind)} (init_from)", False
    return None, "", False


def _train(config, wd: Workdir, schedule: RecordSchedule, stop: StopSignal, report) -> dict:
    run = Run(config)
    state, batches = run.state, run.train_batches()
    restored, how, resumed = _start_state(config, wd, run, report)
    if restored is not None:
        # Host copies: orbax hands back arrays committed to this process's first device, which a
        # multi-process driver could only place on the global mesh by cross-host transfers.
        state = state.replace(**jax.device_get(restored.state))
        batches.set_state(restored.data)
        report(how)
    step = int(state.step)
    config_json = config_lib.to_json(config)
    writer = monitor = None
    if run.process_index == 0:  # the process that writes the records
        wd.write_config(config.to_json(indent=2))
        writer = MetricsWriter(wd, purge_step=step + 1, report=report)
        # At every start: the records after this line are made under this schedule, and lines
        # written before it at later steps were a killed attempt's (readers drop them).
        writer.event(step, how or f"started at step {step}", start=True, schedule=schedule_fields(config_json))
        monitor = _make_monitor(config, schedule, run, wd, resume_step=step, report=report)

    driver = run.driver
    state = driver.put_state(state)
    batches = data.DevicePrefetch(batches, driver.put_batch, size=config.device_prefetch)
    timer = StepTimer(config.batch_size)
    from tqdm.auto import tqdm

    progress = tqdm(total=config.num_steps, initial=step, disable=not config.progress_bar, unit="step",
                    dynamic_ncols=True, desc="compiling" if step < config.num_steps else None)
    log = LogTrain(schedule, writer, timer, run.schedule, wd, progress)
    evaluate = Evaluate(run, schedule, writer, wd, resumed=resumed, best=wd.best_eval(report) if resumed else None)
    checkpoint = Checkpoint(wd, schedule, driver, batches, config_json, writer, evaluate,
                            saved_at=step if resumed else None)
    measure = Measure(monitor, schedule, run, driver, writer, resumed=resumed, report=report)
    sharpness = ([Sharpness(run, schedule, driver, writer, max_iter=config.analysis_sharpness, resumed=resumed,
                            report=report)] if writer and schedule.monitor_on and config.get("analysis_sharpness") else [])
    preempt = Preempt(stop, log, checkpoint, writer, wd, report)
    # The order after a step: the window's line first (its NaN check stops the run before anything
    # is evaluated or saved); the evaluation's lines before the checkpoint they belong to (a
    # checkpoint on disk has its evaluation on disk); the measurement after the checkpoint (a kill
    # between them is made good on resume, Measure.start); the SIGTERM flag last, so that a signal
    # arriving during the evaluation, the checkpoint or the measurement gets its checkpoint here.
    actions = ActionList([log, evaluate, checkpoint, measure, *sharpness, preempt], timer)
    try:
        try:
            if not stop.received:  # the records the starting step lacks (a stop during start-up skips them)
                actions.start(step, state)
            if stop.received:
                preempt.stop_before_the_first_step(step)
            compiled = False
            while step < config.num_steps and not preempt.stopped:
                state, metrics = driver.train_step(state, next(batches))
                step += 1
                log.add(metrics)
                if compiled:
                    timer.step()
                else:  # the first step of this process compiled the step function
                    timer.first_step_done(metrics)
                    progress.set_description(None, refresh=False)
                    compiled = True
                progress.update(1)
                actions.after_step(step, state)
        except FileWriteError as err:
            if isinstance(err, CheckpointWriteError):
                raise
            raise wd.record_write_failed(err, step) from err
        if "eval" not in evaluate.results and not preempt.stopped:  # resumed a finished run: evaluate it again
            evaluate.results["eval"] = run.evaluate(state)
    finally:
        progress.close()
    return {"step": step, "train": log.last, "eval": evaluate.results.get("eval"),
            "train_eval": evaluate.results.get("train_eval"), "best_eval": evaluate.best,
            "stopped": preempt.stopped, "workdir": str(wd.path)}


def _make_monitor(config, schedule: RecordSchedule, run: Run, wd: Workdir, resume_step, report):
    """The gradient-propagation monitor of `config.analysis_*`, or None when it is off. Every
    check (probe batch size, the model's unit interface, a writable analysis log) happens here,
    before training starts; it writes through `wd` (records past `resume_step`, a killed
    attempt's, are dropped)."""
    if not schedule.monitor_on:
        return None
    from jaxres.analysis.monitor import TrainingMonitor

    images, labels = run.probe_batch(config.analysis_batch_size)
    return TrainingMonitor(run.analysis_model(), images, labels, workdir=wd, bn=config.analysis_bn,
                           unit_jacobians=config.analysis_unit_jacobians, resume_step=resume_step, report=report)


def format_summary(config, summary: dict) -> str:
    def pct(m):
        return f"{100 * m['accuracy']:.2f}% ({int(m['count'])} examples)" if m else "-"

    rows = [("model", config.model), ("dataset", config.dataset),
            ("steps", f"{summary['step']} / {config.num_steps}" + (" (stopped by SIGTERM)" if summary["stopped"] else ""))]
    if summary["train"]:
        rows.append(("train loss (last window)", f"{summary['train']['loss']:.4f}"))
    if summary["eval"]:
        rows += [("eval loss", f"{summary['eval']['loss']:.4f}"), ("eval accuracy", pct(summary["eval"]))]
    if summary.get("train_eval"):
        rows.append(("train-subset accuracy (eval mode)", pct(summary["train_eval"])))
    if summary["best_eval"]:
        rows.append(("best eval accuracy", f"{pct(summary['best_eval'])} at step {summary['best_eval']['step']}"))
    rows += [("wall time", f"{summary['wall_time_s']:.1f} s"), ("workdir", summary["workdir"])]
    return summary_table(rows)


def evaluate_workdir(workdir, *, checkpoint: str = "latest", split: str = "", data_dir: str = "",
                     report=print) -> dict:
    """Evaluates a checkpoint of a run (`latest`, `best` or a step number) on its eval split
    (or `split`), with the config stored in that checkpoint. Reads only: a damaged checkpoint
    is reported with the ones that can be used instead, never moved."""
    wd, kind, wanted = find_checkpoint(workdir, checkpoint)

    def unreadable(err):
        others = [s for s in wd.steps(kind) if s != wanted]
        return ValueError(f"checkpoint {wanted} in {wd.directory(kind)} cannot be read ({describe_error(err)}); "
                          f"evaluate another with --checkpoint STEP (available: {others or 'none'}), or rerun "
                          f"training, which moves it aside and resumes from the previous one")

    with wd:
        try:
            config = config_lib.from_json(wd.stored_json(wanted, "config", kind))
        except Exception as err:  # noqa: BLE001 - the checkpoint's files cannot be read
            raise unreadable(err) from None
        if split:
            config.eval_split = split
        if data_dir:
            config.data_dir = data_dir
        run = Run(config, need_train=False)  # its own errors (a missing dataset, ...) pass through as they are
        try:
            tree = wd.restore(wanted, checkpoint_tree(run.state), kind).state
        except CheckpointMismatchError:
            raise
        except Exception as err:  # noqa: BLE001 - the checkpoint's files cannot be read
            raise unreadable(err) from None
    result = run.evaluate(run.driver.put_state(run.state.replace(**tree)))
    report(summary_table([("checkpoint", f"{kind}/{wanted}"), ("model", config.model),
                          ("split", f"{config.dataset}:{config.eval_split or run.spec.eval_split}"),
                          ("loss", f"{result['loss']:.4f}"),
                          ("accuracy", f"{100 * result['accuracy']:.2f}% ({int(result['count'])} examples)")]))
    return dict(result, step=wanted)
