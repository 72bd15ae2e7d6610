"""Training-step benchmark of a registry model: compile time, step time, images/s, MFU.

The step is jaxres.train.step.train_step (SGD with momentum, softmax cross-entropy, BatchNorm
in train mode) run by one of the parallel drivers on a fixed synthetic batch, so the numbers
measure the model and the step, not the input pipeline (`--pipeline` measures that alone).
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
import optax

from jaxres.bench.peaks import peak_flops
from jaxres.models import count_macs, create_model, model_card
from jaxres.train.drivers import check_batch_size, make_driver
from jaxres.train.precision import compute_dtype
from jaxres.train.state import create_train_state


def training_flops(macs_per_example: int, batch_size: int) -> float:
    """Model FLOPs of one training step: forward 2*MACs, backward twice the forward."""
    return 6.0 * macs_per_example * batch_size


def time_steps(step, state, batch, steps: int, warmup: int):
    """(first-call seconds, sorted steady-state step seconds); every step is synchronized."""
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return first, sorted(times)


def bench_train_step(name: str, *, batch_size: int, dtype: str = "float32", driver: str = "single",
                     steps: int = 10, warmup: int = 2, input_size: int | None = None,
                     peak_tflops: float | None = None, **overrides) -> dict:
    """Benchmarks one training step of registry model `name`; returns one result row."""
    card = model_card(name)
    size = input_size or card.input_size
    jnp_dtype = compute_dtype(dtype, jax.devices()[0].platform)
    drv = make_driver(driver)
    check_batch_size(batch_size, drv.num_devices)
    model = create_model(name, dtype=jnp_dtype, **overrides)
    state = create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.PRNGKey(0), (1, size, size, 3))
    data = np.random.default_rng(0)
    batch = {
        "image": data.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "label": data.integers(0, model.num_classes, batch_size).astype(np.int32),
    }
    first, times = time_steps(drv.train_step, drv.put_state(state), drv.put_batch(batch), steps, warmup)
    step_s = statistics.median(times)
    macs = count_macs(model, size)
    peak, peak_desc = (peak_tflops * 1e12, "given") if peak_tflops else peak_flops(jax.devices()[0], dtype)
    flops = training_flops(macs, batch_size)
    return {
        "framework": "jax",
        "model": name,
        "batch_size": batch_size,
        "input_size": size,
        "dtype": dtype,
        "driver": driver,
        "devices": drv.num_devices,
        "device": jax.devices()[0].device_kind,
        "compile_s": max(first - step_s, 0.0),
        "step_s": step_s,
        "step_s_min": times[0],
        "step_s_max": times[-1],
        "steps": steps,
        "images_per_s": batch_size / step_s,
        "macs_per_example": macs,
        "model_tflops_per_s": flops / step_s / 1e12,
        "mfu": flops / step_s / (peak * drv.num_devices) if peak else None,
        "peak": peak_desc,
        "params": card.params if not overrides else None,
    }
