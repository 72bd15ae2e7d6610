"""The jaxres weights file: one safetensors file with a checksum and what model it is for.

Format (version 1), documented so that any safetensors reader can use it:

- tensors: every leaf of the Flax variables, named by its path joined with "/", e.g.
  `params/stem/conv1/kernel` (HWIO), `params/head/fc/kernel` (in, out),
  `batch_stats/unit_1/norm1/mean`; arrays in the model's layout (NHWC models) and dtype.
- metadata (safetensors' string -> string header):
  `format` = "jaxres.weights", `format_version` = "1", `model` = registry name,
  `num_classes`, `source` (free text: where the weights came from), `preprocessing` (JSON of
  `descriptors.Preprocessing`, or "" when unknown), `jaxres_version`, and `sha256`: the
  SHA-256 of the tensors in sorted name order, each hashed as its name, dtype, shape and
  C-order bytes (see `tensors_sha256`). safetensors validates the header and offsets but not
  the bytes; the checksum catches a damaged or edited file.
  Optional: `config`, the JSON of the `jaxres train` config whose run made the weights (the
  model's overrides, its dataset and seed: what rebuilds the model it was trained as, see
  `jaxres.analysis.restore`); readers that do not know it ignore it.

Loading checks the format, the checksum, the model name, and every shape and dtype against
the model's own variables, and reports all mismatches at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxres.trees import differences, leaf_table, listed

FORMAT = "jaxres.weights"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
# The metadata a reader cannot do without, and what each says.
REQUIRED_METADATA = {
    "model": "the registry name the weights are for",
    "num_classes": "the classifier's width",
    "sha256": "the checksum of the tensors",
}


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """The metadata of a jaxres weights file."""

    path: str
    model: str
    num_classes: int
    source: str
    preprocessing: dict | None  # the Preprocessing fields, or None when unknown
    sha256: str
    format_version: str
    jaxres_version: str
    config: dict | None = None  # the training config of the run that made the weights, when recorded


def tensors_sha256(flat: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the tensors in sorted name order: name, dtype, shape, C-order bytes."""
    digest = hashlib.sha256()
    for name in sorted(flat):
        array = np.ascontiguousarray(flat[name])
        digest.update(f"{name}\0{array.dtype.name}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _flatten(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError(
            f"variables must be a Flax variables dict with a 'params' collection, got {type(variables).__name__}"
        )
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    return {name: np.asarray(jax.device_get(value)) for name, value in flat.items()}


def save_weights(
    path: str | os.PathLike,
    variables: Mapping[str, Any],
    model: str,
    *,
    num_classes: int,
    source: str = "",
    preprocessing: Any = None,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes `variables` (the Flax dict of `model`) as a jaxres weights file; returns the path.

    `preprocessing`: a `descriptors.Preprocessing` (or a dict of its fields) recorded for users;
    `config`: the `jaxres train` config (its JSON dict) of the run the weights come from.
    Never replaces an existing file unless `overwrite`; writes to a temporary name first and
    renames, so an interrupted save leaves no half-written file under `path`.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"jaxres weights files end in {SUFFIX}; got {str(path)!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it, or another path")
    if dataclasses.is_dataclass(preprocessing):
        preprocessing = dataclasses.asdict(preprocessing)
    flat = _flatten(variables)
    from jaxres import __version__

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": str(model),
        "num_classes": str(int(num_classes)),
        "source": source,
        "preprocessing": json.dumps(preprocessing) if preprocessing else "",
        "jaxres_version": __version__,
        "sha256": tensors_sha256(flat),
    }
    if config:
        metadata["config"] = json.dumps(dict(config), sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(flat, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def read_weights_info(path: str | os.PathLike) -> WeightsInfo:
    """The metadata of a jaxres weights file, without reading its tensors."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such weights file: {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a jaxres weights file (no format={FORMAT!r} in its metadata); a torchvision "
            f"state_dict converts with `jaxres convert torchvision` or jaxres.weights.from_torchvision"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has jaxres weights format version {meta.get('format_version')!r}; this jaxres reads "
            f"version {FORMAT_VERSION}: upgrade jaxres"
        )
    missing = [key for key in REQUIRED_METADATA if not meta.get(key)]
    if missing:
        raise ValueError(
            f"{path} is marked as a jaxres weights file but its metadata has no {', '.join(missing)} "
            f"({'; '.join(REQUIRED_METADATA[key] for key in missing)}): it was not written by "
            f"jaxres.weights.save_weights or was edited; convert the original weights again (jaxres convert)"
        )
    try:
        config = json.loads(meta["config"]) if meta.get("config") else None
    except json.JSONDecodeError:
        config = "unreadable"
    if not (config is None or isinstance(config, dict)):
        raise ValueError(f"{path}: its metadata's config is not a JSON object; the file was edited: export the "
                         f"weights again (jaxres.weights.save_weights)")
    if not meta["num_classes"].isdigit():
        raise ValueError(f"{path}: its metadata's num_classes must be a whole number, got {meta['num_classes']!r}; "
                         f"the file was edited: convert the original weights again (jaxres convert)")
    return WeightsInfo(
        path=path,
        model=meta["model"],
        num_classes=int(meta["num_classes"]),
        source=meta.get("source", ""),
        preprocessing=json.loads(meta["preprocessing"]) if meta.get("preprocessing") else None,
        sha256=meta["sha256"],
        format_version=meta["format_version"],
        jaxres_version=meta.get("jaxres_version", ""),
        config=config,
    )


def check_variables(flat: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """Raises one ValueError listing every missing, unexpected, wrong-shape or wrong-dtype leaf."""
    problems = differences(leaf_table(dict(flat)), leaf_table(dict(expected)))
    if problems:
        hint = ""
        if any("has dtype" in p for p in problems):
            hint = ("\n  to change dtypes, load into a model with the file's dtypes and cast: "
                    "jax.tree.map(lambda a: a.astype(dtype), variables)")
        raise ValueError(f"{what}: {len(problems)} mismatch(es) with the model's variables:\n  "
                         f"{listed(problems, 15, chr(10) + '  ')}{hint}")


def read_weights(path: str | os.PathLike) -> tuple[dict, WeightsInfo]:
    """A jaxres weights file's variables (numpy, nested as Flax's) and metadata, its format and
    checksum checked but not its shapes: for readers that check them against a model built
    from `info.config` themselves (`jaxres.analysis.restore`)."""
    from safetensors.numpy import load_file

    info = read_weights_info(path)
    flat = load_file(info.path)
    _check_checksum(flat, info)
    return traverse_util.unflatten_dict(flat, sep="/"), info


def _check_checksum(flat: Mapping[str, np.ndarray], info: WeightsInfo) -> None:
    if tensors_sha256(flat) != info.sha256:
        raise ValueError(
            f"{info.path} fails its checksum (sha256 of its tensors differs from the recorded "
            f"{info.sha256[:12]}...): the file is damaged or was modified; convert or copy it again"
        )


def load_weights(path: str | os.PathLike, model=None) -> tuple[dict, WeightsInfo]:
    """Reads a jaxres weights file -> (Flax variables, WeightsInfo).

    `model`: the registry name the file must be for, or a jaxres model whose variables the
    file must match exactly (shapes and dtypes); default: the file's own model at its
    num_classes. A wrong model, checksum, shape or dtype raises a ValueError naming each.
    """
    from safetensors.numpy import load_file

    from jaxres.models import create_model
    from jaxres.models.complexity import abstract_variables
    from jaxres.models.units import UnitModel

    info = read_weights_info(path)
    if isinstance(model, str) and model != info.model:
        raise ValueError(f"{info.path} holds {info.model} weights, not {model}; load it as {info.model!r}")
    if model is None or isinstance(model, str):
        model = create_model(info.model, num_classes=info.num_classes)
    elif not isinstance(model, UnitModel):
        raise TypeError(f"model must be a registry name or a jaxres model, got {type(model).__name__}")
    flat = load_file(info.path)
    _check_checksum(flat, info)
    expected = traverse_util.flatten_dict(abstract_variables(model, 32), sep="/")
    check_variables(flat, expected, f"{info.path} ({info.model})")
    variables = traverse_util.unflatten_dict({name: jnp.asarray(a) for name, a in flat.items()}, sep="/")
    return variables, info
