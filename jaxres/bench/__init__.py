"""Benchmarks: training-step speed and MFU, PyTorch side by side, input pipeline.

Names are imported on first use, so a PyTorch worker (`jaxres.bench.worker`) imports no JAX."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "bench_train_step": "jaxres.bench.train_step",
    "training_flops": "jaxres.bench.train_step",
    "peak_flops": "jaxres.bench.peaks",
    "interleaved": "jaxres.bench.side_by_side",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxres.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
