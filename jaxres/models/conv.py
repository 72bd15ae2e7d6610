"""2-D convolution with a kernel gradient that is fast on XLA:CPU.

XLA differentiates a convolution w.r.t. its kernel by another convolution whose "kernel" is
the whole output-gradient image (32x32 for a CIFAR stage 1, 224x224 for VGG's first layers).
XLA:CPU runs that correlation 3-15x slower than the forward convolution (measured on a 2-core
x86 CPU, batch 128: 32x32x16 forward 10 ms, kernel gradient 190 ms; VGG 224x224x64 batch 8:
0.44 s vs 6.4 s), and it dominated CPU training steps (`experiments/bench_conv.py`).

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (flax's `nn.Conv` takes it
as a field). Its value is XLA's convolution; its JVP w.r.t. the kernel is written as the sum
over kernel taps of (shifted input) @ kernel[tap], looped over small batch chunks that stay in
cache, and JAX's transpose of that linear map is the kernel gradient: per chunk and tap one
(C_in x pixels) @ (pixels x C_out) matmul. Numerics equal XLA's to float tolerance (summation
order differs). Its input gradient is XLA's too, fed a pre-flipped kernel (see `_input_tangent`).
Used on CPU only: on GPU/TPU the vendor kernels are fast and this would not be.
Anything but plain NHWC/HWIO convolutions (dilation, groups, other layouts) goes to XLA as is.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

NHWC = ("NHWC", "HWIO", "NHWC")
CHUNK_BYTES = 512 << 10  # a chunk of input images this large stays in L2 while its taps are summed


def _is_unit(dilation) -> bool:
    return dilation is None or all(d == 1 for d in dilation)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`, with the CPU-fast kernel gradient where it applies."""
    plain = (
        lhs.ndim == 4 and jax.default_backend() == "cpu" and _is_unit(lhs_dilation) and _is_unit(rhs_dilation)
        and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    )
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision, preferred_element_type)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return _conv(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC, precision=precision)


@_conv.defjvp
def _conv_jvp(strides, padding, precision, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _conv(x, w, strides, padding, precision)
    out = []
    if not isinstance(dx, SymbolicZero):
        out.append(_input_tangent(dx, w, strides, padding, precision))
    if not isinstance(dw, SymbolicZero):
        out.append(_taps_matmul(x, dw, strides, padding, y.shape, precision))
    if not out:
        return y, SymbolicZero(jax.core.get_aval(y).to_tangent_aval())
    return y, functools.reduce(jnp.add, out)


def _input_tangent(dx, w, strides, padding, precision):
    """conv(dx, w), written so that its transpose (the input gradient) is a plain NHWC/HWIO
    convolution with a materialized flipped kernel. JAX's transpose flips the kernel and swaps
    its in/out axes through dimension numbers; inside a `lax.scan` body (scan_units) XLA:CPU
    then ran that convolution 7x slower than unrolled (18 scanned 64x32x32x16 layers: 990 vs
    131 ms). Here the flipped, axis-swapped kernel is computed up front behind an optimization
    barrier (175 ms scanned, 131 ms unrolled, bitwise the same gradient)."""
    flipped = lax.optimization_barrier(lax.rev(w, (0, 1)).swapaxes(2, 3))  # (H, W, C_out, C_in)
    return lax.conv_general_dilated(dx, lax.rev(flipped, (0, 1)), strides, padding,
                                    dimension_numbers=("NHWC", "HWOI", "NHWC"), precision=precision)


def _chunk(batch: int, image_bytes: int) -> int:
    """Largest divisor of `batch` whose images fit in CHUNK_BYTES (at least 1)."""
    size = max(1, min(batch, CHUNK_BYTES // max(image_bytes, 1)))
    while batch % size:
        size -= 1
    return size


def _taps_matmul(x, w, strides, padding, out_shape, precision):
    """The convolution as a linear map of the kernel: sum over taps (i, j) of the strided,
    shifted input times w[i, j], one scan step per chunk of images (transposes to the fast
    kernel gradient)."""
    (sh, sw), (kh, kw) = strides, w.shape[:2]
    n, ho, wo = out_shape[:3]
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    b = _chunk(n, math.prod(xp.shape[1:]) * xp.dtype.itemsize)

    @jax.checkpoint  # recompute the taps in the transpose: saving them would cost 9x the input
    def one_chunk(_, xc):
        acc = None
        for i in range(kh):
            for j in range(kw):
                tap = lax.slice(xc, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, xc.shape[3]),
                                (1, sh, sw, 1))
                term = jnp.einsum("bhwc,cd->bhwd", tap, w[i, j], precision=precision)
                acc = term if acc is None else acc + term
        return None, acc

    _, ys = lax.scan(one_chunk, None, xp.reshape(n // b, b, *xp.shape[1:]))
    return ys.reshape(out_shape)
