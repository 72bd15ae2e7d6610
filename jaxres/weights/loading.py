"""Pretrained models: `(model, variables)` from a weights spec; the one entry point.

Flax modules hold no parameters, so a pretrained model is the pair

    model, variables = jaxres.pretrained("resnet50", weights="torchvision:IMAGENET1K_V2")
    logits = model.apply(variables, images_nhwc)          # eval mode, float32 logits

A weights spec is one of
- "torchvision:IMAGENET1K_V1" / "torchvision:IMAGENET1K_V2" / "torchvision:DEFAULT":
  torchvision's published file, taken from torchvision's own cache
  (`$TORCH_HOME/hub/checkpoints`, as `torchvision.models.resnet50(weights=...)` uses it) or
  downloaded into it (needs torch and internet), then converted;
- "hf-hub:timm/resnet50.tv2_in1k" (timm's copy of the same weights on the Hugging Face Hub,
  a safetensors file: no torch needed), through the huggingface_hub cache (hub.py);
- the path of a jaxres weights file (`jaxres convert` writes them; no torch needed);
- the path of a torchvision state_dict, `.pth` (needs torch) or `.safetensors`.
"""

from __future__ import annotations

import os

import jax

from jaxres.models import create_model
from jaxres.models import model_names
from jaxres.models.units import UnitModel
from jaxres.weights.cache import fetch_torchvision_file
from jaxres.weights.descriptors import published_models, torchvision_weights
from jaxres.weights.head import fresh_classifier, warn_fresh_classifier
from jaxres.weights.hub import HUB_PREFIX, fetch_hub_file, hub_model_name, parse_hub_spec
from jaxres.weights.io import FORMAT, load_weights, read_weights_info
from jaxres.weights.state_dict import read_state_dict, state_dict_num_classes
from jaxres.weights.torchvision import from_torchvision

TORCHVISION_PREFIX = "torchvision:"


def list_models(filter: str | None = None, *, pretrained: bool = False) -> list[str]:
    """The zoo's models, as `jaxres.list_models`: registry names in registry order, all of them or
    those of a family (`filter`: "vgg", "resnet", "cifar_plain", ...) or of a shell pattern
    ("resnet*", "*vgg16*"); with `pretrained=True` only those with published ImageNet weights,
    which `jaxres.pretrained(name)` loads."""
    names = model_names(filter)
    if not pretrained:
        return names
    published = set(published_models())
    return [name for name in names if name in published]


def _without_classifier(variables: dict, model: UnitModel) -> dict:
    params = dict(variables["params"])
    params["head"] = {k: v for k, v in params["head"].items() if k != model.classifier_path()[-1]}
    if not params["head"]:
        del params["head"]
    return {**variables, "params": params}


def _replace_classifier(variables: dict, model: UnitModel, rng: jax.Array) -> dict:
    params = dict(variables["params"])
    head = dict(params["head"])
    head[model.classifier_path()[-1]] = fresh_classifier(model, rng)
    params["head"] = head
    return {**variables, "params": params}


def pretrained(
    name: str,
    weights: str | os.PathLike = "torchvision:DEFAULT",
    *,
    num_classes: int | None = None,
    rng: jax.Array | None = None,
    download: bool = True,
    **overrides,
) -> tuple[UnitModel, dict]:
    """(model, variables): registry model `name` with the weights spec `weights` loaded.

        model, variables = jaxres.pretrained("vgg16", "torchvision:IMAGENET1K_V1")
        model, variables = jaxres.pretrained("resnet50", "hf-hub:timm/resnet50.tv2_in1k")  # no torch
        model, variables = jaxres.pretrained("resnet50", "out/resnet50.safetensors", num_classes=10)

    `num_classes` defaults to the weights' own; 0 loads everything but the classifier (the model
    returns pooled features). With another number, everything but the last
    linear layer is loaded and that layer is initialized from `rng` (default
    `jax.random.key(0)`), with a warning. Overrides are `create_model`'s (e.g.
    `param_dtype=jnp.bfloat16`). `download=False` never touches the network. Errors name the
    bad spec, file or tensor and the fix.
    """
    rng = jax.random.key(0) if rng is None else rng
    if isinstance(weights, str) and weights.startswith(TORCHVISION_PREFIX):
        descriptor = torchvision_weights(name, weights[len(TORCHVISION_PREFIX):])
        state_dict = read_state_dict(fetch_torchvision_file(descriptor, download=download))
        return _from_state_dict(name, state_dict, num_classes, rng, overrides)
    if isinstance(weights, str) and weights.startswith(HUB_PREFIX):
        repo_id, _ = parse_hub_spec(weights)
        holds = hub_model_name(repo_id)
        if holds is not None and holds != name:
            raise ValueError(f"{weights} holds timm's {holds} weights, not {name}; load it as {holds!r}")
        state_dict = read_state_dict(fetch_hub_file(weights, download=download))
        return _from_state_dict(name, state_dict, num_classes, rng, overrides)
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a spec string or a path, got {type(weights).__name__}")
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights {path!r} is neither 'torchvision:<TAG>' (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT), "
            f"'hf-hub:OWNER/NAME' (e.g. hf-hub:timm/resnet50.tv2_in1k) nor an existing file"
        )
    if path.endswith(".safetensors") and _is_jaxres_file(path):
        info = read_weights_info(path)
        if info.model != name:
            raise ValueError(f"{path} holds {info.model} weights, not {name}; load it as {info.model!r}")
        native = create_model(name, num_classes=info.num_classes, **overrides)
        variables, _ = load_weights(path, native)
        if num_classes is None or num_classes == info.num_classes:
            return native, variables
        model = create_model(name, num_classes=num_classes, **overrides)
        if num_classes == 0:  # pooled features: the file's classifier is left out
            return model, _without_classifier(variables, model)
        warn_fresh_classifier(name, path, info.num_classes, model)
        return model, _replace_classifier(variables, model, rng)
    return _from_state_dict(name, read_state_dict(path), num_classes, rng, overrides)


def _from_state_dict(name: str, state_dict, num_classes: int | None, rng: jax.Array, overrides: dict):
    if num_classes is None:  # a fine-tuned state_dict keeps its own number of classes
        num_classes = state_dict_num_classes(state_dict)
    model = create_model(name, num_classes=num_classes, **overrides)
    return model, from_torchvision(state_dict, model, rng=rng)


def _is_jaxres_file(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
