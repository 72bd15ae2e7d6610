"""Benchmarks of jaxres.analysis: time and peak memory of

1. exact end-to-end norms over all units of cifar_resnet56 (segmented chain of per-unit VJPs
   and one whole-model VJP), against one training step (forward + backward + SGD update,
   train-mode BN) at the same batch size; target <= 4x the step;
2. the exact per-unit Frobenius norm of a 32x32x16 unit (cifar_resnet56 unit_1) vs chunk size;
3. Lanczos vs power iteration to a relative tolerance of 1e-3 on that unit.

Each case runs in its own subprocess so peak RSS (ru_maxrss) is the case's own. Times are
the median of --repeats runs after one warm-up (compile excluded; compile reported apart).

    .venv/bin/python experiments/bench_analysis.py [--batch-size 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _timed(fn, repeats):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    # repeats=0: a single call, compile included (the iterative routines report iterations)
    return {"first_call_s": first, "median_s": times[len(times) // 2] if times else first}


def case(name: str, batch_size: int, repeats: int, chunk: int) -> dict:
    import jax
    import optax

    import jaxres
    from jaxres.analysis import unit_jacobian
    from jaxres.analysis.endtoend import end_to_end_norms, end_to_end_norms_whole
    from jaxres.analysis.segments import SegmentCache, find_segment

    model = jaxres.create_model("cifar_resnet56")
    x = jax.random.normal(jax.random.key(0), (batch_size, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(1), (batch_size,), 0, 10)
    variables = jax.jit(model.init)(jax.random.key(2), x)
    result = {"case": name, "batch_size": batch_size}
    if name == "train_step":
        tx = optax.sgd(0.1, momentum=0.9)
        opt = tx.init(variables["params"])

        @jax.jit
        def step(params, stats, opt, x, y):
            def loss(p):
                z, new = model.apply({"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(z, y).mean(), new
            (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), new["batch_stats"], opt, value

        result.update(_timed(lambda: jax.block_until_ready(
            step(variables["params"], variables["batch_stats"], opt, x, labels)), repeats))
    elif name.startswith("e2e_"):
        bn = name.split("_")[-1]
        if "whole" in name:
            # the C summed rows (the training step's cost scale); per-example blocks of a batch
            # map take N*C rows
            fn = lambda: end_to_end_norms_whole(model, variables, x, labels, bn=bn, per_example_blocks=False)  # noqa: E731
        else:
            cache = SegmentCache()
            fn = lambda: end_to_end_norms(model, variables, x, labels, bn=bn, cache=cache,  # noqa: E731
                                          per_example_blocks=False)
        result.update(_timed(fn, repeats))
    else:
        cache = SegmentCache()
        seg = find_segment(cache.segments(model, variables, (1, 32, 32, 3), "eval"), "unit_1")
        h = jax.random.normal(jax.random.key(3), (1, 32, 32, 16))
        if name == "frobenius_exact":
            result["chunk_size"] = chunk
            out = {}
            result.update(_timed(lambda: out.setdefault("v", jax.block_until_ready(
                unit_jacobian.frobenius_sq_exact(seg.ops.map, h, params=seg.params, chunk_size=chunk))), 0))
            result["frobenius_sq"] = float(out["v"][0])
        else:
            routine = {"lanczos": unit_jacobian.spectral_norm_lanczos, "power": unit_jacobian.spectral_norm_power}[name]
            out = {}
            kwargs = {"max_iter": 2000} if name == "power" else {"max_iter": 300}
            result.update(_timed(lambda: out.setdefault("r", routine(seg.ops.map, h, params=seg.params, tol=1e-3,
                                                                    **kwargs)), 0))
            r = out["r"]
            result.update(sigma=float(r["sigma"][0]), iterations=int(r["iterations"]),
                          residual=float(r["residual"][0]), converged=bool(r["converged"][0]))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", default="128,512,2048")
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default=None, help="comma-separated case names to run (default: all)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.batch_size, args.repeats, args.chunk)))
        return 0
    cases = [("train_step", 0), ("e2e_segmented_eval", 0), ("e2e_segmented_batch", 0), ("e2e_whole_eval", 0),
             ("lanczos", 0), ("power", 0)] + [("frobenius_exact", int(c)) for c in args.chunks.split(",")]
    if args.only:
        cases = [c for c in cases if c[0] in args.only.split(",")]
    rows = []
    for name, chunk in cases:
        out = subprocess.run([sys.executable, __file__, "--case", name, "--batch-size", str(args.batch_size),
                              "--repeats", str(args.repeats), "--chunk", str(chunk)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name:<22} {chunk or '':>6} first {rows[-1]['first_call_s']:8.2f} s  median "
              f"{rows[-1]['median_s']:8.3f} s  peak RSS {rows[-1]['peak_rss_mib']:7.0f} MiB  "
              + " ".join(f"{k}={v}" for k, v in rows[-1].items()
                         if k in ("iterations", "residual", "sigma", "frobenius_sq")), flush=True)
    steps = [r["median_s"] for r in rows if r["case"] == "train_step"]
    for row in rows:
        if steps and row["case"].startswith("e2e_"):
            print(f"{row['case']}: {row['median_s'] / steps[0]:.2f}x one training step (target <= 4x)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
