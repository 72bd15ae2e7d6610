"""The trained twins as an experiment of the package (`jaxres experiment twins`): bad input is
refused before any work, one analysis runs on a tiny net as `jaxres inspect` would, and the
committed figures and tables regenerate from the committed results."""

import json
import shutil
from pathlib import Path

import pytest

from jaxres.cli import main
from jaxres.experiments import trained_twins

COMMITTED = Path(__file__).resolve().parents[1] / "experiments" / "results" / "twins"


@pytest.mark.parametrize("kwargs, message", [
    (dict(nets=("cifar_plain20", "cifar_plain110")), "unknown nets cifar_plain110; valid: cifar_plain20"),
    (dict(analyses=("lesion", "hessian")), "unknown analyses hessian; valid: lesion, landscape"),
    (dict(analyses=()), "nothing to run: name one or more analyses of lesion"),
])
def test_bad_names_are_refused_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        trained_twins.run_twins(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_a_missing_weights_file_is_named_with_the_fix(tmp_path, capsys):
    assert main(["experiment", "twins", "--nets", "cifar_resnet20", "--weights", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"no weights file {tmp_path / 'cifar_resnet20.safetensors'}; pass --weights DIR" in err
    assert not (tmp_path / "out").exists()


def test_plot_only_needs_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no results of the trained twins"):
        trained_twins.run_twins(tmp_path, plot_only=True)


def test_an_analysis_writes_what_jaxres_inspect_writes(tmp_path):
    """A tiny ResNet on the synthetic dataset stands in for cifar_plain20: its spectrum (the
    experiment's arguments: 2 images, initialization too) lands in OUT/cifar_plain20/ with the
    arguments, and the figure and table are drawn from it."""
    from test_inspect_cli import write_weights

    (tmp_path / "weights").mkdir()
    write_weights(tmp_path / "weights" / "cifar_plain20.safetensors")
    trained_twins.run_twins(tmp_path / "out", nets=("cifar_plain20",), analyses=("spectrum",),
                            weights_dir=tmp_path / "weights", report=lambda *_: None)
    result = json.loads((tmp_path / "out" / "cifar_plain20" / "spectrum.json").read_text())
    assert set(result) >= {"trained", "initialization", "wall_time_s", "load_average"}
    assert result["arguments"] == {"experiment": "twins", "analysis": "spectrum", "init": True, "images": 2,
                                   "num_matvecs": 64, "num_probes": 8}
    assert (tmp_path / "out" / "spectrum.png").is_file()
    assert "| cifar_plain20 | trained | features unit_1..unit_3 |" in (tmp_path / "out" / "tables.md").read_text()


def test_a_plain_net_gets_no_gradient_paths(tmp_path):
    """The gradient by path length is defined for residual nets only: a plain net skips it."""
    from test_inspect_cli import write_weights

    (tmp_path / "weights").mkdir()
    write_weights(tmp_path / "weights" / "cifar_plain20.safetensors")
    reports = []
    trained_twins.run_twins(tmp_path / "out", nets=("cifar_plain20",), analyses=("paths",),
                            weights_dir=tmp_path / "weights", report=reports.append)
    assert "== cifar_plain20 paths: skipped (only for cifar_resnet20, cifar_resnet56)" in reports
    assert not (tmp_path / "out" / "cifar_plain20" / "paths.json").exists()


def test_plot_only_regenerates_the_committed_tables(tmp_path):
    for net in trained_twins.NETS:
        shutil.copytree(COMMITTED / net, tmp_path / net)
    assert main(["experiment", "twins", "--plot-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "tables.md").read_text() == (COMMITTED / "tables.md").read_text()
    assert {p.name for p in tmp_path.glob("*.png")} == {"lesion.png", "landscape.png", "sharpness.png",
                                                        "sharpness_training.png", "spectrum.png", "paths.png"}


def write_training_run(directory: Path, net: str, values: dict, *, killed: dict | None = None) -> None:
    """A training workdir's metrics.jsonl with "sharpness" lines: `values` step -> lambda_max
    (learning rate 0.1 up to step 4, then 0.01; momentum 0.9); `killed` lines of an attempt
    killed after step 2, before a restart from step 2."""
    def line(step, value):
        lr = 0.1 if step <= 4 else 0.01
        return {"step": step, "split": "sharpness", "lambda_max": value, "residual": 1e-4, "iterations": 9,
                "converged": 1, "loss": 1.0, "learning_rate": lr, "threshold_gd": 2 / lr,
                "threshold_momentum": 3.8 / lr}
    records = [{"step": 0, "split": "event", "start": True}]
    records += [line(s, v) for s, v in values.items() if s <= 2]
    if killed:
        records += [line(s, v) for s, v in killed.items()]
        records.append({"step": 2, "split": "event", "start": True})
    records += [line(s, v) for s, v in values.items() if s > 2]
    workdir = directory / net / "training"
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_sharpness_during_training_is_read_against_the_thresholds_of_each_step(tmp_path):
    from jaxres.experiments import trained_twins_plots as plots

    write_training_run(tmp_path, "cifar_plain20", {0: 10.0, 2: 30.0, 4: 50.0, 8: 40.0}, killed={4: 999.0})
    write_training_run(tmp_path, "cifar_resnet20", {0: 40.0, 2: 20.0, 4: 19.0, 8: 5.0})
    curves = plots.load_sharpness_training(tmp_path)
    assert [r["lambda_max"] for r in curves["cifar_plain20"]] == [10.0, 30.0, 50.0, 40.0]  # killed attempt dropped
    lines = []
    assert plots.sharpness_training_figure(curves, lines, tmp_path).name == "sharpness_training.png"
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines if line.startswith("| cifar")}
    # first learning rate 0.1: 2/lr = 20, (2 + 2 x 0.9)/lr = 38
    assert rows["cifar_plain20"][3] == "2.5 (4)" and rows["cifar_plain20"][4] == "1.32"
    assert rows["cifar_resnet20"][3] == "2 (0)" and rows["cifar_resnet20"][5] == "40 / 5"
    assert (tmp_path / "sharpness_training.png").stat().st_size > 0
