"""The degradation experiment (jaxres.experiments): its figures and table from hand-written
workdir files, and (slow) a tiny end-to-end run on real Fashion-MNIST that a rerun does not redo."""

import json
import math
from pathlib import Path

import pytest

from jaxres.experiments import degradation, degradation_plots

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
UNITS = ["stem", "unit_1", "unit_2", "head"]


def analysis_record(step, grads, stds, bn="batch"):
    return {"step": step, "bn": bn, "probe_size": 32, "time_s": 0.5, "loss": 2.3, "units": UNITS,
            "dL_dh": dict(zip(UNITS, grads)), "dlogits_dh": {u: {"median": 1.0, "q10": 0.5, "q90": 2.0} for u in UNITS},
            "dL_dW": {}, "dL_dW_rel": {}, "response_std": {f"unit_{i}/layer1": s for i, s in enumerate(stds, 1)}}


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def out(tmp_path):
    """OUT/runs with a finished, resumed plain-20 run (steps repeated after the resume) and a
    partial residual-20 run (no evaluation yet, one gradient record)."""
    runs = tmp_path / "runs"
    plain = runs / "cifar_plain20"
    write_jsonl(plain / "metrics.jsonl", [
        {"step": 50, "split": "train", "time": 1.0, "loss": 1.0, "accuracy": 0.60, "learning_rate": 0.1},
        {"step": 100, "split": "train", "time": 2.0, "loss": 0.9, "accuracy": 0.70, "learning_rate": 0.1},
        {"step": 100, "split": "eval", "time": 3.0, "loss": 0.8, "accuracy": 0.72, "count": 10000},
        {"step": 50, "split": "event", "time": 4.0, "event": "resumed from checkpoint 50"},
        # after the resume from step 50, steps 100 are replayed: the later lines count
        {"step": 100, "split": "train", "time": 5.0, "loss": 0.9, "accuracy": 0.75, "learning_rate": 0.1},
        {"step": 100, "split": "eval", "time": 6.0, "loss": 0.7, "accuracy": 0.80, "count": 10000},
    ])
    write_jsonl(plain / "analysis.jsonl", [
        analysis_record(0, [0.5, 0.2, 0.3, 0.4], [1.0, 2.0]),
        analysis_record(100, [0.1, 0.05, "nan", 0.5], [3.0, 1.0]),  # replaced below
        analysis_record(100, [0.1, 0.01, None, 0.5], [3.0, 1.0, "inf"]),
        analysis_record(100, [9.0, 9.0, 9.0, 9.0], [9.0], bn="eval"),  # another policy: not plotted
    ])
    (plain / "config.json").write_text(json.dumps({"model": "cifar_plain20", "num_steps": 100}))
    residual = runs / "cifar_resnet20"
    write_jsonl(residual / "metrics.jsonl", [
        {"step": 50, "split": "train", "time": 1.0, "loss": 1.1, "accuracy": 0.55, "learning_rate": 0.1}])
    write_jsonl(residual / "analysis.jsonl", [analysis_record(0, [0.4, 0.3, 0.2, "inf"], [1.0, 1.0])])
    (residual / "config.json").write_text(json.dumps({"model": "cifar_resnet20", "num_steps": 100}))
    write_jsonl(runs / "wall_time.jsonl", [
        {"model": "cifar_plain20", "wall_time_s": 10.5, "step": 50, "stopped": True},
        {"model": "cifar_plain20", "wall_time_s": 20.0, "step": 100, "stopped": False}])
    return tmp_path


def test_results_count_the_later_line_of_a_repeated_step(out):
    degradation_plots.write_outputs(out)
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    plain = rows["cifar_plain20"]
    assert plain["final_train_error"] == pytest.approx(0.25)  # 1 - 0.75, the replayed window
    assert plain["final_test_error"] == pytest.approx(0.20)  # 1 - 0.80
    assert plain["gradient_ratio_start"] == pytest.approx(0.2 / 0.4)  # unit_1 / head at step 0
    assert plain["gradient_ratio_end"] == pytest.approx(0.01 / 0.5)  # the later step-100 record, bn=batch
    assert plain["gradient_ratio_end_step"] == 100
    assert plain["finished"] is True and plain["steps"] == 100
    assert plain["wall_time_s"] == pytest.approx(30.5)  # both invocations
    assert plain["analysis_time_s"] == pytest.approx(1.5)  # steps 0 and 100 (the later line) + the eval record


def test_a_partial_run_has_nulls_where_it_has_no_numbers(out):
    degradation_plots.write_outputs(out)
    results = json.loads((out / "results.json").read_text())
    row = {r["model"]: r for r in results["runs"]}["cifar_resnet20"]
    assert row["final_train_error"] == pytest.approx(0.45)
    assert row["final_test_error"] is None  # not evaluated yet
    assert row["gradient_ratio_start"] is None  # head gradient "inf": no ratio
    assert row["wall_time_s"] is None and row["finished"] is False and row["steps"] == 50
    assert [r["model"] for r in results["runs"]] == ["cifar_plain20", "cifar_resnet20"]  # plain first
    assert "wall_time.jsonl" in results["wall_time_source"]


def test_every_figure_and_table_is_written(out):
    degradation_plots.write_outputs(out)
    for name in degradation_plots.OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    assert (out / "degradation_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| cifar_plain20 | 100 / 100 | 25.00 | 20.00 | 0.5 | 0.02 (step 100) | 30 s |" in table
    assert not list(out.glob(".*"))  # no temporary files left


def test_gradient_matrix_is_log10_with_nan_for_non_finite(out):
    run = degradation_plots.load_run(out / "runs" / "cifar_plain20")
    units, steps, logs = degradation_plots.gradient_matrix(run)
    assert units == UNITS and steps == [0, 100]
    assert logs[1, 1] == pytest.approx(math.log10(0.01))
    assert math.isnan(logs[2, 1])  # null in the file


def test_recipe_scales_the_schedule_with_the_number_of_steps():
    config = degradation.recipe("cifar_plain56", 800)
    assert config.model == "cifar_plain56" and config.num_steps == 800
    assert dict(config.lr_boundaries) == {"400": 0.1, "600": 0.1}  # /10 at 50% and 75%
    assert (config.eval_every_steps, config.checkpoint_every_steps, config.analysis_every_steps) == (200, 100, 100)
    assert (config.learning_rate, config.momentum, config.weight_decay, config.batch_size) == (0.1, 0.9, 1e-4, 128)


def test_recipe_builds_depth_8_from_model_overrides():
    config = degradation.recipe("cifar_plain8", 100)
    assert config.model == "ResNet"
    assert tuple(config.model_overrides.stage_sizes) == (1, 1, 1) and config.model_overrides.residual is False


def test_recipe_rejects_a_depth_that_is_not_6n_plus_2():
    with pytest.raises(ValueError, match="6n\\+2.*got 'cifar_plain52'"):
        degradation.recipe("cifar_plain52")


def test_a_run_of_another_length_is_refused_before_training(out):
    config = degradation.recipe("cifar_plain20", 200)  # the workdir holds a 100-step run
    with pytest.raises(ValueError, match="holds a run of 100 steps, not 200; rerun with --num-steps 100"):
        degradation.train_one(out, "cifar_plain20", config, "1/1", report=print)


def test_missing_dataset_without_debian_files_says_how_to_import(tmp_path, monkeypatch):
    monkeypatch.setattr(degradation, "DEBIAN_IDX_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="jaxres data import fashion_mnist --from DIR"):
        degradation.run_degradation(tmp_path / "out", data_dir=str(tmp_path / "tfds"), report=print)


@pytest.mark.slow
@pytest.mark.skipif(not (IDX_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST IDX files absent from {IDX_DIR}: apt-get install dataset-fashion-mnist")
def test_tiny_run_on_fashion_mnist_is_not_redone(tmp_path):
    out, lines = tmp_path / "out", []
    models = ("cifar_plain8", "cifar_resnet8")
    results = degradation.run_degradation(out, models=models, num_steps=2, data_dir=str(tmp_path / "tfds"),
                                          report=lines.append)
    assert [r["model"] for r in results["runs"]] == list(models)
    assert all(r["finished"] and r["steps"] == 2 for r in results["runs"])
    records = [json.loads(x) for x in (out / "runs" / "cifar_resnet8" / "analysis.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    before = {m: (out / "runs" / m / "metrics.jsonl").read_bytes() for m in models}
    wall = (out / "runs" / "wall_time.jsonl").read_text()

    lines.clear()
    degradation.run_degradation(out, models=models, num_steps=2, data_dir=str(tmp_path / "tfds"), report=lines.append)
    assert sum("not retrained" in str(line) for line in lines) == 2
    assert {m: (out / "runs" / m / "metrics.jsonl").read_bytes() for m in models} == before
    assert (out / "runs" / "wall_time.jsonl").read_text() == wall
    for name in degradation_plots.OUTPUTS:
        assert (out / name).is_file(), name
