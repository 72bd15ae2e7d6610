"""Numeric parity of converted weights with torchvision itself (needs torch and torchvision).

`logit_difference` runs torchvision's model with the original state_dict and the jaxres model
with the converted variables on the same random batch (NCHW for torch, NHWC for jaxres) in
eval mode, float32, and returns the largest absolute logit difference and the logit scale.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from jaxres.models import create_model


def torchvision_model(name: str, state_dict: Mapping[str, Any] | None = None, num_classes: int = 1000):
    """torchvision.models.<name>(weights=None) in eval mode, with `state_dict` loaded if given."""
    try:
        import torch
        import torchvision
    except ImportError:
        raise ImportError("comparing with torchvision needs torch and torchvision: pip install 'jaxres[torch]'") from None
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if state_dict is not None:
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()}
        model.load_state_dict(tensors)
    return model.eval()


def logit_difference(name: str, state_dict, variables, *, size: int = 224, batch: int = 1, seed: int = 0) -> dict:
    """{"max_abs_diff", "logit_scale" (max |torch logit|), "size", "batch"} on N(0, 1) inputs."""
    import torch

    reference = torchvision_model(name, state_dict)
    x = np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    logits = np.asarray(create_model(name).apply(variables, x.transpose(0, 2, 3, 1)))
    return {
        "max_abs_diff": float(np.abs(logits - expected).max()),
        "logit_scale": float(np.abs(expected).max()),
        "size": size,
        "batch": batch,
    }
