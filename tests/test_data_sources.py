"""Dataset sources: TFDS builders through tfds.testing.mock_data (no download), the
offline IDX importer, the synthetic dataset, and the messages for unprepared data."""

import gzip
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxres.data import dataset_spec, eval_batches, eval_transform, load_source, train_transform
from jaxres.data.importer import import_idx, read_idx


@pytest.mark.parametrize("name,shape", [("cifar10", (32, 32, 3)), ("cifar100", (32, 32, 3)),
                                        ("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1))])
def test_tfds_builders_load_through_data_source(name, shape, tmp_path):
    spec = dataset_spec(name)
    with tfds.testing.mock_data(num_examples=9):
        source = load_source(name, spec.eval_split, str(tmp_path))
        assert len(source) == 9
        assert source[0]["image"].shape == shape and source[0]["image"].dtype == np.uint8
        batches = list(eval_batches(source, batch_size=4, transform=eval_transform(
            spec.augment, spec.image_size, spec.mean, spec.std)))
    assert sum(b["mask"].sum() for b in batches) == 9
    assert batches[0]["image"].shape == (4, 32, 32, spec.channels)
    assert "tensorflow" not in sys.modules  # reading never imports TensorFlow


def test_imagenet_loads_through_data_source(tmp_path):
    spec = dataset_spec("imagenet2012")
    with tfds.testing.mock_data(num_examples=3):
        source = load_source("imagenet2012", "validation", str(tmp_path))
        records = [source[i] for i in range(3)]
    batch = train_transform(spec.augment, 224, spec.mean, spec.std)(records, np.random.default_rng(0))
    assert batch["image"].shape == (3, 224, 224, 3) and batch["label"].dtype == np.int32


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not prepared .*jaxres data prepare cifar10"):
        load_source("cifar10", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"jaxres data import fashion_mnist --from"):
        load_source("fashion_mnist", "train", str(tmp_path))


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar1'.*did you mean 'cifar10'"):
        dataset_spec("cifar1")


def test_synthetic_is_deterministic_and_has_an_odd_test_split():
    a, b = load_source("synthetic", "test"), load_source("synthetic", "test")
    assert len(a) == 257
    assert np.array_equal(a[5]["image"], b[5]["image"]) and a[5]["label"] == b[5]["label"]
    assert a[0]["image"].shape == (32, 32, 3) and a[0]["image"].dtype == np.uint8


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """A miniature Fashion-MNIST in the standard IDX layout: 7 train and 5 test images."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for stem, n in (("train", 7), ("t10k", 5)):
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return root


def test_idx_import_round_trips_pixels_and_labels(idx_dir, tmp_path):
    path = import_idx("fashion_mnist", idx_dir, tmp_path)
    assert path == tmp_path / "fashion_mnist" / "3.0.1"
    images = read_idx(idx_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(idx_dir / "t10k-labels-idx1-ubyte.gz")
    source = load_source("fashion_mnist", "test", str(tmp_path))
    assert len(source) == 5 and len(load_source("fashion_mnist", "train", str(tmp_path))) == 7
    got = sorted((int(r["label"]), r["image"][..., 0].tobytes()) for r in (source[i] for i in range(5)))
    assert got == sorted((int(l), im.tobytes()) for l, im in zip(labels, images))


def test_truncated_idx_file_is_rejected(idx_dir, tmp_path):
    bad = tmp_path / "src"
    bad.mkdir()
    for f in idx_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    data = gzip.decompress((bad / "t10k-images-idx3-ubyte.gz").read_bytes())
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-10]))
    with pytest.raises(ValueError, match="is truncated: expected"):
        import_idx("fashion_mnist", bad, tmp_path / "data")
    assert not (tmp_path / "data").exists()  # nothing half-written


def test_missing_idx_directory_names_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        import_idx("fashion_mnist", tmp_path / "nowhere", tmp_path)
