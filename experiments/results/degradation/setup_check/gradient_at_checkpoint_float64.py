# Used with: PYTHONPATH=<tree> python gradient_at_checkpoint.py CHECKPOINT/state OUT.npz (JAXRES_ONEDNN=0 for XLA), the tree
# being commit 63e7839 (flax BatchNorm form), f1f7866..e6cb4cb (x * a + b) or 24a5d95 (centred, fixed).
"""Loss gradient of cifar_resnet56 at a checkpoint, on a fixed batch, with whichever code is on
PYTHONPATH: compare the setups' step functions at a trained state."""
import sys
import numpy as np
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp
import jaxres
jax.config.update("jax_enable_x64", True)
from jaxres.models import onednn_conv

ckpt, out = sys.argv[1], sys.argv[2]
state = ocp.PyTreeCheckpointer().restore(ckpt)
params, stats = jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), (state["params"], state["batch_stats"]))
model = jaxres.create_model("cifar_resnet56", num_classes=10, in_channels=1, dtype=jnp.float64)
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((128, 28, 28, 1)), jnp.float64)
y = jnp.asarray(rng.integers(0, 10, 128))

def loss_fn(p):
    logits, _ = model.apply({"params": p, "batch_stats": stats}, x, True, mutable=["batch_stats"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

loss, g = jax.jit(jax.value_and_grad(loss_fn))(params)
flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(g)}
flat["__loss"] = np.asarray(loss)
np.savez(out, **flat)
print(out, "onednn" if onednn_conv.enabled() else "xla", float(loss))
