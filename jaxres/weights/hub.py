"""torchvision's weights as timm republishes them on the Hugging Face Hub: no torch needed.

A spec "hf-hub:timm/resnet50.tv2_in1k" names the Hub repository `timm/resnet50.tv2_in1k`;
its `model.safetensors` holds torchvision's IMAGENET1K_V2 ResNet-50 state_dict under
torchvision's module names. timm's VGG differs in the classifier only: torchvision's
`classifier.0/3/6` Linear layers are timm's `pre_logits.fc1` (a 7x7 conv, OIHW
(4096, 512, 7, 7)), `pre_logits.fc2` (a 1x1 conv) and `head.fc`, the same numbers reshaped
(timm's vgg.py `_filter_fn`); `state_dict.unwrap_state_dict` undoes that exactly.

The file is read through the huggingface_hub cache (`$HF_HUB_CACHE`, default
`$HF_HOME/hub`, `~/.cache/huggingface/hub`), offline first: a cached file is used without
any network call, and a download is tried only when it is missing, `download=True` and
`HF_HUB_OFFLINE` is not set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from jaxres.weights.cache import WeightsUnavailableError

HUB_PREFIX = "hf-hub:"
HUB_FILENAME = "model.safetensors"

_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """"hf-hub:OWNER/NAME[@REVISION]" -> (repo id, revision or None)."""
    if not spec.startswith(HUB_PREFIX):
        raise ValueError(f"a Hub weights spec starts with {HUB_PREFIX!r}, got {spec!r}")
    repo_id, _, revision = spec[len(HUB_PREFIX):].partition("@")
    if not _REPO_ID.fullmatch(repo_id):
        raise ValueError(
            f"{spec!r} names no Hub repository: write {HUB_PREFIX}OWNER/NAME, e.g. 'hf-hub:timm/resnet50.tv2_in1k'"
        )
    return repo_id, revision or None


def hub_model_name(repo_id: str) -> str | None:
    """The timm architecture a `timm/ARCH.TAG` repository holds (None for other owners)."""
    owner, name = repo_id.split("/", 1)
    return name.split(".", 1)[0] if owner == "timm" else None


def hub_cache_dir() -> Path:
    """huggingface_hub's cache directory, computed as huggingface_hub does, from the
    environment at call time: $HF_HUB_CACHE, else $HF_HOME/hub, where HF_HOME defaults to
    $XDG_CACHE_HOME/huggingface, i.e. ~/.cache/huggingface."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return Path(os.path.expanduser(os.environ.get("HF_HOME", os.path.join(cache, "huggingface")))) / "hub"


def hub_cache_path(repo_id: str) -> Path:
    """The cache folder of `repo_id` (its files sit under snapshots/<commit>/)."""
    return hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"


def _offline_by_environment() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def fetch_hub_file(spec: str, *, download: bool = True) -> Path:
    """The cached `model.safetensors` of Hub spec `spec`, downloading it into the cache if
    needed and allowed. Raises WeightsUnavailableError naming the repository, the cache path
    and how to fetch the file when it is absent and cannot be downloaded."""
    repo_id, revision = parse_hub_spec(spec)
    folder = hub_cache_path(repo_id)
    wanted = f"{folder}/snapshots/<commit>/{HUB_FILENAME}"
    fix = (
        f"on a machine with internet run `hf download {repo_id} {HUB_FILENAME}` and copy {folder} "
        f"into this machine's cache {hub_cache_dir()}, or pass the downloaded {HUB_FILENAME}'s path as weights"
    )
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError  # here in 0.23 to 2.x alike
    except ImportError:
        raise WeightsUnavailableError(
            f"reading {spec} needs huggingface_hub (pip install 'jaxres[hub]'); or download "
            f"https://huggingface.co/{repo_id}/resolve/main/{HUB_FILENAME} and pass its path as weights"
        ) from None

    def get(local_files_only: bool) -> Path:
        return Path(hf_hub_download(repo_id, HUB_FILENAME, revision=revision, cache_dir=hub_cache_dir(),
                                    local_files_only=local_files_only))

    try:
        return get(local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if not download or _offline_by_environment():
        why = "download=False" if not download else "HF_HUB_OFFLINE is set"
        raise WeightsUnavailableError(f"{HUB_FILENAME} of {repo_id} is not in the Hub cache ({wanted}) and {why}; {fix}")
    try:
        return get(local_files_only=False)
    except (HfHubHTTPError, OSError, ValueError) as err:  # not found, no network, a gated repository
        raise WeightsUnavailableError(
            f"cannot download {HUB_FILENAME} of {repo_id} into the Hub cache ({wanted}): {err}; {fix}"
        ) from None

