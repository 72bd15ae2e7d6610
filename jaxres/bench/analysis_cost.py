"""Benchmarks of jaxres.analysis: time and peak memory of

1. exact end-to-end norms over all units of cifar_resnet56 (segmented chain of per-unit VJPs
   and one whole-model VJP), against one training step (forward + backward + SGD update,
   train-mode BN) at the same batch size; target <= 4x the step;
2. the exact per-unit Frobenius norm of a 32x32x16 unit (cifar_resnet56 unit_1) vs chunk size;
3. Lanczos vs power iteration to a relative tolerance of 1e-3 on that unit.

Each case runs in its own subprocess so peak RSS (ru_maxrss) is the case's own. Times are
the median of --repeats runs after one warm-up (compile excluded; compile reported apart).
Another CIFAR ResNet can stand in for cifar_resnet56 (the positional model; unit_1 of each is
32x32x16).

    jaxres bench --suite analysis [cifar_resnet56] [--batch-size 32] [--only lanczos,power] [--json out.json]
"""

from __future__ import annotations

import resource
import time
from typing import Iterator

from jaxres.bench.cases import run_isolated, selected

# the cases in the order they run; "frobenius_exact" runs once per chunk size
CASES = ("train_step", "e2e_segmented_eval", "e2e_segmented_batch", "e2e_whole_eval", "lanczos", "power",
         "frobenius_exact")


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


def case(name: str, batch_size: int, repeats: int, chunk: int, model: str = "cifar_resnet56") -> dict:
    """One row, measured in this process: `name` (one of CASES) on `model` at `batch_size`
    (frobenius_exact: in chunks of `chunk` JVPs); its peak RSS is this process's."""
    import jax
    import optax

    import jaxres
    from jaxres.analysis import unit_jacobian
    from jaxres.analysis.endtoend import end_to_end_norms, end_to_end_norms_whole
    from jaxres.analysis.segments import SegmentCache, find_segment

    model_name, model = model, jaxres.create_model(model)
    x = jax.random.normal(jax.random.key(0), (batch_size, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(1), (batch_size,), 0, 10)
    variables = jax.jit(model.init)(jax.random.key(2), x)
    result = {"case": name, "model": model_name, "batch_size": batch_size}
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


def bench_analysis_cost(model: str = "cifar_resnet56", *, batch_size: int = 32, repeats: int = 3,
                        chunks=(128, 512, 2048), only: str | None = None) -> Iterator[dict]:
    """The rows of the cases (CASES; `only`: those whose name contains one of its comma-separated
    strings), each measured in a process of its own, one by one as each finishes."""
    cases = [(name, 0) for name in CASES[:-1]] + [("frobenius_exact", int(c)) for c in chunks]
    for name, chunk in selected(cases, only, label=lambda c: c[0], suite="analysis"):
        yield run_isolated("jaxres.bench.analysis_cost", "case", name=name, batch_size=batch_size,
                           repeats=repeats, chunk=chunk, model=model)


def format_rows(rows, header: bool = True) -> str:
    """Rows of `case` as a text table: seconds of the first call and the median of the rest,
    the case's peak RSS, and what the iterative routines report."""
    lines = [f"{'case':<22} {'chunk':>6} {'first s':>8} {'median s':>9} {'peak RSS MiB':>12}  result"] if header else []
    for r in rows:
        lines.append(f"{r['case']:<22} {r.get('chunk_size', ''):>6} {r['first_call_s']:8.2f} {r['median_s']:9.3f} "
                     f"{r['peak_rss_mib']:12.0f}  "
                     + " ".join(f"{k}={v}" for k, v in r.items()
                                if k in ("iterations", "residual", "sigma", "frobenius_sq")))
    return "\n".join(lines)


def notes(rows) -> str:
    """Each end-to-end case's time in training steps, against the issue's target."""
    steps = [r["median_s"] for r in rows if r["case"] == "train_step"]
    return "\n".join(f"{r['case']}: {r['median_s'] / steps[0]:.2f}x one training step (target <= 4x)"
                     for r in rows if steps and r["case"].startswith("e2e_"))
