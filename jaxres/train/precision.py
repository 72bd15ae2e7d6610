"""Mixed precision: compute dtypes and dynamic loss scaling for float16.

Parameters, optimizer state and BatchNorm statistics stay float32 in every mode; only the
model's compute `dtype` changes (logits are float32). bfloat16 has float32's exponent range
and needs no loss scaling. float16 underflows small gradients, so its loss is multiplied by
a dynamic scale (Micikevicius et al. 2018, arXiv 1710.03740): a step whose gradients are
non-finite is skipped (parameters, optimizer and BN statistics unchanged) and halves the
scale; `period` finite steps in a row double it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxres.models.layers import pick

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str, platform: str | None = None):
    """The jnp dtype called `name`; refuses, before any compile, one `platform` cannot run."""
    dtype = pick("compute dtype", name, COMPUTE_DTYPES)
    if name == "float16" and platform == "tpu":
        raise ValueError("TPUs have no float16 arithmetic; use the compute dtype bfloat16")
    return dtype


class DynamicLossScale(struct.PyTreeNode):
    """The loss scale and the count of finite steps since it last changed (float32/int32)."""

    scale: jax.Array
    good_steps: jax.Array
    period: int = struct.field(pytree_node=False, default=2000)

    @classmethod
    def create(cls, initial: float = 2.0**15, period: int = 2000) -> "DynamicLossScale":
        return cls(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32), period)

    def update(self, finite: jax.Array) -> "DynamicLossScale":
        grown = self.good_steps + 1 >= self.period
        scale = jnp.where(finite, jnp.where(grown, self.scale * 2, self.scale), jnp.maximum(self.scale / 2, 1.0))
        good = jnp.where(finite & ~grown, self.good_steps + 1, 0)
        return self.replace(scale=scale, good_steps=good.astype(jnp.int32))


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (a scalar bool array)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def select_tree(keep_new: jax.Array, new, old):
    """`new` where keep_new else `old`, leaf by leaf (how a skipped step leaves the state)."""
    return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)
