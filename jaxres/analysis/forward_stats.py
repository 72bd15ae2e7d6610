"""Forward statistics: the std of every layer's response (He et al. 2015, Fig. 7).

He et al. measure "the outputs of each 3x3 layer, after BN and before the nonlinearity /
addition" - exactly the zoo's layer probes (`layer1`, `layer2`, ...) - and find residual
nets' responses smaller than their plain twins'. The std here is over every element of the
batch (N, H, W, C): exact, not estimated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxres.analysis.segments import check_bn, last_probe


def response_std(value) -> jax.Array:
    """Std over all elements (float32 accumulation) of one NHWC response."""
    return jnp.std(value.astype(jnp.float32))


def build_forward(fn, capture_fn):
    """Segment op: `(cvars, h) -> (unit output, {probe: response std, "out": output std}, pre)`.

    `pre` is h + (last layer probe) when the unit keeps the shape and has probes, else None:
    the sum an identity-shortcut unit forms before its activation (used to recognize such
    units from the outside; see `segments.identity_unit`).
    """

    def forward(cvars, h):
        out, probes = capture_fn(cvars, h)
        stats = {name: response_std(value) for name, value in probes.items()}
        stats["out"] = response_std(out)
        pre = None
        if probes and out.shape == h.shape:
            pre = h + last_probe(probes)
        return out, stats, pre

    return forward


def forward_statistics(model, variables, x, bn: str = "eval") -> dict:
    """`{unit: {probe: std}}` for every layer probe of `model` on the NHWC batch `x` (one pass).

    Uses the 'intermediates' collection the probes sow into; `bn` as in `segments`.
    """
    train = check_bn(bn)
    mutable = ["intermediates"] + (["batch_stats"] if train and "batch_stats" in variables else [])
    rngs = {"dropout": jax.random.key(0)} if train else None
    _, state = model.apply(variables, x, train, probes=True, mutable=mutable, rngs=rngs)
    stats = {}
    for unit in model.unit_names():
        sown = state["intermediates"].get(unit, {})
        entry = {name: float(response_std(value[0])) for name, value in sown.items()}
        if f"out_{unit}" in state["intermediates"]:
            entry["out"] = float(response_std(state["intermediates"][f"out_{unit}"][0]))
        stats[unit] = entry
    return stats
