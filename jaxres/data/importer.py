"""Offline import of the standard IDX files (MNIST, Fashion-MNIST) into a TFDS dataset.

The result is an ordinary prepared TFDS dataset in array_record format under
`<data_dir>/<name>/<version>/`, read by the same loader as the official builders' output
(`sources.load_source`). Images are stored as `Tensor` uint8 features: TFDS encodes those
without TensorFlow (its `Image` feature needs TensorFlow to PNG-encode), so importing needs
no TensorFlow either.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np

# Fashion-MNIST's class names (Xiao et al. 2017, arXiv 1708.07747) and MNIST's digits.
CLASS_NAMES = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "mnist": [str(d) for d in range(10)],
}
# The same version as the official TFDS builders, so either preparation satisfies the loader.
VERSIONS = {"fashion_mnist": "3.0.1", "mnist": "3.0.1"}
# IDX file stems (LeCun's naming, used by both datasets) and their split.
SPLIT_FILES = {"train": "train", "test": "t10k"}
IDX_DTYPES = {0x08: np.uint8}
IMAGE_SHAPE = (28, 28)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as an array: magic 0x0000TTNN, N big-endian
    uint32 dimensions, then the data (LeCun et al., the MNIST file format)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:  # not gzip, or a cut-off gzip stream
        raise ValueError(f"{path} is not a readable gzip file ({err}); download it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes: bad magic number 0x{data[:4].hex()} "
            f"(expected 0x000008NN, NN = the number of dimensions)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: expected a {header}-byte header for {ndim} dimensions, "
                         f"got {len(data)} bytes")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "corrupt (longer than its header says)"
        raise ValueError(f"{path} is {problem}: expected {expected} bytes for shape {tuple(dims)}, got {len(data)}")
    return np.frombuffer(data, IDX_DTYPES[data[2]], offset=header).reshape(dims)


def find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"{directory} has no {stem}[.gz]; expected the four standard IDX files "
        f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        f"t10k-labels-idx1-ubyte.gz)"
    )


def read_idx_split(directory, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of one split, checked for consistency."""
    directory = Path(directory)
    stem = SPLIT_FILES[split]
    images_path = find_idx(directory, f"{stem}-images-idx3-ubyte")
    labels_path = find_idx(directory, f"{stem}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{images_path} must hold 28x28 images, 3 dimensions (N, 28, 28); its header says "
                         f"{images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path} must hold labels, 1 dimension (N,); its header says {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.max(initial=0) > 9:
        raise ValueError(f"{labels_path}: labels must be 0..9, found {labels.max()}")
    return images, labels


def _builder_class(name: str):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import utils as tfds_utils

    class IdxImport(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A TFDS builder over IDX files already on disk (no download)."""

        VERSION = tfds.core.Version(VERSIONS[name])

        # TFDS looks for checksum files next to a builder's source through
        # importlib_resources, which may not be installed; this builder downloads nothing.
        @tfds_utils.classproperty
        @classmethod
        def code_path(cls):
            return None

        def __init__(self, *, source_dir: Path, **kwargs):
            self.source_dir = Path(source_dir)
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"{name} imported by `jaxres data import` from the standard IDX files.",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(*IMAGE_SHAPE, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES[name]),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in SPLIT_FILES}

        def _generate_examples(self, split):
            images, labels = read_idx_split(self.source_dir, split)
            for i in range(len(images)):
                yield i, {"image": images[i][..., None], "label": int(labels[i])}

    IdxImport.name = name
    return IdxImport


def import_idx(name: str, source_dir, data_dir) -> Path:
    """Writes `name` (fashion_mnist or mnist) from the IDX files in `source_dir` into
    `data_dir` as a prepared TFDS dataset; returns the dataset's directory. An existing
    prepared copy is left untouched. Every file is checked before anything is written, and
    TFDS writes into a temporary directory inside `data_dir`, renamed into place once
    complete: a failure leaves nothing half-written."""
    from jaxres.data.sources import check_data_dir

    if name not in CLASS_NAMES:
        raise ValueError(f"jaxres can import {', '.join(sorted(CLASS_NAMES))} from IDX files, not {name!r}")
    source_dir, data_dir = Path(source_dir), Path(data_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(
            f"IDX directory {source_dir} does not exist (Debian: apt-get install dataset-fashion-mnist puts "
            f"the files in /usr/share/datasets/fashion-mnist)"
        )
    check_data_dir(data_dir)
    for split in SPLIT_FILES:  # fail on a bad file before anything is written
        read_idx_split(source_dir, split)
    target = data_dir / name / VERSIONS[name]
    if (target / "dataset_info.json").is_file():
        return target
    if target.exists():
        raise FileExistsError(f"{target} exists but holds no prepared dataset (an interrupted preparation?); "
                              f"remove it and import again")
    made = [d for d in (data_dir, target.parent) if not d.exists()]
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-import-", dir=data_dir))
    try:
        builder = _builder_class(name)(source_dir=source_dir, data_dir=str(staging), file_format="array_record")
        builder.download_and_prepare()
        target.parent.mkdir(exist_ok=True)
        os.replace(builder.data_dir, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in reversed(made):  # created by this call, and left empty by a failure
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
    return target
