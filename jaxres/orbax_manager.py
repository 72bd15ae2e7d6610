"""How jaxres keeps its checkpoints in orbax: one `CheckpointManager` per checkpoint directory,
holding the four items of a checkpoint, keeping the latest N besides the best evaluated one
and saving synchronously; the restore target of an array (with a sharding orbax can place);
and a tree's shapes and dtypes by path, to compare a checkpoint with what a run expects before
reading it. `jaxres.workdir` uses it for the run directory's checkpoints."""

from __future__ import annotations

import jax

# A checkpoint's items: state (the arrays: step, params, batch_stats, opt_state, rng, + loss_scale),
# data (the training iterator's state), config (the run's), meta (step, time, eval metrics if any).
ITEMS = ("state", "data", "config", "meta")


def checkpoint_manager(directory, *, keep: int, read_only: bool = False):
    """The orbax manager of `directory`: it keeps the latest `keep` checkpoints and the best by
    eval accuracy (orbax's `metrics` item, written for evaluated checkpoints only); a save has
    finished, renamed into place, when it returns."""
    import logging

    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    absl_logger = logging.getLogger("absl")
    if _without_metrics_warning not in absl_logger.filters:
        absl_logger.addFilter(_without_metrics_warning)

    options = ocp.CheckpointManagerOptions(
        # best_fn makes orbax write and read the `metrics` item; preservation_policy alone
        # decides what is deleted: the latest `keep`, and the best evaluated checkpoint.
        best_fn=_eval_accuracy,
        best_mode="max",
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            policies.BestN(get_metric_fn=_eval_accuracy, n=1, keep_checkpoints_without_metrics=False),
        ]),
        create=False,
        # Synchronous: a save has finished (and is renamed into place) when save() returns,
        # so a checkpoint named in the log is on disk even if the process dies next.
        enable_async_checkpointing=False,
        read_only=read_only,
    )
    # Handlers named up front, so that a fresh process can read one item (or its metadata) alone.
    handlers = {item: ocp.JsonCheckpointHandler() for item in ITEMS if item != "state"}
    handlers["state"] = ocp.StandardCheckpointHandler()
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def restore_target(leaf) -> jax.ShapeDtypeStruct:
    """A leaf of a restore target with a sharding: its own, else this process's first device
    (a `jax.eval_shape` target has none, and orbax would otherwise lay the arrays out as they
    were saved, on devices a reader may not have)."""
    import orbax.checkpoint as ocp

    struct = ocp.utils.to_shape_dtype_struct(leaf)
    if getattr(struct, "sharding", None) is not None:
        return struct
    return jax.ShapeDtypeStruct(struct.shape, struct.dtype,
                                sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def _eval_accuracy(metrics: dict) -> float:
    return float(metrics["accuracy"])


def _without_metrics_warning(record) -> bool:
    # orbax warns at every save without metrics once best_fn is set; here only evaluated
    # checkpoints have them, by design.
    return not str(record.msg).startswith("Requested `tracked_metric`")
