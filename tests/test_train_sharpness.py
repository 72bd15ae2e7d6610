"""The training loop's sharpness action (jaxres.train.actions.Sharpness) on a tiny net, with
fakes for the run, driver and writer: what it writes, when, and that a failure never stops a run."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.analysis.sharpness import top_hessian_eigenvalue
from jaxres.records import RecordSchedule
from jaxres.train.actions import Sharpness


class Writer:
    def __init__(self):
        self.lines = []

    def write(self, step, split, scalars):
        self.lines.append((step, split, dict(scalars)))

    def event(self, step, text, **fields):
        self.lines.append((step, "event", text))


class FakeRun:
    """A tiny net whose state is its variables; learning rate 0.1 until step 4, then 0.01."""

    def __init__(self):
        from jaxres.models import ResNet

        self.model = ResNet(stage_sizes=(1,), widths=(3,), stem="cifar", num_classes=3, in_channels=2)
        self.x = np.asarray(jax.random.normal(jax.random.key(0), (4, 4, 4, 2)), np.float32)
        self.labels = np.array([0, 1, 2, 0])
        self.variables = jax.jit(self.model.init)(jax.random.key(1), jnp.asarray(self.x))
        self.config = types.SimpleNamespace(analysis_batch_size=4, momentum=0.9)

    def probe_batch(self, size):
        return self.x[:size], self.labels[:size]

    def analysis_model(self):
        return self.model

    def analysis_variables(self, state):
        return state

    def schedule(self, step):
        return 0.1 if step < 4 else 0.01


DRIVER = types.SimpleNamespace(get_state=lambda state: state)


def action(run, writer, **kwargs):
    schedule = RecordSchedule.from_config({"num_steps": 8, "log_every_steps": 3, "eval_every_steps": 0,
                                           "checkpoint_every_steps": 0, "analysis_every_steps": 4,
                                           "analysis_steps": (), "train_eval_examples": 0})
    return Sharpness(run, schedule, DRIVER, writer, max_iter=50, resumed=False, report=lambda text: None, **kwargs)


@pytest.fixture(scope="module")
def run():
    return FakeRun()


def test_it_writes_the_top_eigenvalue_beside_the_next_updates_thresholds(run):
    writer = Writer()
    sharpness = action(run, writer)
    assert [k for k in range(9) if sharpness.due(k)] == [0, 4, 8]
    sharpness(4, run.variables)
    ((step, split, line),) = writer.lines
    expected = top_hessian_eigenvalue(run.model, run.variables, run.x, run.labels, bn="batch", max_iter=50)
    assert (step, split) == (4, "sharpness")
    assert line["lambda_max"] == pytest.approx(expected["lambda_max"], rel=1e-6)
    assert line["learning_rate"] == 0.01
    assert line["threshold_gd"] == pytest.approx(200.0) and line["threshold_momentum"] == pytest.approx(380.0)


def test_a_failure_is_noted_and_turns_it_off(run):
    writer = Writer()
    sharpness = action(run, writer)
    diverged = {**run.variables, "params": jax.tree.map(lambda a: a * jnp.nan, run.variables["params"])}
    sharpness(4, diverged)
    assert writer.lines[0][1] == "event" and "sharpness stopped: ValueError" in writer.lines[0][2]
    assert not sharpness.due(8)
