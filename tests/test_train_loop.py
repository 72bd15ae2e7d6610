"""The training loop in-process: checkpoints and their recovery, non-finite losses, config
handling, metrics files and the eval command (synthetic data, a tiny ResNet)."""

import json
import re
import shutil

import jax
import numpy as np
import pytest

from jaxres.analysis.restore import check_variables, restore_variables
from jaxres.cli import main
from jaxres.cli.train import split_overrides
from jaxres.models import unstack_identical_units
from jaxres.train import NonFiniteLossError, apply_overrides, evaluate_workdir, load_config, train_and_evaluate
from jaxres.train.run import Run
from jaxres.train.state import checkpoint_tree
from jaxres.workdir import Workdir

CONFIG = "synthetic"


def tiny_config(**fields):
    config = load_config(CONFIG)
    apply_overrides(config, ["--config.model_overrides.widths=(4, 8, 16)", "--config.batch_size=16",
                             "--config.num_steps=4", "--config.checkpoint_every_steps=2",
                             "--config.eval_every_steps=0", "--config.log_every_steps=1",
                             "--config.progress_bar=False", "--config.num_data_threads=1"])
    for key, value in fields.items():
        config[key] = value
    return config


def final_tree(workdir, config, step):
    with Workdir(workdir) as wd:
        saved = wd.restore(step, checkpoint_tree(Run(config, need_train=False).state))
    return saved.state, saved.data, saved.config, saved.meta


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)  # bitwise


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config()
    summary = train_and_evaluate(config, workdir)
    return workdir, config, summary


def test_run_writes_checkpoints_metrics_and_a_summary(finished_run):
    workdir, config, summary = finished_run
    assert summary["step"] == 4 and summary["eval"]["count"] == 257  # the full odd split
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # The first step compiles: timed apart, and throughput counts the steps after it only.
    assert {"loss", "accuracy", "learning_rate", "grad_norm", "first_step_time"} <= set(train[0])
    assert "images_per_second" not in train[0] and "first_step_time" not in train[1]
    assert {"images_per_second", "step_time"} <= set(train[1])
    assert train[0]["first_step_time"] > 10 * train[1]["step_time"]
    assert any(r["split"] == "eval" and r["count"] == 257 for r in lines)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["num_steps"] == 4
    _, data_state, saved_config, meta = final_tree(workdir, config, 4)
    assert data_state == {"next_index": 4} and saved_config["model"] == "ResNet" and meta["step"] == 4


def test_eval_command_reevaluates_the_checkpoint(finished_run, capsys):
    workdir, _, summary = finished_run
    assert main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert f"{100 * summary['eval']['accuracy']:.2f}% (257 examples)" in out
    assert evaluate_workdir(workdir, checkpoint="best", report=lambda *_: None)["count"] == 257


def test_rerunning_a_finished_run_changes_nothing(finished_run):
    workdir, config, _ = finished_run
    before = final_tree(workdir, config, 4)[0]
    assert train_and_evaluate(config, workdir, report=lambda *_: None)["step"] == 4
    assert_trees_equal(final_tree(workdir, config, 4)[0], before)


def test_truncated_latest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path):
    workdir, config, _ = finished_run
    tmp_path = tmp_path / "copy"
    shutil.copytree(workdir, tmp_path)
    reference = final_tree(tmp_path, config, 4)[0]
    data_files = sorted((tmp_path / "checkpoints" / "4" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    biggest = data_files[-1]
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    messages = []
    summary = train_and_evaluate(config, tmp_path, report=messages.append)
    assert any("checkpoint 4" in m and "unreadable" in m for m in messages), messages
    assert any("resumed from checkpoint 2" in m for m in messages)
    assert list((tmp_path / "checkpoints.corrupt").iterdir())  # kept, not deleted
    assert summary["step"] == 4
    assert_trees_equal(final_tree(tmp_path, config, 4)[0], reference)  # redone bitwise


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path):
    # lr 1e30: step 1's loss is finite but its update overflows the weights; the loop must
    # stop there (the loss or the state is non-finite) and keep the last finite checkpoint.
    config = tiny_config(learning_rate=1e30, checkpoint_every_steps=1, log_every_steps=1)
    with pytest.raises(NonFiniteLossError) as err:
        train_and_evaluate(config, tmp_path, report=lambda *_: None)
    found = re.search(r"non-finite at step (\d+); .*Last good checkpoint: checkpoint (\d+) in "
                      r".*checkpoints \(intact\)", str(err.value))
    assert found, str(err.value)
    bad, good = int(found.group(1)), int(found.group(2))
    assert 1 <= good < bad
    with Workdir(tmp_path) as wd:
        assert wd.steps()[-1] == good  # nothing saved after it
    tree = final_tree(tmp_path, config, good)[0]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(tree["params"]))


def test_resuming_with_a_different_recipe_is_refused(finished_run):
    workdir, config, _ = finished_run
    changed = tiny_config(learning_rate=0.5)
    with pytest.raises(ValueError, match=r"different config \(learning_rate: saved 0.1, now 0.5\)"):
        train_and_evaluate(changed, workdir, report=lambda *_: None)


def test_a_run_saved_before_a_field_existed_resumes_when_the_field_keeps_its_default(tmp_path):
    from jaxres.train import config as config_lib
    from jaxres.train.loop import check_resumable

    config = tiny_config()
    older = {k: v for k, v in config_lib.to_json(config).items() if k not in ("optimizer", "trust_coefficient")}
    check_resumable(older, config, tmp_path)  # the older run trained with SGD, today's default
    with pytest.raises(ValueError, match=r"different config \(optimizer: saved 'sgd', now 'lars'\)"):
        check_resumable(older, tiny_config(optimizer="lars"), tmp_path)


def test_config_overrides_are_typed_and_checked():
    config = load_config("cifar10:resnet110")
    apply_overrides(config, ["--config.num_steps=100", "--config.learning_rate", "1", "--config.nesterov=True"])
    assert config.num_steps == 100 and config.learning_rate == 1.0 and config.nesterov is True
    with pytest.raises(ValueError, match=r"no field 'num_step'.*did you mean 'num_steps'"):
        apply_overrides(config, ["--config.num_step=3"])
    with pytest.raises(ValueError, match=r"resnet \+ one of .* or plain \+ one of"):
        load_config("cifar10:resnet50")
    assert split_overrides(["--workdir", "w", "--config.a=1", "--config.b", "2"]) == (
        ["--config.a=1", "--config.b", "2"], ["--workdir", "w"])


def test_paper_recipes_build():
    # He et al. 2015 / Simonyan & Zisserman 2014 hyper-parameters, as the configs state them.
    r110 = load_config("cifar10:resnet110")
    assert (r110.model, r110.batch_size, r110.num_steps, r110.weight_decay) == ("cifar_resnet110", 128, 64000, 1e-4)
    vgg = load_config("imagenet:vgg16")
    assert (vgg.learning_rate, vgg.batch_size, vgg.weight_decay, vgg.model_overrides.dropout) == (0.01, 256, 5e-4, 0.5)
    for arg in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain18", "plain34"):
        c = load_config(f"imagenet:{arg}")
        assert c.model == arg and c.schedule == "step" and c.decay_every_epochs == 30
    for arg in ("resnet20", "resnet32", "resnet44", "resnet56", "plain20", "plain32", "plain44", "plain56", "plain110"):
        assert load_config(f"cifar10:{arg}").model == f"cifar_{arg}"


def test_train_command_reports_a_missing_dataset(tmp_path, capsys):
    code = main(["train", "--config", "cifar10:resnet20", "--workdir", str(tmp_path / "w"),
                 f"--config.data_dir={tmp_path}"])
    assert code == 2
    assert "not prepared" in capsys.readouterr().err


def test_scanned_blocks_train_checkpoint_and_analyze_like_unrolled(tmp_path):
    # model_overrides.scan_units (what the resnet1202 recipe sets): checkpoints hold the stacked
    # layout, the numbers are the unrolled run's, and the analysis reads the workdir per unit.
    trees = {}
    for scan in (False, True):
        config = tiny_config()
        apply_overrides(config, ["--config.model_overrides.stage_sizes=(2, 2, 2)",
                                 f"--config.model_overrides.scan_units={scan}"])
        train_and_evaluate(config, tmp_path / str(scan), report=lambda *_: None)
        trees[scan] = final_tree(tmp_path / str(scan), config, 4)[0]
        model = Run(config, need_train=False).state.model
    assert "unit_1..unit_2" in trees[True]["params"] and "unit_1" in trees[False]["params"]
    variables = {k: trees[True][k] for k in ("params", "batch_stats")}
    unstacked = unstack_identical_units(model, variables)
    for a, b in zip(jax.tree.leaves(unstacked), jax.tree.leaves({k: trees[False][k] for k in ("params", "batch_stats")})):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    restored = check_variables(model.clone(scan_units=False), restore_variables(tmp_path / "True"), np.zeros((1, 32, 32, 3), np.float32))
    assert jax.tree.structure(restored) == jax.tree.structure(jax.tree.map(np.asarray, unstacked))


def test_resnet1202_recipe_scans_its_blocks():
    c = load_config("cifar10:resnet1202")
    assert c.model == "cifar_resnet1202" and c.model_overrides.scan_units is True
    assert c.learning_rate == 0.01 and c.lr_boundaries["400"] == 10.0  # warm-up as for depth 110
    with pytest.raises(ValueError, match=r"resnet \+ one of .* or plain \+ one of"):
        load_config("cifar10:plain1202")
