"""Gradient propagation measured during training (`config.analysis_every_steps`,
`analysis_steps`) and the eval-mode score of a fixed training subset (`train_eval_examples`):
the records are the library's numbers, survive a kill and resume unchanged (a kill between a
checkpoint and its measurement included), the schedule may change on resume, and a bad setting
or a failing measurement never costs the run."""

import os

import jax
import numpy as np
import pytest

from jaxres import data
from jaxres.analysis import TrainingMonitor, end_to_end_norms, read_analysis
from jaxres.train import train_and_evaluate
from jaxres.train.run import TRAIN_EVAL_SEED, Run
from jaxres.files import read_jsonl
from jaxres.workdir import Workdir
from tests.test_train_loop import final_tree, tiny_config
from tests.test_workdir_faults import QUIET, Killed, killed_during, sigterm_during


def analysis_config(**fields):
    return tiny_config(**{"analysis_every_steps": 2, "analysis_batch_size": 8, "analysis_bn": "eval,batch", **fields})


def numbers(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("analysed")
    config = analysis_config()
    train_and_evaluate(config, workdir, **QUIET)
    return workdir, config


def test_records_at_step_zero_every_interval_and_the_end_for_each_bn_policy(analysed):
    records = read_analysis(analysed[0])
    assert [(r["step"], r["bn"]) for r in records] == [(s, bn) for s in (0, 2, 4) for bn in ("eval", "batch")]
    assert records[0]["probe_size"] == 8 and records[0]["units"][0] == "stem"


def test_records_equal_end_to_end_norms_on_the_checkpoint_and_the_probe_batch(analysed):
    workdir, config = analysed
    run = Run(config)
    images, labels = run.probe_batch(config.analysis_batch_size)
    state = final_tree(workdir, config, 4)[0]
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    for record in read_analysis(workdir)[-2:]:
        expected = end_to_end_norms(run.analysis_model(), variables, images, labels, bn=record["bn"])
        for unit in record["units"]:
            grad = np.sqrt(np.sum(np.square(expected["units"][unit]["input"]["loss_grad"])))
            np.testing.assert_allclose(record["dL_dh"][unit], grad, rtol=1e-6)
            np.testing.assert_allclose(record["dlogits_dh"][unit]["median"],
                                       np.median(expected["units"][unit]["input"]["logit_jac_summed_rows"]), rtol=1e-6)


def test_a_run_stopped_and_resumed_ends_with_the_records_of_an_uninterrupted_one(analysed, monkeypatch, tmp_path):
    # SIGTERM during the measurement at step 2 (records written, then the checkpoint), and once
    # more a kill-like cut: records past the last checkpoint are dropped on resume.
    sent = sigterm_during(monkeypatch, TrainingMonitor, "measure", lambda self, step, *a: step == 2)
    assert train_and_evaluate(analysis_config(), tmp_path, **QUIET)["stopped"] and sent
    monkeypatch.undo()
    with open(tmp_path / "analysis.jsonl", "a") as f:  # as if killed after measuring step 4
        f.write(open(analysed[0] / "analysis.jsonl").read().splitlines()[-1] + "\n")
    train_and_evaluate(analysis_config(), tmp_path, **QUIET)
    assert numbers(read_analysis(tmp_path)) == numbers(read_analysis(analysed[0]))


def test_a_probe_batch_larger_than_the_split_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"probe batch of 100000 examples needs a split with at least 100000"):
        train_and_evaluate(analysis_config(analysis_batch_size=100000), tmp_path, **QUIET)
    assert Workdir(tmp_path).steps() == []


def test_an_unwritable_analysis_file_is_refused_before_training(tmp_path):
    os.makedirs(tmp_path / "analysis.jsonl")
    with pytest.raises(OSError, match="analysis.jsonl"):
        train_and_evaluate(analysis_config(), tmp_path, **QUIET)
    assert Workdir(tmp_path).steps() == []


def test_a_failing_measurement_never_costs_the_run(analysed, monkeypatch, tmp_path):
    original = TrainingMonitor.measure

    def measure(self, step, variables):
        if step == 2:
            raise FloatingPointError("simulated failure")
        return original(self, step, variables)

    monkeypatch.setattr(TrainingMonitor, "measure", measure)
    messages = []
    assert train_and_evaluate(analysis_config(), tmp_path, report=messages.append)["step"] == 4
    assert any("analysis at step 2 failed (FloatingPointError: simulated failure)" in m for m in messages)
    events = [r["event"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "event"]
    assert any(e.startswith("analysis stopped: FloatingPointError") for e in events)
    assert [r["step"] for r in read_analysis(tmp_path)] == [0, 0]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                     final_tree(tmp_path, analysis_config(), 4)[0],
                                     final_tree(analysed[0], analysis_config(), 4)[0]))


@pytest.mark.parametrize("step", [2, 4], ids=["mid-run", "final step"])
def test_a_kill_between_a_checkpoint_and_its_measurement_is_measured_on_resume(analysed, monkeypatch, tmp_path, step):
    # At an evaluated step the checkpoint is saved before the measurement; killed in between,
    # the resumed run starts from that checkpoint and must measure the step it starts from.
    config = analysis_config(eval_every_steps=2)
    killed_during(monkeypatch, TrainingMonitor, "measure", lambda self, s, *a: s == step)
    with pytest.raises(Killed):
        train_and_evaluate(config, tmp_path, **QUIET)
    monkeypatch.undo()
    with Workdir(tmp_path) as wd:
        assert wd.latest_step() == step
    assert step not in {r["step"] for r in read_analysis(tmp_path)}
    messages = []
    train_and_evaluate(config, tmp_path, report=messages.append)
    assert any(f"resumed from checkpoint {step}" in m for m in messages)
    assert numbers(read_analysis(tmp_path)) == numbers(read_analysis(analysed[0]))


def test_extra_analysis_steps_are_measured_besides_the_interval_and_the_end(tmp_path):
    train_and_evaluate(analysis_config(num_steps=5, analysis_every_steps=4, analysis_steps=(1, 3), analysis_bn="batch"),
                       tmp_path, **QUIET)
    assert [r["step"] for r in read_analysis(tmp_path)] == [0, 1, 3, 4, 5]


def test_the_schedule_may_change_on_resume_and_the_records_say_which_made_them(tmp_path):
    train_and_evaluate(analysis_config(analysis_bn="batch"), tmp_path, **QUIET)  # steps 0, 2, 4
    # a longer run measuring at step 5 only (and the end), with the train subset scored too
    changed = analysis_config(analysis_bn="batch", num_steps=7, analysis_every_steps=0, analysis_steps=(5,),
                              train_eval_examples=8, eval_examples=16)
    train_and_evaluate(changed, tmp_path, **QUIET)
    assert [r["step"] for r in read_analysis(tmp_path)] == [0, 2, 4, 5, 7]
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    starts = [r for r in metrics if r.get("start")]
    assert [(r["step"], r["schedule"]["analysis_every_steps"], r["schedule"]["analysis_steps"],
             r["schedule"]["train_eval_examples"], r["schedule"]["eval_examples"]) for r in starts] == [
        (0, 2, [], 0, 0), (4, 0, [5], 8, 16)]
    evals = {r["step"]: r["count"] for r in metrics if r["split"] == "eval"}
    assert evals[7] == 16 < evals[4]  # the whole split before the change, the sample after


@pytest.mark.parametrize("field, value, match", [
    ("analysis_steps", (4, -1), r"analysis_steps must be a tuple of step numbers >= 0 .*got \(4, -1\)"),
    ("analysis_steps", (1.5,), r"analysis_steps must be a tuple of step numbers >= 0 .*got \(1.5,\)"),
    ("analysis_steps", ("4",), r"analysis_steps must be a tuple of step numbers >= 0 .*got \('4',\)"),
    ("train_eval_examples", -5, r"train_eval_examples must be an integer >= 0.*got -5"),
    ("train_eval_examples", 10**6, r"train_eval_examples 1000000 exceeds the \d+ examples of the training split"),
    ("eval_examples", -1, r"eval_examples must be an integer >= 0.*got -1"),
    ("eval_examples", 10**6, r"eval_examples 1000000 exceeds the \d+ examples of the eval split"),
])
def test_a_bad_record_schedule_is_refused_before_training(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(analysis_config(**{field: value}), tmp_path / "run", **QUIET)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_eval_scores_a_fixed_training_subset_in_eval_mode_at_every_evaluation(tmp_path):
    config = tiny_config(seed=3, eval_every_steps=2, train_eval_examples=20)
    summary = train_and_evaluate(config, tmp_path, **QUIET)
    lines = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train_eval"]
    assert [(r["step"], r["count"]) for r in lines] == [(2, 20), (4, 20)]
    # the same images whatever the run's seed: the first 20 of a TRAIN_EVAL_SEED permutation
    run = Run(config)
    indices = data.permuted_indices(len(run.train_source), 20, TRAIN_EVAL_SEED)
    np.testing.assert_array_equal(run.train_eval_source.indices, indices)
    assert TRAIN_EVAL_SEED != config.seed
    # the numbers are Run.evaluate's (eval mode, eval transform) on the final checkpoint
    state = run.driver.put_state(run.state.replace(**final_tree(tmp_path, config, 4)[0]))
    expected = run.evaluate(state, data.SourceSubset(run.train_source, indices))
    assert lines[-1]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert lines[-1]["accuracy"] == expected["accuracy"] == summary["train_eval"]["accuracy"]


def test_eval_examples_scores_a_fixed_sample_of_the_eval_split_and_evaluate_still_the_whole(tmp_path):
    config = tiny_config(seed=3, eval_every_steps=2, eval_examples=24)
    train_and_evaluate(config, tmp_path, **QUIET)
    lines = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "eval"]
    assert [(r["step"], r["count"]) for r in lines] == [(2, 24), (4, 24)]
    run = Run(config)
    indices = data.permuted_indices(len(run.eval_source), 24, TRAIN_EVAL_SEED)
    np.testing.assert_array_equal(run.evaluation_sources()["eval"].indices, indices)
    state = run.driver.put_state(run.state.replace(**final_tree(tmp_path, config, 4)[0]))
    expected = run.evaluate(state, data.SourceSubset(run.eval_source, indices))
    assert lines[-1]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert lines[-1]["accuracy"] == expected["accuracy"]
    assert run.evaluate(state)["count"] == len(run.eval_source) > 24  # outside training: the whole split


def test_measuring_sharpness_leaves_the_training_bitwise_unchanged(analysed, tmp_path):
    # The Hessian of the probe batch's loss is taken on the same state the step trains; nothing
    # of it may reach the parameters, the BatchNorm statistics or the data order.
    config = analysis_config(analysis_sharpness=20)
    train_and_evaluate(config, tmp_path, **QUIET)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "sharpness"] == [0, 2, 4]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                     final_tree(tmp_path, config, 4)[0],
                                     final_tree(analysed[0], analysis_config(), 4)[0]))
