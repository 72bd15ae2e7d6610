"""Random-access data sources: TFDS datasets read through `tfds` array_record files (no
TensorFlow at training time) and the in-memory `synthetic` dataset.

A source is any object with `__len__` and `__getitem__(i) -> {"image": uint8 HWC, "label": int}`,
which is what `grain.MapDataset.source` needs. `DATASETS` records, per dataset, what the input
pipeline must know: image size, channels, classes, normalization statistics and which paper
augmentation applies.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from jaxres.data.synthetic import SyntheticSource
from jaxres.choices import pick
from jaxres.imagenet_stats import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline needs to know about one dataset (images are uint8, NHWC)."""

    name: str
    image_size: int  # side of the square model input after the eval transform
    channels: int
    num_classes: int
    mean: tuple[float, ...]  # per-channel statistics of pixels scaled to [0, 1]
    std: tuple[float, ...]
    augment: str  # key of transforms.TRAIN_TRANSFORMS
    train_split: str = "train"
    eval_split: str = "test"
    prepare: str = "download"  # "download" | "manual" | "import" | "builtin"


DATASETS: dict[str, DatasetSpec] = {
    # Statistics: the per-channel mean/std of the training split's pixels in [0, 1] (the
    # values torchvision users quote; tests recompute Fashion-MNIST's from the real files).
    "cifar10": DatasetSpec("cifar10", 32, 3, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar"),
    "cifar100": DatasetSpec("cifar100", 32, 3, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar"),
    "mnist": DatasetSpec("mnist", 32, 1, 10, (0.1307,), (0.3081,), "mnist"),
    "fashion_mnist": DatasetSpec("fashion_mnist", 32, 1, 10, (0.2860,), (0.3530,), "mnist", prepare="import"),
    "imagenet2012": DatasetSpec(
        "imagenet2012", 224, 3, 1000, IMAGENET_MEAN, IMAGENET_STD, "imagenet",
        eval_split="validation", prepare="manual",
    ),
    "synthetic": DatasetSpec("synthetic", 32, 3, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cifar", prepare="builtin"),
}


def dataset_spec(name: str) -> DatasetSpec:
    return pick("dataset", name, DATASETS)


def default_data_dir() -> str:
    """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or str(Path("~/tensorflow_datasets").expanduser())


def how_to_prepare(name: str, data_dir: str) -> str:
    """The command a user runs to make `name` readable, for error messages and the CLI."""
    spec = dataset_spec(name)
    if spec.prepare == "import":
        return (
            f"run `jaxres data import {name} --from DIR --data-dir {data_dir}` with DIR holding the IDX "
            f"files (Debian: apt-get install dataset-fashion-mnist; DIR=/usr/share/datasets/fashion-mnist), "
            f"or `jaxres data prepare {name} --data-dir {data_dir}` (downloads; needs pip install 'jaxres[prepare]')"
        )
    manual = " --manual-dir DIR_WITH_THE_ILSVRC2012_TARS" if spec.prepare == "manual" else ""
    return (
        f"run `pip install 'jaxres[prepare]'` (TensorFlow encodes the images once) and then "
        f"`jaxres data prepare {name}{manual} --data-dir {data_dir}`"
    )


def check_data_dir(data_dir) -> None:
    """Refuses a data_dir that exists but is not a directory (it would look "not prepared")."""
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise NotADirectoryError(
            f"data_dir {str(data_dir)!r} is a file; data_dir must be a directory (the TFDS data dir holding "
            f"<dataset>/<version>/): pass another --data-dir (or --config.data_dir) or move the file away"
        )


def prepared_dir(name: str, data_dir: str) -> Path | None:
    """The newest `<data_dir>/<name>/<version>` holding a prepared dataset, or None."""
    check_data_dir(data_dir)
    root = Path(data_dir) / name
    if not root.is_dir():
        return None
    versions = [d for d in root.iterdir() if d.is_dir() and (d / "dataset_info.json").is_file()]

    def version_key(d):
        return tuple(int(p) if p.isdigit() else -1 for p in d.name.split("."))

    return max(versions, key=version_key) if versions else None


def load_source(name: str, split: str, data_dir: str | None = None, *, seed: int = 0):
    """A random-access source of `{"image": uint8 (H, W, C), "label": int}` records.

    TFDS datasets must be prepared in array_record format (see `how_to_prepare`); reading
    them needs no TensorFlow. The features are read from the prepared files, so datasets
    written by `jaxres data import` load the same way as the official builders' output.
    """
    spec = dataset_spec(name)
    if name == "synthetic":
        return SyntheticSource(split, spec.image_size, spec.channels, spec.num_classes, seed=seed)
    data_dir = str(data_dir or default_data_dir())
    import tensorflow_datasets as tfds  # deferred: importing TFDS takes seconds

    found = prepared_dir(name, data_dir)
    if found is not None:
        builder = tfds.builder_from_directory(str(found))
    else:
        builder = tfds.builder(name, data_dir=data_dir)
        # tfds.testing.mock_data patches as_data_source, so only insist on prepared files
        # when nothing is mocked.
        if not builder.is_prepared() and not _mocked(tfds):
            raise FileNotFoundError(f"dataset {name!r} is not prepared in {data_dir}; {how_to_prepare(name, data_dir)}")
    if split not in builder.info.splits and not _mocked(tfds):
        raise ValueError(
            f"dataset {name!r} has no split {split!r} (it has {', '.join(sorted(builder.info.splits))})"
        )
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError as err:  # prepared as tfrecord: not random-access
        raise FileNotFoundError(
            f"dataset {name!r} in {data_dir} is prepared as TFRecord, which has no random access; "
            f"prepare it again as array_record: {how_to_prepare(name, data_dir)} ({err})"
        ) from None


def _mocked(tfds) -> bool:
    # mock_data swaps DatasetBuilder.as_data_source for a function defined in its own module.
    method = tfds.core.DatasetBuilder.as_data_source
    return "mock" in getattr(method, "__module__", "") or "mock" in getattr(method, "__qualname__", "")
