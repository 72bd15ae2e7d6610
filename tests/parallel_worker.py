"""Subprocess worker for the parallel-driver tests: device counts are fixed at JAX start-up,
so each configuration runs in its own process and prints one JSON line.

    python tests/parallel_worker.py DRIVER NUM_CPU_DEVICES [PROCESS_ID NUM_PROCESSES PORT]
"""

import json
import os
import sys

os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

GLOBAL_BATCH, STEPS = 16, 3


def main(driver_kind: str, num_devices: int, process_id: int = 0, num_processes: int = 1, port: int = 0):
    jax.config.update("jax_num_cpu_devices", num_devices)
    from jaxres.train.distributed import initialize_distributed

    initialize_distributed(f"localhost:{port}", num_processes, process_id)
    from jaxres.models import ResNet
    from jaxres.train.drivers import make_driver
    from jaxres.train.state import create_train_state

    model = ResNet(stage_sizes=(1, 1), widths=(4, 8), stem="cifar", shortcut="A", num_classes=10)
    state = create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.PRNGKey(0), (2, 16, 16, 3))
    driver = make_driver(driver_kind)
    state = driver.put_state(state)
    data = np.random.default_rng(0)
    losses = []
    per_process = GLOBAL_BATCH // num_processes
    for _ in range(STEPS):
        images = data.normal(size=(GLOBAL_BATCH, 16, 16, 3)).astype(np.float32)
        labels = data.integers(0, 10, GLOBAL_BATCH).astype(np.int32)
        local = slice(process_id * per_process, (process_id + 1) * per_process)  # per-host shard
        state, metrics = driver.train_step(state, driver.put_batch({"image": images[local], "label": labels[local]}))
        losses.append(float(metrics["loss"]))
    final = driver.get_state(state)
    flat = {jax.tree_util.keystr(k): np.asarray(v).tolist() for k, v in jax.tree_util.tree_leaves_with_path(
        {"params": final.params, "batch_stats": final.batch_stats})}
    print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), "losses": losses,
                      "step": int(np.asarray(final.step)), "variables": flat}))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))
