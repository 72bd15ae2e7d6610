"""Loss-landscape slices (jaxres.analysis.landscape) against losses computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.analysis import landscape
from jaxres.models import ResNet


@pytest.fixture(scope="module")
def tiny():
    model = ResNet(stage_sizes=(1,), widths=(3,), stem="cifar", num_classes=3, in_channels=2)
    x = np.asarray(jax.random.normal(jax.random.key(0), (5, 4, 4, 2)))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    variables = {**variables, "batch_stats": jax.tree.map(
        lambda s: s + 0.3 * jax.random.uniform(jax.random.key(2), s.shape), variables["batch_stats"])}
    return model, variables, x, np.array([0, 1, 2, 0, 1])


def loss_by_hand(model, variables, x, labels):
    logits = model.apply(variables, jnp.asarray(x), False)
    log_p = jax.nn.log_softmax(logits)
    return float(-np.mean(np.asarray(log_p)[np.arange(len(labels)), labels]))


def test_directions_have_the_trained_filters_norms_and_leave_batchnorm_out(tiny):
    _, variables, _, _ = tiny
    params = variables["params"]
    direction = landscape.filter_normalized_direction(params, seed=3)
    for path, (w, d) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            zip(jax.tree.leaves(params), jax.tree.leaves(direction))):
        w, d = np.asarray(w), np.asarray(d)
        if w.ndim < 2:  # BatchNorm scale/bias, dense bias
            assert not d.any(), path
        else:  # one filter = one output channel (the last axis)
            axes = tuple(range(w.ndim - 1))
            norm = lambda a: np.sqrt(np.sum(np.square(a), axis=axes))  # noqa: E731
            np.testing.assert_allclose(norm(d), norm(w), rtol=1e-5)


def test_every_grid_point_is_the_loss_of_the_moved_weights(tiny):
    model, variables, x, labels = tiny
    result = landscape.slice_2d(model, variables, x, labels, alphas=[-0.5, 0.0, 1.0], betas=[0.0, 0.25], seed=7,
                                chunk=2)
    d1 = landscape.filter_normalized_direction(variables["params"], 7)
    d2 = landscape.filter_normalized_direction(variables["params"], 8)
    for i, b in enumerate(result["beta"]):
        for j, a in enumerate(result["alpha"]):
            moved = jax.tree.map(lambda w, u, v: w + a * u + b * v, variables["params"], d1, d2)
            expected = loss_by_hand(model, {**variables, "params": moved}, x, labels)
            assert result["loss"][i][j] == pytest.approx(expected, rel=1e-5)
    assert result["loss"][0][1] == pytest.approx(result["center"]["loss"], rel=1e-6)
    assert result["center"]["loss"] == pytest.approx(loss_by_hand(model, variables, x, labels), rel=1e-5)


def test_the_linear_path_ends_at_its_two_nets(tiny):
    model, variables, x, labels = tiny
    start = jax.jit(model.init)(jax.random.key(9), jnp.asarray(x))
    result = landscape.linear_path(model, start, variables, x, labels, ts=[0.0, 0.5, 1.0])
    assert result["loss"][0] == pytest.approx(loss_by_hand(model, start, x, labels), rel=1e-5)
    assert result["loss"][2] == pytest.approx(loss_by_hand(model, variables, x, labels), rel=1e-5)
    halfway = jax.tree.map(lambda u, v: (u + v) / 2, start, variables)
    assert result["loss"][1] == pytest.approx(loss_by_hand(model, halfway, x, labels), rel=1e-5)


@pytest.mark.parametrize("text, message", [
    ("-1:1:0", "has 0 points; a slice needs at least 2 per axis"),
    ("-1:1:1", "has 1 point; a slice needs at least 2"),
    ("-1:1", "must be LOW:HIGH:POINTS"),
])
def test_a_grid_without_two_points_per_axis_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        landscape.parse_axis(text)


def test_an_empty_grid_is_refused_before_any_evaluation(tiny):
    model, variables, x, labels = tiny
    with pytest.raises(ValueError, match="alpha grid has 0 points"):
        landscape.slice_2d(model, variables, x, labels, alphas=[], betas=[0.0, 1.0])
