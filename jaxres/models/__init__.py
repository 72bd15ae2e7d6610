"""The jaxres model zoo: VGG and ResNet families behind one unit interface."""

from jaxres.models.complexity import count_macs, count_params
from jaxres.models.registry import ModelCard, create_model, model_card, model_names
from jaxres.models.resnet import ResNet, cifar_resnet, imagenet_resnet
from jaxres.models.scan_layout import stack_identical_units, unstack_identical_units
from jaxres.models.units import UnitModel, apply_units, stage_outputs, unit_names, unit_outputs
from jaxres.models.vgg import VGG, cifar_vgg, vgg

__all__ = [
    "ModelCard", "ResNet", "UnitModel", "VGG", "apply_units", "cifar_resnet", "cifar_vgg",
    "count_macs", "count_params", "create_model", "imagenet_resnet", "model_card", "model_names",
    "stack_identical_units", "stage_outputs", "unit_names", "unit_outputs", "unstack_identical_units", "vgg",
]


def __getattr__(name: str):
    if name == "list_models":  # its one home is now the top level, with the published weights
        raise AttributeError("jaxres.models.list_models is now jaxres.list_models(filter, pretrained=False); "
                             "jaxres.models.model_names(filter) lists the registry alone")
    raise AttributeError(f"module 'jaxres.models' has no attribute {name!r}")
