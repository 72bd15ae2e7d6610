"""Parallel drivers: one per-device step, run on every device three ways.

`jaxres.train.step.train_step(state, batch, axis_name=...)` is written per device with explicit
collectives (pmean of gradients and metrics, BatchNorm statistics synchronized over the axis).
A driver places the state and the batch on the devices and runs that same step:

- "single": `jax.jit` on one device (axis_name=None), the reference;
- "pmap": `jax.pmap` over the local devices with a leading device axis (the classic design;
  pmap is in maintenance mode since JAX 0.8);
- "sharded": `jax.jit` of `jax.shard_map` over a 1-D `Mesh` of all (global) devices, the state
  replicated and the batch split along its first axis (what current JAX recommends).

With the same global batch, all three compute the same update up to float reassociation in
the cross-device means (tests: 8 CPU devices vs 1, max relative difference < 1e-5).
Multi-host: every process passes its *local* batch (per-host sharding by the data pipeline);
"sharded" assembles the global array with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxres.choices import pick
from jaxres.train.step import eval_step, train_step

AXIS = "data"
DRIVERS = ("single", "pmap", "sharded")


def check_batch_size(global_batch: int, num_devices: int, num_processes: int = 1, *,
                     name: str = "global batch size") -> None:
    """Refuses, before any compile, a batch that is empty or that the devices cannot split
    evenly; `name` is how the message calls it (e.g. the config field "eval_batch_size")."""
    if global_batch < 1:
        raise ValueError(f"{name} must be a positive integer, got {global_batch!r}")
    if global_batch % num_devices:
        raise ValueError(
            f"{name} {global_batch} is not divisible by the {num_devices} devices; "
            f"use a multiple of {num_devices} (e.g. {max(num_devices, global_batch // num_devices * num_devices)})"
        )
    if global_batch % num_processes:
        raise ValueError(f"{name} {global_batch} is not divisible by the {num_processes} processes")


@dataclasses.dataclass
class Driver:
    """Runs the per-device step on a set of devices. Methods take and return host-side trees
    for the batch; `state` stays in the driver's device layout between steps."""

    kind: str
    num_devices: int
    put_state: Callable[[Any], Any]
    put_batch: Callable[[dict], Any]
    train_step: Callable[[Any, Any], tuple[Any, dict]]
    eval_step: Callable[[Any, Any], dict]
    get_state: Callable[[Any], Any]  # back to one logical (replicated, unstacked) state


def make_driver(kind: str = "sharded", *, label_smoothing: float = 0.0, devices=None,
                donate: bool = True) -> Driver:
    """A driver of `kind` ("single", "pmap", "sharded") over `devices` (default: all)."""
    pick("parallel driver", kind, dict.fromkeys(DRIVERS))
    step = functools.partial(train_step, label_smoothing=label_smoothing)
    donate_argnums = (0,) if donate else ()
    if kind == "single":
        device = (devices or jax.local_devices())[0]
        return Driver(
            kind, 1,
            put_state=lambda s: jax.device_put(s, device),
            put_batch=lambda b: jax.device_put(b, device),
            train_step=jax.jit(step, donate_argnums=donate_argnums),
            eval_step=jax.jit(eval_step),
            get_state=lambda s: s,
        )
    if kind == "pmap":
        # devices=None lets pmap span every process's devices (collectives across hosts);
        # naming devices restricts it to those (local) ones.
        local = list(devices or jax.local_devices())
        n = len(local)

        def put_batch(batch):
            check_batch_size(len(jax.tree.leaves(batch)[0]), n)
            return jax.tree.map(lambda a: np.asarray(a).reshape(n, -1, *np.shape(a)[1:]), batch)

        return Driver(
            kind, n * jax.process_count(),
            put_state=lambda s: jax_utils.replicate(s, local),
            put_batch=put_batch,
            train_step=_first_of_metrics(jax.pmap(functools.partial(step, axis_name=AXIS), AXIS, devices=devices,
                                                  donate_argnums=donate_argnums)),
            eval_step=_first(jax.pmap(functools.partial(eval_step, axis_name=AXIS), AXIS, devices=devices)),
            get_state=jax_utils.unreplicate,
        )
    mesh = Mesh(np.asarray(devices or jax.devices()), (AXIS,))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))

    def put_batch(batch):
        local_devices = mesh.local_devices
        check_batch_size(len(jax.tree.leaves(batch)[0]), len(local_devices))
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(split, np.asarray(a)), batch)

    def mapped(fn, out_specs):
        # check_vma=False: the outputs *are* replicated (pmean'd), which shard_map cannot infer
        # through BatchNorm (jaxres.models.batchnorm); out_specs=P() states it.
        return jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=out_specs, check_vma=False)

    return Driver(
        kind, mesh.size,
        put_state=lambda s: jax.device_put(s, replicated),
        put_batch=put_batch,
        train_step=jax.jit(mapped(functools.partial(step, axis_name=AXIS), (P(), P())), donate_argnums=donate_argnums),
        eval_step=jax.jit(mapped(functools.partial(eval_step, axis_name=AXIS), P())),
        get_state=lambda s: s,
    )


def _first_of_metrics(pmapped):
    """pmap returns per-device copies of the (already averaged) metrics: keep one."""

    def run(state, batch):
        state, metrics = pmapped(state, batch)
        return state, jax.tree.map(lambda a: a[0], metrics)

    return run


def _first(pmapped):
    return lambda state, batch: jax.tree.map(lambda a: a[0], pmapped(state, batch))
