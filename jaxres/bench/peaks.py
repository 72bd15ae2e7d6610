"""Peak dense FLOP/s of common accelerators and an estimate for the host CPU, for MFU.

Model-FLOPs utilization = (model FLOPs per step / step time) / peak. Peaks are the vendors'
dense (no sparsity) figures per chip; `--peak-tflops` overrides them for anything else.
"""

from __future__ import annotations

import os
import re

# (substring of jax's device_kind, lowercased) -> {dtype: peak FLOP/s}. Order matters: the
# first substring found wins, so more specific names come first.
ACCELERATOR_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h200", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),
    ("h100", {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}),  # SXM; PCIe is 756
    ("a100", {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12}),
    ("l4", {"bfloat16": 121e12, "float16": 121e12, "float32": 30.3e12}),
    ("a10", {"bfloat16": 125e12, "float16": 125e12, "float32": 31.2e12}),
    ("v100", {"float16": 125e12, "bfloat16": 15.7e12, "float32": 15.7e12}),
    ("t4", {"float16": 65e12, "bfloat16": 8.1e12, "float32": 8.1e12}),
    ("tpu v6 lite", {"bfloat16": 918e12, "float32": 918e12 / 4}),
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": 197e12 / 4}),
    ("tpu v5", {"bfloat16": 459e12, "float32": 459e12 / 4}),
    ("tpu v4", {"bfloat16": 275e12, "float32": 275e12 / 4}),
    ("tpu v3", {"bfloat16": 123e12, "float32": 123e12 / 4}),
    ("tpu v2", {"bfloat16": 45e12, "float32": 45e12 / 4}),
)


def cpu_peak_flops() -> tuple[float, str]:
    """An estimate: cores x clock x float32 FLOPs per cycle (2 FMA units x SIMD lanes x 2).

    AVX-512: 64 FLOPs/cycle/core, AVX2+FMA: 32, otherwise 8. The clock is the one
    /proc/cpuinfo reports (a VM may not show turbo), so treat CPU MFU as approximate.
    """
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return 0.0, "unknown CPU (no /proc/cpuinfo): pass --peak-tflops"
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)]
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    clock = max(mhz) * 1e6 if mhz else 2.0e9
    name = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    desc = f"{name.group(1) if name else 'CPU'}: {cores} cores x {clock / 1e9:.2f} GHz x {per_cycle} FLOP/cycle (estimate)"
    return cores * clock * per_cycle, desc


def peak_flops(device, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, description) of one jax device for `dtype`; 0.0 when unknown."""
    if device.platform == "cpu":
        return cpu_peak_flops()
    kind = device.device_kind.lower()
    for needle, table in ACCELERATOR_PEAKS:
        if needle in kind:
            peak = table.get(dtype, table["float32"])
            return peak, f"{device.device_kind}: {peak / 1e12:.0f} TFLOP/s dense {dtype} (vendor figure)"
    return 0.0, f"{device.device_kind}: peak unknown, pass --peak-tflops"
