"""Reading and recognizing torchvision state_dicts: `.pth` files (torch), safetensors files (no
torch), training checkpoints; which torchvision architecture and how many classes they hold.
Values stay views where possible: `to_numpy(tensor)` shares torch's memory, and
`from_torchvision` copies what it keeps."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import numpy as np

from jaxres.models.resnet import IMAGENET_DEPTHS
from jaxres.models.vgg import VGG_LAYERS


def to_numpy(value) -> np.ndarray:
    """A torch tensor (without importing torch), numpy or jax array -> numpy array."""
    if type(value).__module__.split(".")[0] == "torch":
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            tensor = tensor.float()
        return tensor.numpy()
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value)
    raise TypeError(f"state_dict values must be torch tensors or arrays, got {type(value).__name__}")


# timm's VGG module -> torchvision's (timm's vgg.py `_filter_fn`, inverted): timm holds
# torchvision's classifier Linear layers as convs, OIHW (4096, 512, 7, 7) and (4096, 4096, 1, 1).
_TIMM_VGG_MODULES = {"pre_logits.fc1": "classifier.0", "pre_logits.fc2": "classifier.3", "head.fc": "classifier.6"}


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torchvision's names for a plain state_dict, torchvision's training checkpoint
    ({"model": ...}), a DistributedDataParallel one ("module." prefixes) or timm's layout of
    the same weights (the Hub's `timm/vgg16.tv_in1k`: its classifier convs become torchvision's
    Linear weights again, reshaped to (out, in) in the NCHW flatten order; a ResNet's names
    agree already)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
    renamed = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        module, _, leaf = key.rpartition(".")
        if module in _TIMM_VGG_MODULES:
            key = f"{_TIMM_VGG_MODULES[module]}.{leaf}"
            if leaf == "weight" and len(shape_of(value)) == 4:
                value = value.reshape(shape_of(value)[0], -1)
        renamed[key] = value
    return renamed


def shape_of(value) -> tuple[int, ...]:
    """The shape of a tensor or array, or a shape given as a sequence."""
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def identify(state_dict: Mapping[str, Any]) -> str | None:
    """The torchvision builder name (resnet50, vgg16_bn, ...) whose layout `state_dict` has
    (values: tensors, arrays or shapes), or None."""
    names = set(state_dict)
    if "fc.weight" in names and "layer1.0.conv1.weight" in names:
        blocks = []
        for stage in range(1, 5):
            found = [int(m.group(1)) for n in names if (m := re.fullmatch(rf"layer{stage}\.(\d+)\.conv1\.weight", n))]
            blocks.append(max(found) + 1 if found else 0)
        kind = "bottleneck" if "layer1.0.conv3.weight" in names else "basic"
        for depth, (block, stages) in IMAGENET_DEPTHS.items():
            if (block, stages) == (kind, tuple(blocks)):
                return f"resnet{depth}"
        return None
    if any(n.startswith("features.") for n in names) and "classifier.0.weight" in names:
        convs = sum(1 for n in names if re.fullmatch(r"features\.\d+\.weight", n) and len(shape_of(state_dict[n])) == 4)
        bn = any(n.endswith("running_mean") for n in names)
        depth = convs + 3  # VGG-n has n - 3 conv layers and 3 linear layers
        return f"vgg{depth}{'_bn' if bn else ''}" if depth in VGG_LAYERS else None
    return None


def state_dict_num_classes(state_dict: Mapping[str, Any]) -> int | None:
    """Output width of the last linear layer of a torchvision VGG/ResNet state_dict (values:
    tensors, arrays or shapes), or None."""
    if "fc.weight" in state_dict:
        return shape_of(state_dict["fc.weight"])[0]
    linear = [int(m.group(1)) for n in state_dict if (m := re.fullmatch(r"classifier\.(\d+)\.weight", n))]
    return shape_of(state_dict[f"classifier.{max(linear)}.weight"])[0] if linear else None


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a torchvision state_dict: a `.pth`/`.pt` file (needs torch) or a `.safetensors`
    file written from `model.state_dict()` or published by timm (no torch needed). Returns
    numpy arrays under torchvision's names (`unwrap_state_dict`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such weights file: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
        if metadata.get("format") == "jaxres.weights":
            raise ValueError(f"{path} is already a jaxres weights file: load it with jaxres.weights.load_weights")
        return unwrap_state_dict(tensors)
    if not path.endswith((".pth", ".pt", ".bin")):
        raise ValueError(f"unknown weights file type {path!r}: expected .pth, .pt, .bin or .safetensors")
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs torch (pip install 'jaxres[torch]'); or save the state_dict with "
            f"safetensors.torch.save_file on a machine with torch and convert the .safetensors file"
        ) from None
    try:
        # weights_only: never run pickled code from a downloaded file.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle/zip/runtime errors of many kinds
        raise ValueError(f"cannot read {path} as a torch state_dict: {err}") from None
    return {key: to_numpy(value) for key, value in unwrap_state_dict(state_dict).items()}
