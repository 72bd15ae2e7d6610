"""Parameter and multiply-accumulate counts, computed abstractly (no weights allocated).

MACs count the multiply-adds of convolutions and matrix products in one forward pass of one
example, read off the traced jaxpr; this is the convention of torchvision's model tables
("GFLOPS" 4.09 for resnet50) and the papers (3.6 billion FLOPs for ResNet-34).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core


def abstract_variables(model, input_size: int, batch: int = 1):
    """ShapeDtypeStructs of `model.init` for an NHWC input of `input_size` squared."""
    x = jax.ShapeDtypeStruct((batch, input_size, input_size, model.in_channels), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))


def count_params(variables) -> int:
    """Trainable parameters: the 'params' collection (BN running statistics excluded)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


def count_macs(model, input_size: int, variables=None) -> int:
    """Multiply-accumulates of one forward pass on one (input_size x input_size) example."""
    variables = variables if variables is not None else abstract_variables(model, input_size)
    x = jax.ShapeDtypeStruct((1, input_size, input_size, model.in_channels), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)
    return _jaxpr_macs(jaxpr.jaxpr)


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out, rhs = eqn.outvars[0].aval, eqn.invars[1].aval
            out_features_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += math.prod(out.shape) * math.prod(rhs.shape) // rhs.shape[out_features_dim]
        elif name == "onednn_conv_forward":  # the jaxres[onednn] path: (NHWC x, HWIO kernel) -> NHWC y
            out, rhs = eqn.outvars[0].aval, eqn.invars[1].aval
            total += math.prod(out.shape) * math.prod(rhs.shape[:3])
        elif name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[d] for d in lhs_contract)
        repeat = eqn.params.get("length", 1) if name == "scan" else 1
        for sub in _sub_jaxprs(eqn.params):
            total += repeat * _jaxpr_macs(sub)
    return total


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item
