"""The loss of a whole model as a pure function of its parameters, for the analyses that move in
parameter space (`landscape`, `sharpness`): `model.apply` of all units at once, under a
BatchNorm policy ("eval": running statistics; "batch": the batch's own, as trained; see
`segments`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxres.analysis.segments import check_bn


def model_logits(model, bn: str):
    """`logits(params, rest, x)`: `model` (whole-model apply) with variables {params, **rest} on
    the NHWC batch `x` under BatchNorm policy `bn` (batch statistics updated but not returned)."""
    train = check_bn(bn)

    def logits(params, rest, x):
        variables = {"params": params, **rest}
        mutable = ["batch_stats"] if train and "batch_stats" in rest else False
        rngs = {"dropout": jax.random.key(0)} if train else None
        out = model.apply(variables, x, train, mutable=mutable, rngs=rngs)
        return (out[0] if mutable else out).astype(jnp.float32)

    return logits


def cross_entropies(logits, labels):
    """Per-example cross-entropy (N,) of float32 logits (N, C) and int labels (N,)."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]


def mean_cross_entropy(model, bn: str):
    """`loss(params, rest, x, labels)`: the mean cross-entropy of `model_logits`."""
    logits = model_logits(model, bn)
    return lambda params, rest, x, labels: jnp.mean(cross_entropies(logits(params, rest, x), labels))
