"""The classifier's last linear layer: the one part of a model that depends on num_classes.

Loading weights made for another number of classes keeps everything else and initializes
this layer afresh (torchvision's fine-tuning recipe replaces `fc` / `classifier[6]` alike).
Each model says where that layer is (`model.classifier_path()`); nothing here depends on
the model family.
"""

from __future__ import annotations

import os
import sys
import warnings

import jax
import jax.numpy as jnp

from jaxres.models.units import UnitModel

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def fresh_classifier(model: UnitModel, rng: jax.Array) -> dict[str, jax.Array]:
    """{"kernel", "bias"} of the last linear layer, initialized as the model's own init does.

    Initializes the head unit alone (the unit interface's `start="head"`) on a 1x1 zero
    feature map: both heads pool adaptively (ResNet to 1x1, VGG to `pool_size`^2 by
    replicating a 1x1 map), so the layer shapes are those of a full-size input and no
    backbone weights are allocated.
    """
    spec = model.unit_specs(False)[-1]
    features = jnp.zeros((1, 1, 1, spec.in_channels), model.dtype)
    params = model.init(rng, features, start="head")["params"]
    for name in model.classifier_path():
        params = params[name]
    return dict(params)


def warn_fresh_classifier(name: str, source: str, weights_classes: int, model: UnitModel) -> None:
    """Warns that `model`'s last linear layer was initialized afresh, at the caller's line.

    The warning points at the first frame outside the jaxres package (the user's
    `jaxres.pretrained(...)` or `from_torchvision(...)` call), however deep inside jaxres
    the loading happened; Python 3.12's `skip_file_prefixes` does the same.
    """
    frame, stacklevel = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(
        f"{name}: the weights ({source}) classify {weights_classes} classes, the model "
        f"{model.num_classes}; loaded everything but the last linear layer {'/'.join(model.classifier_path())}, "
        f"which is freshly initialized",
        stacklevel=stacklevel,
    )
