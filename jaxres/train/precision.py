"""Mixed precision: compute dtypes and dynamic loss scaling for float16.

Parameters, optimizer state and BatchNorm statistics stay float32 in every mode; only the
model's compute `dtype` changes (logits are float32). bfloat16 has float32's exponent range
and needs no loss scaling. float16 underflows small gradients, so its loss is multiplied by
a dynamic scale (Micikevicius et al. 2018, arXiv 1710.03740), Flax's `DynamicScale`: a step
whose gradients are non-finite is skipped (parameters, optimizer and BN statistics unchanged)
and halves the scale; after `growth_interval` finite steps in a row the next finite one
doubles it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.training.dynamic_scale import DynamicScale

from jaxres.choices import pick

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str, platform: str | None = None):
    """The jnp dtype called `name`; refuses, before any compile, one `platform` cannot run."""
    dtype = pick("compute dtype", name, COMPUTE_DTYPES)
    if name == "float16" and platform == "tpu":
        raise ValueError("TPUs have no float16 arithmetic; use the compute dtype bfloat16")
    return dtype


def dynamic_loss_scale(initial: float = 2.0**15, growth_interval: int = 2000) -> DynamicScale:
    """Flax's `DynamicScale` starting at `initial`, never below 1, with array fields (float32
    scale, int32 count of finite steps) so that checkpoints hold and restore it exactly."""
    if not initial >= 1:
        raise ValueError(f"the initial loss scale must be >= 1 (e.g. 2**15), got {initial}")
    return DynamicScale(growth_interval=growth_interval, fin_steps=jnp.zeros((), jnp.int32),
                        scale=jnp.asarray(initial, jnp.float32), minimum_scale=1.0)


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (a scalar bool array)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def select_tree(keep_new: jax.Array, new, old):
    """`new` where keep_new else `old`, leaf by leaf (how a skipped step leaves the state)."""
    return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)
