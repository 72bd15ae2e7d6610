"""Model behaviour: BatchNorm modes, plain/residual twins, study switches, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxres
from jaxres.models.layers import KERNEL_INITS
from tests.conftest import init, tiny_cifar_resnet

X = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))


@functools.cache
def initialized(**config):
    model = tiny_cifar_resnet(**config)
    return model, init(model, X)


def test_train_mode_uses_batch_statistics_and_updates_running_averages():
    model, variables = initialized()
    eval_logits = model.apply(variables, X)
    train_logits, updates = model.apply(variables, X, True, mutable=["batch_stats"])
    assert not np.allclose(eval_logits, train_logits)
    # running mean <- 0.9 * 0 + 0.1 * batch mean (torch's momentum 0.1), per channel
    stem_out = model.apply(variables, X, start="stem", stop="stem")  # eval, but conv is BN-free
    conv = jax.lax.conv_general_dilated(
        X, variables["params"]["stem"]["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(updates["batch_stats"]["stem"]["norm1"]["mean"], 0.1 * conv.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    assert stem_out.shape == (4, 16, 16, 4)


def test_eval_mode_is_per_example():
    model, variables = initialized()
    together = model.apply(variables, X)
    alone = model.apply(variables, X[:1])
    np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-6)


def test_option_a_twins_have_identical_parameter_trees():
    resnet, plain = jaxres.create_model("cifar_resnet20"), jaxres.create_model("cifar_plain20")
    shapes = lambda m: jax.tree.map(lambda a: a.shape, jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert shapes(resnet) == shapes(plain)


def test_twins_share_everything_but_the_shortcut():
    resnet, variables = initialized(shortcut="B")
    plain = tiny_cifar_resnet(shortcut="B", residual=False)
    plain_vars = jax.eval_shape(plain.init, jax.random.key(0), X)
    res_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables)}
    plain_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(plain_vars)}
    assert plain_paths < res_paths
    assert all("proj_" in p for p in res_paths - plain_paths)
    # with the residual's weights, the plain twin's unit equals the residual unit minus its shortcut
    _, outputs = resnet.apply(variables, X, capture=True)
    h = outputs["unit_1"]
    shared = {c: {k: v for k, v in tree.items()} for c, tree in variables.items()}
    plain_out = plain.apply(shared, h, start="unit_2", stop="unit_2")
    branch = resnet.apply(variables, h, start="unit_2", stop="unit_2", probes=True, mutable=["intermediates"])[1]
    pre_add = branch["intermediates"]["unit_2"]["layer2"][0]
    np.testing.assert_allclose(plain_out, jax.nn.relu(pre_add), rtol=1e-5, atol=1e-6)


def test_zero_init_residual_makes_every_block_the_identity():
    model, variables = initialized(zero_init_residual=True, stage_sizes=(2, 1, 1))
    _, outputs = model.apply(variables, X, capture=True)
    # post-activation basic block, zero last BN: relu(x + 0) = x for x >= 0 (x is a ReLU output)
    np.testing.assert_array_equal(outputs["unit_2"], outputs["unit_1"])
    np.testing.assert_array_equal(outputs["unit_1"], outputs["stem"])


def test_zero_init_residual_without_normalization_zeroes_the_last_conv():
    # SkipInit / Fixup: no BN scale to zero, so the branch's last conv starts at zero
    model, variables = initialized(zero_init_residual=True, norm="none", stage_sizes=(2, 1, 1))
    assert not np.any(variables["params"]["unit_2"]["conv2"]["kernel"])
    assert np.any(variables["params"]["unit_2"]["conv1"]["kernel"])
    _, outputs = model.apply(variables, X, capture=True)
    np.testing.assert_array_equal(outputs["unit_2"], outputs["unit_1"])


def test_zero_init_residual_on_a_plain_net_is_refused():
    with pytest.raises(ValueError, match="plain twin \\(residual=False\\) has no shortcut"):
        initialized(zero_init_residual=True, residual=False)


def test_shortcut_and_residual_scaling():
    model, variables = initialized(activation="linear", shortcut_scale=0.5, residual_scale=0.25)
    _, outputs = model.apply(variables, X, capture=True)
    _, state = model.apply(variables, outputs["stem"], start="unit_1", stop="unit_1", probes=True,
                           mutable=["intermediates"])
    branch = state["intermediates"]["unit_1"]["layer2"][0]
    np.testing.assert_allclose(outputs["unit_1"], 0.5 * outputs["stem"] + 0.25 * branch, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "linear"])
def test_activation_switch_without_normalization(activation):
    model, variables = initialized(activation=activation, norm="none")
    assert "batch_stats" not in variables
    assert "bias" in variables["params"]["unit_1"]["conv1"]  # no norm: convs get a bias
    _, outputs = model.apply(variables, X, capture=True)
    if activation == "tanh":
        assert float(jnp.abs(outputs["unit_1"]).max()) <= 1.0
    if activation == "sigmoid":
        assert float(outputs["stem"].min()) >= 0.0


def kernel(init_name, shape, seed=0):
    return KERNEL_INITS[init_name](jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize(
    "init_name, expected_var",
    [
        ("he_normal_fan_out", 2 / (9 * 128)),  # torchvision: kaiming_normal_(mode="fan_out")
        ("he_normal_fan_in", 2 / (9 * 64)),
        ("glorot_normal", 2 / (9 * 64 + 9 * 128)),
        ("lecun_normal", 1 / (9 * 64)),
    ],
)
def test_initializer_variance_within_sampling_error(init_name, expected_var):
    w = kernel(init_name, (3, 3, 64, 128))
    n = w.size  # 73,728 draws: the sample variance has relative std sqrt(2/n) = 0.5%
    assert abs(float(w.var()) / expected_var - 1) < 5 * np.sqrt(2 / n)
    assert abs(float(w.mean())) < 5 * np.sqrt(expected_var / n)


def test_orthogonal_initializers():
    w = kernel("orthogonal", (3, 3, 16, 32)).reshape(-1, 32)
    np.testing.assert_allclose(w.T @ w, np.eye(32), atol=1e-5)
    d = kernel("delta_orthogonal", (3, 3, 16, 32))
    np.testing.assert_allclose(d[1, 1] @ d[1, 1].T, np.eye(16), atol=1e-5)
    assert float(jnp.abs(d).sum()) == pytest.approx(float(jnp.abs(d[1, 1]).sum()))
    narrowing = kernel("delta_orthogonal", (3, 3, 32, 16))  # in > out: row-orthogonal centre
    np.testing.assert_allclose(narrowing[1, 1].T @ narrowing[1, 1], np.eye(16), atol=1e-5)


def test_torchvision_default_init_of_the_head():
    model, variables = initialized()
    fc = variables["params"]["head"]["fc"]
    bound = 1 / np.sqrt(16)  # torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert float(jnp.abs(fc["kernel"]).max()) <= bound and float(jnp.abs(fc["bias"]).max()) <= bound
    assert float(jnp.abs(fc["bias"]).max()) > 0


def test_bfloat16_compute_with_float32_parameters():
    model32, variables = initialized()
    model16 = tiny_cifar_resnet(dtype=jnp.bfloat16)
    assert jax.tree.leaves(jax.tree.map(lambda a: a.dtype, jax.eval_shape(model16.init, jax.random.key(0), X)["params"]))[0] == jnp.float32
    logits16 = jax.jit(model16.apply)(variables, X)
    logits32 = jax.jit(model32.apply)(variables, X)
    assert logits16.dtype == jnp.float32  # logits are always float32
    _, outputs = model16.apply(variables, X, capture=True)
    assert outputs["unit_1"].dtype == jnp.bfloat16
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * float(jnp.abs(logits32).max()))


def test_vgg_dropout_needs_a_key_in_train_mode_and_is_off_in_eval():
    model = jaxres.models.VGG(layers=(8, "M"), pool_size=1, classifier_widths=(16,), num_classes=3)
    x = X[:, :8, :8]
    variables = init(model, x)
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
    a = model.apply(variables, x, True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, x, True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
