"""Convolution kernel gradient on the zoo's conv shapes: XLA's rule against each of
jaxres.models.conv's CPU rules.

    jaxres bench --suite conv [--json PATH] [--only 8x56x56] [--repeats 7]

Prints a table (milliseconds, median (min) of --repeats synchronized calls after a warm-up
call, the variants interleaved call by call so load drifts hit them alike) of the forward
convolution, the input gradient by XLA's own rule (`dx lax`) and by jaxres's under the chosen
rule (`dx jaxres`: a matrix product for strided 1x1 kernels; it includes one elementwise pass
over the gradient, the transpose of the input's `_materialized`, which in a network fuses with
its neighbours), and the kernel gradient by XLA's own rule (`lax`) and by each
rule `jaxres.models.conv` has: "xla" (XLA's kernel gradient on arrays transposed up front),
"taps" (tap matmuls over cached batch chunks) and "matmul" (1x1 kernels: one GEMM over
N*H*W), with the rule `kernel_gradient_rule` picks (`rule`), its speedup over `lax` (medians)
and the largest relative difference of its kernel gradient from XLA's. These measurements are
where the rule comes from; rerun it on a new jaxlib: the rule holds while the chosen column
stays the fastest. Made for XLA:CPU; on other backends jaxres uses XLA's rule unchanged.
"""

from __future__ import annotations

import statistics
import time
from typing import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from jaxres.bench.cases import selected
from jaxres.models.conv import NHWC, _conv, _materialized, kernel_gradient_rule

# (batch, side, c_in, c_out, kernel, stride): CIFAR ResNet stages at batch 128, ImageNet
# ResNet/VGG layers at batch 8 (the 1x1 rows: every 1x1 shape of torchvision's ResNet-50).
SHAPES = [
    (128, 32, 16, 16, 3, 1), (128, 16, 32, 32, 3, 1), (128, 8, 64, 64, 3, 1), (128, 32, 16, 32, 3, 2),
    (8, 224, 3, 64, 7, 2), (8, 56, 64, 64, 3, 1), (8, 28, 128, 128, 3, 1), (8, 14, 256, 256, 3, 1),
    (8, 7, 512, 512, 3, 1), (8, 224, 64, 64, 3, 1), (8, 112, 128, 128, 3, 1),
    (8, 56, 64, 64, 1, 1), (8, 56, 64, 256, 1, 1), (8, 56, 256, 64, 1, 1), (8, 56, 256, 128, 1, 1),
    (8, 56, 256, 512, 1, 2), (8, 28, 128, 512, 1, 1), (8, 28, 512, 128, 1, 1), (8, 28, 512, 256, 1, 1),
    (8, 28, 512, 1024, 1, 2), (8, 14, 256, 1024, 1, 1), (8, 14, 1024, 256, 1, 1), (8, 14, 1024, 512, 1, 1),
    (8, 14, 1024, 2048, 1, 2), (8, 7, 512, 2048, 1, 1), (8, 7, 2048, 512, 1, 1),
]
RULES = ("xla", "taps", "matmul")
# the timed calls of a row, in the table's order
COLUMNS = ("forward", "input_lax", "input_jaxres", "kernel_lax") + tuple(f"kernel_{r}" for r in RULES)


def interleaved_ms(calls: dict, repeats: int) -> dict:
    """{name: (min ms, median ms)} of synchronized calls, one of each per round."""
    for f in calls.values():
        jax.block_until_ready(f())
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, f in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(f())
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def label(n, side, cin, cout, k, s) -> str:
    return f"{n}x{side}x{side}x{cin}->{cout} k{k}s{s}"


def bench_shape(n, side, cin, cout, k, s, repeats: int) -> dict:
    """One row: the timed calls of one conv shape (NHWC input n x side x side x cin, HWIO
    kernel k x k x cin x cout, stride s, 'same'-style padding k // 2), float32."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (n, side, side, cin))
    w = jax.random.normal(keys[1], (k, k, cin, cout)) / (k * k * cin) ** 0.5
    padding = ((k // 2, k // 2), (k // 2, k // 2))

    def xla_conv(x, w):
        return lax.conv_general_dilated(x, w, (s, s), padding, dimension_numbers=NHWC)

    def rule_conv(rule):
        return lambda x, w: _conv(_materialized(x), w, (s, s), padding, None, rule)

    g = jax.random.normal(keys[2], xla_conv(x, w).shape)
    kernel_grad = {"lax": xla_conv} | {rule: rule_conv(rule) for rule in RULES if rule != "matmul" or k == 1}
    kernel_grad = {name: jax.jit(lambda x, w, g, f=f: jax.vjp(lambda w: f(x, w), w)[1](g)[0])
                   for name, f in kernel_grad.items()}
    out_side = (side + 2 * (k // 2) - k) // s + 1
    chosen = kernel_gradient_rule(w.shape, out_side * out_side) if jax.default_backend() == "cpu" else "lax"
    forward = jax.jit(xla_conv)
    grad_x = {name: jax.jit(lambda x, w, g, f=f: jax.vjp(lambda x: f(x, w), x)[1](g)[0])
              for name, f in (("lax", xla_conv), ("jaxres", rule_conv(chosen)))}
    calls = {"forward": lambda: forward(x, w)}
    calls |= {f"input_{name}": lambda f=f: f(x, w, g) for name, f in grad_x.items()}
    calls |= {f"kernel_{name}": lambda f=f: f(x, w, g) for name, f in kernel_grad.items()}
    ms = interleaved_ms(calls, repeats)
    ref, ours = kernel_grad["lax"](x, w, g), kernel_grad[chosen](x, w, g)
    return {"shape": label(n, side, cin, cout, k, s), "rule": chosen,
            "ms_min": {name: v[0] for name, v in ms.items()}, "ms_median": {name: v[1] for name, v in ms.items()},
            "speedup": ms["kernel_lax"][1] / ms[f"kernel_{chosen}"][1],
            "max_rel_diff": float(jnp.max(jnp.abs(ref - ours)) / jnp.max(jnp.abs(ref))),
            "repeats": repeats, "backend": jax.default_backend(), "jax": jax.__version__}


def bench_conv_rules(*, repeats: int = 5, only: str | None = None, shapes=None) -> Iterator[dict]:
    """The rows of `shapes` (default SHAPES) whose label contains one of `only`'s
    comma-separated strings (all when None), one by one as each is measured."""
    shapes = SHAPES if shapes is None else shapes
    for shape in selected(shapes, only, label=lambda shape: label(*shape), suite="conv"):
        yield bench_shape(*shape, repeats=repeats)


def format_rows(rows, header: bool = True) -> str:
    """Rows of `bench_shape` as a text table."""
    lines = []
    if header:
        lines.append(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
                     f"ms, median (min) of the interleaved calls")
        lines.append(f"{'shape':<32} {'rule':>6} "
                     + " ".join(f"{c.replace('kernel_', 'dW ').replace('input_', 'dx '):>14}" for c in COLUMNS)
                     + f" {'speedup':>8} {'rel diff':>9}")
    for r in rows:
        cells = [f"{r['ms_median'][c]:>7.1f} ({r['ms_min'][c]:>5.1f})" if c in r["ms_median"] else f"{'-':>14}"
                 for c in COLUMNS]
        lines.append(f"{r['shape']:<32} {r['rule']:>6} " + " ".join(cells)
                     + f" {r['speedup']:>7.2f}x {r['max_rel_diff']:>9.1e}")
    return "\n".join(lines)
