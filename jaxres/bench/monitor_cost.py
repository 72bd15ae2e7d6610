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

    jaxres bench --suite monitor [cifar_resnet56] [--probe-sizes 32,64] [--bns batch eval,batch] [--json out.json]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Iterator

from jaxres.bench.cases import run_isolated


def train_step_case(model_name: str, batch_size: int, steps: int) -> dict:
    """The training step's row, measured in this process: median of `steps` after one warm-up."""
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
    return {"case": "train_step", "model": model_name, "batch_size": batch_size, "step_s": step_s,
            "compile_s": max(first - step_s, 0.0)}


def measure_case(model_name: str, probe_size: int, bn: str, repeats: int, unit_jacobians: int) -> dict:
    """One measurement's row, measured in this process: the first call, then the median of `repeats`."""
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
    return {"case": "measure", "model": model_name, "probe_size": probe_size, "bn": bn, "unit_jacobians": unit_jacobians,
            "measure_s": measure_s, "compile_s": max(first - measure_s, 0.0), "first_s": first,
            "times_s": times}


def isolated_case(function: str, **kwargs) -> dict:
    """A case (`train_step_case` or `measure_case`) in a process of its own, with the 1-minute
    load average at its start and end and the CPUs."""
    before = os.getloadavg()[0]
    row = run_isolated("jaxres.bench.monitor_cost", function, **kwargs)
    row["load_avg_1min"] = [round(before, 2), round(os.getloadavg()[0], 2)]  # at start, at end
    row["cpus"] = os.cpu_count()
    return row


def bench_monitor_cost(model: str = "cifar_resnet56", *, batch_size: int = 128, probe_sizes=(32, 64),
                       bns=("batch",), unit_jacobians: int = 0, every: int = 100, run_steps: int = 3000,
                       steps: int = 3, repeats: int = 3) -> Iterator[dict]:
    """The training step's row, then one measurement row per BatchNorm policy and probe size with
    its overhead at `every` steps (`interval`) and over a run of `run_steps` (`run`), as fractions;
    one by one as each case finishes."""
    step = isolated_case("train_step_case", model_name=model, batch_size=batch_size, steps=steps)
    yield step
    measurements = run_steps // every + 1
    for bn in bns:
        for size in probe_sizes:
            row = isolated_case("measure_case", model_name=model, probe_size=int(size), bn=bn, repeats=repeats,
                                unit_jacobians=unit_jacobians)
            row["overhead_interval"] = (row["measure_s"] + row["compile_s"]) / (every * step["step_s"])
            row["overhead_run"] = (measurements * row["measure_s"] + row["compile_s"]) / (run_steps * step["step_s"])
            row.update(every=every, run_steps=run_steps, measurements=measurements)
            yield row


def format_rows(rows, header: bool = True) -> str:
    """Rows of `bench_monitor_cost` as a text table: seconds of a training step (at the training
    batch) or of a measurement (at the probe size), and the measurements' overheads in %."""
    lines = [f"{'case':<10} {'batch':>5} {'bn':<10} {'seconds':>8} {'compile s':>9} {'interval %':>10} "
             f"{'run %':>6}  load avg"] if header else []
    for r in rows:
        if r["case"] == "train_step":
            lines.append(f"{'train_step':<10} {r['batch_size']:>5} {'-':<10} {r['step_s']:>8.2f} "
                         f"{r['compile_s']:>9.1f} {'-':>10} {'-':>6}  {r['load_avg_1min']}")
        else:
            lines.append(f"{'measure':<10} {r['probe_size']:>5} {r['bn']:<10} {r['measure_s']:>8.2f} "
                         f"{r['compile_s']:>9.1f} {100 * r['overhead_interval']:>10.1f} "
                         f"{100 * r['overhead_run']:>6.1f}  {r['load_avg_1min']}")
    return "\n".join(lines)


def notes(rows) -> str:
    """What the overhead columns divide by, and the issue's bar."""
    measured = [r for r in rows if r["case"] == "measure"]
    if not measured:
        return ""
    r = measured[0]
    return (f"interval %: (measure + compile) / ({r['every']} steps); run %: {r['measurements']} measurements + one "
            f"compile over {r['run_steps']} steps; bar: 10%")
