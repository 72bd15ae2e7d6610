"""Sharpness (jaxres.analysis.sharpness) against the dense Hessian of a tiny net's loss.

The net has 246 parameters, so jax.hessian of the flattened loss is a 246 x 246 matrix whose
eigvalsh is the brute-force answer. Lanczos stops at a relative Ritz residual <= tol; the top
Ritz value then lies within tol |lambda| below the top eigenvalue (interlacing).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxres.analysis import sharpness
from jaxres.analysis.loss import mean_cross_entropy
from jaxres.models import ResNet


@pytest.fixture(scope="module")
def tiny():
    model = ResNet(stage_sizes=(1,), widths=(3,), stem="cifar", num_classes=3, in_channels=2)
    x = jax.random.normal(jax.random.key(0), (5, 4, 4, 2))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    variables = {**variables, "batch_stats": jax.tree.map(
        lambda s: s + 0.3 * jax.random.uniform(jax.random.key(2), s.shape), variables["batch_stats"])}
    return model, variables, x, jnp.array([0, 1, 2, 0, 1])


def dense_hessian_eigenvalues(model, variables, x, labels, bn):
    loss = mean_cross_entropy(model, bn)
    rest = {k: v for k, v in variables.items() if k != "params"}
    flat, unravel = ravel_pytree(variables["params"])
    hessian = jax.jit(jax.hessian(lambda p: loss(unravel(p), rest, x, labels)))(flat)
    return np.linalg.eigvalsh(np.asarray(hessian, np.float64)), flat.size


@pytest.mark.parametrize("bn", ["batch", "eval"])
def test_top_eigenvalue_matches_the_dense_hessian(tiny, bn):
    model, variables, x, labels = tiny
    eigenvalues, size = dense_hessian_eigenvalues(model, variables, x, labels, bn)
    result = sharpness.top_hessian_eigenvalue(model, variables, x, labels, bn=bn, tol=1e-4)
    assert result["num_parameters"] == size == 246
    assert result["converged"]
    top = eigenvalues[-1]
    # float32 Hessian-vector products against a float32 dense Hessian: ~1e-5 relative
    assert abs(result["lambda_max"] - top) <= 1e-4 * abs(top) + 1e-5
    low, high = result["interval"]
    assert low - 1e-5 * abs(top) <= top <= high + 1e-5 * abs(top)
    assert result["iterations"] < size  # Lanczos, not a full basis


def test_a_diverged_checkpoint_is_refused_before_any_hessian_vector_product(tiny):
    model, variables, x, labels = tiny
    params = jax.tree.map(lambda a: a, variables["params"])
    params["unit_1"] = jax.tree.map(lambda a: a.at[...].set(jnp.nan), params["unit_1"])
    with pytest.raises(ValueError, match=r"holds \d+ non-finite values .* the run diverged.*earlier checkpoint"):
        sharpness.top_hessian_eigenvalue(model, {**variables, "params": params}, x, labels)


@pytest.mark.parametrize("kwargs, message", [
    ({"tol": 0.0}, "relative residual in"),
    ({"max_iter": 1}, "integer >= 2"),
    ({"bn": "running"}, "BatchNorm policy"),
])
def test_bad_lanczos_settings_are_refused(tiny, kwargs, message):
    model, variables, x, labels = tiny
    with pytest.raises(ValueError, match=message):
        sharpness.top_hessian_eigenvalue(model, variables, x, labels, **kwargs)


def test_stability_thresholds_are_cohen_et_al_s():
    assert sharpness.stability_thresholds(0.1) == {"gd": 20.0, "momentum": 20.0}
    assert sharpness.stability_thresholds(0.01, momentum=0.9) == pytest.approx({"gd": 200.0, "momentum": 380.0})
