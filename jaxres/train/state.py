"""The training state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from jaxres.models.scan_layout import training_layout


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, opt_state; static apply_fn, tx) plus:

    - `batch_stats`: BatchNorm running statistics ({} for normalization-free nets);
    - `rng`: the run's base PRNG key (uint32 (2,)); step k uses fold_in(rng, k), so no RNG
      state evolves and a resumed run draws the same dropout masks;
    - `model`: the Flax module (static), so the step can re-bind BatchNorm to a mapped axis;
    - `loss_scale`: a flax `DynamicScale` (`precision.dynamic_loss_scale`) for float16, else None.
    """

    batch_stats: Any = None
    rng: jax.Array = None
    model: Any = struct.field(pytree_node=False, default=None)
    loss_scale: Any = None

    def variables(self) -> dict:
        """The `variables` dict for `model.apply`."""
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, ...], loss_scale=None) -> TrainState:
    """Initializes `model` on a zero batch of `input_shape` (N, H, W, C) and wraps it with
    the optimizer `tx`. `rng` (a raw uint32 key) seeds the parameters and, folded, dropout.
    `loss_scale` (`precision.dynamic_loss_scale()`) turns on dynamic loss scaling (float16).
    A `scan_units=True` model's variables are kept in the stacked layout
    (`jaxres.models.scan_layout.training_layout`)."""
    init_rng, run_rng = jax.random.split(rng)

    def init(key):
        variables = model.init(key, jnp.zeros(input_shape, jnp.float32), False)
        # scan_units models train on the stacked layout: a few arrays per run of identical
        # blocks instead of one per block keeps deep nets' steps quick to compile.
        return training_layout(model, variables)

    # Init builds every block on its own (scan_units only scans the training passes); XLA
    # needs minutes to compile that for a 1,000-block net (cifar_resnet1202: 4.6 min), while
    # running it op by op takes seconds (9 s).
    deep = model.scan_units
    variables = init(init_rng) if deep else jax.jit(init)(init_rng)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        rng=run_rng,
        model=model,
        loss_scale=loss_scale,
    ).replace(step=jnp.zeros((), jnp.int32))  # an array, so checkpoints restore it exactly


def abstract_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                         input_shape: tuple[int, ...], loss_scale=None) -> TrainState:
    """`create_train_state`'s result as shapes and dtypes only (jax.ShapeDtypeStruct leaves),
    traced by `jax.eval_shape` without compiling or running `init`: the target a checkpoint
    restores into."""
    return jax.eval_shape(lambda key: create_train_state(model, tx, key, input_shape, loss_scale), rng)


def checkpoint_tree(state: TrainState) -> dict:
    """The arrays a checkpoint holds (static fields are rebuilt from the config)."""
    tree = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "rng": state.rng}
    if state.loss_scale is not None:
        tree["loss_scale"] = state.loss_scale
    return tree
