"""Loss gradient of cifar_resnet56 at a checkpoint, on a fixed batch, with whichever jaxres tree
is on PYTHONPATH: the check that found the BatchNorm precision bug (../README.md).

    PYTHONPATH=TREE python gradient_at_checkpoint.py CHECKPOINT/state OUT.npz [float64]

TREE: commit 63e7839 (flax's BatchNorm form), f1f7866..e6cb4cb (x * a + b) or a2aad33 (flax's
again); JAXRES_ONEDNN=0 for XLA's convolutions. "float64" computes the reference in float64.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import jaxres
from jaxres.models import onednn_conv

ckpt, out = sys.argv[1], sys.argv[2]
dtype = jnp.float64 if sys.argv[3:] == ["float64"] else jnp.float32
jax.config.update("jax_enable_x64", dtype == jnp.float64)
state = ocp.PyTreeCheckpointer().restore(ckpt)
params, stats = jax.tree.map(lambda v: jnp.asarray(v, dtype), (state["params"], state["batch_stats"]))
model = jaxres.create_model("cifar_resnet56", num_classes=10, in_channels=1, dtype=dtype)
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((128, 28, 28, 1)), dtype)
y = jnp.asarray(rng.integers(0, 10, 128))


def loss_fn(p):
    logits, _ = model.apply({"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


loss, g = jax.jit(jax.value_and_grad(loss_fn))(params)
flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(g)}
flat["__loss"] = np.asarray(loss)
np.savez(out, **flat)
print(out, "onednn" if onednn_conv.enabled() else "xla", jnp.dtype(dtype).name, float(loss))
