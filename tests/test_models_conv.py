"""jaxres.models.conv: the CPU-fast derivatives equal XLA's convolution derivatives.

Reference: jax.lax.conv_general_dilated and JAX's own derivative rules (forward, VJP w.r.t.
input and kernel, JVP, second order). Float32 tolerance: relative 1e-5 of the largest entry
(only the summation order differs)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxres.models.conv as conv_module
from jaxres.models import onednn_conv
from jaxres.models.conv import NHWC, _chunk, _taps_pay_off, conv_general_dilated, kernel_gradient_rule

CASES = [  # (batch, side, c_in, c_out, kernel, stride, pad): every conv shape the zoo uses
    (4, 8, 3, 5, 3, 1, 1),  # CIFAR stem / basic block
    (6, 9, 4, 6, 3, 2, 1),  # strided 3x3, odd side
    (4, 8, 4, 6, 1, 2, 0),  # projection shortcut
    (1, 9, 2, 3, 7, 2, 3),  # ImageNet stem
    (3, 5, 4, 4, 1, 1, 0),  # bottleneck 1x1
    (2, 7, 3, 5, 1, 2, 0),  # projection shortcut, odd side
    (2, 6, 3, 4, 1, 3, 1),  # 1x1 with padding and a stride that leaves pixels out (none in the zoo)
]


@pytest.fixture(autouse=True)
def xla_convolutions(monkeypatch):
    """These tests are of jaxres's rules around XLA's convolution (values bit for bit XLA's):
    the optional oneDNN path (tests/test_models_onednn.py) is switched off where installed."""
    monkeypatch.setenv(onednn_conv.SWITCH, "0")


def _rules(kernel):  # "matmul" exists for 1x1 kernels only
    return ["xla", "taps"] + (["matmul"] if kernel == 1 else [])


def _loss(impl, stride, pad):
    def loss(x, w):  # a non-linear readout so every output pixel's cotangent differs
        y = impl(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=NHWC)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
    return loss


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=rtol * np.abs(a).max())


def _force(monkeypatch, rule):
    """Every layer takes kernel-gradient `rule`, whatever `kernel_gradient_rule` picks."""
    monkeypatch.setattr(conv_module, "kernel_gradient_rule", lambda kernel_shape, pixels: rule)


@pytest.mark.parametrize("case, rule", [(case, rule) for case in CASES for rule in _rules(case[4])])
def test_value_and_gradients_match_xla(case, rule, monkeypatch):
    _force(monkeypatch, rule)
    n, side, cin, cout, k, s, p = case
    x = jax.random.normal(jax.random.key(0), (n, side, side, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
    ref, new = _loss(lax.conv_general_dilated, s, p), _loss(conv_general_dilated, s, p)
    assert float(new(x, w)) == float(ref(x, w))  # the value is XLA's convolution, bit for bit
    for a, b in zip(jax.grad(ref, (0, 1))(x, w), jax.grad(new, (0, 1))(x, w)):
        _close(a, b)
    tx, tw = jax.random.normal(jax.random.key(2), x.shape), jax.random.normal(jax.random.key(3), w.shape)
    _close(jax.jvp(ref, (x, w), (tx, tw))[1], jax.jvp(new, (x, w), (tx, tw))[1])


@pytest.mark.parametrize("kernel, pad, rule", [(3, 1, "xla"), (3, 1, "taps"), (1, 0, "matmul")])
def test_second_order_matches_xla(kernel, pad, rule, monkeypatch):
    _force(monkeypatch, rule)
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 2))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 2, 2))
    ref, new = _loss(lax.conv_general_dilated, 2, pad), _loss(conv_general_dilated, 2, pad)
    _close(jax.hessian(ref, 1)(x, w), jax.hessian(new, 1)(x, w))
    _close(jax.jacfwd(jax.grad(ref, 0), 1)(x, w), jax.jacfwd(jax.grad(new, 0), 1)(x, w))


def test_other_convolutions_fall_through_to_xla():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 2, 4))
    kwargs = dict(dimension_numbers=NHWC, feature_group_count=2, rhs_dilation=(2, 2))
    got = conv_general_dilated(x, w, (1, 1), "SAME", **kwargs)
    np.testing.assert_array_equal(got, lax.conv_general_dilated(x, w, (1, 1), "SAME", **kwargs))
    assert "custom_jvp" not in str(jax.make_jaxpr(lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME", **kwargs))(x, w))
    w1 = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))
    assert "custom_jvp" in str(jax.make_jaxpr(lambda x, w: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC))(x, w1))


@pytest.mark.parametrize("kernel", [3, 1])  # rules "xla" and "matmul"
def test_string_padding_and_bfloat16(kernel):
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 4)).astype(jnp.bfloat16)
    for impl in (lax.conv_general_dilated, conv_general_dilated):
        assert impl(x, w, (2, 2), "SAME", dimension_numbers=NHWC).shape == (4, 4, 4, 4)
    f = lambda impl: lambda w: jnp.sum(impl(x, w, (2, 2), "SAME", dimension_numbers=NHWC).astype(jnp.float32) ** 2)
    a, b = jax.grad(f(lax.conv_general_dilated))(w), jax.grad(f(conv_general_dilated))(w)
    assert b.dtype == jnp.bfloat16
    _close(a.astype(jnp.float32), b.astype(jnp.float32), rtol=3e-2)  # bf16: 8 mantissa bits


def test_chunks_divide_the_batch_and_fit_the_budget():
    assert _chunk(128, 34 * 34 * 16 * 4) == 4  # 74 KB images, 512 KiB budget -> 6, largest divisor 4
    assert _chunk(7, 1) == 7 and _chunk(7, 10**9) == 1 and _chunk(12, 150_000) == 3


@pytest.mark.parametrize("kernel, pixels, taps", [
    ((3, 3, 16, 16), 32 * 32, False),  # CIFAR stages: XLA's kernel gradient is 1.5-3.6x faster
    ((3, 3, 64, 64), 8 * 8, False),
    ((7, 7, 3, 64), 112 * 112, False),  # ImageNet stem: 3 input channels
    ((3, 3, 64, 64), 56 * 56, False),  # ResNet layer1
    ((3, 3, 256, 256), 14 * 14, False),  # small map
    ((1, 1, 256, 64), 56 * 56, False),  # 1x1: one matmul either way
    ((3, 3, 64, 64), 224 * 224, True),  # VGG block 1: XLA's correlation crawls on big maps
    ((3, 3, 128, 128), 112 * 112, True),
    ((3, 3, 256, 256), 56 * 56, True),  # wide VGG layers
    ((3, 3, 512, 512), 28 * 28, True),
])
def test_taps_where_they_were_measured_faster(kernel, pixels, taps):
    assert _taps_pay_off(kernel, pixels) is taps


@pytest.mark.parametrize("kernel, pixels, rule", [
    ((1, 1, 256, 64), 56 * 56, "matmul"),  # every 1x1 kernel, any stride: jaxres bench --suite conv
    ((1, 1, 1024, 2048), 7 * 7, "matmul"),  # measured 1.4-16x faster than XLA's on ResNet-50's 1x1 shapes
    ((3, 3, 16, 16), 32 * 32, "xla"),
    ((3, 3, 128, 128), 112 * 112, "taps"),
])
def test_kernel_gradient_rule(kernel, pixels, rule):
    assert kernel_gradient_rule(kernel, pixels) == rule


@pytest.mark.parametrize("stride", [1, 2])
def test_1x1_kernel_gradient_is_one_matrix_product(stride):
    """On CPU the compiled kernel gradient of a 1x1 conv is a dot over N*H*W, with no
    convolution and no transpose of the input or the output gradient."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    w = jax.random.normal(jax.random.key(1), (1, 1, 4, 6))
    g = jax.random.normal(jax.random.key(2), (2, 8 // stride, 8 // stride, 6))
    kernel_grad = jax.jit(lambda x, w, g: jax.vjp(
        lambda w: conv_general_dilated(x, w, (stride, stride), "VALID", dimension_numbers=NHWC), w)[1](g)[0])
    ops = set(re.findall(r"= \S+ ([\w-]+)\(", kernel_grad.lower(x, w, g).compile().as_text()))
    assert "dot" in ops and not ops & {"convolution", "transpose", "copy"}, ops


def test_materialized_input_keeps_every_bit():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4)) * jnp.array([1e-30, 1.0, 1e30, -0.0])
    for dtype in (jnp.float32, jnp.bfloat16):
        got = jax.jit(conv_module._materialized)(x.astype(dtype))
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(x.astype(dtype)).view(np.uint8))
    assert "div" in str(jax.make_jaxpr(conv_module._materialized)(x))
