"""Every exact quantity of jaxres.analysis against brute-force jax.jacrev / jax.grad.

Tolerance: float32 throughout; results agree to rtol 1e-4 (sums of up to ~1e4 squared
float32 terms; observed agreement ~1e-6).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.analysis import estimators, unit_groups, unit_jacobian
from jaxres.analysis.endtoend import end_to_end, end_to_end_norms, end_to_end_norms_whole
from jaxres.analysis.forward_stats import forward_statistics
from jaxres.analysis.segments import SegmentCache, find_segment
from jaxres.models import ResNet

RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny():
    """A 2-stage CIFAR-style ResNet (unit_2 downsamples with option A), 6x6 inputs, batch 3."""
    model = ResNet(stage_sizes=(1, 1), widths=(4, 6), stem="cifar", shortcut="A", num_classes=5)
    x = jax.random.normal(jax.random.key(0), (3, 6, 6, 3))
    variables = model.init(jax.random.key(1), x)
    # non-trivial running statistics, so bn="eval" differs from the identity
    variables = {**variables, "batch_stats": jax.tree.map(
        lambda s: s + 0.3 * jax.random.uniform(jax.random.key(2), s.shape), variables["batch_stats"])}
    labels = jnp.array([0, 3, 4])
    return model, variables, x, labels


@pytest.fixture(scope="module")
def e2e(tiny):
    model, variables, x, labels = tiny
    cache = SegmentCache()
    return {bn: end_to_end_norms(model, variables, x, labels, bn=bn, cache=cache, return_activations=True)
            for bn in ("eval", "batch")}


@pytest.mark.parametrize("bn", ["eval", "batch"])
def test_segmented_chain_equals_one_whole_model_vjp(tiny, e2e, bn):
    model, variables, x, labels = tiny
    whole = end_to_end_norms_whole(model, variables, x, labels, bn=bn)
    for unit, entry in whole["units"].items():
        for key in ("logit_jac", "logit_jac_summed_rows", "loss_grad"):
            np.testing.assert_allclose(e2e[bn]["units"][unit]["input"][key], entry["input"][key], rtol=RTOL)
            for probe, value in entry["probes"].items():
                np.testing.assert_allclose(e2e[bn]["units"][unit]["probes"][probe][key], value[key], rtol=RTOL)


def _from(model, variables, start, train=False):
    def logits(h):
        if not train:
            return model.apply(variables, h, False, start=start)
        return model.apply(variables, h, True, start=start, mutable=["batch_stats"])[0]
    return logits


def test_logit_jacobian_norm_equals_jacrev_per_example(tiny, e2e):
    model, variables, x, _ = tiny
    h = e2e["eval"]["activations"][2]  # input of unit_2
    f = _from(model, variables, "unit_2")
    jac = jax.jit(jax.vmap(jax.jacrev(lambda hi: f(hi[None])[0])))(h)
    brute = np.sum(np.square(np.asarray(jac)).reshape(3, -1), axis=1)
    np.testing.assert_allclose(e2e["eval"]["units"]["unit_2"]["input"]["logit_jac"] ** 2, brute, rtol=RTOL)
    # its full spectrum (5 singular values per example, from the Gram matrix of the class VJPs)
    svd = np.stack([np.linalg.svd(np.asarray(jac[i], np.float64).reshape(5, -1), compute_uv=False) for i in range(3)])
    np.testing.assert_allclose(e2e["eval"]["units"]["unit_2"]["input"]["singular_values"], svd, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("bn", ["eval", "batch"])
def test_loss_gradient_equals_jax_grad(tiny, e2e, bn):
    model, variables, x, labels = tiny
    h = e2e[bn]["activations"][1]  # input of unit_1
    f = _from(model, variables, "unit_1", train=bn == "batch")
    loss = lambda h: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(f(h)), labels[:, None], 1))  # noqa: E731
    brute = np.linalg.norm(np.asarray(jax.jit(jax.grad(loss))(h)).reshape(3, -1), axis=1)
    np.testing.assert_allclose(e2e[bn]["units"]["unit_1"]["input"]["loss_grad"], brute, rtol=RTOL)


def test_weight_gradients_equal_jax_grad(tiny, e2e):
    model, variables, x, labels = tiny

    def loss(params):
        z = model.apply({**variables, "params": params}, x, False)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], 1))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    got = e2e["eval"]["units"]["unit_2"]["param_grad"]
    assert set(got) == {"conv1/kernel", "conv2/kernel"}
    np.testing.assert_allclose(got["conv2/kernel"], np.linalg.norm(grads["unit_2"]["conv2"]["kernel"]), rtol=RTOL)
    np.testing.assert_allclose(e2e["eval"]["units"]["head"]["param_grad"]["fc/kernel"],
                               np.linalg.norm(grads["head"]["fc"]["kernel"]), rtol=RTOL)


def test_forward_stds_match_the_whole_model_intermediates(tiny, e2e):
    model, variables, x, _ = tiny
    whole = forward_statistics(model, variables, x, bn="eval")
    for unit, stats in whole.items():
        for probe, value in stats.items():
            assert e2e["eval"]["units"][unit]["forward"][probe] == pytest.approx(value, rel=1e-5)


@pytest.fixture(scope="module")
def unit2(tiny, e2e):
    """unit_2 (downsampling block, 6x6x4 -> 3x3x6) as a map of its input, eval and batch mode."""
    model, variables, x, _ = tiny
    h = e2e["eval"]["activations"][2]
    seg_eval = find_segment(SegmentCache().segments(model, variables, x.shape, "eval"), "unit_2")
    seg_batch = find_segment(SegmentCache().segments(model, variables, x.shape, "batch"), "unit_2")
    return h, seg_eval, seg_batch, model, variables


@pytest.mark.parametrize("side,chunk", [("jvp", 1), ("jvp", 50), ("vjp", 7), ("auto", 1000)])
def test_frobenius_exact_equals_jacrev_any_side_and_chunk(unit2, side, chunk):
    h, seg, _, model, variables = unit2
    f = lambda hi: model.apply(variables, hi[None], start="unit_2", stop="unit_2")[0]  # noqa: E731
    brute = np.sum(np.square(np.asarray(jax.jit(jax.vmap(jax.jacrev(f)))(h))).reshape(3, -1), axis=1)
    got = unit_jacobian.frobenius_sq_exact(seg.ops.map, h, params=seg.params, side=side, chunk_size=chunk)
    np.testing.assert_allclose(got, brute, rtol=RTOL)


def test_batch_map_frobenius_and_cross_example_share_equal_jacrev(unit2):
    h, _, seg, model, variables = unit2
    f = lambda hb: model.apply(variables, hb, True, start="unit_2", stop="unit_2", mutable=["batch_stats"])[0]  # noqa: E731
    jac = np.asarray(jax.jit(jax.jacrev(f))(h)).reshape(3 * 54, 3 * 144)
    total = np.sum(jac**2)
    diag = sum(np.sum(jac[i * 54:(i + 1) * 54, i * 144:(i + 1) * 144] ** 2) for i in range(3))
    for side in ("jvp", "vjp"):
        got_total, got_diag = unit_jacobian.frobenius_sq_exact(seg.ops.map, h, params=seg.params,
                                                               per_example=False, side=side, chunk_size=40)
        np.testing.assert_allclose([got_total, got_diag], [total, diag], rtol=RTOL)
    assert 0 < 1 - diag / total < 0.9  # BatchNorm's batch statistics couple the examples


def test_spectrum_and_spectral_norms_equal_svd_of_jacrev(unit2):
    h, seg, _, model, variables = unit2
    f = lambda hi: model.apply(variables, hi[None], start="unit_2", stop="unit_2")[0]  # noqa: E731
    jac = np.asarray(jax.jit(jax.vmap(jax.jacrev(f)))(h)).reshape(3, 54, 144)
    svd = [np.linalg.svd(jac[i], compute_uv=False) for i in range(3)]
    spectrum = unit_jacobian.singular_values_exact(seg.ops.map, h, params=seg.params)
    np.testing.assert_allclose(spectrum, np.stack(svd), rtol=1e-4, atol=1e-5)
    top = np.stack(svd)[:, 0]
    lanczos = unit_jacobian.spectral_norm_lanczos(seg.ops.map, h, params=seg.params, tol=1e-6)
    power = unit_jacobian.spectral_norm_power(seg.ops.map, h, params=seg.params, tol=1e-6, max_iter=2000)
    assert lanczos["converged"].all() and (lanczos["residual"] <= 1e-6).all()
    np.testing.assert_allclose(lanczos["sigma"], top, rtol=1e-5)
    np.testing.assert_allclose(power["sigma"], top, rtol=1e-4)
    assert lanczos["iterations"] < power["iterations"]  # Lanczos needs far fewer products


def test_exact_methods_refuse_sizes_they_cannot_run(unit2):
    h, seg, _, _, _ = unit2
    with pytest.raises(ValueError, match="max_elements"):
        unit_jacobian.singular_values_exact(seg.ops.map, h, params=seg.params, max_elements=100)
    big = jnp.zeros((8, 32, 32, 16))  # a 32x32x16 unit: one chunk of 10^5 basis vectors is ~80 GiB
    with pytest.raises(ValueError, match="chunk_size <= .*method='estimate'"):
        unit_jacobian.check_chunk(100_000, big.shape[0], 32 * 32 * 16)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        unit_jacobian.frobenius_sq_exact(seg.ops.map, h, params=seg.params, chunk_size=0)


def test_a_32x32x16_unit_frobenius_runs_in_bounded_memory():
    """Exact ||J||_F^2 of a 32x32x16 -> 32x32x16 conv layer without its 1 GiB Jacobian: a
    3x3 conv with kernel W has ||J||_F^2 = sum over output pixels of the squared taps that
    land inside the image (zero padding), i.e. sum_taps ||W_tap||^2 * (#pixels where valid)."""
    w = jax.random.normal(jax.random.key(3), (3, 3, 16, 16)) / 12
    f = lambda h: jax.lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.zeros((1, 32, 32, 16))
    got = unit_jacobian.frobenius_sq_exact(f, h, chunk_size=512)
    valid = np.array([31, 32, 31])  # rows (and columns) where tap offset -1, 0, +1 stays inside
    expected = sum(np.sum(np.asarray(w[a, b]) ** 2) * valid[a] * valid[b] for a in range(3) for b in range(3))
    np.testing.assert_allclose(got, [expected], rtol=1e-4)


def test_hutchinson_and_hutchpp_are_unbiased_on_a_unit(unit2):
    h, seg, _, model, variables = unit2
    exact = unit_jacobian.frobenius_sq_exact(seg.ops.map, h, params=seg.params)
    for est in (estimators.frobenius_sq_hutchinson(seg.ops.map, h, params=seg.params, num_probes=64),
                estimators.frobenius_sq_hutchpp(seg.ops.map, h, params=seg.params, num_probes=60)):
        # 5 standard errors: fails with probability < 1e-6 if the estimator is unbiased
        assert np.all(np.abs(est["estimate"] - exact) < 5 * est["std_err"])


def _jacrev_blocks(model, variables, h, unit, train):
    """Brute force: the whole batch map's Jacobian of `unit` by jax.jacrev, (N*n_out, N*n_in)."""
    def f(hb):
        if not train:
            return model.apply(variables, hb, start=unit, stop=unit)
        return model.apply(variables, hb, True, start=unit, stop=unit, mutable=["batch_stats"])[0]
    out = jax.eval_shape(f, h)
    jac = np.asarray(jax.jit(jax.jacrev(f))(h), np.float64)
    return jac.reshape(int(np.prod(out.shape)), int(np.prod(h.shape)))


@pytest.mark.parametrize("bn", ["eval", "batch"])
def test_exact_spectrum_equals_svd_of_jacrev(unit2, bn):
    """bn=eval: J of example 0; bn=batch: the diagonal block d out_0 / d h_0 of the batch map
    (rows 0..53, columns 0..143 of the whole (3*54) x (3*144) Jacobian)."""
    h, seg_eval, seg_batch, model, variables = unit2
    jac = _jacrev_blocks(model, variables, h, "unit_2", bn == "batch")
    expected = np.linalg.svd(jac[:54, :144], compute_uv=False)
    got = unit_groups.exact_spectrum(seg_eval if bn == "eval" else seg_batch, h, bn)
    assert got["shape"] == [54, 144]
    np.testing.assert_allclose(got["singular_values"], expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def twin_units():
    """Two identical blocks (unit_1, unit_2: 4x4x4 -> 4x4x4, identity shortcuts) of a small
    no-norm ReLU ResNet: one group for `unit_groups.measure_group`."""
    model = ResNet(stage_sizes=(2,), widths=(4,), stem="cifar", norm="none", num_classes=3)
    x = jax.random.normal(jax.random.key(4), (2, 4, 4, 3))
    variables = model.init(jax.random.key(5), x)
    segs = SegmentCache().segments(model, variables, x.shape)
    hs = end_to_end(segs, x, jnp.array([0, 2])).activations
    assert segs[1].ops is segs[2].ops  # identical jaxprs share one compiled computation
    return model, variables, [(segs[1], hs[1]), (segs[2], hs[2])]


def test_grouped_unit_measurements_equal_jacrev_per_unit(twin_units):
    """One vmapped op for both units: Lanczos sigma_max = top singular value of jacrev's J
    (tol 1e-6 -> rtol 1e-5); Hutchinson (64 probes) within 5 standard errors of the exact
    ||J||_F^2; the identity/branch split near ||J_F||_F and ||I + J_F||_F from jacrev of the
    last layer probe (64 Rademacher probes: rtol 0.15 on the norm)."""
    model, variables, items = twin_units
    options = unit_groups.JacobianOptions(method="estimate", num_probes=64, tol=1e-6, max_iter=64, examples=2)
    results = unit_groups.measure_group(items, [True, True], "eval", options, seed=0)
    for (seg, h), result, unit in zip(items, results, ("unit_1", "unit_2")):
        for i in range(2):
            f = lambda hi: model.apply(variables, hi[None], start=unit, stop=unit)[0]  # noqa: E731
            jac = np.asarray(jax.jacrev(f)(h[i]), np.float64).reshape(64, 64)
            sv = np.linalg.svd(jac, compute_uv=False)
            assert result["spectral_norm"]["sigma"][i] == pytest.approx(sv[0], rel=1e-5)
            fro = result["frobenius_sq"]
            assert abs(fro["estimate"][i] - np.sum(sv**2)) < 5 * fro["std_err"][i]
            assert result["mean_sq_singular_value"]["estimate"][i] == pytest.approx(fro["estimate"][i] / 64)

            def branch(hi):
                _, state = model.apply(variables, hi[None], start=unit, stop=unit, probes=True,
                                        mutable=["intermediates"])
                return state["intermediates"][unit]["layer2"][0][0]

            jf = np.asarray(jax.jacrev(branch)(h[i]), np.float64).reshape(64, 64)
            split = result["residual_split"]
            assert split["branch"][i] == pytest.approx(np.linalg.norm(jf), rel=0.15)
            assert split["identity_plus_branch"][i] == pytest.approx(np.linalg.norm(np.eye(64) + jf), rel=0.15)


def test_batch_mode_blocks_summed_rows_and_cross_share_equal_jacrev(tiny, e2e):
    """bn="batch": the per-example blocks d z_i/d h_i, the summed rows sum_j d z_j/d h_i, the
    end-to-end cross-example share, the blocks' singular values and the gradient scale
    coefficient, all from jax.jacrev of the whole batch map from unit_1's input to the logits."""
    model, variables, x, _ = tiny
    h = e2e["batch"]["activations"][1]
    f = _from(model, variables, "unit_1", train=True)
    jac = np.asarray(jax.jit(jax.jacrev(f))(h), np.float64).reshape(3, 5, 3, -1)  # [i, c, j, k]
    blocks = np.stack([jac[i, :, i] for i in range(3)])  # (N, C, n)
    entry = e2e["batch"]["units"]["unit_1"]["input"]
    np.testing.assert_allclose(entry["logit_jac"], np.linalg.norm(blocks.reshape(3, -1), axis=1), rtol=RTOL)
    summed = jac.sum(0).transpose(1, 0, 2)  # [j, c, k]
    np.testing.assert_allclose(entry["logit_jac_summed_rows"], np.linalg.norm(summed.reshape(3, -1), axis=1),
                               rtol=RTOL)
    assert entry["cross_example_share"] == pytest.approx(1 - np.sum(blocks**2) / np.sum(jac**2), abs=1e-5)
    assert 0.01 < entry["cross_example_share"] < 0.99  # batch statistics couple the examples end to end
    svd = np.stack([np.linalg.svd(blocks[i], compute_uv=False) for i in range(3)])
    np.testing.assert_allclose(entry["singular_values"], svd, rtol=RTOL, atol=1e-6)
    z = np.linalg.norm(np.asarray(f(h), np.float64), axis=1)
    hn = np.linalg.norm(np.asarray(h, np.float64).reshape(3, -1), axis=1)
    gsc = np.linalg.norm(blocks.reshape(3, -1), axis=1) / np.sqrt(blocks.shape[-1]) * hn / z
    np.testing.assert_allclose(entry["gradient_scale"], gsc, rtol=RTOL)


def test_gradient_scale_is_invariant_to_rescaling_the_activations():
    """Philipp et al.'s GSC: scaling h by a scales d z/d h by 1/a and ||h|| by a."""
    from jaxres.analysis.endtoend import gradient_scale

    jac, h, logits = np.array([2.0, 3.0]), np.ones((2, 4)), np.ones((2, 5))
    np.testing.assert_allclose(gradient_scale(jac / 10, h * 10, logits), gradient_scale(jac, h, logits))
    # an identity map (h = z, d z/d h = I, ||I||_F = sqrt(n)) has GSC 1
    np.testing.assert_allclose(gradient_scale(np.full(2, 2.0), np.ones((2, 4)), np.ones((2, 4))), [1.0, 1.0])


def test_calibrated_running_statistics_make_eval_mode_compute_the_batch_forward_pass(tiny):
    """At initialization Flax's running statistics are 0 and 1 (eval BN = identity); the study
    calibrates them to the inputs' batch statistics: eval-mode logits then equal batch-mode ones,
    and the statistics are those Flax's own momentum update moves towards."""
    from jaxres.analysis.study import calibrate_batch_stats

    model, variables, x, _ = tiny
    calibrated = calibrate_batch_stats(model, variables, x)
    batch_logits, state = model.apply(variables, x, True, mutable=["batch_stats"])
    np.testing.assert_allclose(model.apply(calibrated, x, False), batch_logits, rtol=1e-4, atol=1e-5)
    zero = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    _, from_zero = model.apply({**variables, "batch_stats": zero}, x, True, mutable=["batch_stats"])
    expected = jax.tree.map(lambda s: s / (1 - model.bn_momentum), from_zero["batch_stats"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), calibrated["batch_stats"],
                 expected)


def test_float64_end_to_end_agrees_with_float32_and_stays_float64(tiny, e2e):
    model, variables, x, labels = tiny
    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        segments = SegmentCache().segments(model64, v64, x.shape, "batch", jnp.float64)
        result = end_to_end(segments, jnp.asarray(x, jnp.float64), labels)
        assert result.activations[2].dtype == jnp.float64 and result.input_grads.dtype == np.float64
    for unit, entry in result.units.items():
        np.testing.assert_allclose(entry["input"]["logit_jac"], e2e["batch"]["units"][unit]["input"]["logit_jac"],
                                   rtol=1e-4)


@pytest.fixture(scope="module")
def two_stages():
    """Stem, unit_1/unit_2 keep the 6x6x4 shape, unit_3 opens stage 2 (3x3x6), unit_4 keeps it."""
    model = ResNet(stage_sizes=(2, 2), widths=(4, 6), stem="cifar", shortcut="A", num_classes=5)
    x = jnp.zeros((2, 6, 6, 3))
    return SegmentCache().segments(model, model.init(jax.random.key(0), x), x.shape)


def test_units_are_sorted_into_stages_from_their_shapes_and_sampled_per_stage(two_stages):
    from jaxres.analysis.stages import sample_units, unit_places

    places = unit_places(two_stages)
    assert [(p.name, p.kind, p.stage) for p in places] == [
        ("stem", "stem", None), ("unit_1", "shape-keeping", 1), ("unit_2", "shape-keeping", 1),
        ("unit_3", "transition", 2), ("unit_4", "shape-keeping", 2), ("head", "head", None)]
    assert sample_units(places, 1) == [2, 4]  # the middle shape-keeping unit of each stage
    assert sample_units(places, 2) == [1, 2, 4]  # stage 2 has one
    assert sample_units(places, 0) == list(range(6))


def test_units_are_sampled_over_the_net_with_transitions_the_same_centred_way(two_stages):
    """within="net" (the training monitor): the inner units unit_1 .. unit_4, transitions
    included, at int((j + 1/2) * 4 / count)."""
    from jaxres.analysis.stages import sample_units, unit_places

    places = unit_places(two_stages)
    assert sample_units(places, 1, within="net") == [3]  # unit_3, the transition
    assert sample_units(places, 2, within="net") == [2, 4]
    assert sample_units(places, 3, within="net") == [1, 3, 4]
    assert sample_units(places, 9, within="net") == [1, 2, 3, 4]  # every inner unit, never the stem or head


def test_stage_rates_are_geometric_means_over_shape_keeping_units_only(two_stages):
    """Norms at the inputs of stem, unit_1 .. unit_4 and the head: stage 1's rate is the
    geometric mean of n1/n2 and n2/n3 = sqrt(n1/n3); the transition unit_3 is n3/n4 alone."""
    from jaxres.analysis.stages import stage_rates, unit_places

    norms = [np.array([v, 2 * v]) for v in (50.0, 36.0, 9.0, 4.0, 2.0, 1.0)]
    rates = stage_rates(unit_places(two_stages), norms)
    assert [s["units"] for s in rates["stages"]] == [["unit_1", "unit_2"], ["unit_4"]]
    assert [s["rate"] for s in rates["stages"]] == pytest.approx([np.sqrt(36 / 4), 2.0])
    assert [(t["unit"], t["rate"]) for t in rates["transitions"]] == [("unit_3", pytest.approx(2.0))]


def test_twins_initialized_on_their_own_share_their_weights():
    """The study initializes every model on its own; Flax derives each parameter's key from its
    path, so a plain net, its residual twin and either activation start from the same weights."""
    from jaxres.models.registry import create_model

    x = jnp.zeros((1, 32, 32, 3))
    residual = create_model("cifar_resnet20").init(jax.random.key(0), x)
    plain = create_model("cifar_plain20", activation="tanh").init(jax.random.key(0), x)
    assert jax.tree.structure(plain) == jax.tree.structure(residual)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(residual)))
