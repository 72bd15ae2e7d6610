"""The training loop's periodic actions (jaxres.train.actions), each on its own: when it is due,
what it does and what it keeps, with fakes for what it is handed (a writer, a workdir, a run, a
driver) instead of a training run. The order of the loop's list is specified here too, through
one trace that every fake writes to."""

import contextlib
import types

import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.files import FileWriteError
from jaxres.records import RecordSchedule
from jaxres.train import metrics
from jaxres.train.actions import (ActionList, Checkpoint, Evaluate, LogTrain, Measure, NonFiniteLossError,
                                  PeriodicAction, Preempt)


def schedule(**fields) -> RecordSchedule:
    config = {"num_steps": 8, "log_every_steps": 3, "eval_every_steps": 4, "checkpoint_every_steps": 0,
              "analysis_every_steps": 0, "analysis_steps": (), "train_eval_examples": 0, **fields}
    return RecordSchedule.from_config(config)


class Writer:
    def __init__(self, trace):
        self.trace = trace

    def write(self, step, split, scalars):
        self.trace.append(("write", step, split, dict(scalars)))

    def event(self, step, text, **fields):
        self.trace.append(("event", step, text))

    def sync(self):
        self.trace.append(("sync",))


class Timer:
    def __init__(self, trace):
        self.trace = trace

    @contextlib.contextmanager
    def paused(self, state=None):
        self.trace.append(("pause",))
        yield
        self.trace.append(("resume",))

    def lap(self):
        return {"step_time": 0.5}


class FakeWorkdir:
    path = "/runs/w"

    def __init__(self, trace, latest=None, records=()):
        self.trace, self.latest, self.records = trace, latest, set(records)

    def latest_step(self):
        return self.latest

    def directory(self):
        return "/runs/w/checkpoints"

    def records_at(self, step):
        return self.records

    def save(self, step, tree, data_state, config, eval_metrics=None):
        self.trace.append(("save", step, eval_metrics))
        self.latest = step


class FakeRun:
    """Evaluates to fixed numbers per split; the analysis variables are the state itself."""

    def __init__(self, trace, accuracies=None, train_eval=False, during_eval=None):
        self.trace, self.accuracies = trace, list(accuracies or [0.5])
        self.train_eval, self.during_eval = train_eval, during_eval

    def evaluation_sources(self):
        return {"eval": "test split", **({"train_eval": "train subset"} if self.train_eval else {})}

    def evaluate(self, state, source):
        if self.during_eval:
            self.during_eval()
        if source != "test split":
            return {"loss": 1.0, "accuracy": 0.9, "count": 10.0}
        accuracy = self.accuracies.pop(0) if len(self.accuracies) > 1 else self.accuracies[0]
        return {"loss": 1.0, "accuracy": accuracy, "count": 10.0}

    def analysis_variables(self, host_state):
        return host_state


class Monitor:
    def __init__(self, trace, recorded=(), fail=None, during=None):
        self.trace, self.recorded, self.fail, self.during, self.closed = trace, set(recorded), fail, during, False

    def recorded_steps(self):
        return self.recorded

    def measure(self, step, variables):
        if self.during:
            self.during()
        if self.fail:
            raise self.fail
        self.trace.append(("measure", step))
        self.recorded.add(step)

    def close(self):
        self.closed = True


class Stop:
    def __init__(self):
        self.received, self.polled = False, []

    def poll(self, step):
        self.polled.append(step)


def host_state(value=1.0):
    """A train state on the host, as `driver.get_state` hands it to the checkpoint."""
    return types.SimpleNamespace(step=jnp.asarray(3), params={"w": jnp.full((2,), value)}, batch_stats={},
                                 opt_state=(), rng=jnp.zeros((2,), jnp.uint32), loss_scale=None)


DRIVER = types.SimpleNamespace(get_state=lambda state: state)
BATCHES = types.SimpleNamespace(get_state=lambda: {"next_index": 3})


def log_action(trace, sched=None, latest=None):
    return LogTrain(sched or schedule(), Writer(trace), Timer(trace), lambda count: 0.1 * (count + 1),
                    FakeWorkdir(trace, latest))


# -- the record schedule the actions ask --------------------------------------------------------

def test_checkpoints_come_at_evaluations_intervals_and_the_end_and_every_checkpoint_ends_a_window():
    s = schedule(num_steps=10, log_every_steps=4, eval_every_steps=6, checkpoint_every_steps=5)
    assert [k for k in range(11) if s.saves(k)] == [0, 5, 6, 10]
    assert [k for k in range(11) if s.logs(k)] == [0, 4, 5, 6, 8, 10]


# -- the list: order and the step timer -------------------------------------------------------

class Recorder(PeriodicAction):
    def __init__(self, name, trace, due_at):
        self.name, self.trace, self.due_at = name, trace, due_at

    def start(self, step, state):
        self.trace.append(("start", self.name))

    def due(self, step):
        return step in self.due_at

    def __call__(self, step, state):
        self.trace.append((self.name, step))


def test_the_list_runs_the_due_actions_in_its_order_each_with_the_step_timer_paused():
    trace = []
    actions = ActionList([Recorder("a", trace, {2}), Recorder("b", trace, {1, 2})], Timer(trace))
    actions.after_step(1, state=None)
    assert trace == [("pause",), ("b", 1), ("resume",)]
    trace.clear()
    actions.after_step(2, state=None)
    assert trace == [("pause",), ("a", 2), ("resume",), ("pause",), ("b", 2), ("resume",)]
    trace.clear()
    actions.start(0, state=None)
    assert [t for t in trace if t[0] == "start"] == [("start", "a"), ("start", "b")]


def test_a_lap_inside_a_pause_starts_the_next_window_at_the_lap(monkeypatch):
    # The log action takes the window's lap while the timer is paused around it: the next window
    # starts at the lap and excludes only the paused time after it.
    now = [0.0]
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    timer = metrics.StepTimer(batch_size=10)
    timer.steps = 4
    now[0] = 8.0  # 4 steps, 2 s each
    with timer.paused():
        now[0] = 9.0  # the window's metrics are back from the devices
        lap = timer.lap()
        now[0] = 12.0  # writing the line
    assert lap["step_time"] == pytest.approx(9.0 / 4)
    timer.steps = 1
    now[0] = 14.0
    assert timer.lap()["step_time"] == pytest.approx(2.0)  # 14 - 9 less the 3 s paused after the lap


# -- LogTrain -----------------------------------------------------------------------------------

def test_a_train_line_holds_the_window_means_its_steps_and_the_learning_rate_of_its_last_update():
    trace = []
    log = log_action(trace)
    for loss, skipped in ((3.0, 0), (2.0, 1), (1.0, 1)):
        log.add({"loss": np.float32(loss), "accuracy": np.float32(0.5), "skipped": np.int32(skipped)})
    assert not log.due(2) and log.due(3)
    log(3, state=None)
    assert trace == [("write", 3, "train", {"loss": 2.0, "accuracy": 0.5, "skipped": 2.0, "steps": 3,
                                            "learning_rate": pytest.approx(0.3), "step_time": 0.5})]
    assert log.last["steps"] == 3 and log.pending == []
    log(3, state=None)  # nothing pending (a stop right after a logged step): no second line
    assert len(trace) == 1


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint():
    trace = []
    log = log_action(trace, latest=2)
    for loss in (1.0, np.nan):
        log.add({"loss": np.float32(loss)})
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4; .*checkpoint 2 in /runs/w/checkpoints "
                                                 r"\(intact\).*--config.init_from=/runs/w"):
        log(4, state=None)
    assert trace == []  # no line for the window


# -- Evaluate -----------------------------------------------------------------------------------

def test_evaluations_write_a_line_per_split_and_keep_the_best_the_latest_of_equals():
    trace = []
    evaluate = Evaluate(FakeRun(trace, accuracies=[0.6, 0.6, 0.4], train_eval=True), schedule(train_eval_examples=5),
                        Writer(trace), FakeWorkdir(trace), resumed=False)
    assert [k for k in range(9) if evaluate.due(k)] == [0, 4, 8]
    for step in (2, 4, 6):
        evaluate(step, state=None)
    assert [(t[1], t[2]) for t in trace] == [(s, split) for s in (2, 4, 6) for split in ("eval", "train_eval")]
    assert evaluate.best == {"loss": 1.0, "accuracy": 0.6, "count": 10.0, "step": 4}
    assert evaluate.results["train_eval"]["accuracy"] == 0.9
    assert evaluate.eval_metrics_at(6)["accuracy"] == 0.4 and evaluate.eval_metrics_at(4) is None


def test_a_resumed_run_evaluates_only_the_splits_its_restored_step_lacks():
    trace = []
    sched = schedule(train_eval_examples=5)  # step 4 wants eval and train_eval; eval is on disk
    evaluate = Evaluate(FakeRun(trace, train_eval=True), sched, Writer(trace), FakeWorkdir(trace, records={"eval"}),
                        resumed=True, best={"accuracy": 0.7, "step": 2})
    evaluate.start(4, state=None)
    assert [t[2] for t in trace] == ["train_eval"]
    assert evaluate.best == {"accuracy": 0.7, "step": 2}  # the restored best is left as it was
    Evaluate(FakeRun(trace), sched, Writer(trace), FakeWorkdir(trace), resumed=False).start(0, state=None)
    assert len(trace) == 1  # a new run's first state is not evaluated


# -- Checkpoint ---------------------------------------------------------------------------------

def checkpoint_action(trace, state_value=1.0, evaluated=None):
    evaluate = types.SimpleNamespace(eval_metrics_at=lambda step: evaluated)
    driver = types.SimpleNamespace(get_state=lambda state: host_state(state_value))
    return Checkpoint(FakeWorkdir(trace, latest=2), schedule(checkpoint_every_steps=3), driver, BATCHES,
                      {"num_steps": 8}, Writer(trace), evaluate, saved_at=2)


def test_a_checkpoint_syncs_the_lines_first_carries_its_eval_metrics_and_is_saved_once_per_step():
    trace = []
    checkpoint = checkpoint_action(trace, evaluated={"accuracy": 0.5})
    assert [k for k in range(9) if checkpoint.due(k)] == [0, 3, 4, 6, 8]
    checkpoint(2, state=None)  # the restored step is on disk already
    checkpoint(4, state=None)
    checkpoint(4, state=None)
    assert trace == [("sync",), ("save", 4, {"accuracy": 0.5})]
    assert checkpoint.saved_at == 4


def test_a_state_with_a_non_finite_number_is_never_saved():
    trace = []
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 6; .*Last good checkpoint: checkpoint 2"):
        checkpoint_action(trace, state_value=np.inf)(6, state=None)
    assert ("save", 6, None) not in trace


# -- Measure ------------------------------------------------------------------------------------

def measure_action(trace, monitor, resumed=False, **fields):
    return Measure(monitor, schedule(analysis_every_steps=4, **fields), FakeRun(trace), DRIVER, Writer(trace),
                   resumed=resumed, report=lambda text: trace.append(("report", text)))


def test_a_new_run_measures_its_first_state_and_then_the_scheduled_steps_once():
    trace = []
    measure = measure_action(trace, Monitor(trace), analysis_steps=(1,))
    measure.start(0, state=None)
    assert [k for k in range(9) if measure.due(k)] == [0, 1, 4, 8]
    measure(4, state=None)
    measure(4, state=None)  # on record: skipped
    assert trace == [("measure", 0), ("measure", 4)]


def test_a_resumed_run_measures_its_restored_step_only_when_scheduled_and_missing():
    trace = []
    measure_action(trace, Monitor(trace, recorded={0}), resumed=True).start(3, state=None)  # not scheduled
    measure_action(trace, Monitor(trace, recorded={0, 4}), resumed=True).start(4, state=None)  # on record
    measure_action(trace, Monitor(trace, recorded={0}), resumed=True).start(4, state=None)  # killed before it
    assert trace == [("measure", 4)]


def test_a_failed_measurement_turns_the_monitor_off_and_the_run_goes_on():
    trace = []
    monitor = Monitor(trace, fail=FloatingPointError("overflow"))
    measure = measure_action(trace, monitor)
    measure(4, state=None)
    assert trace == [("report", "analysis at step 4 failed (FloatingPointError: overflow); training goes on "
                                "without it"), ("event", 4, "analysis stopped: FloatingPointError: overflow")]
    assert monitor.closed and measure.monitor is None and not measure.due(8)


def test_a_record_that_cannot_be_written_stops_the_run():
    trace = []
    measure = measure_action(trace, Monitor(trace, fail=FileWriteError(28, "could not write analysis")))
    with pytest.raises(FileWriteError):
        measure(4, state=None)


# -- Preempt ------------------------------------------------------------------------------------

def test_a_stop_polls_every_step_then_logs_the_window_saves_this_step_and_says_so():
    trace = []
    stop = Stop()
    log = log_action(trace)
    log.add({"loss": np.float32(1.0)})
    checkpoint = checkpoint_action(trace)
    preempt = Preempt(stop, log, checkpoint, Writer(trace), FakeWorkdir(trace), report=lambda t: trace.append(t))
    assert not preempt.due(5) and stop.polled == [5]
    stop.received = True
    assert preempt.due(5)
    preempt(5, state=None)
    assert [t[:3] for t in trace if isinstance(t, tuple)] == [("write", 5, "train"), ("sync",), ("save", 5, None),
                                                             ("event", 5, "stopped by SIGTERM")]
    assert "SIGTERM: saved checkpoint 5 in /runs/w/checkpoints; rerun the same command to resume" in trace
    assert preempt.stopped


def test_a_stop_during_start_up_saves_nothing_and_names_the_latest_checkpoint():
    trace = []
    preempt = Preempt(Stop(), log_action(trace), checkpoint_action(trace), Writer(trace), FakeWorkdir(trace, latest=6),
                      report=lambda t: trace.append(t))
    preempt.stop_before_the_first_step(6)
    assert preempt.stopped and not any(t[0] == "save" for t in trace if isinstance(t, tuple))
    assert ("SIGTERM before the first step: nothing trained, nothing new to save (latest checkpoint: 6 in "
            "/runs/w/checkpoints); rerun the same command to resume") in trace


# -- the loop's order ---------------------------------------------------------------------------

def loop_actions(trace, stop, sched, run=None, monitor=None):
    """The loop's list, in the loop's order (jaxres.train.loop._train), wired to fakes."""
    writer, workdir = Writer(trace), FakeWorkdir(trace, latest=0)
    log = LogTrain(sched, writer, Timer([]), lambda count: 0.1, workdir)
    evaluate = Evaluate(run or FakeRun(trace), sched, writer, workdir, resumed=False)
    checkpoint = Checkpoint(workdir, sched, types.SimpleNamespace(get_state=lambda state: host_state()), BATCHES,
                            {}, writer, evaluate)
    measure = Measure(monitor or Monitor(trace), sched, FakeRun(trace), DRIVER, writer, resumed=False)
    preempt = Preempt(stop, log, checkpoint, writer, workdir, report=lambda text: None)
    return log, preempt, ActionList([log, evaluate, checkpoint, measure, preempt], Timer([]))


def test_at_an_evaluated_step_the_lines_precede_the_checkpoint_and_the_measurement_follows_it():
    trace = []
    log, _, actions = loop_actions(trace, Stop(), schedule(analysis_every_steps=4))
    log.add({"loss": np.float32(1.0)})
    actions.after_step(4, state=None)
    assert [t[:3] for t in trace] == [("write", 4, "train"), ("write", 4, "eval"), ("sync",),
                                      ("save", 4, {"loss": 1.0, "accuracy": 0.5, "count": 10.0}), ("measure", 4)]


@pytest.mark.parametrize("during", ["evaluation", "measurement"])
def test_a_sigterm_during_an_action_gets_its_checkpoint_at_this_step(during):
    trace = []
    stop = Stop()
    flag = lambda: setattr(stop, "received", True)  # noqa: E731
    sched = schedule(log_every_steps=0, eval_every_steps=2, analysis_every_steps=3)
    run = FakeRun(trace, during_eval=flag if during == "evaluation" else None)
    monitor = Monitor(trace, during=flag if during == "measurement" else None)
    log, preempt, actions = loop_actions(trace, stop, sched, run, monitor)
    step = 2 if during == "evaluation" else 3
    log.add({"loss": np.float32(1.0)})
    actions.after_step(step, state=None)
    assert preempt.stopped and ("save", step) in [t[:2] for t in trace]
    assert ("event", step, "stopped by SIGTERM") == trace[-1]
    assert ("write", step, "train") in [t[:3] for t in trace]  # the window ends at the stop
