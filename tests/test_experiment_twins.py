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
                                                        "spectrum.png", "paths.png"}
