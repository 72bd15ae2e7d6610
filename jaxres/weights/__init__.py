"""Pretrained weights: torchvision conversion, published-weight descriptors, jaxres weight files.

    model, variables = jaxres.pretrained("resnet50", "torchvision:IMAGENET1K_V2")
    model, variables = jaxres.pretrained("resnet50", "hf-hub:timm/resnet50.tv2_in1k")
    variables = jaxres.weights.from_torchvision(torch_model.state_dict(), "resnet50")
    jaxres.weights.save_weights("resnet50.safetensors", variables, "resnet50", num_classes=1000)

This package sits above the model zoo: it imports `jaxres.models`, never the other way.
"""

from jaxres.weights.cache import WeightsUnavailableError, fetch_torchvision_file, torchvision_cache_path
from jaxres.weights.descriptors import (
    Preprocessing,
    WeightDescriptor,
    list_torchvision_weights,
    published_models,
    torchvision_weights,
)
from jaxres.weights.hub import fetch_hub_file, hub_cache_dir
from jaxres.weights.io import WeightsInfo, load_weights, read_weights_info, save_weights
from jaxres.weights.loading import list_models, pretrained
from jaxres.weights.state_dict import identify, read_state_dict
from jaxres.weights.torchvision import ConversionError, convertible_models, from_torchvision

__all__ = [
    "ConversionError", "Preprocessing", "WeightDescriptor", "WeightsInfo", "WeightsUnavailableError",
    "convertible_models", "fetch_hub_file", "fetch_torchvision_file", "from_torchvision", "hub_cache_dir",
    "identify", "list_models", "list_torchvision_weights", "load_weights", "pretrained", "published_models",
    "read_state_dict", "read_weights_info", "save_weights", "torchvision_cache_path", "torchvision_weights",
]
