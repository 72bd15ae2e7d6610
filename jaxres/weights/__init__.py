"""Pretrained weights: torchvision conversion, published-weight descriptors, jaxres weight files.

    model, variables = jaxres.pretrained("resnet50", "torchvision:IMAGENET1K_V2")
    variables = jaxres.weights.from_torchvision(torch_model.state_dict(), "resnet50")
    jaxres.weights.save_weights("resnet50.safetensors", variables, "resnet50", num_classes=1000)
"""

from jaxres.weights.descriptors import (
    Preprocessing,
    WeightDescriptor,
    list_torchvision_weights,
    torchvision_weights,
)
from jaxres.weights.io import WeightsInfo, load_weights, read_weights_info, save_weights
from jaxres.weights.loading import (
    WeightsUnavailableError,
    fetch_torchvision_file,
    load_pretrained,
    pretrained,
    torchvision_cache_path,
)
from jaxres.weights.state_dict import identify, read_state_dict
from jaxres.weights.torchvision import ConversionError, convertible_models, from_torchvision

__all__ = [
    "ConversionError", "Preprocessing", "WeightDescriptor", "WeightsInfo", "WeightsUnavailableError",
    "convertible_models", "fetch_torchvision_file", "from_torchvision", "identify", "list_torchvision_weights",
    "load_pretrained", "load_weights", "pretrained", "read_state_dict", "read_weights_info", "save_weights",
    "torchvision_cache_path", "torchvision_weights",
]
