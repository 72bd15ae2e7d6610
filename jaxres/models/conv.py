"""2-D convolution whose derivatives are fast on XLA:CPU.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (flax's `nn.Conv` takes it
as a field). Its value is XLA's convolution, bit for bit; on CPU four things differ from XLA's
own rules, each measured on a 2-core x86 CPU (`jaxres bench --suite conv`, `jaxres bench`):

- The input is materialized once (`_materialized`). XLA's kernel gradient transposes the input
  to (C, H, W, N); XLA:CPU fused that transpose with the input's elementwise producers and so
  recomputed the BatchNorm/ReLU/residual-add chain of every earlier block in the stage, once
  per block: 300 of the ~700 ms of a cifar_resnet20 step at batch 128 (profiled).
- The kernel gradient is XLA's where that is fast and a sum over kernel taps of
  (shifted input)^T @ (output gradient) where XLA's is slow: large images or wide layers
  (`_taps_pay_off`). XLA computes it as a convolution whose "kernel" is the whole output-
  gradient image and ran it at 12-15 GFLOP/s on 112x112 and 224x224 maps (VGG, batch 8:
  112x112x128 1.26 s against 0.34 s by taps), but at 90-100 GFLOP/s on CIFAR and ResNet
  stages, where tap matmuls with 16-64 channels are 1.2-3.6x slower.
- A 1x1 kernel's gradient is one matrix product over N*H*W (`_pixel_matmul`), 1.3-11x faster
  than XLA's on ResNet-50's 1x1 layers; `kernel_gradient_rule` picks among the three.
- The input gradient is XLA's, fed a pre-flipped kernel (see `_input_tangent`), except for
  strided 1x1 kernels, where it is a matrix product and a scatter.

Numerics equal XLA's to float tolerance (only the summation order differs). Used on CPU only:
on GPU/TPU the vendor kernels are fast and this would not be. Anything but plain NHWC/HWIO
convolutions (dilation, groups, other layouts) goes to XLA as is.

Where the optional `jaxres[onednn]` extra is installed, plain float32 CPU convolutions go to
oneDNN's instead, forward and both gradients (`jaxres.models.onednn_conv`; JAXRES_ONEDNN=0
keeps them here): on the CIFAR ResNet shapes its convolutions took less than half XLA's time
(docs/scale.md). bfloat16 and the rest stay with the rules above.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxres.models import onednn_conv

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
    padding = tuple(tuple(p) for p in padding)
    if (lhs.dtype == rhs.dtype == jnp.float32 and all(lo >= 0 and hi >= 0 for lo, hi in padding)
            and onednn_conv.enabled()):
        return onednn_conv.conv(lhs, rhs, window_strides, padding)
    out_pixels = math.prod((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s
                           in zip(lhs.shape[1:3], padding, rhs.shape[:2], window_strides))
    return _conv(_materialized(lhs), rhs, tuple(window_strides), padding, precision,
                 kernel_gradient_rule(rhs.shape, out_pixels))


def materialized_on_cpu(x):
    """x, computed once into a buffer on XLA:CPU (`_materialized`); x itself on other backends.

    For a unit's output, the residual stream: XLA:CPU otherwise fused each unit's BatchNorm,
    residual add and ReLU into every later unit's output fusion, so unit k of a stage recomputed
    units 1..k (quadratic in depth; in cifar_resnet56's first stage the last such fusion read 50
    arrays). The values are unchanged: x / 1 is exact."""
    return _materialized(x) if jax.default_backend() == "cpu" else x


def _materialized(x):
    """x, computed once into a buffer that every consumer reads.

    x / 1 is exact; the 1 sits behind an optimization barrier so XLA cannot fold the division,
    and XLA's fusion never duplicates a division (an "expensive" op) into several consumers.
    So the kernel gradient's transpose of x reads x instead of re-deriving it from the block
    outputs before it (cifar_resnet20, batch 128: transposes 300 -> 63 ms of a ~700 ms step)."""
    return x / lax.optimization_barrier(jnp.ones((), x.dtype))


def kernel_gradient_rule(kernel_shape, pixels: int) -> str:
    """How the CPU kernel gradient of an HWIO kernel with `pixels` output pixels is computed:
    "matmul" for 1x1 kernels (`_pixel_matmul`), "taps" where `_taps_pay_off`, else "xla"."""
    if kernel_shape[:2] == (1, 1):
        return "matmul"
    return "taps" if _taps_pay_off(kernel_shape, pixels) else "xla"


def _taps_pay_off(kernel_shape, pixels: int) -> bool:
    """Whether the tap-matmul kernel gradient beats XLA's for this layer on XLA:CPU.

    Measured on 2 cores (batch 8 unless noted; XLA ms / taps ms). Taps win on large maps, where
    XLA's correlation with a 112x112 or larger "kernel" runs at 12-15 GFLOP/s: 224x224x64->64
    975/826, 112x112x64->128 613/224, 112x112x128->128 1261/337; and on wide 3x3 layers at
    28x28 and up: 56x56x256->256 354/247, 56x56x128->256 200/143, 28x28x512->512 266/215,
    28x28x256->512 117/102. They lose with few channels, on small maps and for 1x1 kernels:
    56x56x64->64 22/26, 14x14x256->256 10/16, 7x7x512->512 13/19, 56x56x256->64 (1x1) 28/40,
    224x224x3->64 69/351, and the CIFAR stages at batch 128 (32x32x16 10/36, 8x8x64 8/13)."""
    kh, kw, c_in, c_out = kernel_shape
    wide = c_in * c_out >= 128 * 256 and pixels >= 28 * 28
    return kh * kw > 1 and c_in >= 32 and (pixels >= 112 * 112 or wide)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, padding, precision, rule):
    del rule  # only the derivative depends on it
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC, precision=precision)


@_conv.defjvp
def _conv_jvp(strides, padding, precision, rule, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _conv(x, w, strides, padding, precision, rule)
    # Without symbolic_zeros=True, JAX hands both tangents in as arrays (zeros when only one
    # argument is differentiated); the unused path is pruned when the JVP is transposed.
    if rule == "matmul":
        kernel = _pixel_matmul(x, dw, strides, padding, precision)
    elif rule == "taps":
        kernel = _taps_matmul(x, dw, strides, padding, y.shape, precision)
    else:
        kernel = _kernel_tangent(x, dw, strides, padding, precision)
    if rule == "matmul" and strides != (1, 1):
        # A strided 1x1 input gradient by XLA is a convolution over the output gradient dilated
        # with zeros (s^2 times the work); as a matrix product it is one GEMM on the output
        # gradient and a scatter: 1.1-1.6x faster on ResNet-50's three shapes. At stride 1 XLA's
        # convolution was as fast or up to 2x faster than the GEMM (`jaxres bench --suite
        # conv`, `dx` columns).
        return y, _pixel_matmul(dx, w, strides, padding, precision) + kernel
    return y, _input_tangent(dx, w, strides, padding, precision) + kernel


def _input_tangent(dx, w, strides, padding, precision):
    """conv(dx, w), written so that its transpose (the input gradient) is a plain NHWC/HWIO
    convolution with a materialized flipped kernel. JAX's transpose flips the kernel and swaps
    its in/out axes through dimension numbers; inside a `lax.scan` body (scan_units) XLA:CPU
    then ran that convolution 7x slower than unrolled (18 scanned 64x32x32x16 layers: 990 vs
    131 ms). Here the flipped, axis-swapped kernel is computed up front behind a barrier (175 ms
    scanned, 131 ms unrolled, bitwise the same gradient), now by `_materialized`, which writes it
    in one pass (see `_kernel_tangent`)."""
    flipped = _materialized(lax.rev(w, (0, 1)).swapaxes(2, 3))  # (H, W, C_out, C_in)
    return lax.conv_general_dilated(dx, lax.rev(flipped, (0, 1)), strides, padding,
                                    dimension_numbers=("NHWC", "HWOI", "NHWC"), precision=precision)


def _kernel_tangent(x, dw, strides, padding, precision):
    """conv(x, dw), written so that its transpose (XLA's kernel gradient) is a plain NHWC/HWIO
    convolution of arrays transposed up front: the input as (C_in, H, W, N), the output gradient
    as (H, W, N, C_out), giving the gradient as (C_in, kh, kw, C_out). XLA:CPU makes those same
    transposes itself when unrolled, but inside a `lax.scan` body (scan_units) it ran the
    convolution in JAX's transposed dimension numbers as given: ~1 s per layer instead of 10 ms
    (cifar_resnet20, batch 128). `_materialized` keeps XLA from folding the transposes back
    into dimension numbers; this is the same trick as `_input_tangent`'s.

    Each transpose is materialized by dividing its result by the barrier'd 1, not by putting
    the transposed array itself behind an `optimization_barrier`: XLA's layout assignment does not
    see through a barrier, so it gave the barrier's operand the layout that makes the transpose
    a physical no-op, copied it there, and copied it again into the convolution's row-major
    layout: two passes over every transposed input, output gradient and kernel. The division
    fuses with the transpose into one pass that writes the row-major layout (the same values,
    bit for bit)."""
    xt = _materialized(x.transpose(3, 1, 2, 0))
    dwt = _materialized(dw.transpose(2, 0, 1, 3))
    yt = lax.conv_general_dilated(xt, dwt, strides, padding, dimension_numbers=("CHWN", "IHWO", "HWNC"),
                                  precision=precision)
    return _materialized(yt).transpose(2, 0, 1, 3)


def _pixel_matmul(x, w, strides, padding, precision):
    """A 1x1 convolution as one matrix product: the padded input's strided pixels, as an
    (N*H_out*W_out, C_in) matrix, times w[0, 0]. Its transpose, the kernel gradient, is
    pixels^T @ (output gradient as (N*H_out*W_out, C_out)): a single GEMM on the arrays as they
    lie (both reshapes are free), where XLA's rule transposes both and runs a correlation with a
    56x56 "kernel". Stride s takes every s-th row and column first (a copy of 1/s^2 of x)."""
    (sh, sw), (c_in, c_out) = strides, w.shape[2:]
    if any(lo or hi for lo, hi in padding):
        x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)))
    n, h, wd = x.shape[:3]
    ho, wo = (h - 1) // sh + 1, (wd - 1) // sw + 1
    if (sh, sw) != (1, 1):
        x = lax.slice(x, (0, 0, 0, 0), (n, sh * (ho - 1) + 1, sw * (wo - 1) + 1, c_in), (1, sh, sw, 1))
    y = lax.dot_general(x.reshape(n * ho * wo, c_in), w.reshape(c_in, c_out), (((1,), (0,)), ((), ())),
                        precision=precision)
    return y.reshape(n, ho, wo, c_out)


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
