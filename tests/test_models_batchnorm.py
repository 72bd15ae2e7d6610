"""jaxres.models.batchnorm.BatchNorm is flax.linen.BatchNorm normalizing as x * a + b: the same
variables, statistics and running averages bit for bit, outputs and derivatives to rounding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxres.models.batchnorm import BatchNorm

X = jax.random.normal(jax.random.key(0), (8, 5, 5, 6)) * 3 + 1.5
FIELDS = dict(momentum=0.9, epsilon=1e-5, scale_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))


def both(**fields):
    return nn.BatchNorm(**FIELDS, **fields), BatchNorm(**FIELDS, **fields)


def leaves_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(p, q) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("train", [True, False])
def test_same_variables_statistics_and_outputs_as_flax(train):
    flax_bn, ours = both(use_running_average=not train)
    variables = flax_bn.init(jax.random.key(1), X)
    assert leaves_equal(variables, ours.init(jax.random.key(1), X))
    y_flax, new_flax = flax_bn.apply(variables, X, mutable=["batch_stats"])
    y, new = ours.apply(variables, X, mutable=["batch_stats"])
    assert leaves_equal(new_flax, new)  # running averages: bit for bit
    np.testing.assert_allclose(y, y_flax, atol=2e-6, rtol=1e-6)
    if train:  # normalized: per-channel mean bias, std |scale|
        np.testing.assert_allclose(y.mean((0, 1, 2)), variables["params"]["bias"], atol=1e-5)
        np.testing.assert_allclose(y.std((0, 1, 2)), jnp.abs(variables["params"]["scale"]), rtol=1e-4)


def assert_derivatives_equal(ours, flax_bn, variables, x, rel):
    """d/d(params, x) of a nonlinear loss of the output agree with flax's within rel of the largest."""
    def loss(module, params, x):
        y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return (jnp.sin(y) * y).sum()

    for got, want in zip(jax.grad(functools.partial(loss, ours), argnums=(0, 1))(variables["params"], x),
                         jax.grad(functools.partial(loss, flax_bn), argnums=(0, 1))(variables["params"], x)):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, w, atol=rel * np.abs(w).max(), rtol=0)


def test_derivatives_equal_flax_to_rounding():
    flax_bn, ours = both(use_running_average=False)
    assert_derivatives_equal(ours, flax_bn, flax_bn.init(jax.random.key(1), X), X, 2e-5)


def test_statistics_are_averaged_over_a_mapped_axis_as_flax_does():
    flax_bn, ours = both(use_running_average=False, axis_name="devices")
    variables = flax_bn.init(jax.random.key(1), X)
    shards = X.reshape(2, 4, 5, 5, 6)
    run = lambda m: jax.vmap(lambda x: m.apply(variables, x, mutable=["batch_stats"]), axis_name="devices")(shards)  # noqa: E731
    (y_flax, stats_flax), (y, stats) = run(flax_bn), run(ours)
    assert leaves_equal(stats_flax, stats)
    np.testing.assert_allclose(y, y_flax, atol=2e-6, rtol=1e-6)
    # the full batch's statistics: each shard normalized with the whole batch's mean
    whole, _ = BatchNorm(**FIELDS, use_running_average=False).apply(variables, X, mutable=["batch_stats"])
    np.testing.assert_allclose(y.reshape(X.shape), whole, atol=2e-6)


def test_bfloat16_compute_keeps_float32_statistics_and_parameters():
    _, ours = both(use_running_average=False, dtype=jnp.bfloat16)
    variables = ours.init(jax.random.key(1), X.astype(jnp.bfloat16))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    y, new = ours.apply(variables, X.astype(jnp.bfloat16), mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and new["batch_stats"]["mean"].dtype == jnp.float32


def test_no_running_average_update_while_initializing_and_zero_scale_init():
    ours = BatchNorm(use_running_average=False, scale_init=nn.initializers.zeros)
    variables = ours.init(jax.random.key(1), X)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0)
    np.testing.assert_array_equal(variables["batch_stats"]["var"], 1)
    y, _ = ours.apply(variables, X, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, 0)  # a zero-initialized scale: the block starts as the identity


def test_a_mean_far_from_zero_is_centred_before_scaling_as_flax_does():
    """Features whose mean is 1000x their spread (a trained deep net has them): written as
    x * a + (bias - mean * a), the rounding of x * a cancels, and at a trained cifar_resnet56
    state 2 % of a kernel's gradient was rounding error (flax's form: 0.05 %). Centred first,
    output and derivatives equal flax's to the rounding of the centred values."""
    far = X + 3000.0  # spread about 3, mean about 3000
    flax_bn, ours = both(use_running_average=False)
    variables = flax_bn.init(jax.random.key(1), far)
    y_flax, _ = flax_bn.apply(variables, far, mutable=["batch_stats"])
    y, _ = ours.apply(variables, far, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_flax, atol=1e-6 * np.abs(y_flax).max(), rtol=0)
    assert_derivatives_equal(ours, flax_bn, variables, far, 1e-5)
