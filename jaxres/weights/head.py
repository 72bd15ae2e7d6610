"""The classifier's last linear layer: the one part of a model that depends on num_classes.

Loading weights made for another number of classes keeps everything else and initializes
this layer afresh (torchvision's fine-tuning recipe replaces `fc` / `classifier[6]` alike).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxres.models import ResNet, VGG
from jaxres.models.units import UnitModel


def classifier_path(model: UnitModel) -> tuple[str, ...]:
    """Flax module path of the layer whose output width is `num_classes`."""
    if isinstance(model, VGG):
        return ("head", f"fc{len(model.classifier_widths) + 1}")
    if isinstance(model, ResNet):
        return ("head", "fc")
    raise TypeError(f"no known classifier layer in a {type(model).__name__}")


def fresh_classifier(model: UnitModel, rng: jax.Array) -> dict[str, jax.Array]:
    """{"kernel", "bias"} of the last linear layer, initialized as the model's own init does.

    Initializes the head unit alone (the unit interface's `start="head"`) on a zero feature
    map, so no backbone weights are allocated.
    """
    spec = model.unit_specs(False)[-1]
    side = model.pool_size if isinstance(model, VGG) else 1
    features = jnp.zeros((1, side, side, spec.in_channels), model.dtype)
    params = model.init(rng, features, start="head")["params"]
    for name in classifier_path(model):
        params = params[name]
    return dict(params)
