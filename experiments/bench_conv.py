"""Convolution kernel gradient: XLA's vs jaxres.models.conv's, on the zoo's conv shapes.

    python experiments/bench_conv.py [--json PATH] [--only 32x16]

Prints a table (milliseconds, median of --repeats synchronized calls after a warm-up call) of
the forward convolution, the input gradient and the kernel gradient by XLA, the kernel gradient
by jaxres and their ratio, with the largest relative difference of the two kernel gradients.
jaxres uses tap matmuls over cached batch chunks where `jaxres.models.conv._taps_pay_off` says
they were measured faster (the `rule` column), else XLA's kernel gradient on pre-transposed
arrays; these measurements are where that rule comes from. Rerun it on a new jaxlib: the rule
holds while `speedup` stays >= 1 on the `taps` rows. Made for XLA:CPU; on other backends jaxres uses
XLA's rule and the two columns agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from jaxres.models.conv import NHWC, _taps_pay_off, conv_general_dilated

# (batch, side, c_in, c_out, kernel, stride): CIFAR ResNet stages at batch 128, ImageNet
# ResNet/VGG layers at batch 8.
SHAPES = [
    (128, 32, 16, 16, 3, 1), (128, 16, 32, 32, 3, 1), (128, 8, 64, 64, 3, 1), (128, 32, 16, 32, 3, 2),
    (8, 224, 3, 64, 7, 2), (8, 56, 64, 64, 3, 1), (8, 28, 128, 128, 3, 1), (8, 14, 256, 256, 3, 1),
    (8, 7, 512, 512, 3, 1), (8, 224, 64, 64, 3, 1), (8, 112, 128, 128, 3, 1),
]


def median_ms(f, *args, repeats: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_shape(n, side, cin, cout, k, s, repeats: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (n, side, side, cin))
    w = jax.random.normal(keys[1], (k, k, cin, cout)) / (k * k * cin) ** 0.5
    padding = ((k // 2, k // 2), (k // 2, k // 2))

    def conv(impl):
        return lambda x, w: impl(x, w, (s, s), padding, dimension_numbers=NHWC)

    g = jax.random.normal(keys[2], conv(lax.conv_general_dilated)(x, w).shape)
    forward = jax.jit(conv(lax.conv_general_dilated))
    grad_x = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(lax.conv_general_dilated)(x, w), x)[1](g)[0])
    kernel = {name: jax.jit(lambda x, w, g, impl=impl: jax.vjp(lambda w: conv(impl)(x, w), w)[1](g)[0])
              for name, impl in (("xla", lax.conv_general_dilated), ("jaxres", conv_general_dilated))}
    ref, ours = kernel["xla"](x, w, g), kernel["jaxres"](x, w, g)
    out_side = (side + 2 * (k // 2) - k) // s + 1
    rule = "taps" if jax.default_backend() == "cpu" and _taps_pay_off(w.shape, out_side * out_side) else "xla"
    row = {"shape": f"{n}x{side}x{side}x{cin}->{cout} k{k}s{s}", "rule": rule, "forward_ms": median_ms(forward, x, w, repeats=repeats),
           "grad_input_ms": median_ms(grad_x, x, w, g, repeats=repeats),
           "grad_kernel_xla_ms": median_ms(kernel["xla"], x, w, g, repeats=repeats),
           "grad_kernel_jaxres_ms": median_ms(kernel["jaxres"], x, w, g, repeats=repeats),
           "max_rel_diff": float(jnp.max(jnp.abs(ref - ours)) / jnp.max(jnp.abs(ref)))}
    row["speedup"] = row["grad_kernel_xla_ms"] / row["grad_kernel_jaxres_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", help="substring of the shape label, e.g. 128x32x32")
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'shape':<30} {'rule':>5} {'fwd':>8} {'d input':>8} {'d kernel XLA':>13} {'jaxres':>8} {'speedup':>8} "
          f"{'rel diff':>9}")
    rows = []
    for shape in SHAPES:
        label = f"{shape[0]}x{shape[1]}x{shape[1]}x{shape[2]}"
        if args.only and args.only not in label:
            continue
        r = bench_shape(*shape, repeats=args.repeats)
        rows.append(r)
        print(f"{r['shape']:<30} {r['rule']:>5} {r['forward_ms']:>8.1f} {r['grad_input_ms']:>8.1f} {r['grad_kernel_xla_ms']:>13.1f} "
              f"{r['grad_kernel_jaxres_ms']:>8.1f} {r['speedup']:>7.1f}x {r['max_rel_diff']:>9.1e}", flush=True)
    text = json.dumps({"backend": jax.default_backend(), "jax": jax.__version__, "rows": rows}, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
