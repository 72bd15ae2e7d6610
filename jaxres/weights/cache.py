"""torchvision's download cache: where `torchvision.models.resnet50(weights=...)` keeps its
files ($TORCH_HOME/hub/checkpoints), found without importing torch, and filled with torch's
own downloader when a file is missing."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from jaxres.weights.descriptors import WeightDescriptor


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
        importlib.import_module("torch.hub")
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
