"""Compile time of the training step vs depth, unrolled and with `scan_units`.

    jaxres bench --suite compile [--batch-size 32] [--variants unrolled,scan] [--json PATH] [models...]

Lowers and compiles (no execution) jaxres's jitted training step (SGD momentum, train-mode
BatchNorm) for each model as registered, and with identical blocks scanned (+ remat), and
prints the seconds and the size of the optimized HLO. The issue's bound: cifar_resnet1202 and
preact_resnet1001 must compile in <= 1.5x cifar_resnet110's time.
"""

from __future__ import annotations

import functools
import time
from typing import Iterator

import jax
import numpy as np
import optax

from jaxres.choices import pick
from jaxres.models import create_model
from jaxres.train.state import create_train_state
from jaxres.train.step import train_step

VARIANTS = {"unrolled": {}, "scan": {"scan_units": True}, "scan+remat": {"scan_units": True, "remat_units": True}}
MODELS = ("cifar_resnet110", "cifar_resnet1202", "preact_resnet1001")


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


def bench_compile_time(models=MODELS, *, batch_size: int = 32, variants=tuple(VARIANTS)) -> Iterator[dict]:
    """One row per model and variant (a name of VARIANTS), one by one as each compiles."""
    for variant in variants:
        pick("compile variant", variant, VARIANTS)  # a misspelt variant fails before anything compiles
    for name in models:
        for variant in variants:
            r = compile_seconds(name, batch_size, **VARIANTS[variant])
            r["variant"] = variant
            yield r


def format_rows(rows, header: bool = True) -> str:
    """Rows of `bench_compile_time` as a text table."""
    lines = [f"{'model':<20} {'variant':<11} {'trace+lower s':>13} {'total s':>8} {'HLO chars':>10}"] if header else []
    lines += [f"{r['model']:<20} {r['variant']:<11} {r['lower_s']:>13.1f} {r['compile_s']:>8.1f} {r['hlo_chars']:>10,}"
              for r in rows]
    return "\n".join(lines)
