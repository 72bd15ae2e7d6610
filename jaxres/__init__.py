"""jaxres: VGG and ResNet in JAX/Flax, a training stack, and an exact gradient-propagation lab."""

from jaxres.models import create_model, list_models, model_card, unit_names, unit_outputs, apply_units
from jaxres.weights.loading import pretrained

__version__ = "0.1.0"

__all__ = [
    "apply_units", "create_model", "list_models", "model_card", "pretrained", "unit_names", "unit_outputs",
    "__version__",
]
