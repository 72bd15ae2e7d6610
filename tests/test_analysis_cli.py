"""`jaxres analyze` and the analysis API on bad input: clear errors, no partial files; the
checkpoint restore path; one small end-to-end CLI run."""

import json

import chex
import jax
import numpy as np
import jax.numpy as jnp
import pytest

from jaxres.files import atomic_write
from jaxres.analysis.restore import check_variables, restore_variables
from jaxres.analysis.segments import SegmentCache, check_bn, find_segment
from jaxres.analysis.study_config import StudyConfig, model_names
from jaxres.cli import main
from jaxres.models import ResNet


def test_unknown_model_name_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["analyze", "--models", "cifar_resnett", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown model or family 'cifar_resnett'" in err and "did you mean" in err
    assert not out.exists()


def test_depth_a_family_lacks_names_the_valid_depths():
    with pytest.raises(ValueError, match=r"cifar_plain has no depth 50 \(valid depths: \[20, 32, 44, 56, 110\]\)"):
        model_names(StudyConfig(depths=(50,)))


@pytest.mark.parametrize("field,value,match", [
    ("method", "exactly", "unknown method 'exactly'"),
    ("bns", ("running",), "unknown BatchNorm policy"),
    ("activations", ("relu6",), "unknown activation"),
    ("batch_size", 1, "batch_size must be >= 2"),
])
def test_bad_study_settings_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        StudyConfig(**{field: value})


def test_unit_out_of_range_and_bad_bn_policy():
    model = ResNet(stage_sizes=(1,), widths=(4,), stem="cifar", num_classes=3)
    x = jnp.zeros((2, 4, 4, 3))
    segments = SegmentCache().segments(model, model.init(jax.random.key(0), x), x.shape)
    assert find_segment(segments, "unit_1").name == "unit_1"
    with pytest.raises(ValueError, match="unknown unit 'unit_9'"):
        find_segment(segments, "unit_9")
    with pytest.raises(ValueError, match="unknown BatchNorm policy"):
        check_bn("train")


def test_exact_method_too_large_suggests_estimate():
    from jaxres.analysis.unit_groups import JacobianOptions, frobenius_sq

    class Seg:  # only the fields frobenius_sq reads
        name, out_shape = "unit_1", (8, 32, 32, 16)

    with pytest.raises(ValueError, match="use --method estimate"):
        frobenius_sq(Seg, None, None, jnp.zeros((8, 32, 32, 16)), per_example=False,
                     options=JacobianOptions(method="exact"))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "results.json"

    def fail(handle):
        handle.write(b"{partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    """An orbax StandardCheckpointer save of {"params", "batch_stats", "step"} of a small net."""
    import orbax.checkpoint as ocp

    model = ResNet(stage_sizes=(1, 1), widths=(4, 8), stem="cifar", shortcut="A", num_classes=10)
    x = jnp.zeros((2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x)
    path = tmp_path_factory.mktemp("ckpt") / "100" / "default"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {**variables, "step": 100})
    checkpointer.wait_until_finished()
    return model, x, variables, path.parent.parent


def test_checkpoint_restores_from_a_manager_style_directory(saved_checkpoint):
    model, x, variables, root = saved_checkpoint
    restored = check_variables(model, restore_variables(root), x)
    chex.assert_trees_all_equal(restored, dict(variables))


def test_checkpoint_of_another_model_lists_the_mismatches(saved_checkpoint):
    _, x, _, root = saved_checkpoint
    other = ResNet(stage_sizes=(1, 1), widths=(4, 16), stem="cifar", shortcut="A", num_classes=10)
    with pytest.raises(ValueError, match=r"checkpoint does not match .*unit_2.*conv1.*kernel"):
        check_variables(other, restore_variables(root), x)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore_variables(tmp_path / "nope")


@pytest.mark.slow
def test_cli_small_study_writes_results_plots_and_table(tmp_path, capsys):
    out = tmp_path / "analyze"
    code = main(["analyze", "--models", "cifar_plain20,cifar_resnet20", "--norm", "none", "--activation", "relu",
                 "--batch-size", "2", "--jacobian-units", "1", "--num-probes", "4", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["gradient_scale.png", "loss_grads.png", "norms.png",
                                                    "results.json", "singular_values.png", "spectra.png", "table.txt"]
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["measurements"]] == ["cifar_plain20", "cifar_resnet20"]
    assert results["config"]["seed"] == 0 and "jax" in results["versions"]
    plain, residual = results["measurements"]
    assert len(plain["units"]) == 11  # stem, 9 blocks, head
    # twins share weights, so the head (same classifier, same input statistics) sees the same fc
    assert plain["units"][-1]["param_grad"].keys() == residual["units"][-1]["param_grad"].keys()
    assert any(u["identity_shortcut"] for u in residual["units"]) and not any(u["identity_shortcut"] for u in plain["units"])
    assert residual["residual"] and not plain["residual"]
    # per-unit Jacobians on 1 shape-keeping unit per stage (3 stages: 16, 32, 64 channels)
    measured = [u for u in plain["units"] if u["jacobian"] is not None]
    assert [(u["stage"], u["kind"]) for u in measured] == [(1, "shape-keeping"), (2, "shape-keeping"),
                                                          (3, "shape-keeping")]
    # every per-unit number carries its method; exact spectra of d z_i/d h_i: 10 per example
    for u in measured:
        assert {u["jacobian"][k]["method"] for k in ("frobenius_sq", "mean_sq_singular_value")} <= {
            "exact", "hutchinson-4"}
        assert u["jacobian"]["spectral_norm"]["method"] == "lanczos" and u["logit_jac"]["method"] == "exact"
    assert "an interval marks estimates" in (out / "table.txt").read_text()
    values = residual["units"][1]["logit_jac_singular_values"]
    assert len(values) == 2 and len(values[0]) == 10 and values[0] == sorted(values[0], reverse=True)
    assert sum(v**2 for v in values[0]) == pytest.approx(residual["units"][1]["logit_jac"]["per_example"][0] ** 2,
                                                         rel=1e-4)  # sum sigma^2 = ||J||_F^2
    # the whole net's mean field beside every stage and transition, with the draws it is for
    for m in (plain, residual):
        assert m["summary"]["weight_draws"] == 1
        entries = m["summary"]["stages"] + m["summary"]["transitions"]
        assert len(entries) == 5 and all(e["theory"]["weight_draws"] == 1 for e in entries)
        assert "spatial mean field of the whole net" in entries[0]["theory"]["assumptions"]
    assert "followed along the identity" in residual["summary"]["stages"][0]["theory"]["assumptions"]
    assert "stage rates, 1 draw" in (out / "table.txt").read_text()
    printed = capsys.readouterr().out
    assert "cifar_resnet20" in printed and "1 weight draw (seed 0)" in printed


def test_bad_workers_count_is_named_before_any_work():
    from jaxres.analysis.study import run_study

    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        run_study(StudyConfig(models=("cifar_resnet20",), depths=(20,)), workers=0)


@pytest.mark.slow
def test_settings_in_threads_give_the_same_numbers_as_one_by_one():
    """Settings run concurrently (one thread each) with their own seeds and compiled code: every
    reported number is bit-identical to the sequential study, and measurements keep the config's order."""
    from jaxres.analysis.study import run_study

    config = StudyConfig(models=("cifar_resnet20",), depths=(20,), norms=("none",), activations=("relu", "tanh"),
                         batch_size=2, jacobian_units=1, num_probes=4, max_iter=8)

    def numbers(results):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in results.to_json()["measurements"]]

    one_by_one = run_study(config)
    threaded = run_study(config, workers=2)
    assert [m.setting.activation for m in threaded.measurements] == ["relu", "tanh"]
    assert numbers(threaded) == numbers(one_by_one)


def test_checkpoint_from_a_jaxres_train_workdir(tmp_path, saved_checkpoint):
    """The layout `jaxres train` writes: WORKDIR/checkpoints/<step>/{state,data,config,meta}."""
    from jaxres.workdir import Workdir

    model, x, variables, _ = saved_checkpoint
    ckpts = Workdir(tmp_path, create=True, keep=2)
    for step in (5, 10):
        tree = {"step": step, **jax.tree.map(lambda a: a + step, dict(variables))}
        ckpts.save(step, tree, {"pos": step}, {"lr": 0.1})
    restored = check_variables(model, restore_variables(tmp_path), x)
    expected = jax.tree.map(lambda a: a + 10, dict(variables))  # the latest step
    chex.assert_trees_all_close(restored, expected)


def test_a_workdir_checkpoint_names_the_model_as_trained(tmp_path):
    """`jaxres analyze --checkpoint WORKDIR` rebuilds the model from the config stored in the
    checkpoint: a cifar_plain20 trained on Fashion-MNIST takes 1-channel images."""
    from jaxres.analysis.restore import study_settings
    from jaxres.workdir import Workdir

    with Workdir(tmp_path, create=True) as wd:
        wd.save(3, {"step": np.int32(3)}, {}, {"model": "cifar_plain20", "dataset": "fashion_mnist",
                                               "model_overrides": {"activation": "tanh"}})
    assert study_settings(tmp_path) == {"models": "cifar_plain20", "norm": "batchnorm", "activation": "tanh",
                                        "in_channels": 1}
    assert study_settings(tmp_path / "checkpoints" / "3") == study_settings(tmp_path)
    with Workdir(tmp_path / "other", create=True) as wd:  # a model built from overrides alone is not in the registry
        wd.save(3, {"step": np.int32(3)}, {}, {"model": "ResNet", "dataset": "fashion_mnist"})
    assert study_settings(tmp_path / "other") == {}


def test_table_labels_estimates_with_their_interval_and_shows_the_theory():
    from jaxres.analysis.report import format_table

    def measurement(model, msv, theory):
        return {"model": model, "setting": {"norm": "batchnorm", "activation": "relu", "bn": "batch"}, "summary": {
            "first_last_ratio": 20.4, "first_last_ratio_summed_rows": 10.9, "cross_example_share_unit_1": 0.22,
            "stages": [{"rate": 1.45, "theory": theory}], "transitions": [{"rate": 1.49}],
            "gradient_scale_unit_1": 3.84, "input_logit_jac": 3.42, "unit_msv": msv,
            "unit_sigma_max": {"median": 5.08}, "grad_correlation_lag1": 0.0048}}

    results = {"measurements": [
        measurement("estimated", {"median": 1.94, "method": "hutchinson-8", "ci": [1.87, 1.99]},
                    {"rate": 1.4667, "tolerance": 0.05}),
        measurement("exact", {"median": 1.5, "method": "exact"}, None)]}
    header, _, estimated, exact = format_table(results).splitlines()
    assert "stage rates, 1 draw" in header  # the draws each rate is averaged over
    assert "1.94 [1.87,1.99]" in estimated and "1.47±5%" in estimated and "20.4" in estimated
    assert "[" not in exact and " 1.5 " in exact and " - " in exact  # no interval, no theory


def test_float64_study_draws_the_float32_inputs_and_casts_them():
    """A float64 re-run must measure the same nets on the same inputs: drawing in float64 would
    give other random numbers (and so would initializing with param_dtype=float64)."""
    from jaxres.analysis.study import study_inputs

    config = StudyConfig(models=("cifar_resnet20",), depths=(20,))
    x32, labels32 = study_inputs(config)
    with jax.enable_x64(True):
        x64, labels64 = study_inputs(StudyConfig(models=("cifar_resnet20",), depths=(20,), float64=True))
        assert x64.dtype == jnp.float64
        assert bool(jnp.array_equal(x64.astype(jnp.float32), x32)) and bool(jnp.array_equal(labels64, labels32))
    with pytest.raises(ValueError, match="float64 must be True or False"):
        StudyConfig(float64="yes")
