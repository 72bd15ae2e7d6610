"""Benchmarks, one module per suite of `jaxres bench --suite NAME`: training-step speed and MFU,
PyTorch side by side and the input pipeline (`train_step`, `side_by_side`, `pipeline`: the step
suite), convolution gradient rules (`conv_rules`), compile time vs depth (`compile_time`), the cost
of the exact analysis (`analysis_cost`) and of the training monitor (`monitor_cost`).

Names are imported on first use, so a PyTorch worker (`jaxres.bench.worker`) imports no JAX."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "bench_train_step": "jaxres.bench.train_step",
    "training_flops": "jaxres.bench.train_step",
    "peak_flops": "jaxres.bench.peaks",
    "interleaved": "jaxres.bench.side_by_side",
    "bench_conv_rules": "jaxres.bench.conv_rules",
    "bench_compile_time": "jaxres.bench.compile_time",
    "bench_analysis_cost": "jaxres.bench.analysis_cost",
    "bench_monitor_cost": "jaxres.bench.monitor_cost",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxres.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
