"""Jacobian singular-value density (jaxres.analysis.spectrum, SLQ through matfree) against the
dense SVD of small Jacobians materialized with jax.jacfwd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.analysis import spectrum
from jaxres.analysis.lesion import unit_inputs
from jaxres.analysis.segments import SegmentCache


@pytest.fixture(scope="module")
def net():
    """A 2-unit residual net on 4x4x2 inputs, batch 2, BN eval with non-trivial statistics."""
    from jaxres.models import ResNet

    model = ResNet(stage_sizes=(2,), widths=(3,), stem="cifar", num_classes=4, in_channels=2)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    variables = {**variables, "batch_stats": jax.tree.map(
        lambda s: s + 0.3 * jax.random.uniform(jax.random.key(2), s.shape), variables["batch_stats"])}
    segments = SegmentCache().segments(model, variables, x.shape, "eval")
    return model, variables, segments, unit_inputs(segments, x)


def dense_jacobian(model, variables, h, start, stop):
    f = lambda z: model.apply(variables, z, False, start=start, stop=stop)  # noqa: E731
    out = f(h)
    return np.asarray(jax.jacfwd(f)(h), np.float64).reshape(out.size, h.size)


def dense_singular_values(model, variables, segments, hs, start, stop):
    index = [s.name for s in segments].index(start)
    return np.linalg.svd(dense_jacobian(model, variables, hs[index], start, stop), compute_uv=False)


@pytest.mark.parametrize("start, stop", [("unit_1", "unit_2"),   # square: 96 x 96, probes on the input
                                         ("unit_2", "head")])    # wide: 8 x 96, probes on the output
def test_a_full_krylov_space_gives_the_dense_singular_values(net, start, stop):
    model, variables, segments, hs = net
    exact = dense_singular_values(model, variables, segments, hs, start, stop)
    chain = spectrum.chain_between(segments, start, stop)
    h = hs[[s.name for s in segments].index(start)]
    k = len(exact)  # min(n_in, n_out)
    nodes, weights = spectrum.quadrature_nodes(chain, h, num_matvecs=k, num_probes=2)
    for s, w in zip(nodes, weights):
        np.testing.assert_allclose(np.sort(s)[::-1], exact, rtol=2e-3, atol=1e-4 * exact[0])
        assert w.sum() == pytest.approx(1.0, abs=1e-6)


def test_the_second_and_fourth_moments_are_exact_per_probe(net):
    """sum_j w_j s_j^2 = ||J v||^2 / ||v||^2 and sum_j w_j s_j^4 = ||J^T J v||^2 / ||v||^2 for each
    probe v (a Gauss rule of k >= 2 nodes is exact in degrees 1 and 2 of s^2)."""
    model, variables, segments, hs = net
    jac = dense_jacobian(model, variables, hs[1], "unit_1", "unit_2")
    chain = spectrum.chain_between(segments, "unit_1", "unit_2")
    nodes, weights = spectrum.quadrature_nodes(chain, hs[1], num_matvecs=6, num_probes=3, seed=5)
    rng = np.random.default_rng(5)  # the probes, drawn as quadrature_nodes draws them
    for s, w in zip(nodes, weights):
        v = rng.choice([-1.0, 1.0], size=hs[1].shape).ravel()
        assert np.sum(w * s**2) == pytest.approx(np.sum((jac @ v) ** 2) / v.size, rel=1e-4)
        assert np.sum(w * s**4) == pytest.approx(np.sum((jac.T @ (jac @ v)) ** 2) / v.size, rel=1e-4)


def test_summary_intervals_cover_the_dense_truth_and_the_density_adds_up(net):
    model, variables, segments, hs = net
    exact = dense_singular_values(model, variables, segments, hs, "unit_1", "unit_2")
    result = spectrum.jacobian_spectrum(segments, hs, "unit_1", "unit_2", num_matvecs=12, num_probes=16)
    mean_sq = result["mean_sq_singular_value"]
    assert mean_sq["ci_low"] <= np.mean(exact**2) <= mean_sq["ci_high"]
    fourth = result["mean_fourth_singular_value"]
    assert fourth["ci_low"] <= np.mean(exact**4) <= fourth["ci_high"]
    # the ratio of the two estimates (consistent, biased for few probes: its bootstrap interval is a guide)
    assert result["isometry"]["estimate"] == pytest.approx(mean_sq["estimate"] ** 2 / fourth["estimate"])
    assert result["isometry"]["estimate"] == pytest.approx(np.mean(exact**2) ** 2 / np.mean(exact**4), rel=0.25)
    assert result["sigma_max"]["estimate"] <= exact[0] * (1 + 1e-4)  # a lower bound...
    assert result["sigma_max"]["estimate"] == pytest.approx(exact[0], rel=1e-3)  # ...that Lanczos reaches first
    assert sum(result["density"]["mass"]) == pytest.approx(1 - result["null_share"]["estimate"], abs=1e-6)
    assert result["num_singular_values"] == 96 and result["probe_side"] == "input"


def test_a_start_after_the_stop_is_refused(net):
    _, _, segments, hs = net
    with pytest.raises(ValueError, match="start unit 'head' comes after stop unit 'unit_1'"):
        spectrum.jacobian_spectrum(segments, hs, "head", "unit_1")


def test_too_few_probes_are_refused(net):
    _, _, segments, hs = net
    with pytest.raises(ValueError, match="num_probes must be an integer >= 2"):
        spectrum.jacobian_spectrum(segments, hs, "unit_1", "unit_2", num_probes=1)
