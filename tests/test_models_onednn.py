"""jaxres.models.onednn_conv: oneDNN's convolutions (the optional `jaxres[onednn]` extra) equal
XLA's, with derivatives of every order, and jaxres.models.conv routes plain float32 CPU
convolutions to them only when the extra is there and not switched off.

Reference: jax.lax.conv_general_dilated and JAX's own derivative rules. Float32 tolerance:
relative 1e-5 of the largest entry (oneDNN sums in another order than XLA). Without the extra
the tests that run oneDNN skip, saying why; the fallback tests run everywhere."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxres.models import onednn_conv
from jaxres.models.conv import NHWC, conv_general_dilated

from conftest import init, tiny_cifar_resnet

needs_onednn = pytest.mark.skipif(
    not onednn_conv.available(),
    reason=f"the oneDNN path is unavailable here: {onednn_conv.unavailable_reason()}")

CASES = [  # (batch, side, c_in, c_out, kernel, stride, padding): the zoo's conv shapes, small
    (4, 8, 3, 5, 3, 1, ((1, 1), (1, 1))),  # CIFAR stem / basic block
    (6, 9, 4, 6, 3, 2, ((1, 1), (1, 1))),  # strided 3x3, odd side (torchvision's padding)
    (6, 8, 4, 6, 3, 2, ((0, 1), (0, 1))),  # strided 3x3, flax "SAME" (asymmetric)
    (4, 8, 4, 6, 1, 2, ((0, 0), (0, 0))),  # projection shortcut
    (1, 9, 2, 3, 7, 2, ((3, 3), (3, 3))),  # ImageNet stem
    (3, 5, 4, 4, 1, 1, ((0, 0), (0, 0))),  # bottleneck 1x1
    (2, 6, 3, 4, 1, 3, ((1, 1), (1, 1))),  # 1x1 with padding and a stride that leaves pixels out
]


@pytest.fixture
def onednn_on(monkeypatch):
    monkeypatch.setenv(onednn_conv.SWITCH, "1")


def _loss(impl, stride, padding):
    def loss(x, w):  # a non-linear readout so every output pixel's cotangent differs
        y = impl(x, w, (stride, stride), padding, dimension_numbers=NHWC)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
    return loss


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=rtol * np.abs(a).max())


def _uses_onednn(f, *args) -> bool:
    # a new function each time: JAX caches traces by function, and the switch is read when tracing
    return "onednn_conv_forward" in str(jax.make_jaxpr(lambda *a: f(*a))(*args))


@needs_onednn
@pytest.mark.parametrize("case", CASES)
def test_value_jvp_and_vjps_match_xla(case, onednn_on):
    n, side, cin, cout, k, s, padding = case
    x = jax.random.normal(jax.random.key(0), (n, side, side, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
    ref, new = _loss(lax.conv_general_dilated, s, padding), _loss(conv_general_dilated, s, padding)
    assert _uses_onednn(new, x, w)
    _close(ref(x, w), jax.jit(new)(x, w))
    for a, b in zip(jax.grad(ref, (0, 1))(x, w), jax.jit(jax.grad(new, (0, 1)))(x, w)):  # input and kernel
        _close(a, b)
    tx, tw = jax.random.normal(jax.random.key(2), x.shape), jax.random.normal(jax.random.key(3), w.shape)
    _close(jax.jvp(ref, (x, w), (tx, tw))[1], jax.jvp(new, (x, w), (tx, tw))[1])


@needs_onednn
@pytest.mark.parametrize("kernel, padding", [(3, ((1, 1), (1, 1))), (1, ((0, 0), (0, 0)))])
def test_second_order_matches_xla(kernel, padding, onednn_on):
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 2))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 2, 2))
    ref, new = _loss(lax.conv_general_dilated, 2, padding), _loss(conv_general_dilated, 2, padding)
    _close(jax.hessian(ref, 1)(x, w), jax.hessian(new, 1)(x, w))  # backward-weights of backward-weights
    _close(jax.hessian(ref, 0)(x, w), jax.hessian(new, 0)(x, w))  # backward-data of backward-data
    _close(jax.jacfwd(jax.grad(ref, 0), 1)(x, w), jax.jacfwd(jax.grad(new, 0), 1)(x, w))


@needs_onednn
def test_vmap_folds_batched_images_and_maps_batched_kernels(onednn_on):
    x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4, 5))
    conv = lambda impl: lambda x, w: impl(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    for axes in ((0, None), (None, 0), (0, 0)):
        args = (x, w[0]) if axes == (0, None) else (x[0], w) if axes == (None, 0) else (x, w)
        _close(jax.vmap(conv(lax.conv_general_dilated), axes)(*args), jax.vmap(conv(conv_general_dilated), axes)(*args))
    # per-example kernel gradients: backward-weights with both arguments batched
    grads = lambda impl: jax.vmap(jax.grad(lambda w, x: jnp.sum(conv(impl)(x[None], w) ** 2)), (None, 0))(w[0], x[0])
    _close(grads(lax.conv_general_dilated), grads(conv_general_dilated))


@needs_onednn
def test_string_padding(onednn_on):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    for padding in ("SAME", "VALID"):
        _close(lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=NHWC),
               conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=NHWC))


@needs_onednn
def test_the_switch_turns_it_off(monkeypatch):
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    conv = lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    monkeypatch.setenv(onednn_conv.SWITCH, "1")
    assert _uses_onednn(conv, x, w)
    monkeypatch.setenv(onednn_conv.SWITCH, "0")
    assert not _uses_onednn(conv, x, w)
    np.testing.assert_array_equal(conv(x, w), lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC))


@needs_onednn
def test_a_training_step_matches_xla(monkeypatch):
    """Gradients of a whole CIFAR ResNet (stem, strided and option-A blocks, BatchNorm) agree."""
    model = tiny_cifar_resnet()
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    variables = init(model, x)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    grads = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(onednn_conv.SWITCH, switch)
        grad = jax.jit(jax.value_and_grad(loss))
        assert ("JaxresOnednnConv" in grad.lower(variables["params"]).as_text()) == (switch == "1")
        grads[switch] = grad(variables["params"])
    _close(grads["0"][0], grads["1"][0])
    for a, b in zip(jax.tree.leaves(grads["0"][1]), jax.tree.leaves(grads["1"][1])):
        _close(a, b, rtol=1e-4)  # through BatchNorm's normalization: differences grow a little


@needs_onednn
def test_the_handlers_are_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = onednn_conv._build()
    assert built.parent == tmp_path / "jaxres" / "onednn" and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert onednn_conv._build() == built and built.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no half-written file left


@needs_onednn
def test_a_missing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(onednn_conv.Unavailable, match="cannot run the C\\+\\+ compiler .*no-such-g\\+\\+"):
        onednn_conv._build()
    assert list((tmp_path / "jaxres" / "onednn").iterdir()) == []


def test_other_convolutions_stay_with_xla(onednn_on):
    """bf16, grouped and dilated convolutions never go to oneDNN (it is float32, plain only)."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
    grouped = dict(dimension_numbers=NHWC, feature_group_count=2, rhs_dilation=(2, 2))
    assert not _uses_onednn(lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME", **grouped), x, w)
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4)).astype(jnp.bfloat16)
    assert not _uses_onednn(lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC),
                            x.astype(jnp.bfloat16), w)


def test_without_the_extra_the_reason_names_it(monkeypatch):
    monkeypatch.setattr(onednn_conv, "LIBRARY_DIST", "jaxres-no-such-onednn-dist")
    with pytest.raises(onednn_conv.Unavailable, match=r"jaxres-no-such-onednn-dist is not installed; "
                                                      r"`pip install 'jaxres\[onednn\]'`"):
        onednn_conv._dist_file(onednn_conv.LIBRARY_DIST, "libdnnl.so.3")


def test_unavailable_means_xla(monkeypatch):
    monkeypatch.setattr(onednn_conv, "_state", {"reason": "not here"})
    monkeypatch.setenv(onednn_conv.SWITCH, "1")
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    assert not onednn_conv.enabled() and onednn_conv.unavailable_reason() == "not here"
    assert not _uses_onednn(lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC), x, w)


@needs_onednn
def test_the_conv_suite_times_onednn_beside_xla():
    from jaxres.bench import conv_rules

    (row,) = conv_rules.bench_conv_rules(repeats=1, onednn=True, shapes=[(2, 8, 4, 8, 3, 2)])
    assert set(conv_rules.ONEDNN_COLUMNS) <= set(row["ms_median"]) and row["onednn_rel_diff"] < 1e-5
    assert "oneDNN" in conv_rules.format_rows([row]).splitlines()[-1]


def test_the_conv_suite_says_why_onednn_is_missing(monkeypatch):
    from jaxres.bench import conv_rules

    monkeypatch.setattr(onednn_conv, "_state", {"reason": "not here"})
    with pytest.raises(ValueError, match="--onednn times oneDNN's CPU convolutions, unavailable here: not here"):
        list(conv_rules.bench_conv_rules(repeats=1, onednn=True, shapes=[(2, 8, 4, 8, 3, 2)]))


@needs_onednn
@pytest.mark.slow
def test_bench_times_onednn_and_xla_side_by_side(tmp_path, capsys):
    # `jaxres bench MODEL --onednn`: two worker processes, one with each convolution path, the
    # order rotated round by round; each worker says which path its step used.
    import json

    from jaxres.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "cifar_resnet20", "--batch-size", "2", "--steps", "3", "--warmup", "0", "--onednn",
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["onednn"]["onednn"] is True and row["xla"]["onednn"] is False
    pair = row["pairs"]["onednn/xla"]
    assert len(pair["ratios"]) == 3 == len(row["onednn"]["step_s"]) == len(row["xla"]["step_s"])
    assert pair["ratios"] == pytest.approx([a / b for a, b in zip(row["onednn"]["step_s"], row["xla"]["step_s"])])
    assert "onednn/xla min/med" in capsys.readouterr().out
