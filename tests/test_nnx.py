"""jaxres.nnx: zoo models wrapped with flax.nnx.bridge.ToNNX, trained with nnx.Optimizer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxres.models import VGG
from jaxres.nnx import linen_variables, to_nnx, train_step
from tests.conftest import init, tiny_cifar_resnet

MODEL = tiny_cifar_resnet()
X = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
LABELS = jnp.arange(8) % 10


@functools.cache
def linen_setup():
    return init(MODEL, X)


def _close(a, b, **tol):
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, **tol), a, b)


def test_nnx_forward_equals_linen_with_the_same_variables():
    variables = linen_setup()
    model = to_nnx(MODEL, variables)
    np.testing.assert_array_equal(model(X), MODEL.apply(variables, X))
    # train mode: the same logits and the same updated running statistics, written into the module
    logits, updates = MODEL.apply(variables, X, True, mutable=["batch_stats"])
    np.testing.assert_array_equal(model(X, True, mutable=["batch_stats"]), logits)
    back = linen_variables(model)
    _close(back["batch_stats"], updates["batch_stats"], rtol=0, atol=0)
    _close(back["params"], variables["params"], rtol=0, atol=0)


def test_lazy_init_builds_the_linen_variables():
    model = to_nnx(MODEL, input_shape=(1, 16, 16, 3), seed=3)
    variables = linen_variables(model)
    assert jax.tree.structure(variables) == jax.tree.structure(linen_setup())
    assert isinstance(model.unit_1["conv1"]["kernel"], nnx.Param)
    assert isinstance(model.unit_1["norm1"]["mean"], nnx.BatchStat)
    np.testing.assert_array_equal(model(X), MODEL.apply(variables, X))


def test_training_steps_lower_the_loss_and_update_batch_stats():
    model = to_nnx(MODEL, linen_setup())
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    before = linen_variables(model)
    losses = [float(train_step(model, optimizer, X, LABELS)) for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses
    after = linen_variables(model)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), before, after)
    assert min(jax.tree.leaves(moved["batch_stats"])) > 0  # every running mean and variance moved
    assert max(jax.tree.leaves(moved["params"])) > 0
    # eval mode reads the running statistics and changes nothing
    np.testing.assert_array_equal(model(X), MODEL.apply(after, X))
    _close(linen_variables(model), after, rtol=0, atol=0)


def test_dropout_draws_from_the_modules_stream():
    vgg = VGG(layers=(4, "M"), pool_size=1, classifier_widths=(16,), dropout=0.5, num_classes=3)
    model = to_nnx(vgg, input_shape=(1, 8, 8, 3))
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    first, second = model(x, True), model(x, True)
    assert not np.array_equal(first, second)  # a new dropout mask per call
    np.testing.assert_array_equal(model(x), model(x))


def test_probes_work_under_the_bridge_with_distinct_paths():
    model = to_nnx(MODEL, linen_setup())
    model(X, mutable=True)  # probes off: nothing but params and batch_stats
    assert set(linen_variables(model)) == {"params", "batch_stats"}
    model(X, probes=True, mutable=["intermediates", "perturbations"])  # used to fail: duplicate path
    assert "out_stem" in vars(model) and "d_out_stem" in vars(model)


@pytest.mark.parametrize("kwargs, match", [({}, "exactly one of"), ({"variables": {}, "input_shape": (1, 8, 8, 3)}, "exactly one of"),
                                           ({"variables": {"params": {}, "intermediates": {}}}, r"also \['intermediates'\]")])
def test_to_nnx_names_what_is_missing(kwargs, match):
    with pytest.raises(ValueError, match=match):
        to_nnx(MODEL, **kwargs)
