"""Training-step benchmark of a registry model: compile time, step time, images/s, MFU.

The step is jaxres.train.step.train_step (SGD with momentum, softmax cross-entropy, BatchNorm
in train mode) run by one of the parallel drivers on a fixed synthetic batch, so the numbers
measure the model and the step, not the input pipeline (`--pipeline` measures that alone).
In mode "inference" it is the driver's eval step instead: the forward pass with BatchNorm's
running statistics, plus the loss sums.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax

from jaxres.bench.peaks import peak_flops
from jaxres.models import count_macs, create_model, model_card
from jaxres.train.drivers import check_batch_size, make_driver
from jaxres.train.precision import compute_dtype
from jaxres.train.state import create_train_state


MODES = ("train", "inference")


def training_flops(macs_per_example: int, batch_size: int) -> float:
    """Model FLOPs of one training step: forward 2*MACs, backward twice the forward."""
    return 6.0 * macs_per_example * batch_size


def step_flops(macs_per_example: int, batch_size: int, mode: str) -> float:
    """Model FLOPs of one step: `training_flops`, or the forward's 2*MACs for inference."""
    return training_flops(macs_per_example, batch_size) if mode == "train" else 2.0 * macs_per_example * batch_size


class StepSetup(NamedTuple):
    """A registry model's step on a fixed synthetic batch, placed on the devices by a driver:
    `step(state, batch) -> (state, metrics)`, in either mode."""

    step: Callable[[Any, Any], tuple[Any, Any]]
    state: Any
    batch: Any
    model: Any
    input_size: int
    num_devices: int


def setup_step(name: str, *, batch_size: int, dtype: str = "float32", driver: str = "single",
               input_size: int | None = None, mode: str = "train", **overrides) -> StepSetup:
    """Model `name` (registry overrides as keywords), SGD-momentum state, a normal(0, 1) batch
    (NHWC float32, seed 0) and the driver's train or eval step; nothing is compiled yet."""
    if mode not in MODES:
        raise ValueError(f"bench mode must be one of {MODES}; got {mode!r}")
    size = input_size or model_card(name).input_size
    drv = make_driver(driver)
    check_batch_size(batch_size, drv.num_devices)
    model = create_model(name, dtype=compute_dtype(dtype, jax.devices()[0].platform), **overrides)
    state = create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.PRNGKey(0), (1, size, size, 3))
    data = np.random.default_rng(0)
    batch = {
        "image": data.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "label": data.integers(0, model.num_classes, batch_size).astype(np.int32),
    }
    step = drv.train_step if mode == "train" else (lambda state, batch: (state, drv.eval_step(state, batch)))
    return StepSetup(step, drv.put_state(state), drv.put_batch(batch), model, size, drv.num_devices)


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
                     peak_tflops: float | None = None, mode: str = "train", **overrides) -> dict:
    """Benchmarks one training (or inference) step of registry model `name` in this process;
    returns one result row."""
    card = model_card(name)
    setup = setup_step(name, batch_size=batch_size, dtype=dtype, driver=driver, input_size=input_size, mode=mode,
                       **overrides)
    first, times = time_steps(setup.step, setup.state, setup.batch, steps, warmup)
    step_s = statistics.median(times)
    size = setup.input_size
    macs = count_macs(setup.model, size)
    peak, peak_desc = (peak_tflops * 1e12, "given") if peak_tflops else peak_flops(jax.devices()[0], dtype)
    flops = step_flops(macs, batch_size, mode)
    return {
        "framework": "jax",
        "model": name,
        "mode": mode,
        "batch_size": batch_size,
        "input_size": size,
        "dtype": dtype,
        "driver": driver,
        "devices": setup.num_devices,
        "device": jax.devices()[0].device_kind,
        "compile_s": max(first - step_s, 0.0),
        "step_s": step_s,
        "step_s_min": times[0],
        "step_s_max": times[-1],
        "steps": steps,
        "images_per_s": batch_size / step_s,
        "macs_per_example": macs,
        "model_tflops_per_s": flops / step_s / 1e12,
        "mfu": flops / step_s / (peak * setup.num_devices) if peak else None,
        "peak": peak_desc,
        "params": card.params if not overrides else None,
    }


HEADER = (f"{'model':<18} {'mode':<9} {'batch':>5} {'dtype':<8} {'driver':<7} {'compile s':>9} "
          f"{'step ms':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6}")


def format_rows(rows, header: bool = True) -> str:
    """Rows of `bench_train_step` as a text table."""
    lines = [HEADER, "-" * len(HEADER)] if header else []
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"{r['model']:<18} {r['mode']:<9} {r['batch_size']:>5} {r['dtype']:<8} {r['driver']:<7} "
                     f"{r['compile_s']:>9.1f} {1e3 * r['step_s']:>9.1f} {r['images_per_s']:>9.1f} "
                     f"{r['model_tflops_per_s']:>8.3f} {mfu:>6}")
    return "\n".join(lines)
