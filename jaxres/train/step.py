"""Pure per-device training and evaluation steps (no I/O, no config lookups).

Both run unchanged on one device under `jax.jit`, or per device under `jax.pmap` /
`shard_map` when given the mapped `axis_name`: gradients and metrics are then averaged
with `lax.pmean` and BatchNorm uses batch statistics synchronized over that axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxres.train import precision
from jaxres.train.state import TrainState


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy (float32 (N,)) of logits (N, K) and int labels (N,);
    label smoothing mixes the one-hot target with the uniform distribution (Szegedy et al. 2016)."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _model_for(state: TrainState, axis_name):
    # Synchronized BatchNorm: the same module with its statistics averaged over the axis.
    return state.model if axis_name is None else state.model.clone(bn_axis_name=axis_name)


def train_step(state: TrainState, batch: dict, *, axis_name: str | None = None,
               label_smoothing: float = 0.0) -> tuple[TrainState, dict]:
    """One SGD step on `batch` = {"image": float32 (N, H, W, C), "label": int (N,)}.

    Returns the new state and float32 scalar metrics: `loss` (mean cross-entropy, without the
    weight-decay term), `accuracy`, `grad_norm` (global L2 norm of the loss gradient). Dropout
    draws from fold_in(state.rng, step) (and the device index under `axis_name`). With a
    `state.loss_scale` (float16) the metrics add `skipped` (1.0 when the step's gradients were
    non-finite and the update was skipped) and `loss_scale`.
    """
    model = _model_for(state, axis_name)
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, lax.axis_index(axis_name))

    def loss_fn(params):
        variables = {"params": params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
        logits, updates = model.apply(variables, batch["image"], True, mutable=["batch_stats"], rngs={"dropout": rng})
        return cross_entropy(logits, batch["label"], label_smoothing).mean(), (logits, updates)

    if state.loss_scale is None:
        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if axis_name is not None:
            grads = lax.pmean(grads, axis_name)
    else:
        # float16: the loss scaled, the gradients unscaled and averaged over the axis (before
        # the finiteness test, so that every device agrees on skipping the step).
        loss_scale, finite, (loss, (logits, updates)), grads = state.loss_scale.value_and_grad(
            loss_fn, has_aux=True, axis_name=axis_name)(state.params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)}
    if axis_name is not None:
        metrics = lax.pmean(metrics, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
    if state.loss_scale is not None:
        # A step with overflowing gradients is skipped: only the step counter and the scale move.
        kept = precision.select_tree(finite, (new_state.params, new_state.opt_state, new_state.batch_stats),
                                     (state.params, state.opt_state, state.batch_stats))
        new_state = new_state.replace(params=kept[0], opt_state=kept[1], batch_stats=kept[2], loss_scale=loss_scale)
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        metrics["loss_scale"] = state.loss_scale.scale
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, axis_name: str | None = None) -> dict:
    """Sums over the real examples of a padded batch (`mask` float32 (N,), 1 = real):
    `loss_sum` (cross-entropy), `correct` and `count`; summed over `axis_name` when given.
    Divide the totals over all batches to get exact split-level averages."""
    logits = state.model.apply(state.variables(), batch["image"], False)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    sums = {
        "loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
    return sums if axis_name is None else lax.psum(sums, axis_name)
