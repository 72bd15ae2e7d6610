"""Cost of measuring gradient propagation during training (jaxres.analysis.monitor).

For a model on a Fashion-MNIST-shaped input (32x32x1, 10 classes): one jitted training step
at the training batch (jaxres.train.step.train_step, SGD momentum, "single" driver; median of
--steps after warm-up) and one `TrainingMonitor.measure` on a probe batch (TensorBoard on, as
in a run; first call = compilation + one measurement, then the median of --repeats). The
overhead of measuring every E steps is

    interval: (measure + compile) / (E * step)        the worst interval (the first)
    run:      (M * measure + compile) / (S * step)    a run of S steps, M = S // E + 1 measurements

against the issue's bar of 10% of the run's wall time. Each case runs in its own process, so
its compile time is its own. The 2-core development machine is shared: the load average is
reported with every row.

    .venv/bin/python experiments/bench_monitor.py [--probe-sizes 32,64] [--bns batch "eval,batch"] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def train_step_case(model_name: str, batch_size: int, steps: int) -> dict:
    import jax
    import numpy as np
    import optax

    from jaxres.bench.train_step import time_steps
    from jaxres.models import create_model
    from jaxres.train.drivers import make_driver
    from jaxres.train.state import create_train_state

    model = create_model(model_name, in_channels=1)
    driver = make_driver("single")
    state = create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.PRNGKey(0), (1, 32, 32, 1))
    data = np.random.default_rng(0)
    batch = {"image": data.normal(size=(batch_size, 32, 32, 1)).astype(np.float32),
             "label": data.integers(0, 10, batch_size).astype(np.int32)}
    first, times = time_steps(driver.train_step, driver.put_state(state), driver.put_batch(batch), steps, warmup=1)
    step_s = statistics.median(times)
    return {"case": "train_step", "batch_size": batch_size, "step_s": step_s, "compile_s": max(first - step_s, 0.0)}


def measure_case(model_name: str, probe_size: int, bn: str, repeats: int, unit_jacobians: int) -> dict:
    import jax
    import numpy as np

    from jaxres.analysis import TrainingMonitor
    from jaxres.models import create_model

    model = create_model(model_name, in_channels=1)
    data = np.random.default_rng(1)
    images = data.normal(size=(probe_size, 32, 32, 1)).astype(np.float32)
    labels = data.integers(0, 10, probe_size).astype(np.int32)
    variables = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.PRNGKey(0), images[:1]))
    with tempfile.TemporaryDirectory() as workdir:
        monitor = TrainingMonitor(model, images, labels, workdir=workdir, bn=bn, unit_jacobians=unit_jacobians)
        start = time.perf_counter()
        monitor.measure(0, variables)
        first = time.perf_counter() - start
        times = []
        for step in range(1, repeats + 1):
            start = time.perf_counter()
            monitor.measure(step, variables)
            times.append(time.perf_counter() - start)
        monitor.close()
    measure_s = statistics.median(times)
    return {"case": "measure", "probe_size": probe_size, "bn": bn, "unit_jacobians": unit_jacobians,
            "measure_s": measure_s, "compile_s": max(first - measure_s, 0.0), "first_s": first,
            "times_s": times}


def run_case(argv: list[str]) -> dict:
    before = os.getloadavg()[0]
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["load_avg_1min"] = [round(before, 2), round(os.getloadavg()[0], 2)]  # at start, at end
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cifar_resnet56")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch")
    parser.add_argument("--probe-sizes", default="32,64")
    parser.add_argument("--bns", nargs="+", default=["batch"], help='BatchNorm policies per case, e.g. "eval,batch"')
    parser.add_argument("--unit-jacobians", type=int, default=0)
    parser.add_argument("--every", type=int, default=100, help="analysis_every_steps")
    parser.add_argument("--run-steps", type=int, default=3000, help="run length for the amortized overhead "
                        "(3000: the fashion_mnist recipe)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed measurements after the first")
    parser.add_argument("--json", default=None)
    parser.add_argument("--case", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        kind, *rest = args.case
        if kind == "train_step":
            row = train_step_case(args.model, args.batch_size, args.steps)
        else:
            row = measure_case(args.model, int(rest[0]), rest[1], args.repeats, args.unit_jacobians)
        print(json.dumps(row))
        return 0

    common = ["--model", args.model, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--repeats", str(args.repeats), "--unit-jacobians", str(args.unit_jacobians)]
    step = run_case(common + ["--case", "train_step"])
    print(f"{args.model} train step, batch {args.batch_size}: {step['step_s']:.2f} s "
          f"(compile {step['compile_s']:.1f} s; load avg {step['load_avg_1min']})", flush=True)
    measurements = args.run_steps // args.every + 1
    rows = []
    header = (f"{'probe':>5} {'bn':<10} {'measure s':>9} {'compile s':>9} {'interval %':>10} "
              f"{'run %':>6}  load avg")
    print(header)
    for bn in args.bns:
        for size in (int(s) for s in args.probe_sizes.split(",")):
            row = run_case(common + ["--case", "measure", str(size), bn])
            row["overhead_interval"] = (row["measure_s"] + row["compile_s"]) / (args.every * step["step_s"])
            row["overhead_run"] = ((measurements * row["measure_s"] + row["compile_s"])
                                   / (args.run_steps * step["step_s"]))
            rows.append(row)
            print(f"{size:>5} {bn:<10} {row['measure_s']:>9.2f} {row['compile_s']:>9.1f} "
                  f"{100 * row['overhead_interval']:>10.1f} {100 * row['overhead_run']:>6.1f}  {row['load_avg_1min']}",
                  flush=True)
    print(f"interval %: (measure + compile) / ({args.every} steps); run %: {measurements} measurements + one "
          f"compile over {args.run_steps} steps; bar: 10%")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "every": args.every, "run_steps": args.run_steps, "train_step": step,
                       "measure": rows, "cpus": os.cpu_count()}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
