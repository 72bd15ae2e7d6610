"""jaxres: VGG and ResNet in JAX/Flax, a training stack, and an exact gradient-propagation lab.

    model = jaxres.create_model("cifar_resnet56")                             # a Flax module
    model, variables = jaxres.pretrained("resnet50", "torchvision:IMAGENET1K_V2")
    jaxres.list_models("resnet*", pretrained=True)

The names below are imported on first use, so `import jaxres` (and `jaxres --help`) does not
pay for importing JAX.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "apply_units": "jaxres.models",
    "create_model": "jaxres.models",
    "list_models": "jaxres.weights.loading",  # the registry's listing, plus pretrained=True
    "model_card": "jaxres.models",
    "pretrained": "jaxres.weights.loading",
    "unit_names": "jaxres.models",
    "unit_outputs": "jaxres.models",
}

_SUBPACKAGES = ("analysis", "bench", "choices", "data", "experiments", "files", "models", "nnx", "train",
                "weights", "workdir")

__all__ = [
    "__version__", "apply_units", "create_model", "list_models", "model_card", "pretrained", "unit_names",
    "unit_outputs",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"jaxres.{name}")
    else:
        raise AttributeError(f"module 'jaxres' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
