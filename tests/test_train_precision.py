"""Mixed precision (issue 5): bf16/f16 compute tracks float32; float16 loss scaling skips
overflowing steps; the loop runs under every parallel driver and dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxres.models import ResNet
from jaxres.train import create_train_state, train_and_evaluate, train_step
from jaxres.train.precision import DynamicLossScale
from tests.test_train_loop import tiny_config

STEPS = 5


def run_steps(dtype, loss_scale=None, steps=STEPS):
    model = ResNet(stage_sizes=(1, 1, 1), widths=(4, 8, 16), stem="cifar", shortcut="A", num_classes=10, dtype=dtype)
    state = create_train_state(model, optax.sgd(0.05, momentum=0.9), jax.random.PRNGKey(0), (1, 16, 16, 3), loss_scale)
    data = np.random.default_rng(0)
    step = jax.jit(train_step)
    history = []
    for _ in range(steps):
        batch = {"image": jnp.asarray(data.normal(size=(16, 16, 16, 3)), jnp.float32),
                 "label": jnp.asarray(data.integers(0, 10, 16), jnp.int32)}
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


@pytest.fixture(scope="module")
def float32_run():
    return run_steps(jnp.float32)


@pytest.mark.parametrize("dtype, loss_scale", [(jnp.bfloat16, None), (jnp.float16, DynamicLossScale.create())])
def test_low_precision_losses_track_float32(float32_run, dtype, loss_scale):
    _, reference = float32_run
    state, history = run_steps(dtype, loss_scale)
    # bfloat16 keeps 8 significant bits (float16 11): a few steps stay within 2% of float32
    np.testing.assert_allclose([m["loss"] for m in history], [m["loss"] for m in reference], rtol=2e-2)
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32  # params stay float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.batch_stats))
    if loss_scale is not None:
        assert sum(m["skipped"] for m in history) == 0
        assert int(state.loss_scale.good_steps) == STEPS


def test_float16_overflow_skips_the_step_and_halves_the_scale():
    # 2**40 times the loss overflows float16's 65,504 in the backward pass
    state, history = run_steps(jnp.float16, DynamicLossScale.create(2.0**40), steps=1)
    fresh, _ = run_steps(jnp.float16, DynamicLossScale.create(2.0**40), steps=0)
    assert history[0]["skipped"] == 1.0 and history[0]["loss_scale"] == 2.0**40
    assert float(state.loss_scale.scale) == 2.0**39
    assert int(state.step) == 1  # the step counts; nothing else moved
    for new, old in zip(jax.tree.leaves((state.params, state.opt_state, state.batch_stats)),
                        jax.tree.leaves((fresh.params, fresh.opt_state, fresh.batch_stats))):
        np.testing.assert_array_equal(new, old)


def test_loss_scale_grows_after_a_period_of_finite_steps():
    scale = DynamicLossScale.create(8.0, period=3)
    for _ in range(3):
        scale = scale.update(jnp.array(True))
    assert float(scale.scale) == 16.0 and int(scale.good_steps) == 0
    assert float(scale.update(jnp.array(False)).scale) == 8.0
    assert float(DynamicLossScale.create(1.0).update(jnp.array(False)).scale) == 1.0  # never below 1


@pytest.mark.parametrize("parallel, dtype", [("pmap", "bfloat16"), ("sharded", "float16")])
def test_loop_runs_with_every_driver_and_dtype(tmp_path, parallel, dtype):
    summary = train_and_evaluate(tiny_config(parallel=parallel, dtype=dtype, num_steps=2), tmp_path)
    assert summary["step"] == 2 and summary["eval"]["count"] == 257
    assert np.isfinite(summary["train"]["loss"])
    if dtype == "float16":
        assert summary["train"]["skipped"] == 0.0
