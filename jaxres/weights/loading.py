"""Pretrained models: `(model, variables)` from a weights spec.

Flax modules hold no parameters, so a pretrained model is the pair

    model, variables = jaxres.pretrained("resnet50", weights="torchvision:IMAGENET1K_V2")
    logits = model.apply(variables, images_nhwc)          # eval mode, float32 logits

A weights spec is one of
- "torchvision:IMAGENET1K_V1" / "torchvision:IMAGENET1K_V2" / "torchvision:DEFAULT":
  torchvision's published file, taken from torchvision's own cache
  (`$TORCH_HOME/hub/checkpoints`, as `torchvision.models.resnet50(weights=...)` uses it) or
  downloaded into it (needs torch and internet), then converted;
- the path of a jaxres weights file (`jaxres convert` writes them; no torch needed);
- the path of a torchvision state_dict, `.pth` (needs torch) or `.safetensors`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax

from jaxres.models import create_model
from jaxres.models.units import UnitModel
from jaxres.weights.descriptors import WeightDescriptor, torchvision_weights
from jaxres.weights.head import classifier_path, fresh_classifier
from jaxres.weights.io import FORMAT, load_weights, read_weights_info
from jaxres.weights.state_dict import read_state_dict, state_dict_num_classes
from jaxres.weights.torchvision import from_torchvision

TORCHVISION_PREFIX = "torchvision:"


class WeightsUnavailableError(FileNotFoundError):
    """Published weights that are neither in the local cache nor downloadable now."""


def torch_hub_dir() -> Path:
    """torch.hub.get_dir(), computed without importing torch: $TORCH_HOME/hub, where
    TORCH_HOME defaults to $XDG_CACHE_HOME/torch, i.e. ~/.cache/torch."""
    try:
        import torch.hub

        return Path(torch.hub.get_dir())
    except ImportError:
        cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        return Path(os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(cache, "torch")))) / "hub"


def torchvision_cache_path(descriptor: WeightDescriptor) -> Path:
    """Where torchvision keeps (or would download) this file."""
    return torch_hub_dir() / "checkpoints" / descriptor.filename


def _download(url: str, destination: Path, hash_prefix: str) -> None:
    import torch.hub

    destination.parent.mkdir(parents=True, exist_ok=True)
    # torch's own downloader: writes a temporary file, checks the sha256 prefix, then renames.
    torch.hub.download_url_to_file(url, str(destination), hash_prefix=hash_prefix, progress=True)


def fetch_torchvision_file(descriptor: WeightDescriptor, *, download: bool = True) -> Path:
    """The cached torchvision file of `descriptor`, downloading it into the cache if needed.

    A file already in the cache is used as is (as torchvision does); a download is checked
    against the sha256 prefix in its name. Raises WeightsUnavailableError naming the URL and
    the cache path when the file is absent and cannot be downloaded.
    """
    cached = torchvision_cache_path(descriptor)
    if cached.is_file():
        return cached
    fix = (
        f"download {descriptor.url} on a machine with internet and copy it to {cached}, or run "
        f"`jaxres convert torchvision --model {descriptor.model} --from {descriptor.filename} --out DIR` "
        f"where the file is and load the result with weights='DIR/{descriptor.model}.safetensors'"
    )
    if not download:
        raise WeightsUnavailableError(f"{descriptor.filename} is not in torchvision's cache ({cached}); {fix}")
    try:
        import torch.hub  # noqa: F401
    except ImportError:
        raise WeightsUnavailableError(
            f"{descriptor.spec} weights of {descriptor.model} are not in torchvision's cache ({cached}) and "
            f"downloading and reading them needs torch (pip install 'jaxres[torch]'); or {fix}"
        ) from None
    try:
        _download(descriptor.url, cached, descriptor.sha256_prefix)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise WeightsUnavailableError(
            f"cannot download {descriptor.url} into torchvision's cache {cached} ({err}); {fix}"
        ) from None
    return cached


def _replace_classifier(variables: dict, model: UnitModel, rng: jax.Array) -> dict:
    params = dict(variables["params"])
    head = dict(params["head"])
    head[classifier_path(model)[-1]] = fresh_classifier(model, rng)
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
        model, variables = jaxres.pretrained("resnet50", "out/resnet50.safetensors", num_classes=10)

    `num_classes` defaults to the weights' own. With another number, everything but the last
    linear layer is loaded and that layer is initialized from `rng` (default
    `jax.random.key(0)`), with a warning. Overrides are `create_model`'s (e.g.
    `param_dtype=jnp.bfloat16`). `download=False` never touches the network. Errors name the
    bad spec, file or tensor and the fix.
    """
    rng = jax.random.key(0) if rng is None else rng
    if isinstance(weights, str) and weights.startswith(TORCHVISION_PREFIX):
        descriptor = torchvision_weights(name, weights[len(TORCHVISION_PREFIX):])
        state_dict = read_state_dict(fetch_torchvision_file(descriptor, download=download))
        model = create_model(name, num_classes=num_classes, **overrides)
        return model, from_torchvision(state_dict, model, rng=rng)
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a spec string or a path, got {type(weights).__name__}")
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weights {path!r} is neither 'torchvision:<TAG>' (IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT) nor an "
            f"existing file"
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
        warnings.warn(
            f"{name}: {path} classifies {info.num_classes} classes, the model {num_classes}; loaded "
            f"everything but the last linear layer, which is freshly initialized",
            stacklevel=2,
        )
        return model, _replace_classifier(variables, model, rng)
    state_dict = read_state_dict(path)
    if num_classes is None:  # a fine-tuned state_dict keeps its own number of classes
        num_classes = state_dict_num_classes(state_dict)
    model = create_model(name, num_classes=num_classes, **overrides)
    return model, from_torchvision(state_dict, model, rng=rng)


def load_pretrained(model_name: str, weights: str | os.PathLike, *, num_classes: int | None = None, **kwargs) -> dict:
    """The variables of `pretrained(model_name, weights, ...)`, for a model built with the
    same `num_classes` and overrides (`jaxres.create_model(model_name, num_classes=...)`)."""
    return pretrained(model_name, weights, num_classes=num_classes, **kwargs)[1]


def _is_jaxres_file(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
