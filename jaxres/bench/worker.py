"""One framework's step in a long-lived process of its own, driven line by line.

    python -m jaxres.bench.worker '{"framework": "jax", "model": "resnet50", "batch_size": 8, ...}'

`jaxres.bench.side_by_side` starts one per framework (each may run under its own Python, so
JAX and PyTorch need not share a venv) and sends "step" or "quit" on stdin. The worker answers
each with one JSON line on its own copy of stdout (what libraries print goes to stderr):

- at start, once the framework is imported, the model built and the step run 1 + warmup
  times: {"ready": true, "framework", "python", "threads", "first_s", "baseline_bytes", ...};
  the baseline is the resident memory after importing the framework and starting its CPU
  runtime, before the model exists;
- per "step": {"wall_s", "cpu_s"} of one synchronized step (cpu_s: the process's CPU time over
  all threads, so cpu_s / wall_s is the number of cores kept busy);
- on "quit": {"peak_bytes", "peak_since"}: the peak resident memory since the warm-up ended
  where Linux lets it be reset (/proc/self/clear_refs), else since the start.

Imports nothing of JAX for a PyTorch worker, nor of PyTorch for a JAX one.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def _status_bytes(field: str) -> int | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_bytes() -> int:
    current = _status_bytes("VmRSS")
    return current if current is not None else peak_bytes()


def peak_bytes() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, Linux KiB


def reset_peak() -> bool:
    """Resets the peak resident memory to the current one (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def jax_runner(spec: dict):
    """(step, description) for the JAX side: the registry model's step on a synthetic batch."""
    import jax

    jax.devices()  # start the CPU client (and its thread pool) before the baseline is read
    baseline = resident_bytes()
    from jaxres.bench.train_step import setup_step

    setup = setup_step(spec["model"], batch_size=spec["batch_size"], dtype=spec.get("dtype", "float32"),
                       driver=spec.get("driver", "single"), input_size=spec.get("input_size"),
                       mode=spec.get("mode", "train"), **spec.get("overrides", {}))
    carried = [setup.state]

    def step():
        carried[0], metrics = setup.step(carried[0], setup.batch)
        jax.block_until_ready((carried[0], metrics))

    from jaxres.models import onednn_conv

    return step, {"framework": f"jax {jax.__version__}", "baseline_bytes": baseline,
                  "input_size": setup.input_size, "device": jax.devices()[0].device_kind,
                  "onednn": onednn_conv.enabled() if jax.default_backend() == "cpu" else False}


def torch_runner(spec: dict):
    """(step, description) for the PyTorch side: torchvision's model or jaxres's CIFAR twin."""
    import torch
    import torchvision  # noqa: F401  (part of the library baseline)

    torch.zeros(1).sum()
    baseline = resident_bytes()
    from jaxres.bench.torch_reference import torch_step

    step, threads = torch_step(spec["model"], batch_size=spec["batch_size"], input_size=spec["input_size"],
                               num_classes=spec["num_classes"], dtype=spec.get("dtype", "float32"),
                               mode=spec.get("mode", "train"))
    return step, {"framework": f"torch {torch.__version__}", "baseline_bytes": baseline, "threads": threads}


RUNNERS = {"jax": jax_runner, "torch": torch_runner}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the answers

    def answer(message: dict) -> None:
        answers.write(json.dumps(message) + "\n")

    step, desc = RUNNERS[spec["framework"]](spec)
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(spec.get("warmup", 2)):
        step()
    resettable = reset_peak()
    import jaxres

    answer({"ready": True, "python": sys.version.split()[0], "executable": sys.executable,
            "jaxres": os.path.dirname(jaxres.__file__), "first_s": first, **desc})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            answer({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu})
        elif command == "quit":
            answer({"peak_bytes": peak_bytes(), "peak_since": "warm-up" if resettable else "start"})
            return 0
        else:
            answer({"error": f"unknown command {command!r}; send 'step' or 'quit'"})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
