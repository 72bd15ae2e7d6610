"""Bad input is refused before any work, with a message that names what is wrong and what to
do: no silently wrong results, no tracebacks."""

import errno
import gzip
import importlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxres.analysis.study
import jaxres.data.importer
import jaxres.workdir
from jaxres.cli import COMMANDS, main
from jaxres.data import load_source
from jaxres.data.importer import import_idx
from jaxres.models import VGG, cifar_vgg, vgg
from jaxres.train import apply_overrides, load_config
from jaxres.train.optim import make_schedule
from jaxres.train.run import Run
from jaxres.weights import load_weights, save_weights
from jaxres.workdir import Workdir, WorkdirBusyError
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


def test_an_unknown_recipe_lists_the_recipes_and_an_old_recipe_path_names_the_recipe():
    with pytest.raises(ValueError, match=re.escape("no recipe 'cifar'; did you mean 'cifar10'? (recipes: cifar10, "
                                                   "degradation, fashion_mnist, imagenet, synthetic)")):
        load_config("cifar:resnet56")
    # the recipes were files of the checkout (experiments/configs/) before they became modules
    with pytest.raises(FileNotFoundError, match="named without a path: --config cifar10:resnet56"):
        load_config("experiments/configs/cifar10.py:resnet56")


def test_a_config_file_of_ones_own_is_read_by_its_path(tmp_path):
    (tmp_path / "mine.py").write_text("from jaxres.configs import cifar10\n\n"
                                      "def get_config(arg):\n    c = cifar10.get_config(arg)\n    c.seed = 7\n"
                                      "    return c\n")
    config = load_config(f"{tmp_path / 'mine.py'}:resnet20")
    assert (config.model, config.seed) == ("cifar_resnet20", 7)


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


# --- weights files -------------------------------------------------------------------------

@pytest.mark.parametrize("dropped, message", [
    (["model"], "its metadata has no model (the registry name the weights are for)"),
    (["model", "sha256"], "its metadata has no model, sha256 (the registry name the weights are for; the checksum "
                          "of the tensors)"),
], ids=["model", "model-and-checksum"])
def test_weights_file_without_its_model_name_is_named(tmp_path, dropped, message):
    # unchecked: KeyError: 'model'
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    model = tiny_cifar_resnet()
    variables = model.init(KEY, jnp.zeros((1, 8, 8, 3)))
    path = save_weights(tmp_path / "w.safetensors", variables, "cifar_resnet20", num_classes=10)
    with safe_open(str(path), framework="numpy") as f:
        metadata = {k: v for k, v in f.metadata().items() if k not in dropped}
    save_file(load_file(str(path)), str(path), metadata=metadata)  # still marked format=jaxres.weights
    with pytest.raises(ValueError, match=re.escape(f"{path} is marked as a jaxres weights file but {message}: it was "
                                                   f"not written by jaxres.weights.save_weights or was edited; "
                                                   f"convert the original weights again (jaxres convert)")):
        load_weights(path)


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
    def study(*args, **kwargs):
        raise AssertionError("the study ran before its input was checked")

    monkeypatch.setattr(jaxres.analysis.study, "run_study", study)  # --workers 1
    monkeypatch.setattr(jaxres.analysis.study, "measure_setting", study)  # settings in threads (the default)


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


@pytest.mark.parametrize("option, message", [
    (["--bn", ""], "bns (--bn) must be a non-empty list; got (): name at least one of eval, batch"),
    (["--bn", ","], "bns (--bn) must be a non-empty list; got (): name at least one of eval, batch"),
    (["--activation", ""], "activations (--activation) must be a non-empty list; got (): name at least one of relu, "
                           "tanh, "),
    (["--norm", ""], "norms (--norm) must be a non-empty list; got (): name at least one of batchnorm, none"),
    (["--depths", ""], "cifar_resnet is a family, and depths (--depths) is empty: give its depths, e.g. --depths "
                       "20,56, or full names such as cifar_resnet20"),
    (["--in-channels", "0"], "in_channels must be an integer >= 1, got 0"),
], ids=["bn-empty", "bn-comma", "activation-empty", "norm-empty", "depths-empty", "in-channels-0"])
def test_analyze_refuses_an_empty_choice_before_any_work(tmp_path, capsys, study_must_not_run, option, message):
    # unchecked, an empty --bn measured nothing, failed in matplotlib and left an empty
    # results.json; an empty --activation (or --in-channels 0) fell back to the default
    out = tmp_path / "out"
    assert main(["analyze", "--models", "cifar_resnet", "--depths", "20", *option, "--out", str(out),
                 "--no-progress"]) == 2
    assert f"jaxres analyze: error: {message}" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def trained_workdir(tmp_path):
    """A `jaxres train` workdir with checkpoints 3 and 6 (their config names a cifar_plain20)."""
    workdir = tmp_path / "run"
    with Workdir(workdir, create=True) as wd:
        for step in (3, 6):
            wd.save(step, {"step": np.int32(step)}, {}, {"model": "cifar_plain20", "dataset": "fashion_mnist"})
    return workdir


@pytest.mark.parametrize("item", ["config/metadata", "state/_METADATA"])
def test_analyze_names_an_empty_json_file_of_the_checkpoint_and_what_to_do(trained_workdir, tmp_path, capsys,
                                                                           study_must_not_run, item):
    # as a write cut short leaves it; the message was "Expecting value: line 1 column 1 (char 0)"
    empty = trained_workdir / "checkpoints" / "6" / item  # the JSON file orbax writes for that item
    assert empty.stat().st_size > 0
    empty.write_text("")
    out = tmp_path / "out"
    assert main(["analyze", "--checkpoint", str(trained_workdir), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (f"jaxres analyze: error: checkpoint 6 in {trained_workdir / 'checkpoints'} cannot be read (JSONDecodeError: "
            f"Expecting value: line 1 column 1 (char 0)); empty file: {empty}; pass an earlier checkpoint "
            f"({trained_workdir / 'checkpoints' / '3'}), or rerun `jaxres train --workdir {trained_workdir}`, which "
            f"sets it aside and resumes from the one before") in err, err
    assert not out.exists()


def test_an_empty_metadata_file_of_a_plain_orbax_checkpoint_is_named(tmp_path):
    from jaxres.analysis.restore import restore_variables

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "_METADATA").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"empty file: {tmp_path / 'ckpt' / '_METADATA'}; its files are "
                                                   f"damaged or it is not an orbax checkpoint: save it again")):
        restore_variables(tmp_path / "ckpt")


# --- one error boundary for every command (jaxres.cli.main) -------------------------------------

# The least each command parses; its `run` is replaced, so nothing else happens.
COMMAND_ARGS = {
    "models": [], "convert": ["torchvision", "--out", "w"], "train": ["--config", "c.py", "--workdir", "w"],
    "eval": ["--workdir", "w"], "data": ["list"], "bench": ["cifar_resnet20"], "analyze": [],
    "experiment": ["degradation"], "inspect": ["lesion", "--checkpoint", "w"],
}


def run_raising(monkeypatch, command, error):
    def run(args):
        raise error

    monkeypatch.setattr(importlib.import_module(f"jaxres.cli.{command}"), "run", run)
    return main([command, *COMMAND_ARGS[command]])


def test_every_command_has_its_arguments_here():
    assert sorted(COMMAND_ARGS) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_reports_a_library_error_in_one_line(monkeypatch, capsys, command):
    # before, only `jaxres train` caught WorkdirBusyError: `jaxres experiment` showed a traceback
    busy = WorkdirBusyError("runs/x is in use by another training process (PID 7); wait for it to finish")
    assert run_raising(monkeypatch, command, busy) == 1
    assert capsys.readouterr().err == f"jaxres {command}: error: {busy}\n"


@pytest.mark.parametrize("command, rerun", [
    ("train", "rerun the same command to resume from the last checkpoint"),
    ("experiment", "rerun the same command to continue; finished runs are not redone"),
    ("analyze", "rerun the same command to start again"),
    ("convert", "rerun the same command to start again"),
])
def test_an_interrupted_command_says_what_rerunning_does(monkeypatch, capsys, command, rerun):
    try:
        code = run_raising(monkeypatch, command, KeyboardInterrupt())
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail(f"Ctrl-C in jaxres {command} ends in a traceback")
    assert code == 130
    assert capsys.readouterr().err == f"jaxres {command}: interrupted; {rerun}\n"


def test_an_import_error_jaxres_explains_is_one_line_in_any_command(monkeypatch, capsys):
    # `jaxres convert` alone turned these into one line; `jaxres bench --torch` and the rest did not
    needs_torch = ImportError("reading w.pth needs torch (pip install 'jaxres[torch]')")
    assert run_raising(monkeypatch, "analyze", needs_torch) == 2
    assert capsys.readouterr().err == f"jaxres analyze: error: {needs_torch}\n"


@pytest.mark.parametrize("bug", [KeyError("params"), ZeroDivisionError("float division by zero"),
                                 ImportError("cannot import name 'x' from 'y'", name="y")],
                         ids=["KeyError", "ZeroDivisionError", "ImportError-of-a-name"])
def test_a_bug_still_shows_its_traceback(monkeypatch, bug):
    with pytest.raises(type(bug)):
        run_raising(monkeypatch, "eval", bug)


def test_a_second_experiment_on_a_busy_out_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    data_dir = tmp_path / "data"
    import_idx("fashion_mnist", idx_files(tmp_path / "idx"), data_dir)
    capsys.readouterr()  # TFDS's progress bars

    def held(fd, operation):  # another `jaxres experiment` trains in the workdir
        raise BlockingIOError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))

    monkeypatch.setattr(jaxres.workdir.fcntl, "flock", held)
    out = tmp_path / "out"
    assert main(["experiment", "degradation", "--out", str(out), "--models", "cifar_plain8", "--num-steps", "2",
                 "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"jaxres experiment: error: {re.escape(str(out))}/runs/\S+ is in use by another training "
                        rf"process \(PID unknown\); wait for it to finish, .* or choose another --workdir\n", err), err


# --- training config --------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("--config.num_steps=x", "--config.num_steps must be an integer (it is 300 now); got 'x'"),
    ("--config.num_steps=2.5", "--config.num_steps must be an integer (it is 300 now); got 2.5"),
    ("--config.progress_bar=1", "--config.progress_bar must be True or False (it is True now); got 1"),
    ("--config.model_overrides.widths=(4,x,8)",
     "--config.model_overrides.widths must be a tuple (it is (8, 16, 32) now); got '(4,x,8)'"),
    ("--config.lr_boundaries.x=0.1", "lr_boundaries keys must be iteration numbers, e.g. "
                                     "--config.lr_boundaries.32000=0.1 (in a config file: {'32000': 0.1}); got 'x'"),
    ("--config.lr_boundaries={'x': 0.1}", "lr_boundaries keys must be iteration numbers"),
    ("--config.lr_boundaries.100=x", "lr_boundaries.100 must be a number, the factor of the learning rate from "
                                     "iteration 100 on (e.g. 0.1); got 'x'"),
    ("--config.foo.bar=1", "config has no field 'foo'"),
    ("--config.num_steps.x=1", "--config.num_steps.x: num_steps is a value (300), not a group of fields; set it "
                               "with --config.num_steps=VALUE"),
], ids=["int-text", "int-float", "bool-int", "tuple-text", "boundary-key", "boundary-dict", "boundary-factor",
        "no-group", "not-a-group"])
def test_a_config_value_of_the_wrong_type_names_the_field_before_the_workdir_is_made(tmp_path, capsys, override,
                                                                                    message):
    # before: "invalid literal for int() with base 10: 'x'" (after making the workdir), ml_collections'
    # "Could not override field ... cannot be casted", or a KeyError's traceback
    workdir = tmp_path / "run"
    assert main(["train", "--config", "synthetic", "--workdir", str(workdir), override]) == 2
    assert f"jaxres train: error: {message}" in capsys.readouterr().err
    assert not workdir.exists()


def test_a_config_file_with_a_boundary_that_is_no_iteration_is_named():
    config = load_config("synthetic")
    config.lr_boundaries = {"x": 0.1}  # as a get_config() might write it
    with pytest.raises(ValueError, match=r"lr_boundaries keys must be iteration numbers, .*; got 'x'"):
        make_schedule(config, steps_per_epoch=10)


def test_eval_batch_size_zero_is_named_as_such():
    # unchecked, grain says "batch_size must be positive." only at the first evaluation
    config = apply_overrides(load_config("synthetic"),
                             ["--config.eval_batch_size=0", "--config.model_overrides.widths=(4, 8, 16)"])
    with pytest.raises(ValueError, match="eval_batch_size must be a positive integer, got 0"):
        Run(config, need_train=False)
