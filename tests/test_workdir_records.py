"""A run is finished when its final checkpoint and that step's records are on disk
(`Workdir.finished`), not when an eval line says so: a run killed between its final eval line
and its checkpoint is retrained to the end, and a run killed between its final checkpoint and
its records gets them from a rerun without training (also inside `jaxres experiment degradation`).
The records go to logs the workdir hands out (one TensorBoard writer per run; the analysis log
cut back to the restored step) and closes."""

import json
import shutil
from pathlib import Path

import pytest

from jaxres.cli import main
from jaxres.experiments import degradation
from jaxres.files import read_jsonl
from jaxres.train import train_and_evaluate
from jaxres.train.metrics import MetricsWriter
from jaxres.workdir import Workdir
from tests.test_train_loop import CONFIG, assert_trees_equal, final_tree, tiny_config
from tests.test_workdir_faults import QUIET, TINY, Killed, killed_during

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
EVALUATED = ["--config.eval_every_steps=2", "--config.train_eval_examples=8"]


def finished(workdir, config) -> bool:
    with Workdir(workdir) as wd:
        return wd.finished(config)


def lines_since_last_start(workdir) -> list[dict]:
    records = read_jsonl(Path(workdir) / "metrics.jsonl")
    last = max(i for i, r in enumerate(records) if r.get("start"))
    return records[last + 1:]


def test_a_run_killed_at_its_final_eval_line_is_not_finished_and_trains_to_the_end(tmp_path, monkeypatch):
    # The final eval line is written just before the final checkpoint; killed in between, the
    # workdir holds that line with checkpoints up to step 2 only.
    config = tiny_config(eval_every_steps=2, train_eval_examples=8)
    killed_during(monkeypatch, MetricsWriter, "write", lambda self, step, split, *a: (step, split) == (4, "eval"),
                  after=True)
    with pytest.raises(Killed):
        train_and_evaluate(config, tmp_path, **QUIET)
    monkeypatch.undo()
    assert any(r["split"] == "eval" and r["step"] == 4 for r in read_jsonl(tmp_path / "metrics.jsonl"))
    with Workdir(tmp_path) as wd:
        assert wd.latest_step() == 2 and not wd.finished(config)
    assert train_and_evaluate(config, tmp_path, **QUIET)["step"] == 4
    assert finished(tmp_path, config)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A finished 4-step run with evaluations (test split and the train subset) at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("evaluated")
    assert main(["train", "--config", CONFIG, "--workdir", str(workdir), *TINY, *EVALUATED]) == 0
    return workdir


def test_a_finished_run_that_lost_its_final_eval_lines_gets_them_from_jaxres_train_untrained(evaluated, tmp_path,
                                                                                               capsys):
    # As if the lines had not reached the disk when the machine went down after the checkpoint.
    copy = tmp_path / "run"
    shutil.copytree(evaluated, copy)
    config = tiny_config(eval_every_steps=2, train_eval_examples=8)
    records = read_jsonl(copy / "metrics.jsonl")
    final = [r for r in records if r["step"] == 4 and r["split"] in ("eval", "train_eval")]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r not in final))
    assert not finished(copy, config)
    checkpoint = final_tree(copy, config, 4)[0]
    assert main(["train", "--config", CONFIG, "--workdir", str(copy), *TINY, *EVALUATED]) == 0
    assert "resumed from checkpoint 4" in capsys.readouterr().out
    assert finished(copy, config)
    remade = lines_since_last_start(copy)
    assert [r["split"] for r in remade] == ["eval", "train_eval"]  # no training line: nothing retrained
    for old, new in zip(final, remade):
        assert {k: v for k, v in old.items() if k != "time"} == {k: v for k, v in new.items() if k != "time"}
    assert_trees_equal(final_tree(copy, config, 4)[0], checkpoint)


@pytest.mark.slow
@pytest.mark.skipif(not (IDX_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST IDX files absent from {IDX_DIR}: apt-get install dataset-fashion-mnist")
def test_a_grid_run_killed_at_its_final_eval_line_is_retrained_not_called_finished(tmp_path, monkeypatch):
    out, lines, steps = tmp_path / "out", [], 2
    grid = dict(models=("cifar_plain8",), conditions=("baseline",), seeds=(0,), num_steps=steps,
                data_dir=str(tmp_path / "tfds"))
    killed_during(monkeypatch, MetricsWriter, "write", lambda self, step, split, *a: (step, split) == (steps, "eval"),
                  after=True)
    with pytest.raises(Killed):
        degradation.run_degradation(out, report=lines.append, **grid)
    monkeypatch.undo()
    workdir = out / "runs" / "baseline" / "cifar_plain8" / "seed0"
    config = degradation.recipe("cifar_plain8", steps)
    with Workdir(workdir) as wd:
        assert wd.latest_step() == steps - 1 and not wd.finished(config)
    lines.clear()
    degradation.run_degradation(out, report=lines.append, **grid)
    assert not any("not retrained" in str(line) for line in lines), lines
    assert any(f"resuming from checkpoint {steps - 1}" in str(line) for line in lines), lines
    assert finished(workdir, config)
    lines.clear()
    degradation.run_degradation(out, report=lines.append, **grid)
    assert any("finished (2 steps)" in str(line) and "not retrained" in str(line) for line in lines), lines

    # A later sitting on another machine starts from the committed small files, no checkpoints.
    fresh = tmp_path / "fresh"
    copy = fresh / "runs" / "baseline" / "cifar_plain8" / "seed0"
    copy.mkdir(parents=True)
    for name in ("metrics.jsonl", "analysis.jsonl", "config.json"):
        shutil.copy(workdir / name, copy / name)
    lines.clear()
    degradation.run_degradation(fresh, report=lines.append, **grid)
    assert any("finished (2 steps)" in str(line) and "not retrained" in str(line) for line in lines), lines
    assert not (copy / "checkpoints").exists()
    # Without the final step's gradient record (written only after the final checkpoint) nothing
    # proves the run got that far: it is not taken as finished.
    kept = [r for r in read_jsonl(copy / "analysis.jsonl") if r["step"] != steps]
    (copy / "analysis.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    with Workdir(copy) as wd:
        assert not wd.finished_records_only(config) and not wd.finished(config)


def test_records_without_checkpoints_are_not_a_finished_run_when_no_monitor_record_proves_it(tmp_path):
    # Without the gradient monitor the final step's records are eval lines, written before the
    # final checkpoint: a run killed between them would look finished.
    config = tiny_config(eval_every_steps=2, train_eval_examples=8)
    tmp_path.joinpath("metrics.jsonl").write_text("".join(
        json.dumps({"step": config.num_steps, "split": split, "loss": 1.0}) + "\n" for split in ("eval", "train_eval")))
    with Workdir(tmp_path) as wd:
        assert wd.records_at(config.num_steps) == {"eval", "train_eval"}
        assert not wd.finished_records_only(config) and not wd.finished(config)


# -- the logs a workdir hands out --------------------------------------------------------------

def test_the_metrics_and_the_monitor_share_one_tensorboard_writer_and_the_workdir_closes_its_logs(tmp_path):
    with Workdir(tmp_path, create=True) as wd:
        metrics = MetricsWriter(wd, purge_step=5, report=lambda *_: None)
        analysis, _ = wd.analysis_log(report=lambda *_: None)
        assert wd.tensorboard() is metrics.tb  # the first call's purge step holds; one event file per run
        assert len(list(wd.tensorboard_dir.glob("events.out.tfevents.*"))) == 1
    assert metrics.lines.file is None and analysis.file is None and metrics.tb.file is None


def test_the_analysis_log_keeps_one_record_per_step_and_policy_up_to_the_restored_step(tmp_path):
    wd = Workdir(tmp_path, create=True)
    written = [(0, "batch", 1), (2, "batch", 1), (2, "batch", 2), (2, "eval", 1), (4, "batch", 1)]
    wd.analysis_path.write_text("".join(json.dumps({"step": s, "bn": b, "loss": v}) + "\n" for s, b, v in written)
                                + '{"step": 6, "bn"')  # a killed attempt's records after step 2, one torn
    with wd:
        _, kept = wd.analysis_log(keep_through=2, report=lambda *_: None)
    assert [(r["step"], r["bn"], r["loss"]) for r in kept] == [(0, "batch", 1), (2, "batch", 2), (2, "eval", 1)]
    assert wd.analysis_records() == kept  # the file now holds just them
