"""Mixed precision: bf16/f16 compute tracks float32; float16 loss scaling skips
overflowing steps; the loop runs under every parallel driver and dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxres.models import ResNet
from jaxres.train import create_train_state, train_and_evaluate, train_step
from jaxres.train.precision import dynamic_loss_scale
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


@pytest.mark.parametrize("dtype, loss_scale", [(jnp.bfloat16, None), (jnp.float16, dynamic_loss_scale())])
def test_low_precision_losses_track_float32(float32_run, dtype, loss_scale):
    _, reference = float32_run
    state, history = run_steps(dtype, loss_scale)
    # bfloat16 keeps 8 significant bits (float16 11): a few steps stay within 2% of float32
    np.testing.assert_allclose([m["loss"] for m in history], [m["loss"] for m in reference], rtol=2e-2)
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32  # params stay float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.batch_stats))
    if loss_scale is not None:
        assert sum(m["skipped"] for m in history) == 0
        assert int(state.loss_scale.fin_steps) == STEPS


def test_float16_overflow_skips_the_step_and_halves_the_scale():
    # 2**40 times the loss overflows float16's 65,504 in the backward pass
    state, history = run_steps(jnp.float16, dynamic_loss_scale(2.0**40), steps=1)
    fresh, _ = run_steps(jnp.float16, dynamic_loss_scale(2.0**40), steps=0)
    assert history[0]["skipped"] == 1.0 and history[0]["loss_scale"] == 2.0**40
    assert float(state.loss_scale.scale) == 2.0**39
    assert int(state.step) == 1  # the step counts; nothing else moved
    for new, old in zip(jax.tree.leaves((state.params, state.opt_state, state.batch_stats)),
                        jax.tree.leaves((fresh.params, fresh.opt_state, fresh.batch_stats))):
        np.testing.assert_array_equal(new, old)


def test_loss_scale_doubles_after_its_growth_interval_and_never_drops_below_one():
    # flax's DynamicScale: after growth_interval finite steps in a row, the next finite one doubles it.
    scale = dynamic_loss_scale(8.0, growth_interval=2)
    for expected in (8.0, 8.0, 16.0, 16.0):
        scale = update(scale, True)
        assert float(scale.scale) == expected
    assert float(update(scale, False).scale) == 8.0 and int(update(scale, False).fin_steps) == 0
    assert float(update(dynamic_loss_scale(1.0), False).scale) == 1.0  # never below 1
    assert scale.scale.dtype == jnp.float32 and scale.fin_steps.dtype == jnp.int32  # as checkpointed


def update(scale, finite: bool):
    """The scale after one step whose gradient is finite or not (a gradient of 1 or inf)."""
    grad = jnp.float32(1.0 if finite else jnp.inf)
    new_scale, is_finite, _, _ = scale.value_and_grad(lambda w: w * grad)(jnp.float32(1.0))
    assert bool(is_finite) == finite
    return new_scale


def test_old_initial_scales_below_one_are_refused():
    with pytest.raises(ValueError, match="initial loss scale must be >= 1 .*got 0.5"):
        dynamic_loss_scale(0.5)


@pytest.mark.parametrize("parallel, dtype", [("pmap", "bfloat16"), ("sharded", "float16")])
def test_loop_runs_with_every_driver_and_dtype(tmp_path, parallel, dtype):
    summary = train_and_evaluate(tiny_config(parallel=parallel, dtype=dtype, num_steps=2), tmp_path)
    assert summary["step"] == 2 and summary["eval"]["count"] == 257
    assert np.isfinite(summary["train"]["loss"])
    if dtype == "float16":
        assert summary["train"]["skipped"] == 0.0
