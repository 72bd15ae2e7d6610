"""Benchmarks: training-step speed and MFU, PyTorch side by side, input pipeline."""

from jaxres.bench.peaks import peak_flops
from jaxres.bench.train_step import bench_train_step, training_flops

__all__ = ["bench_train_step", "peak_flops", "training_flops"]
