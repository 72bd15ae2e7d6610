"""Convolution kernel gradient on the zoo's conv shapes: XLA's rule against each of
jaxres.models.conv's CPU rules.

    jaxres bench --suite conv [--json PATH] [--only 8x56x56] [--repeats 7] [--onednn]

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

--onednn adds oneDNN's three convolutions through XLA's FFI (`jaxres.models.onednn_conv`, the
`jaxres[onednn]` extra): forward, backward data (`dx onednn`) and backward weights (`dW onednn`),
timed in the same rounds, and the largest relative difference of oneDNN's kernel gradient from
XLA's (`onednn diff`).
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
ONEDNN_COLUMNS = ("forward_onednn", "input_onednn", "kernel_onednn")  # with onednn=True


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


def bench_shape(n, side, cin, cout, k, s, repeats: int, onednn: bool = False) -> dict:
    """One row: the timed calls of one conv shape (NHWC input n x side x side x cin, HWIO
    kernel k x k x cin x cout, stride s, 'same'-style padding k // 2), float32; with `onednn`,
    oneDNN's convolutions too."""
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
    if onednn:
        calls |= _onednn_calls(x, w, g, (s, s), padding)
    ms = interleaved_ms(calls, repeats)
    ref, ours = kernel_grad["lax"](x, w, g), kernel_grad[chosen](x, w, g)
    extra = {"onednn_rel_diff": _rel_diff(ref, calls["kernel_onednn"]())} if onednn else {}
    return {"shape": label(n, side, cin, cout, k, s), "rule": chosen, **extra,
            "ms_min": {name: v[0] for name, v in ms.items()}, "ms_median": {name: v[1] for name, v in ms.items()},
            "speedup": ms["kernel_lax"][1] / ms[f"kernel_{chosen}"][1],
            "max_rel_diff": _rel_diff(ref, ours),
            "repeats": repeats, "backend": jax.default_backend(), "jax": jax.__version__}


def _rel_diff(ref, other) -> float:
    return float(jnp.max(jnp.abs(ref - other)) / jnp.max(jnp.abs(ref)))


def _onednn_calls(x, w, g, strides, padding) -> dict:
    """oneDNN's forward, backward-data and backward-weights calls on these arrays."""
    from jaxres.models import onednn_conv

    conv = lambda x, w: onednn_conv.conv(x, w, strides, padding)  # noqa: E731
    forward = jax.jit(conv)
    grad_x = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    grad_w = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return {"forward_onednn": lambda: forward(x, w), "input_onednn": lambda: grad_x(x, w, g),
            "kernel_onednn": lambda: grad_w(x, w, g)}


def bench_conv_rules(*, repeats: int = 5, only: str | None = None, shapes=None, onednn: bool = False) -> Iterator[dict]:
    """The rows of `shapes` (default SHAPES) whose label contains one of `only`'s
    comma-separated strings (all when None), one by one as each is measured; with `onednn`,
    oneDNN's convolutions too (a ValueError saying why when they are unavailable)."""
    shapes = SHAPES if shapes is None else shapes
    chosen = selected(shapes, only, label=lambda shape: label(*shape), suite="conv")
    if onednn:
        from jaxres.models import onednn_conv

        reason = onednn_conv.unavailable_reason()
        if reason is not None or jax.default_backend() != "cpu":
            raise ValueError(f"--onednn times oneDNN's CPU convolutions, unavailable here: "
                             f"{reason or 'the backend is ' + jax.default_backend()}")
    for shape in chosen:
        yield bench_shape(*shape, repeats=repeats, onednn=onednn)


def format_rows(rows, header: bool = True) -> str:
    """Rows of `bench_shape` as a text table; a row with oneDNN's timings gets a second line."""
    lines = []
    if header:
        lines.append(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
                     f"ms, median (min) of the interleaved calls")
        lines.append(f"{'shape':<32} {'rule':>6} "
                     + " ".join(f"{c.replace('kernel_', 'dW ').replace('input_', 'dx '):>14}" for c in COLUMNS)
                     + f" {'speedup':>8} {'rel diff':>9}")
    cell = lambda r, c: f"{r['ms_median'][c]:>7.1f} ({r['ms_min'][c]:>5.1f})"  # noqa: E731
    for r in rows:
        cells = [cell(r, c) if c in r["ms_median"] else f"{'-':>14}" for c in COLUMNS]
        lines.append(f"{r['shape']:<32} {r['rule']:>6} " + " ".join(cells)
                     + f" {r['speedup']:>7.2f}x {r['max_rel_diff']:>9.1e}")
        if "onednn_rel_diff" in r:
            ours = sum(r["ms_median"][c] for c in ("forward", "input_jaxres", f"kernel_{r['rule']}"))
            theirs = sum(r["ms_median"][c] for c in ONEDNN_COLUMNS)
            lines.append(f"{'  oneDNN':<32} {'':>6} " + " ".join(cell(r, c) for c in ONEDNN_COLUMNS)
                         + f"  (fwd, dx, dW); jaxres/oneDNN {ours / theirs:.2f}x; dW rel diff "
                         f"{r['onednn_rel_diff']:.1e}")
    return "\n".join(lines)
