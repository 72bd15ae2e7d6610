"""The theory check as an experiment of the package (`jaxres experiment theory`): bad input is
refused before any work, and the committed results regenerate from their own results.json."""

import shutil
from pathlib import Path

import pytest

from jaxres.cli import main
from jaxres.experiments import theory_check

COMMITTED = Path(__file__).resolve().parents[1] / "experiments" / "results" / "theory"


@pytest.mark.parametrize("kwargs, message", [
    (dict(sections=("controls", "nope")), "unknown sections nope; valid: mlp_twins"),
    (dict(sections=()), "no section to run"),
    (dict(draws=0), "draws must be a positive integer"),
    (dict(predict_only=True), "--predict-only needs the measurements of an earlier run"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        theory_check.run_theory_check(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_the_command_line_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["experiment", "theory", "--sections", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxres experiment: error: unknown sections nope") and err.count("\n") == 1


@pytest.mark.slow
def test_predict_only_regenerates_the_committed_tables(tmp_path):
    """--predict-only recomputes every prediction beside the stored measurements and rewrites
    results.md: on the committed results it gives the committed results.md, line for line."""
    shutil.copy(COMMITTED / "results.json", tmp_path / "results.json")
    assert main(["experiment", "theory", "--predict-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == (COMMITTED / "results.md").read_text()
    assert {p.name for p in tmp_path.glob("*.png")} >= {"bn_batch_sweep.png", "rates.png", "shattered.png"}
