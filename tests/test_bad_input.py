"""Bad input is refused before any work, with a message that names what is wrong and what to
do: no silently wrong results, no tracebacks."""

import gzip
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxres.analysis.study
import jaxres.data.importer
from jaxres.cli import main
from jaxres.data import load_source
from jaxres.data.importer import import_idx
from jaxres.models import VGG, cifar_vgg, vgg
from jaxres.train import apply_overrides, load_config
from jaxres.train.loop import Run
from tests.conftest import tiny_cifar_resnet
from tests.test_data_sources import write_idx

KEY = jax.random.key(0)
# Three conv units, each followed by a 2x2/2 max pool: the smallest input is 2**3 = 8.
POOLED_THRICE = dict(layers=(4, "M", 8, "M", 8, "M"), num_classes=3, pool_size=1, classifier_widths=())


def shapes_of_init(model, hw):
    """The variables' shapes (traced, nothing computed): where the input checks run."""
    return jax.eval_shape(model.init, KEY, jnp.zeros((1, hw, hw, model.in_channels)))


# --- models -----------------------------------------------------------------------------

@pytest.mark.parametrize("model, smallest", [
    (VGG(**POOLED_THRICE), 8),
    (vgg(16), 32),  # torchvision's layout: 5 pools, so 224 can shrink to 32 but not to 31
    (cifar_vgg(11), 32),
])
def test_vgg_refuses_an_input_its_max_pools_would_empty(model, smallest):
    # unchecked, 7x7 into three pools leaves a 0x0 map and NaN logits
    shapes_of_init(model, smallest)  # the smallest input is fine
    with pytest.raises(ValueError, match=rf"input to 'stem' must be at least {smallest}x{smallest}: its \d max "
                                         rf"pools .* NaN logits; got shape \(1, {smallest - 1}, {smallest - 1}, 3\)"):
        shapes_of_init(model, smallest - 1)


def test_vgg_unit_range_counts_only_its_own_pools():
    model = VGG(**POOLED_THRICE)
    variables = shapes_of_init(model, 8)
    out = jax.eval_shape(lambda v, h: model.apply(v, h, start="unit_1"), variables, jnp.zeros((1, 4, 4, 4)))
    assert out.shape == (1, 3)
    with pytest.raises(ValueError, match=r"input to 'unit_1' must be at least 4x4: its 2 max pools"):
        jax.eval_shape(lambda v, h: model.apply(v, h, start="unit_1"), variables, jnp.zeros((1, 3, 3, 4)))


@pytest.mark.parametrize("model", [tiny_cifar_resnet(), VGG(**POOLED_THRICE, norm="batchnorm")],
                         ids=["resnet", "vgg"])
def test_train_mode_refuses_an_empty_batch(model):
    # unchecked, BatchNorm's mean over 0 examples writes NaN into batch_stats
    variables = shapes_of_init(model, 8)
    empty = jnp.zeros((0, 8, 8, 3))
    with pytest.raises(ValueError, match=r"train-mode apply needs a non-empty batch .*got shape \(0, 8, 8, 3\)"):
        jax.eval_shape(lambda v, x: model.apply(v, x, True, mutable=["batch_stats"]), variables, empty)
    # eval mode on an empty batch is harmless: empty logits (VGG's flatten used to divide by 0)
    assert jax.eval_shape(lambda v, x: model.apply(v, x), variables, empty).shape == (0, model.num_classes)


# --- config files -------------------------------------------------------------------------

def test_config_with_a_syntax_error_names_file_and_line(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("from jaxres.train.config import base_config\n\ndef get_config(:\n    return base_config()\n")
    with pytest.raises(ValueError, match=re.escape(f"config file {config}, line 3: SyntaxError: invalid syntax: "
                                                   f"def get_config(:")):
        load_config(str(config))


def test_config_whose_get_config_raises_names_file_and_line(tmp_path):
    config = tmp_path / "raises.py"
    config.write_text("def get_config():\n    widths = {}\n    return widths['missing']\n")
    with pytest.raises(ValueError, match=re.escape(f"config file {config}, line 3: KeyError: 'missing'")):
        load_config(str(config))


# --- data -----------------------------------------------------------------------------------

def idx_files(root, train=7, test=5, size=28, labels_short_by=0):
    """A miniature Fashion-MNIST in the standard IDX layout (as tests/test_data_sources.py)."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for stem, n in (("train", train), ("t10k", test)):
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, size, size)))
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n - labels_short_by,)))
    return root


def truncated_gzip(path):
    return path.read_bytes()[:100]


def truncated_idx(path):
    return gzip.compress(gzip.decompress(path.read_bytes())[:-10])


def bad_magic(path):
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[2] = 0x0D  # float32, which no MNIST file holds
    return gzip.compress(bytes(data))


def two_dims(path):
    data = gzip.decompress(path.read_bytes())  # (5, 28, 28) -> header of (5, 784)
    return gzip.compress(bytes([0, 0, 8, 2]) + (5).to_bytes(4, "big") + (784).to_bytes(4, "big") + data[16:])


@pytest.mark.parametrize("damage, message", [
    (lambda p: b"<html>404 not found</html>", r"is not a readable gzip file \(Not a gzipped file"),
    (truncated_gzip, r"is not a readable gzip file \(Compressed file ended"),
    (bad_magic, r"is not an IDX file of unsigned bytes: bad magic number 0x00000d03"),
    (truncated_idx, r"is truncated: expected 3936 bytes for shape \(5, 28, 28\), got 3926"),
    (two_dims, r"must hold 28x28 images, 3 dimensions \(N, 28, 28\); its header says \(5, 784\)"),
], ids=["not-gzip", "truncated-gzip", "bad-magic", "truncated-idx", "two-dims"])
def test_damaged_idx_file_is_named_and_nothing_is_written(tmp_path, capsys, damage, message):
    source = idx_files(tmp_path / "idx")
    bad = source / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(damage(bad))
    data_dir = tmp_path / "data"
    assert main(["data", "import", "fashion_mnist", "--from", str(source), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert f"jaxres data: error: {bad} " in err
    assert re.search(message, err), err
    assert not data_dir.exists()


@pytest.mark.parametrize("files, message", [
    (dict(labels_short_by=1), r"train-images-idx3-ubyte.gz has 7 images but \S+train-labels-idx1-ubyte.gz has 6 labels"),
    (dict(size=27), r"train-images-idx3-ubyte.gz must hold 28x28 images.*its header says \(7, 27, 27\)"),
], ids=["label-count", "image-size"])
def test_inconsistent_idx_files_are_named_and_nothing_is_written(tmp_path, files, message):
    # Before, 27x27 images passed the checks and TFDS failed mid-write, leaving downloads/ and
    # fashion_mnist/ behind.
    with pytest.raises(ValueError, match=message):
        import_idx("fashion_mnist", idx_files(tmp_path / "idx", **files), tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_import_failing_while_writing_leaves_nothing(tmp_path, monkeypatch):
    source = idx_files(tmp_path / "idx")
    real, calls = jaxres.data.importer.read_idx_split, []

    def read_then_fail(directory, split):  # the checks pass; TFDS's generation then fails
        calls.append(split)
        if len(calls) > 2:
            raise OSError("No space left on device")
        return real(directory, split)

    monkeypatch.setattr(jaxres.data.importer, "read_idx_split", read_then_fail)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(OSError, match="No space left on device"):
        import_idx("fashion_mnist", source, data_dir)
    assert list(data_dir.iterdir()) == []


def test_import_leaves_only_the_dataset_in_the_data_dir(tmp_path):
    path = import_idx("fashion_mnist", idx_files(tmp_path / "idx"), tmp_path / "data")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["fashion_mnist"]  # no downloads/, no staging
    assert path == tmp_path / "data" / "fashion_mnist" / "3.0.1"
    assert len(load_source("fashion_mnist", "test", str(tmp_path / "data"))) == 5


def test_data_dir_that_is_a_file_is_named(tmp_path, capsys):
    # not to be reported as "not prepared in FILE"
    file = tmp_path / "data.tar"
    file.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=re.escape(f"data_dir '{file}' is a file; data_dir must be a directory")):
        load_source("fashion_mnist", "test", str(file))
    assert main(["data", "list", "--data-dir", str(file)]) == 2
    assert "is a file; data_dir must be a directory" in capsys.readouterr().err


# --- CLI --------------------------------------------------------------------------------------

def test_models_with_no_match_says_so_and_suggests(capsys):
    # not an empty table and exit 0
    assert main(["models", "nonsense"]) == 2
    assert "jaxres models: error: no model has a name containing 'nonsense'" in capsys.readouterr().err
    assert main(["models", "resnt5"]) == 2
    assert "did you mean 'resnet50'" in capsys.readouterr().err


def test_convert_out_that_is_a_file_is_refused_before_reading_anything(tmp_path, capsys):
    out = tmp_path / "weights.bin"
    out.write_bytes(b"keep me")
    # The source does not exist: the --out error comes first, before any reading or converting.
    assert main(["convert", "torchvision", "--from", str(tmp_path / "absent.pth"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is a file; --out must be a directory (for MODEL.safetensors) or a .safetensors path" in err
    assert out.read_bytes() == b"keep me"


@pytest.fixture
def study_must_not_run(monkeypatch):
    def run_study(*args, **kwargs):
        raise AssertionError("the study ran before --out was checked")

    monkeypatch.setattr(jaxres.analysis.study, "run_study", run_study)


@pytest.mark.parametrize("make_out, message", [
    (lambda tmp: tmp / "results.txt", "is a file; --out must be a directory"),
    (lambda tmp: tmp / "results.txt" / "run1", "is under {tmp}/results.txt, which is a file"),
], ids=["file", "under-a-file"])
def test_analyze_out_unusable_is_refused_before_the_study(tmp_path, capsys, study_must_not_run, make_out, message):
    # unchecked, it would fail only when writing results.json, after the whole study
    (tmp_path / "results.txt").write_text("")
    out = make_out(tmp_path)
    assert main(["analyze", "--models", "cifar_resnet", "--depths", "20", "--out", str(out), "--no-progress"]) == 2
    assert f"jaxres analyze: error: --out {out} " + message.format(tmp=tmp_path) in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_analyze_out_without_write_permission_is_refused_before_the_study(tmp_path, capsys, study_must_not_run):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["analyze", "--out", str(locked / "run"), "--no-progress"]) == 2
    assert f"--out {locked / 'run'}: no permission to create it in {locked}" in capsys.readouterr().err


# --- training config --------------------------------------------------------------------------

def test_eval_batch_size_zero_is_named_as_such():
    # unchecked, grain says "batch_size must be positive." only at the first evaluation
    config = apply_overrides(load_config("experiments/configs/synthetic.py"),
                             ["--config.eval_batch_size=0", "--config.model_overrides.widths=(4, 8, 16)"])
    with pytest.raises(ValueError, match="eval_batch_size must be a positive integer, got 0"):
        Run(config, need_train=False)
