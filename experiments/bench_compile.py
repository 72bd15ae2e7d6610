"""Compile time of the training step vs depth, unrolled and with `scan_units`.

    python experiments/bench_compile.py [--batch-size 32] [--json PATH] [models...]

Lowers and compiles (no execution) jaxres's jitted training step (SGD momentum, train-mode
BatchNorm) for each model as registered, and with identical blocks scanned (+ remat), and
prints the seconds and the size of the optimized HLO. The issue's bound: cifar_resnet1202 and
preact_resnet1001 must compile in <= 1.5x cifar_resnet110's time.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import numpy as np
import optax

from jaxres.models import create_model
from jaxres.train.state import create_train_state
from jaxres.train.step import train_step

VARIANTS = {"unrolled": {}, "scan": {"scan_units": True}, "scan+remat": {"scan_units": True, "remat_units": True}}


def compile_seconds(name: str, batch_size: int, **overrides) -> dict:
    model = create_model(name, **overrides)
    state = jax.eval_shape(lambda: create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.PRNGKey(0),
                                                      (1, 32, 32, 3)))
    batch = {"image": jax.ShapeDtypeStruct((batch_size, 32, 32, 3), np.float32),
             "label": jax.ShapeDtypeStruct((batch_size,), np.int32)}
    step = jax.jit(functools.partial(train_step))
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    total = time.perf_counter() - start
    return {"model": name, **overrides, "lower_s": lower_s, "compile_s": total,
            "hlo_chars": len(compiled.as_text() or "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["cifar_resnet110", "cifar_resnet1202", "preact_resnet1001"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", default="unrolled,scan,scan+remat")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    print(f"{'model':<20} {'variant':<11} {'trace+lower s':>13} {'total s':>8} {'HLO chars':>10}")
    for name in args.models:
        for variant in args.variants.split(","):
            r = compile_seconds(name, args.batch_size, **VARIANTS[variant])
            r["variant"] = variant
            rows.append(r)
            print(f"{name:<20} {variant:<11} {r['lower_s']:>13.1f} {r['compile_s']:>8.1f} {r['hlo_chars']:>10,}", flush=True)
    text = json.dumps(rows, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
