"""Zoo models as Flax NNX modules, through Flax's Linen-to-NNX bridge (`flax.nnx.bridge.ToNNX`).

    model = jaxres.nnx.to_nnx(jaxres.create_model("cifar_resnet20"), input_shape=(1, 32, 32, 3))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    loss = jaxres.nnx.train_step(model, optimizer, images, labels)  # BatchNorm statistics updated
    logits = model(images)                                          # eval mode: running statistics

The wrapped module is called like the Linen model's `apply` without the variables:
`model(x)` is eval mode (`train=False` is the zoo's default, as in every call of the unit
interface); `model(x, True, mutable=["batch_stats"])` uses batch statistics and writes the
updated running statistics back into the module. Its state holds `nnx.Param` (Linen's
'params') and `nnx.BatchStat` ('batch_stats') under the Linen module paths
(`model.unit_1["conv1"]["kernel"]`); `linen_variables` gives the Linen dict back, for the
analysis, the weight converters or a Linen checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx.bridge import variables as bridge_variables

from jaxres.models.units import UnitModel

# Linen collection -> NNX variable type, as the bridge maps them.
COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def to_nnx(model: UnitModel, variables=None, *, input_shape=None, seed: int = 0) -> nnx.bridge.ToNNX:
    """`model` as an NNX module holding its variables.

    `variables`: Linen variables (`{"params": ..., "batch_stats": ...}`, e.g. from
    `jaxres.pretrained` or a Linen training state), used as they are; or None to initialize
    new ones on zeros of the NHWC `input_shape` (`nnx.bridge.lazy_init`). `seed` seeds the
    'params' stream and the 'dropout' stream that train-mode calls draw from.
    """
    if not isinstance(model, UnitModel):
        raise TypeError(f"to_nnx wraps a jaxres zoo model (a UnitModel), got {type(model).__name__}")
    if (variables is None) == (input_shape is None):
        raise ValueError(
            "to_nnx needs exactly one of `variables` (existing Linen variables) or `input_shape` "
            f"(NHWC, e.g. (1, 32, 32, 3), to initialize new ones); got variables="
            f"{'None' if variables is None else 'given'}, input_shape={input_shape!r}"
        )
    module = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    if variables is None:
        nnx.bridge.lazy_init(module, jnp.zeros(input_shape, jnp.float32))
        return module
    unknown = sorted(set(variables) - set(COLLECTIONS))
    if unknown:
        raise ValueError(
            f"to_nnx takes the collections {sorted(COLLECTIONS)}; got also {unknown} (drop them: "
            f"the analysis probes are not state)"
        )
    # What ToNNX itself does with the variables a Linen call returns.
    for name, value in bridge_variables.linen_vars_to_nnx_attrs(dict(variables)).items():
        setattr(module, name, nnx.data(value))
    return module


def linen_variables(module: nnx.bridge.ToNNX) -> dict:
    """The Linen variables (`{"params": ..., "batch_stats": ...}`) an NNX-wrapped zoo model holds."""
    out = {}
    for collection, kind in COLLECTIONS.items():
        tree = nnx.to_pure_dict(nnx.state(module, kind))
        if jax.tree.leaves(tree):
            out[collection] = tree
    return out


@nnx.jit
def train_step(model: nnx.bridge.ToNNX, optimizer: nnx.Optimizer, images: jax.Array,
               labels: jax.Array) -> jax.Array:
    """One SGD step on the mean softmax cross-entropy of NHWC `images` and integer `labels`,
    in train mode: BatchNorm uses batch statistics and updates the module's running ones,
    dropout draws from the module's 'dropout' stream. Updates `model` and `optimizer` in
    place; returns the loss before the step."""

    def loss_fn(model):
        logits = model(images, True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss
