"""Offline import of the standard IDX files (MNIST, Fashion-MNIST) into a TFDS dataset.

The result is an ordinary prepared TFDS dataset in array_record format under
`<data_dir>/<name>/<version>/`, read by the same loader as the official builders' output
(`sources.load_source`). Images are stored as `Tensor` uint8 features: TFDS encodes those
without TensorFlow (its `Image` feature needs TensorFlow to PNG-encode), so importing needs
no TensorFlow either.
"""

from __future__ import annotations

import gzip
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


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as an array: magic 0x0000TTNN, N big-endian
    uint32 dimensions, then the data (LeCun et al., the MNIST file format)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(data)} bytes, the header promises {expected}")
    return np.frombuffer(data, IDX_DTYPES[data[2]], offset=4 + 4 * ndim).reshape(dims)


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
    images = read_idx(find_idx(directory, f"{stem}-images-idx3-ubyte"))
    labels = read_idx(find_idx(directory, f"{stem}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match")
    if labels.max(initial=0) > 9:
        raise ValueError(f"{directory}: {split} labels must be 0..9, found {labels.max()}")
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
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
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
    prepared copy is left untouched (TFDS reuses it)."""
    if name not in CLASS_NAMES:
        raise ValueError(f"jaxres can import {', '.join(sorted(CLASS_NAMES))} from IDX files, not {name!r}")
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(
            f"IDX directory {source_dir} does not exist (Debian: apt-get install dataset-fashion-mnist puts "
            f"the files in /usr/share/datasets/fashion-mnist)"
        )
    for split in SPLIT_FILES:  # fail on a bad file before TFDS creates anything
        read_idx_split(source_dir, split)
    import tensorflow_datasets as tfds

    builder = _builder_class(name)(source_dir=source_dir, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    )
    return Path(builder.data_dir)
