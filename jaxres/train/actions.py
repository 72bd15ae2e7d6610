"""The training loop's periodic actions, each a small object with its own state.

After every step the loop asks each action whether it is `due(step)` (the actions ask
`jaxres.records.RecordSchedule`, the one place that knows the schedule) and, if so, calls
`action(step, state)`; before the first step, `action.start(step, state)` makes what the starting
step lacks. `ActionList` runs them in the order of its list (the loop states that order and why)
and pauses the step timer around each one that runs, as big_vision's loop pauses its chronometer
around evaluations and Flax's examples hand their loop a list of `periodic_actions`.

`state` is the train state in the driver's device layout. Every action here can be built from
fakes of what it is handed (a writer, a run, a driver, a workdir) and tested without training.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxres.files import FileWriteError
from jaxres.records import RecordSchedule
from jaxres.train import precision
from jaxres.train.state import checkpoint_tree

all_finite = jax.jit(precision.all_finite)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def non_finite(workdir, what: str) -> NonFiniteLossError:
    """The error that stops a run at `what` (a non-finite loss or state), naming the last good
    checkpoint of `workdir` and how to go on from it."""
    good = workdir.latest_step()
    where = f"checkpoint {good} in {workdir.directory()} (intact)" if good is not None else "none saved yet"
    advice = (f"To go on from it with other settings (e.g. a lower learning rate), start a new run from it: "
              f"jaxres train ... --workdir NEW --config.init_from={workdir.path}" if good is not None else
              "Lower the learning rate or check the data and start again")
    return NonFiniteLossError(f"{what}; training stopped. Last good checkpoint: {where}. {advice}.")


class PeriodicAction:
    """One job of the training loop: when it is due after a step, and what it does then."""

    def start(self, step: int, state) -> None:
        """Before the first step of this process: makes what the starting step lacks (default: nothing)."""

    def due(self, step: int) -> bool:
        raise NotImplementedError

    def __call__(self, step: int, state) -> None:
        raise NotImplementedError


class ActionList:
    """The loop's actions in their order: after every step each is asked `due(step)` in turn
    (Preempt's question is also a multi-host agreement) and runs if it is. The step timer
    (`metrics.StepTimer`) is paused around each one that runs, after waiting for the steps
    dispatched on `state` (their device time stays counted as step time)."""

    def __init__(self, actions: list[PeriodicAction], timer):
        self.actions = list(actions)
        self.timer = timer

    def start(self, step: int, state) -> None:
        for action in self.actions:
            with self.timer.paused(state):
                action.start(step, state)

    def after_step(self, step: int, state) -> None:
        for action in self.actions:
            if action.due(step):
                with self.timer.paused(state):
                    action(step, state)


class LogTrain(PeriodicAction):
    """The train line of a window of steps: the means of their metrics (the count of float16
    steps skipped for overflowing gradients summed), `steps` (how many it averages: fewer than
    `log_every_steps` after a start or before a stop), the learning rate of the window's last
    update and its throughput (`timer.lap()`). A non-finite loss stops the run here, before
    anything is evaluated or saved.

    The loop hands it each step's metrics (`add`); `last` is the latest line (the summary's)."""

    def __init__(self, schedule: RecordSchedule, writer, timer, learning_rate, workdir, progress=None):
        self.schedule = schedule
        self.writer = writer  # None on the processes that write no records
        self.timer = timer
        self.learning_rate = learning_rate  # optimizer step -> learning rate
        self.workdir = workdir
        self.progress = progress  # a tqdm bar shows the latest loss
        self.pending: list = []  # the window's metrics, still on the devices
        self.last: dict = {}

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def due(self, step: int) -> bool:
        return self.schedule.logs(step)

    def __call__(self, step: int, state) -> None:
        if not self.pending:
            return
        values = jax.device_get(self.pending)  # one host sync for the window
        self.pending = []
        throughput = self.timer.lap()
        first = step - len(values) + 1
        for offset, m in enumerate(values):
            if not np.isfinite(m["loss"]):
                raise non_finite(self.workdir, f"loss is {float(m['loss'])} at step {first + offset}")
        line = {k: float((np.sum if k == "skipped" else np.mean)([m[k] for m in values])) for k in values[0]}
        line["steps"] = len(values)
        line["learning_rate"] = float(self.learning_rate(step - 1))
        self.last = {**line, **throughput}
        if self.writer:
            self.writer.write(step, "train", self.last)
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{self.last['loss']:.4f}", refresh=False)


class Evaluate(PeriodicAction):
    """Evaluates the state on the eval split and, with `train_eval_examples`, on the fixed
    training subset (`run.evaluation_sources()`), and writes a metrics line per split. Keeps the
    latest results (`results`, by split; `step`, theirs) and the best eval metrics with their
    step (`best`: the latest of equals, as the workdir's best checkpoint).

    start: a resumed run evaluates the splits its restored step should have and lacks (the
    schedule may ask for more than the run that saved it did)."""

    def __init__(self, run, schedule: RecordSchedule, writer, workdir, *, resumed: bool, best: dict | None = None):
        self.run = run
        self.schedule = schedule
        self.writer = writer
        self.workdir = workdir
        self.resumed = resumed
        self.best = best
        self.results: dict[str, dict] = {}
        self.step: int | None = None

    def start(self, step: int, state) -> None:
        if self.resumed:
            missing = self.schedule.wanted(step) - self.workdir.records_at(step)
            self._evaluate(step, state, [s for s in self.schedule.eval_splits if s in missing])

    def due(self, step: int) -> bool:
        return self.schedule.evaluates(step)

    def __call__(self, step: int, state) -> None:
        self._evaluate(step, state, self.schedule.eval_splits)
        latest = self.results["eval"]
        if self.best is None or latest["accuracy"] >= self.best["accuracy"]:
            self.best = dict(latest, step=step)

    def eval_metrics_at(self, step: int) -> dict | None:
        """The eval metrics of `step` if it was evaluated (for its checkpoint), else None."""
        return self.results.get("eval") if self.step == step else None

    def _evaluate(self, step: int, state, splits) -> None:
        if not splits:
            return
        for split, source in self.run.evaluation_sources().items():
            if split in splits:
                self.results[split] = self.run.evaluate(state, source)
                if self.writer:
                    self.writer.write(step, split, self.results[split])
        self.step = step


class Checkpoint(PeriodicAction):
    """Saves the state at a step once (again at the same step: nothing): its arrays, the data
    iterator's position and the config; at an evaluated step with its eval metrics (a candidate
    for the best checkpoint). The metrics lines so far are synced first, so every line that a
    checkpoint covers is on disk before it; a state holding a non-finite number is never saved.

    saved_at: the step of the checkpoint on disk (a resumed run's restored step), else None."""

    def __init__(self, workdir, schedule: RecordSchedule, driver, batches, config_json: dict, writer,
                 evaluate: Evaluate, *, saved_at: int | None = None):
        self.workdir = workdir
        self.schedule = schedule
        self.driver = driver  # get_state: the state on the host
        self.batches = batches  # get_state: the training iterator's position
        self.config_json = config_json
        self.writer = writer
        self.evaluate = evaluate
        self.saved_at = saved_at

    def due(self, step: int) -> bool:
        return self.schedule.saves(step)

    def __call__(self, step: int, state) -> None:
        if self.saved_at == step:
            return
        if self.writer:
            self.writer.sync()
        tree = checkpoint_tree(self.driver.get_state(state))
        # A finite loss can still come with an overflowing update: never save such a state.
        if not bool(all_finite(tree)):
            raise non_finite(self.workdir, f"parameters or optimizer state are non-finite at step {step}")
        self.workdir.save(step, tree, self.batches.get_state(), self.config_json, self.evaluate.eval_metrics_at(step))
        self.saved_at = step


class ScheduledMeasurement(PeriodicAction):
    """What Measure and Sharpness share: they run at the record schedule's steps (`schedule`); a
    new run measures its starting step, a resumed one only when that step is scheduled (its record
    may be missing); a failure is reported, noted in the metrics log (`writer`), and the subclass
    turns itself off. `name` says which in those messages."""

    name = "measurement"

    def start(self, step: int, state) -> None:
        if not self.resumed or self.schedule.measures(step):
            self(step, state)

    def failed(self, step: int, err: Exception) -> None:
        self.report(f"{self.name} at step {step} failed ({type(err).__name__}: {err}); training goes on without it")
        if self.writer:
            self.writer.event(step, f"{self.name} stopped: {type(err).__name__}: {err}")


class Measure(ScheduledMeasurement):
    """The gradient monitor's measurement (`jaxres.analysis.monitor.TrainingMonitor`) at the
    steps the schedule names, once per step (a step on record is skipped). A measurement that
    fails for any reason but a record that cannot be written is reported, noted in the metrics
    log, and turns the monitor off: it never costs the training run.

    start: a new run measures its first state (step 0, or init_from's step); a resumed one its
    restored step when the schedule names it and the record is missing (a kill between the
    checkpoint and the measurement)."""

    name = "analysis"

    def __init__(self, monitor, schedule: RecordSchedule, run, driver, writer, *, resumed: bool, report=print):
        self.monitor = monitor  # None: off (or on the processes that write no records)
        self.schedule = schedule
        self.run = run  # analysis_variables: the per-unit layout the monitor reads
        self.driver = driver
        self.writer = writer
        self.resumed = resumed
        self.report = report

    def due(self, step: int) -> bool:
        return self.monitor is not None and self.schedule.measures(step)

    def __call__(self, step: int, state) -> None:
        if self.monitor is None or step in self.monitor.recorded_steps():
            return
        try:
            self.monitor.measure(step, self.run.analysis_variables(self.driver.get_state(state)))
        except FileWriteError:
            raise  # a record that cannot be written stops the run; a failed measurement does not
        except Exception as err:  # noqa: BLE001 - a failed measurement never costs the training run
            self.failed(step, err)
            self.monitor.close()
            self.monitor = None


class Sharpness(ScheduledMeasurement):
    """The top Hessian eigenvalue of the training loss (batch statistics, as trained) on the
    monitor's probe batch, at the monitor's steps (`jaxres.analysis.sharpness`: Lanczos on
    exact Hessian-vector products, relative residual 1e-3, at most `max_iter` products), written
    to the metrics log as split "sharpness" beside the learning rate of the next update and
    Cohen et al.'s stability thresholds 2/lr and (2 + 2 momentum)/lr. As for `Measure`, a
    failure is reported, noted in the metrics log, and turns it off; it never costs the run."""

    name = "sharpness"

    def __init__(self, run, schedule: RecordSchedule, driver, writer, *, max_iter: int, resumed: bool, report=print):
        from jaxres.analysis.sharpness import check_tolerance

        check_tolerance(1e-3, max_iter)
        self.run, self.schedule, self.driver, self.writer = run, schedule, driver, writer
        self.max_iter, self.resumed, self.report = max_iter, resumed, report
        self.images, self.labels = run.probe_batch(run.config.analysis_batch_size)

    def due(self, step: int) -> bool:
        return self.writer is not None and self.schedule.measures(step)

    def __call__(self, step: int, state) -> None:
        from jaxres.analysis.sharpness import stability_thresholds, top_hessian_eigenvalue

        if self.writer is None:
            return
        try:
            result = top_hessian_eigenvalue(self.run.analysis_model(),
                                            self.run.analysis_variables(self.driver.get_state(state)),
                                            self.images, self.labels, bn="batch", max_iter=self.max_iter)
        except Exception as err:  # noqa: BLE001 - a failed measurement never costs the training run
            self.failed(step, err)
            self.writer = None
            return
        lr = float(self.run.schedule(step))
        thresholds = stability_thresholds(lr, self.run.config.momentum)
        self.writer.write(step, "sharpness", {
            "lambda_max": result["lambda_max"], "residual": result["residual"], "iterations": result["iterations"],
            "converged": int(result["converged"]), "loss": result["loss"], "learning_rate": lr,
            "threshold_gd": thresholds["gd"], "threshold_momentum": thresholds["momentum"]})


class Preempt(PeriodicAction):
    """SIGTERM as a stop (`jaxres.preemption.StopSignal`): due once the flag is up; then it ends
    the window's train line, saves this step (unless it is saved), says so and stops the loop
    (`stopped`). Reading the flag after the other actions gives a signal that arrives while they
    run its checkpoint at this step."""

    def __init__(self, stop, log: LogTrain, checkpoint: Checkpoint, writer, workdir, report=print):
        self.stop = stop
        self.log = log
        self.checkpoint = checkpoint
        self.writer = writer
        self.workdir = workdir
        self.report = report
        self.stopped = False

    def due(self, step: int) -> bool:
        self.stop.poll(step)  # a multi-process job agrees on the step here: asked after every step
        return self.stop.received

    def __call__(self, step: int, state) -> None:
        self.log(step, state)
        self.checkpoint(step, state)
        self.stopped = True
        self.report(f"SIGTERM: saved checkpoint {step} in {self.workdir.directory()}; rerun the same command to resume")
        if self.writer:
            self.writer.event(step, "stopped by SIGTERM")

    def stop_before_the_first_step(self, step: int) -> None:
        """A stop requested during start-up: nothing trained by this process, nothing new to save."""
        self.stopped = True
        latest = self.workdir.latest_step()
        self.report("SIGTERM before the first step: nothing trained, nothing new to save "
                    + (f"(latest checkpoint: {latest} in {self.workdir.directory()}); rerun the same command to "
                       f"resume" if latest is not None else "(no checkpoint yet); rerun the same command to start"))
        if self.writer:
            self.writer.event(step, "stopped by SIGTERM before the first step")
