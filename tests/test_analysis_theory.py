"""jaxres.analysis against theory: deep linear nets, vanishing gradients, a scalar toy, and
the coverage of the estimators' confidence intervals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.analysis import estimators, unit_jacobian
from jaxres.analysis.endtoend import end_to_end_norms
from jaxres.analysis.segments import SegmentCache
from jaxres.models import ResNet


def test_delta_orthogonal_linear_conv_net_has_all_singular_values_one():
    """Zoo switches activation="linear", norm="none", kernel_init="delta_orthogonal": each
    3x3 conv is an orthogonal 1x1 map at its centre tap (Xiao et al. 2018), so the Jacobian of
    two plain units (4 convs) is orthogonal: every singular value is 1 (Saxe et al. 2014)."""
    model = ResNet(stage_sizes=(2,), widths=(4,), stem="cifar", residual=False, activation="linear",
                   norm="none", kernel_init="delta_orthogonal", num_classes=3)
    h = jax.random.normal(jax.random.key(0), (1, 4, 4, 4))
    variables = model.init(jax.random.key(1), jnp.zeros((1, 4, 4, 3)))
    f = lambda x: model.apply(variables, x, start="unit_1", stop="unit_2")  # noqa: E731
    sv = unit_jacobian.singular_values_exact(f, h)
    np.testing.assert_allclose(sv, 1.0, atol=1e-5)


def _linear_mlp_jacobian_sq_singular_values(depth, width, seed):
    """Plain jax (an MLP, not a zoo model): x -> W_L ... W_1 x, W_l ~ N(0, 1/width), which is
    He et al.'s variance for a linear activation (gain 1)."""
    keys = jax.random.split(jax.random.key(seed), depth)
    weights = [jax.random.normal(k, (width, width)) / np.sqrt(width) for k in keys]

    def f(h):  # (N, width) -> (N, width)
        for w in weights:
            h = h @ w.T
        return h

    return np.asarray(unit_jacobian.singular_values_exact(f, jnp.zeros((1, width))))[0] ** 2


def test_gaussian_linear_net_msv_one_and_variance_linear_in_depth():
    """Pennington et al. 2017: for a product of L Gaussian matrices with variance 1/n the
    squared singular values have mean 1 and (as n -> inf) variance L (Fuss-Catalan moments
    E[l] = 1, E[l^2] = L + 1)."""
    width, seeds = 96, 6
    for depth in (1, 2, 4, 8):
        lam = np.concatenate([_linear_mlp_jacobian_sq_singular_values(depth, width, s) for s in range(seeds)])
        assert lam.mean() == pytest.approx(1.0, abs=0.15), depth
        assert lam.var() == pytest.approx(depth, rel=0.3), depth


@pytest.fixture(scope="module")
def sigmoid_twins():
    """Sigmoid nets without normalization, 8 blocks of width 6, Glorot init (the setting where
    Glorot & Bengio 2010 saw vanishing gradients): the plain net, its residual twin (He et al.
    2015, activation after the addition) and the pre-activation residual net (He et al. 2016)."""
    out = {}
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    labels = jnp.array([0, 1])
    for variant, (residual, preact) in {"plain": (False, False), "residual": (True, False),
                                        "preact": (True, True)}.items():
        model = ResNet(stage_sizes=(8,), widths=(6,), stem="cifar", residual=residual, preact=preact,
                       activation="sigmoid", norm="none", kernel_init="glorot_normal", num_classes=4)
        variables = model.init(jax.random.key(1), x)
        res = end_to_end_norms(model, variables, x, labels, cache=SegmentCache())
        out[variant] = np.array([res["units"][f"unit_{k}"]["input"]["loss_grad"].mean() for k in range(1, 9)]
                                 + [res["units"]["head"]["input"]["loss_grad"].mean()])
    return out


def test_plain_sigmoid_net_gradients_decay_exponentially_towards_the_input(sigmoid_twins):
    """sigmoid' <= 1/4: each plain block multiplies the gradient by a roughly constant factor
    < 1, so log ||dL/dh_l|| is linear in l (fit R^2 > 0.95) with a clearly negative slope."""
    logs = np.log(sigmoid_twins["plain"])[::-1]  # from the head back to unit_1
    slope, intercept = np.polyfit(np.arange(len(logs)), logs, 1)
    residuals = logs - (slope * np.arange(len(logs)) + intercept)
    r2 = 1 - residuals.var() / logs.var()
    assert slope < np.log(0.5) and r2 > 0.95
    assert sigmoid_twins["plain"][0] / sigmoid_twins["plain"][-1] < 1e-3


def test_preactivation_residual_sigmoid_net_keeps_its_gradients(sigmoid_twins):
    """With the activation off the identity path (x + F(x), He et al. 2016) every block adds
    dL/dh_{l+1} itself to the gradient: no exponential decay towards the input."""
    ratio = sigmoid_twins["preact"][0] / sigmoid_twins["preact"][-1]
    assert ratio > 0.5
    assert sigmoid_twins["preact"][0] > 1e6 * sigmoid_twins["plain"][0]


def test_post_activation_residual_sigmoid_net_still_decays_but_far_less(sigmoid_twins):
    """Measured, and worth knowing: with sigmoid(x + F(x)) the sigmoid' <= 1/4 after every
    addition sits on the identity path too, so the residual twin of He et al. 2015 also
    decays exponentially (here ~1e-5 over 8 blocks), only much more slowly than the plain net."""
    residual = sigmoid_twins["residual"][0] / sigmoid_twins["residual"][-1]
    plain = sigmoid_twins["plain"][0] / sigmoid_twins["plain"][-1]
    assert residual < 1e-2
    assert residual > 1e3 * plain


def test_two_layer_scalar_toy_residual_gradient_is_plain_plus_identity():
    """y = w2 tanh(w1 x) (plain) and y = x + w2 tanh(w1 x) (residual): dy/dx = w1 w2 (1 -
    tanh^2(w1 x)) and 1 + w1 w2 (1 - tanh^2(w1 x)); the identity path contributes exactly 1."""
    w1, w2 = 0.7, -1.3
    plain = lambda h: w2 * jnp.tanh(w1 * h)  # noqa: E731
    residual = lambda h: h + plain(h)  # noqa: E731
    for x in (-2.0, 0.0, 0.4, 3.0):
        closed = w1 * w2 * (1 - np.tanh(w1 * x) ** 2)
        h = jnp.full((1, 1), x)
        j_plain = unit_jacobian.jacobian_matrix(plain, h)[0, 0, 0]
        j_res = unit_jacobian.jacobian_matrix(residual, h)[0, 0, 0]
        assert j_plain == pytest.approx(closed, rel=1e-5)
        assert j_res == pytest.approx(1 + closed, rel=1e-5)
        assert j_res - j_plain == pytest.approx(1.0, rel=1e-5)


def test_confidence_intervals_cover_the_exact_value_about_95_percent():
    """Over 200 seeds, the 95% Student-t intervals of Hutchinson (16 probes) and Hutch++
    (24 products) must cover ||M||_F^2 in 88-99% of the seeds (binomial 200 x 0.95 has
    std 1.5%; the t interval is approximate because the samples are not Gaussian)."""
    m = jax.random.normal(jax.random.key(7), (20, 30)) * jnp.linspace(0.2, 2.0, 30)
    f = lambda h: h @ m.T  # noqa: E731
    exact = float(jnp.sum(m**2))
    h = jnp.zeros((1, 30))
    for fn, probes in ((estimators.frobenius_sq_hutchinson, 16), (estimators.frobenius_sq_hutchpp, 24)):
        hits = [(fn(f, h, num_probes=probes, seed=s)["ci_low"][0] <= exact <= fn(f, h, num_probes=probes, seed=s)["ci_high"][0])
                for s in range(200)]
        assert 0.88 <= np.mean(hits) <= 0.99, (fn.__name__, np.mean(hits))


# ---- jaxres.analysis.theory: mean-field predictions, checked against independent references

from scipy import integrate  # noqa: E402

from jaxres.analysis import theory  # noqa: E402


def _normal_expectation(f):
    return integrate.quad(lambda z: f(z) * np.exp(-z * z / 2) / np.sqrt(2 * np.pi), -np.inf, np.inf)[0]


def test_tanh_chi1_at_he_variance_solves_the_fixed_point():
    """Poole et al. 2016: q* = 2 E[tanh(sqrt(q*) z)^2], chi_1 = 2 E[tanh'(sqrt(q*) z)^2]; the
    issue quotes chi_1 ~ 1.106 at sigma_w^2 = 2. Reference: scipy quad, not Gauss-Hermite."""
    q, chi = theory.fixed_point_chi("tanh", 2.0)
    assert q == pytest.approx(2 * _normal_expectation(lambda z: np.tanh(np.sqrt(q) * z) ** 2), rel=1e-9)
    assert chi == pytest.approx(2 * _normal_expectation(lambda z: (1 - np.tanh(np.sqrt(q) * z) ** 2) ** 2), rel=1e-9)
    assert chi == pytest.approx(1.1055, abs=5e-4)


def test_bn_large_batch_rate_is_pi_over_pi_minus_one_for_relu_and_the_moment_ratio_otherwise():
    assert theory.bn_layer_chi("relu") == (pytest.approx(np.pi / (np.pi - 1)), 0.0)
    mean = _normal_expectation(np.tanh)
    var = _normal_expectation(lambda z: np.tanh(z) ** 2) - mean**2
    expected = _normal_expectation(lambda z: (1 - np.tanh(z) ** 2) ** 2) / var
    assert theory.bn_layer_chi_large_batch("tanh") == pytest.approx(expected, rel=1e-9)


def test_finite_batch_bn_rate_falls_with_the_batch_towards_the_large_batch_limit():
    """Yang et al. 2019: the explosion is faster at small batches and tends to pi / (pi - 1)."""
    rates = [theory.bn_layer_chi("relu", b, samples=4096)[0] for b in (4, 8, 32, 256)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert rates[0] > 2.5
    assert rates[-1] == pytest.approx(np.pi / (np.pi - 1), rel=0.01)


def test_finite_batch_bn_rate_matches_a_wide_mlp_twin():
    """The whole gradient ||d z_i / d h|| of a 512-wide BN-ReLU MLP at batch 16 grows per layer
    (squared) at the Monte-Carlo mean-field rate chi(16) = 1.59, not at pi / (pi - 1) = 1.467."""
    measured = theory.mlp_twin_rates(activation="relu", norm="batchnorm", width=512, batch=16, depth=16,
                                     skip=4, quantity="total")["rate"] ** 2
    assert measured == pytest.approx(theory.bn_layer_chi("relu", 16)[0], rel=0.03)


def test_he_relu_and_residual_mlp_twins_match_their_predictions():
    plain = theory.mlp_twin_rates(activation="relu", norm="none", width=512, depth=12)["rate"]
    assert plain == pytest.approx(1.0, rel=0.02)  # per layer, in norm
    post = theory.predict_unit_rate(norm="none", activation="relu", residual=True)
    assert post.rate == pytest.approx(1.399, abs=2e-3)
    measured = theory.mlp_twin_rates(activation="relu", norm="none", residual=True, width=512, depth=12)["rate"]
    assert post.accepts(measured)
    pre = theory.predict_unit_rate(norm="none", activation="relu", residual=True, preactivation=True)
    assert pre.rate == pytest.approx(np.sqrt(2))


def test_border_factors_are_the_valid_tap_fraction_and_the_leading_eigenvalue():
    """First layer from a uniform gradient: (1 - 2 / (3H))^2, the issue's 0.98 / 0.96 / 0.92 in
    norm; deep in a stage: the leading eigenvalue of (A / 3) (x) (A / 3), A tridiagonal ones."""
    for side, first_norm in ((32, 0.98), (16, 0.96), (8, 0.92)):
        assert np.sqrt(theory.border_factor(side, stationary=False)) == pytest.approx(first_norm, abs=0.005)
        a = np.eye(side) + np.eye(side, k=1) + np.eye(side, k=-1)
        assert theory.border_factor(side) == pytest.approx((np.linalg.eigvalsh(a).max() / 3) ** 2, rel=1e-12)
    assert theory.border_factor(None) == 1.0


def test_predictions_cover_the_issue_cases_and_return_none_without_theory():
    bn = theory.predict_unit_rate(norm="batchnorm", activation="relu", residual=False)
    assert bn.rate == pytest.approx(np.pi / (np.pi - 1)) and "Yang" in bn.source
    tanh = theory.predict_unit_rate(norm="none", activation="tanh", residual=False)
    assert tanh.rate == pytest.approx(1.1055, abs=5e-4)
    he = theory.predict_unit_rate(norm="none", activation="relu", residual=False, spatial=32)
    assert he.rate == pytest.approx(0.994, abs=1e-3)
    # BN-eval at initialization is the identity: the no-norm prediction
    assert theory.predict_unit_rate(norm="batchnorm", bn="eval", activation="relu", residual=False).rate == 1.0
    assert theory.predict_unit_rate(norm="batchnorm", activation="relu", residual=True) is None
    assert theory.predict_unit_rate(norm="none", activation="tanh", residual=True) is None
    trans = theory.predict_transition_factor(norm="none", activation="relu", residual=False)
    assert trans.rate == pytest.approx(np.sqrt(0.5))


@pytest.mark.parametrize("kwargs, match", [
    (dict(effective_batch=3), "effective_batch"), (dict(spatial=0), "spatial"),
    (dict(activation="tanhh"), "tanh"), (dict(layers_per_unit=0), "layers_per_unit"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    args = dict(norm="batchnorm", activation="relu", residual=False) | kwargs
    with pytest.raises(ValueError, match=match):
        theory.predict_unit_rate(**args)


@pytest.fixture(scope="module")
def wide_tanh_twin():
    """A one-stage He tanh net without normalization, width 128 on 8x8 maps (borders matter
    there) - the per-unit rates vary along the stage (forward transient from the stem, border
    profile from the head) and the spatial mean field must follow them."""
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    model = ResNet(stage_sizes=(5,), widths=(128,), stem="cifar", residual=False, activation="tanh", norm="none",
                   num_classes=10)
    variables = model.init(jax.random.key(1), x[:1])
    segments = SegmentCache().segments(model, variables, x.shape, "eval", x.dtype)
    res = end_to_end_norms(model, variables, x, jnp.zeros(4, jnp.int32))
    measured = np.array([np.median(res["units"][s.name]["input"]["logit_jac"]) for s in segments])
    predicted = theory.mean_field_unit_norms([(s.in_shape, s.out_shape) for s in segments], norm="none",
                                             activation="tanh", residual=False)
    return measured[:-1] / measured[-1], predicted


def test_spatial_mean_field_follows_a_wide_tanh_twin_unit_by_unit(wide_tanh_twin):
    measured, predicted = wide_tanh_twin
    rates_m = measured[1:] / np.append(measured[2:], 1.0)
    rates_p = predicted[1:] / np.append(predicted[2:], 1.0)
    np.testing.assert_allclose(rates_m, rates_p, rtol=0.04)
    assert rates_p[0] > 1.3 > 1.1 > rates_p[-1]  # forward transient near the stem, borders near the head
