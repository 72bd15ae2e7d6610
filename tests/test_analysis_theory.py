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


def test_he_relu_and_preactivation_mlp_twins_match_their_predictions():
    plain = theory.mlp_twin_rates(activation="relu", norm="none", width=512, depth=12)["rate"]
    assert plain == pytest.approx(1.0, rel=0.02)  # per layer, in norm
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
    # post-activation tanh: the trajectory mean field; pre-activation tanh: the stream's variance
    # grows, so there is no stationary rate (the whole-net mean field predicts it)
    assert theory.predict_unit_rate(norm="none", activation="tanh", residual=True).rate == pytest.approx(1.151, abs=2e-3)
    assert theory.predict_unit_rate(norm="none", activation="tanh", residual=True, preactivation=True) is None
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


# ---- the mechanisms of issue 21, each against a measurement (small twins: seconds each)

from jaxres.analysis import mean_field_spatial  # noqa: E402
from jaxres.analysis.mean_field import activation_moments, post_activation_trajectory  # noqa: E402
from jaxres.analysis.stages import unit_places  # noqa: E402
from jaxres.analysis.twins import conv_twin_rates, mlp_twin_rates  # noqa: E402


def test_pattern_moment_is_the_gaussian_expectation_of_the_product():
    """Lambda(p, p') = E[phi(z_p) phi(z_p')]: the arc-cosine kernel (ReLU) and Mehler's series
    (tanh) against a Monte Carlo estimate (1e6 samples, standard error ~5e-4)."""
    rng = np.random.default_rng(0)
    var = np.array([1.0, 0.6])
    cov = np.array([[0.3, 0.12], [0.12, 0.2]])  # a pattern's covariance (below var on the diagonal)
    u = rng.standard_normal((1_000_000, 2))
    for activation, phi in (("relu", lambda x: np.maximum(x, 0.0)), ("tanh", np.tanh)):
        exact = mean_field_spatial._pattern_moment(activation, var, cov)
        z1 = np.sqrt(var[0]) * u[:, 0]
        z2 = cov[0, 1] / np.sqrt(var[0]) * u[:, 0] + np.sqrt(var[1] - cov[0, 1] ** 2 / var[0]) * u[:, 1]
        assert exact[0, 1] == pytest.approx(np.mean(phi(z1) * phi(z2)), abs=2e-3), activation
        # the diagonal: two examples share only the pattern, cov[p, p]
        z1b = np.sqrt(cov[0, 0]) * u[:, 0] + np.sqrt(var[0] - cov[0, 0]) * u[:, 1]
        z1c = np.sqrt(cov[0, 0]) * u[:, 0] + np.sqrt(var[0] - cov[0, 0]) * rng.permutation(u[:, 1])
        assert exact[0, 0] == pytest.approx(np.mean(phi(z1b) * phi(z1c)), abs=2e-3), activation


def test_bn_border_pattern_is_the_relu_mean_at_the_borders_and_odd_activations_have_none():
    """The share of BN's divisor taken by the border pattern falls with the map (about 1/H)
    and is 0 for tanh, which has no mean."""
    shares = [mean_field_spatial.border_pattern_share(side) for side in (8, 16)]
    assert 0.15 < shares[0] < 0.3 and shares[1] < 0.65 * shares[0]
    assert mean_field_spatial.border_pattern_share(8, "tanh") == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def bn_conv_twins():
    """Plain BN-ReLU conv twins (8x8 maps, 32 channels, batch 8, 13 layers), two weight draws
    each: zero padding and circular padding (no borders)."""
    return {padding: [conv_twin_rates(spatial=8, width=32, depth=13, skip=4, padding=padding, seed=s)
                      for s in range(2)] for padding in ("zero", "circular")}


def test_bn_does_not_cancel_zero_padding_borders(bn_conv_twins):
    """Measured: circular padding grows at chi(N H W) per layer, zero padding about 2% lower
    per layer on 8x8 maps; the mean field with BN's border pattern predicts both (the old
    assumption, 'BN divides the lost taps out', predicted no gap)."""
    zero = np.mean([r["rate"] for r in bn_conv_twins["zero"]])
    circular = np.mean([r["rate"] for r in bn_conv_twins["circular"]])
    chi = theory.bn_layer_chi("relu", 8 * 64)[0] ** 0.5
    pattern = theory.predict_unit_rate(norm="batchnorm", activation="relu", residual=False, spatial=8,
                                       effective_batch=8 * 64).rate ** 0.5
    assert circular == pytest.approx(chi, rel=0.012)
    assert zero == pytest.approx(pattern, rel=0.012)
    assert zero / circular < 0.99 and pattern / chi < 0.985
    share = np.mean([r["pattern_share"] for r in bn_conv_twins["zero"]])
    assert 0.1 < share < 0.25 and abs(np.mean([r["pattern_share"] for r in bn_conv_twins["circular"]])) < 0.02


def test_head_batch_factor_is_one_minus_one_plus_two_over_pi_over_n_for_relu():
    """The closed form of `_head_bn_factors` for ReLU at unit variance on many positions:
    the per-example block keeps 1 - (1 + 2/pi)/N + (1/2 + 1/pi)/N^2 of its squared norm."""
    n = 4096
    mom = activation_moments("relu", np.ones(n))
    for batch in (4, 16, 64):
        block, others = mean_field_spatial._head_bn_factors(mom, np.ones(n), batch)
        expected = 0.5 * (1 - (1 + 2 / np.pi) / batch + (0.5 + 1 / np.pi) / batch**2)
        assert block.mean() == pytest.approx(expected, rel=2e-3)
        assert others.sum() > 0


def test_head_batch_term_predicts_a_small_batch_twin():
    """At batch 4 the last unit before the pool passes about 0.8 of what the mean field
    without the head term says (the head's uniform gradient loses ~(1 + 2/pi)/N at the first
    BN from the head); the measured mean over 3 draws is within 6% of the prediction with the
    term, and more than 15% below the one without."""
    runs = [conv_twin_rates(spatial=8, width=32, depth=9, skip=2, batch=4, seed=s) for s in range(3)]
    last = np.mean([np.median(np.sqrt(np.asarray(r["norms_sq"])[7] / np.asarray(r["norms_sq"])[9])) for r in runs])
    shapes = [((4, 8, 8, 32), (4, 8, 8, 32))] * 5 + [((4, 8, 8, 32), (4, 10))]
    kw = dict(norm="batchnorm", activation="relu", residual=False, batch=4)
    with_term = mean_field_spatial.mean_field_unit_norms(shapes, **kw)[-1]
    without = mean_field_spatial.mean_field_unit_norms(shapes, head_term=False, **kw)[-1]
    assert last == pytest.approx(with_term, rel=0.06)
    assert last < 0.85 * without


def test_trajectory_mean_field_with_shuffled_masks_is_the_stationary_theory():
    """Shuffling each block's masks over the neurons cuts persistence: the trajectory mean
    field then gives back sqrt(p (1 + chi_F)) = sqrt(3 p) under He init."""
    p, _ = theory.post_activation_relu_moments()
    shuffled = post_activation_trajectory("relu", samples=200_000, follow_neurons=False)["rate"]
    followed = post_activation_trajectory("relu", samples=200_000)
    assert shuffled == pytest.approx(np.sqrt(3 * p), rel=2e-3)
    assert followed["rate"] == pytest.approx(1.4304, abs=3e-3)
    assert followed["persistence"] == pytest.approx(0.734, abs=3e-3) and followed["persistence"] > p + 0.05


@pytest.fixture(scope="module")
def post_activation_mlp_twins():
    """A post-activation residual ReLU MLP twin (width 512, 20 blocks, the first and last 5
    left out: the stream's law settles from |N(0, 1)| within ~5 blocks), its masks kept and
    shuffled over the neurons in the backward pass, two weight draws each."""
    kw = dict(activation="relu", norm="none", residual=True, width=512, depth=20, skip=5)
    return {shuffle: [mlp_twin_rates(seed=s, shuffle_masks=shuffle, **kw) for s in range(2)]
            for shuffle in (False, True)}


def test_relu_masks_persist_along_the_identity(post_activation_mlp_twins):
    """Measured P(open | open in the previous block) is the trajectory theory's 0.734, not
    the open fraction p = 0.652 that independent masks would give; the rate follows the
    trajectory theory (1.4304), and shuffling the masks (the control) brings it down to the
    stationary theory's sqrt(3 p) = 1.399."""
    kept, shuffled = post_activation_mlp_twins[False], post_activation_mlp_twins[True]
    assert np.mean([r["persistence"] for r in kept]) == pytest.approx(0.734, abs=0.01)
    assert np.mean([r["open"] for r in kept]) == pytest.approx(0.652, abs=0.01)
    post = theory.predict_unit_rate(norm="none", activation="relu", residual=True)
    assert post.rate == pytest.approx(1.4304, abs=2e-3)
    rate_kept = np.mean([r["rate"] for r in kept])
    rate_shuffled = np.mean([r["rate"] for r in shuffled])
    assert rate_kept == pytest.approx(post.rate, rel=0.015)
    assert rate_shuffled == pytest.approx(np.sqrt(3 * theory.post_activation_relu_open_fraction()), rel=0.015)
    assert rate_kept > rate_shuffled * 1.01


def test_finite_batch_bn_rate_for_tanh_tends_to_its_large_batch_limit():
    rates = [theory.bn_layer_chi("tanh", b, samples=8192)[0] for b in (8, 64, 1024)]
    assert rates[0] > rates[1] > rates[2]
    assert rates[2] == pytest.approx(theory.bn_layer_chi_large_batch("tanh"), rel=0.003)


def _cifar_shapes(depth, batch=8):
    per_stage = (depth - 2) // 6
    shapes, side, channels = [((batch, 32, 32, 3), (batch, 32, 32, 16))], 32, 16
    for stage, width in enumerate((16, 32, 64)):
        for index in range(per_stage):
            before = (batch, side, side, channels)
            if stage and not index:
                side //= 2
            channels = width
            shapes.append((before, (batch, side, side, channels)))
    return shapes + [((batch, 8, 8, 64), (batch, 10))]


class _Shape:  # the fields `unit_places` reads
    def __init__(self, name, in_shape, out_shape):
        self.name, self.in_shape, self.out_shape, self.keeps_shape = name, in_shape, out_shape, in_shape == out_shape


def test_predict_net_rates_covers_the_default_cifar_nets():
    """Three stages and two transitions for every no-norm net and the plain BN nets, each
    with its assumptions; None for BN residual nets."""
    shapes = _cifar_shapes(20)
    places = unit_places([_Shape("stem" if i == 0 else "head" if i == len(shapes) - 1 else f"unit_{i}", a, b)
                          for i, (a, b) in enumerate(shapes)])
    for switches in (dict(norm="batchnorm", activation="relu", residual=False, batch=8),
                     dict(norm="none", activation="tanh", residual=False),
                     dict(norm="none", activation="relu", residual=True, samples=2**16),
                     dict(norm="none", activation="relu", residual=True, preactivation=True, shortcut="B")):
        found = theory.predict_net_rates(shapes, places, **switches)
        assert len(found["stages"]) == 3 and len(found["transitions"]) == 2, switches
        assert all(p.tolerance == theory.STAGE_TOLERANCE for p in found["stages"])
        assert all(p.tolerance == theory.TRANSITION_TOLERANCE for p in found["transitions"])
    bn = theory.predict_net_rates(shapes, places, norm="batchnorm", activation="relu", residual=False, batch=8)
    assert "border pattern" in bn["stages"][0].assumptions and "head's batch term" in bn["stages"][0].assumptions
    assert bn["stages"][2].rate < 0.9 * bn["stages"][0].rate  # the last unit, next to the head, pulls stage 3 down
    assert theory.predict_net_rates(shapes, places, norm="batchnorm", activation="relu", residual=True) is None
