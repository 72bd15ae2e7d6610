"""The degradation experiment (jaxres.experiments): the grid it plans, the recipe's conditions,
its numbers, intervals and words from hand-written workdir files, and (slow) a tiny end-to-end
grid on real Fashion-MNIST that a rerun does not redo."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxres.analysis.quantities import MonitorRecord
from jaxres.experiments import degradation, degradation_plots, degradation_results, intervals
from jaxres.models import onednn_conv

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
UNITS = ["stem", "unit_1", "unit_2", "head"]
T2 = 12.706204736174707  # scipy.stats.t.ppf(0.975, 1): two seeds
T3 = 4.302652729749464  # scipy.stats.t.ppf(0.975, 2): three seeds


def analysis_record(step, grads, stds=(1.0, 1.0), rel=(0.01, 0.001), bn="batch", norms=(1.0, 1.0)):
    return {"step": step, "bn": bn, "probe_size": 32, "time_s": 0.5, "loss": 2.3, "units": UNITS,
            "dL_dh": dict(zip(UNITS, grads)), "dlogits_dh": {u: {"median": 1.0, "q10": 0.5, "q90": 2.0} for u in UNITS},
            "dL_dW": {f"unit_{i}/conv1/kernel": r * w for i, (r, w) in enumerate(zip(rel, norms), 1)},
            "dL_dW_rel": {f"unit_{i}/conv1/kernel": r for i, r in enumerate(rel, 1)},
            "response_std": {f"unit_{i}/layer1": s for i, s in enumerate(stds, 1)}}


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_run(out: Path, name: str, errors: dict, *, num_steps=100, grads=((1.0, 2.0, 0.5, 1.0),), steps=(100,)):
    """A run directory with eval / train_eval lines at `steps` (last one: `errors`) and gradient records."""
    workdir = out / "runs" / name
    metrics = []
    for step in steps:
        metrics += [{"step": step, "split": "train", "time": 1.0, "loss": 1.0, "accuracy": 1 - errors["window"],
                     "steps": 20},
                    {"step": step, "split": "train_eval", "time": 2.0, "loss": 0.9, "accuracy": 1 - errors["train"],
                     "count": 1000},
                    {"step": step, "split": "eval", "time": 3.0, "loss": 0.8, "accuracy": 1 - errors["test"],
                     "count": 10000}]
    write_jsonl(workdir / "metrics.jsonl", metrics)
    write_jsonl(workdir / "analysis.jsonl", [analysis_record(s, g) for s, g in zip((0, 8, num_steps), grads)])
    (workdir / "config.json").write_text(json.dumps({"num_steps": num_steps}))
    return workdir


@pytest.fixture
def grid(tmp_path):
    """Three seeds of baseline plain20/plain56 and of warmup/plain56 (error numbers chosen so that
    the paired differences are known), a fourth warmup seed that diverged, and one unfinished run."""
    plain20 = [0.10, 0.11, 0.12]
    plain56 = [0.20, 0.22, 0.27]  # depth gap 0.10, 0.11, 0.15: mean 0.12, sd 0.0264575
    warmup = [0.18, 0.22, 0.24]  # effect -0.02, 0.00, -0.03: mean -0.016667, sd 0.0152753
    for seed in range(3):
        write_run(tmp_path, f"baseline/cifar_plain20/seed{seed}",
                  {"train": plain20[seed], "window": plain20[seed] + 0.01, "test": plain20[seed] + 0.02})
        write_run(tmp_path, f"baseline/cifar_plain56/seed{seed}",
                  {"train": plain56[seed], "window": plain56[seed], "test": plain56[seed]},
                  grads=((1.0, 100.0, 0.5, 1.0), (1.0, 0.01, 0.001, 1.0), (1.0, 2.0, 0.5, 1.0)))
        write_run(tmp_path, f"warmup/cifar_plain56/seed{seed}",
                  {"train": warmup[seed], "window": warmup[seed], "test": warmup[seed]})
    write_run(tmp_path, "baseline/cifar_resnet20/seed0", {"train": 0.5, "window": 0.5, "test": 0.5}, steps=(50,))
    write_run(tmp_path, "warmup/cifar_plain56/seed3", {"train": 0.9, "window": 0.9, "test": 0.9}, steps=(50,))
    write_jsonl(tmp_path / "runs" / "wall_time.jsonl", [
        {"run": "baseline/cifar_plain20/seed0", "wall_time_s": 10.0, "step": 50, "stopped": True},
        {"run": "baseline/cifar_plain20/seed0", "wall_time_s": 20.5, "step": 100, "stopped": False,
         "convolutions": "onednn", "jax": "0.12.0"},
        {"run": "warmup/cifar_plain56/seed3", "wall_time_s": 5.0, "num_steps": 100,
         "diverged": "loss is nan at step 51; training stopped"}])
    return tmp_path


def by(results, **match):
    rows = [r for r in results if all(r[k] == v for k, v in match.items())]
    assert len(rows) == 1, (match, rows)
    return rows[0]


# -- intervals -------------------------------------------------------------------------------------

def test_t_interval_of_three_values_uses_students_t_with_two_degrees_of_freedom():
    interval = intervals.t_interval([1.0, 2.0, 3.0])
    assert (interval.mean, interval.n) == (2.0, 3)
    assert interval.high - interval.mean == pytest.approx(T3 * 1.0 / math.sqrt(3))
    assert interval.format(spec=".1f") == "2.0 [-0.5, 4.5]"


def test_p_value_is_the_two_sided_t_test_of_mean_zero():
    # df = 2 has a closed form: P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2; here t = 2 / (1 / sqrt(3))
    t = 2 * math.sqrt(3)
    assert intervals.t_interval([1.0, 2.0, 3.0]).p == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert intervals.t_interval([0.2, 0.2]).p == 0.0 and intervals.t_interval([0.0, 0.0]).p == 1.0
    assert math.isnan(intervals.t_interval([0.3]).p)


def test_holm_holds_the_smallest_p_values_until_the_first_that_fails_its_threshold():
    # m = 4 tests (NaN is none): thresholds 0.05/4, 0.05/3, 0.05/2, 0.05 in order of p; 0.04 would
    # pass its own 0.05, but Holm stops at the first failure (0.03 > 0.025)
    assert intervals.holm([0.01, 0.04, 0.03, math.nan, 0.005]) == [True, False, False, None, True]
    assert intervals.holm([0.001, 0.04]) == [True, True]
    assert intervals.holm([]) == []


def test_one_seed_has_no_interval_and_no_verdict():
    interval = intervals.t_interval([0.3, math.nan, None])
    assert interval.n == 1 and math.isnan(interval.low)
    assert intervals.verdict(interval, "up", "down") == "cannot tell (fewer than 2 seeds)"
    assert interval.format(100) == "30.00 (1 seed)"


def test_verdict_follows_the_side_of_zero_the_interval_lies_on():
    assert intervals.verdict(intervals.Interval(1.0, 0.2, 1.8, 3), "up", "down") == "up"
    assert intervals.verdict(intervals.Interval(-1.0, -1.8, -0.2, 3), "up", "down") == "down"
    assert intervals.verdict(intervals.Interval(0.5, -0.1, 1.1, 3), "up", "down") == "cannot tell (the interval holds 0)"


def test_differences_are_paired_by_seed_over_the_seeds_both_sides_have():
    diff = intervals.paired_difference({0: 0.3, 1: 0.5, 2: 0.9}, {0: 0.1, 1: 0.2, 3: 7.0})
    assert diff.n == 2 and diff.mean == pytest.approx(0.25)  # (0.2 + 0.3) / 2, seeds 0 and 1 only
    assert diff.high - diff.mean == pytest.approx(T2 * 0.0707107 / math.sqrt(2), rel=1e-5)


# -- the grid and the recipe -------------------------------------------------------------------------

def test_the_default_grid_is_the_baseline_on_four_nets_and_each_intervention_on_plain56_seed_by_seed():
    grid = degradation.plan()
    assert len(grid) == 3 * (4 + 4)
    assert [r.name for r in grid[:8]] == [
        "baseline/cifar_plain20/seed0", "baseline/cifar_plain56/seed0", "baseline/cifar_resnet20/seed0",
        "baseline/cifar_resnet56/seed0", "warmup/cifar_plain56/seed0", "equalized/cifar_plain56/seed0",
        "delta_orthogonal/cifar_plain56/seed0", "textbook/cifar_plain56/seed0"]
    assert {r.seed for r in grid[8:16]} == {1}


def test_skipinit_runs_on_the_deepest_residual_net():
    grid = degradation.plan(conditions=("baseline", "skipinit"), seeds=(0,))
    assert [r.name for r in grid if r.condition == "skipinit"] == ["skipinit/cifar_resnet56/seed0"]


@pytest.mark.parametrize("kwargs, message", [
    ({"conditions": ()}, "--conditions is empty"),
    ({"conditions": ("baseline", "warmpu")}, "unknown degradation condition 'warmpu'"),
    ({"conditions": ("baseline", "baseline")}, "'baseline' is listed twice"),
    ({"models": ("cifar_resnet20", "cifar_resnet56"), "conditions": ("warmup",)},
     "runs on the deepest plain model of --models, and there is none"),
    ({"models": ("cifar_plain20", "cifar_plain56"), "conditions": ("skipinit",)},
     "runs on the deepest residual model of --models, and there is none"),
    ({"models": ("cifar_plain52",)}, "6n\\+2.*got 'cifar_plain52'"),
    ({"models": ()}, "--models is empty"),
])
def test_bad_grids_are_refused_before_anything_runs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        degradation.plan(**kwargs)


@pytest.mark.parametrize("text, seeds", [("3", (0, 1, 2)), ("0,1,2", (0, 1, 2)), ("5,", (5,)), (" 2, 7 ", (2, 7))])
def test_seeds_are_a_count_or_a_list(text, seeds):
    assert degradation.parse_seeds(text) == seeds


@pytest.mark.parametrize("text, message", [
    ("", "a count N .* or a comma-separated list"), (",", "a count N"), ("0", "N >= 1"),
    ("1,2,1", "lists seed 1 more than once"), ("-1", "a count N"), ("a,b", "a count N")])
def test_bad_seed_lists_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        degradation.parse_seeds(text)


def test_recipe_scales_the_schedule_and_the_measurements_with_the_number_of_steps():
    config = degradation.recipe("cifar_plain56", 800, seed=2)
    assert config.model == "cifar_plain56" and config.num_steps == 800 and config.seed == 2
    assert dict(config.lr_boundaries) == {"400": 0.1, "600": 0.1}  # /10 at 50% and 75%
    assert (config.eval_every_steps, config.checkpoint_every_steps, config.analysis_every_steps) == (200, 100, 100)
    assert tuple(config.analysis_steps) == (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96)
    assert config.train_eval_examples == 10_000
    assert (config.learning_rate, config.momentum, config.weight_decay, config.batch_size) == (0.1, 0.9, 1e-4, 128)
    assert (config.optimizer, config.warmup_steps) == ("sgd", 0)


def test_each_condition_changes_one_thing_of_the_baseline():
    base = degradation.recipe("cifar_plain56", 1000).to_dict()

    def changed(condition):
        config = degradation.recipe("cifar_plain56", 1000, condition).to_dict()
        return {k: config[k] for k in config if config[k] != base[k]}

    assert changed("warmup") == {"warmup_steps": 100}
    assert changed("equalized") == {"optimizer": "lars", "trust_coefficient": 0.01}
    assert changed("delta_orthogonal") == {"model_overrides": {"kernel_init": "delta_orthogonal"}}
    assert changed("textbook") == {"model_overrides": {"norm": "none", "activation": "sigmoid",
                                                       "kernel_init": "glorot_uniform"}}
    residual = degradation.recipe("cifar_resnet56", 1000, "skipinit")
    assert residual.model_overrides.to_dict() == {"norm": "none", "zero_init_residual": True}


def test_recipe_builds_depth_8_from_model_overrides_and_keeps_the_condition():
    config = degradation.recipe("cifar_plain8", 100, "textbook")
    assert config.model == "ResNet"
    overrides = config.model_overrides.to_dict()
    assert overrides["stage_sizes"] == (1, 1, 1) and overrides["residual"] is False and overrides["norm"] == "none"


def test_a_zero_init_residual_branch_on_a_plain_net_is_refused():
    with pytest.raises(ValueError, match="'skipinit' changes residual branches; cifar_plain56 has none"):
        degradation.recipe("cifar_plain56", 100, "skipinit")


# -- the numbers --------------------------------------------------------------------------------------

def test_groups_hold_the_mean_and_interval_over_finished_seeds(grid):
    results, _ = degradation_results.collect(grid)
    plain56 = by(results["groups"], condition="baseline", model="cifar_plain56")
    assert plain56["seeds"] == [0, 1, 2] and plain56["diverged_seeds"] == [] and plain56["unfinished_seeds"] == []
    assert plain56["train_error"].mean == pytest.approx(0.23)
    assert plain56["train_error"].high - 0.23 == pytest.approx(T3 * 0.0360555 / math.sqrt(3), rel=1e-5)
    warmup = by(results["groups"], condition="warmup", model="cifar_plain56")
    assert warmup["seeds"] == [0, 1, 2] and warmup["diverged_seeds"] == [3] and warmup["unfinished_seeds"] == []
    resnet = by(results["groups"], condition="baseline", model="cifar_resnet20")
    assert resnet["seeds"] == [] and resnet["unfinished_seeds"] == [0] and resnet["train_error"].n == 0


def test_the_training_error_is_the_eval_mode_one_and_the_window_error_is_kept_apart(grid):
    results, _ = degradation_results.collect(grid)
    row = by(results["runs"], run="baseline/cifar_plain20/seed1")
    assert row["train_error"] == pytest.approx(0.11)  # train_eval split
    assert row["window_error"] == pytest.approx(0.12)  # last train window
    assert row["test_error"] == pytest.approx(0.13)
    assert row["wall_time_s"] is None or math.isnan(row["wall_time_s"])  # no invocation recorded
    assert by(results["runs"], run="baseline/cifar_plain20/seed0")["wall_time_s"] == pytest.approx(30.5)
    # whose convolutions ran, from the invocations that recorded it; "-" where none did
    assert by(results["runs"], run="baseline/cifar_plain20/seed0")["convolutions"] == "onednn"
    assert row["convolutions"] == "-"
    table = degradation_results.markdown_runs(results).splitlines()
    assert [line.rsplit("|", 2)[-2].strip() for line in table if "plain20/seed" in line] == ["onednn", "-", "-"]
    assert "eval mode" in results["errors"]["train_error"] and "window" in results["errors"]["window_error"]


def test_gradient_ratios_at_the_start_in_the_early_phase_and_at_the_end(grid):
    results, _ = degradation_results.collect(grid)
    row = by(results["runs"], run="baseline/cifar_plain56/seed0")
    assert row["unit1_head_start"] == pytest.approx(100.0)  # step 0: unit_1 / head
    assert row["min_head_start"] == pytest.approx(0.5)  # the smallest inner unit (unit_2)
    assert row["unit1_head_early_min"] == pytest.approx(0.01)  # step 8
    assert row["min_head_early_min"] == pytest.approx(0.001)
    assert row["unit1_head_end"] == pytest.approx(2.0) and row["end_step"] == 100
    assert row["kernel_step_spread_end"] == pytest.approx(0.001 / 0.0055)  # min / median of dL_dW_rel


def test_depth_gaps_and_intervention_effects_are_paired_by_seed_with_their_words(grid):
    results, _ = degradation_results.collect(grid)
    comparisons = results["comparisons"]
    gap = by(comparisons, kind="depth", condition="baseline", error="train_error")
    assert gap["model"] == "cifar_plain56" and gap["reference"] == "baseline/cifar_plain20"
    assert gap["difference"].mean == pytest.approx(0.12)
    assert gap["difference"].low == pytest.approx(0.12 - T3 * 0.0264575 / math.sqrt(3), rel=1e-5)
    assert gap["verdict"] == "degrades (deeper is worse)"
    # 0.016 does not survive Holm's correction over this grid's comparisons; the verdict stays, marked
    tests = results["multiplicity"]["tests"]
    assert gap["difference"].p == pytest.approx(0.0158, abs=1e-4) and gap["difference"].p > 0.05 / tests
    assert gap["holm"] is False
    # among the primary comparisons (eval-mode training error: this gap and warmup's effect; the
    # residual pair has no finished seed) Holm's thresholds are 0.05/2 and 0.05: the gap holds
    assert results["multiplicity"]["primary_tests"] == 2 and gap["holm_primary"] is True
    assert "holm_primary" not in by(comparisons, kind="depth", condition="baseline", error="test_error")
    assert tests == sum(c["difference"].n >= 2 for c in comparisons + results["mechanism"]["comparisons"])
    effect = by(comparisons, kind="effect", condition="warmup", error="train_error")
    assert effect["difference"].mean == pytest.approx(-0.016667, rel=1e-4) and effect["difference"].n == 3
    assert effect["verdict"] == "cannot tell (the interval holds 0)"
    left = by(comparisons, kind="vs shallow plain", condition="warmup", error="train_error")
    assert left["reference"] == "baseline/cifar_plain20" and left["verdict"] == "still worse than cifar_plain20"
    assert not [c for c in comparisons if c["kind"] == "depth" and c["condition"] == "warmup"]  # one depth only


def test_results_json_is_strict_json_with_intervals_as_objects(grid):
    degradation_plots.write_outputs(grid)
    results = json.loads((grid / "results.json").read_text())
    group = by(results["groups"], condition="baseline", model="cifar_plain20")
    assert set(group["train_error"]) == {"mean", "low", "high", "n", "p"}
    assert by(results["groups"], condition="baseline", model="cifar_resnet20")["train_error"]["mean"] is None
    assert by(results["runs"], run="warmup/cifar_plain56/seed3")["diverged"].startswith("loss is nan")


def test_every_figure_and_table_is_written(grid):
    degradation_plots.write_outputs(grid)
    for name in degradation_plots.OUTPUTS:
        assert (grid / name).stat().st_size > 0, name
    assert (grid / "degradation_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (grid / "results.md").read_text()
    assert "| baseline | cifar_plain56 | 0,1,2 | 23.00 [14.04, 31.96] |" in table
    assert "| warmup | cifar_plain56 | 0,1,2 (diverged: 3) |" in table
    # t = 0.12 / (0.0264575 / sqrt(3)) = 7.856 with 2 degrees of freedom: p = 1 - t / sqrt(t^2 + 2) = 0.016
    assert "| baseline: cifar_plain56 - cifar_plain20 | train_error | 12.00 [5.43, 18.57] | 3 | 0.016 | degrades" in table
    assert "Holm" in table
    assert not list(grid.glob(".*"))  # no temporary files left


def test_a_run_of_another_length_is_refused_before_training(grid):
    config = degradation.recipe("cifar_plain20", 200)  # the workdir holds a 100-step run
    with pytest.raises(ValueError, match="holds a run of 100 steps, not 200; rerun with --num-steps 100"):
        degradation.train_one(grid, degradation.RunSpec(0, "baseline", "cifar_plain20"), config, "1/1", report=print)


def test_a_diverged_run_is_not_retried(grid):
    lines = []
    config = degradation.recipe("cifar_plain56", 100, "warmup", seed=3)
    assert degradation.train_one(grid, degradation.RunSpec(3, "warmup", "cifar_plain56"), config, "1/1",
                                 report=lines.append) is False
    assert "diverged before (loss is nan at step 51" in lines[0] and "not retried" in lines[0]


def test_missing_dataset_without_debian_files_says_how_to_import(tmp_path, monkeypatch):
    monkeypatch.setattr(degradation, "DEBIAN_IDX_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="jaxres data import fashion_mnist --from DIR"):
        degradation.run_degradation(tmp_path / "out", data_dir=str(tmp_path / "tfds"), report=print)


@pytest.mark.slow
@pytest.mark.skipif(not (IDX_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST IDX files absent from {IDX_DIR}: apt-get install dataset-fashion-mnist")
def test_tiny_grid_on_fashion_mnist_is_not_redone(tmp_path):
    out, lines = tmp_path / "out", []
    # --quick's path (its seeds 0 and 1, evaluations, training-subset size), on two of its nets, 2 steps
    kwargs = dict(models=("cifar_plain8", "cifar_resnet8"), conditions=("baseline", "equalized"), quick=True,
                  num_steps=2, data_dir=str(tmp_path / "tfds"))
    results = degradation.run_degradation(out, **kwargs, report=lines.append)
    assert [r["run"] for r in results["runs"]] == [
        "baseline/cifar_plain8/seed0", "baseline/cifar_plain8/seed1", "baseline/cifar_resnet8/seed0",
        "baseline/cifar_resnet8/seed1", "equalized/cifar_plain8/seed0", "equalized/cifar_plain8/seed1"]
    assert all(r["finished"] and r["steps"] == 2 for r in results["runs"])
    assert all(0 <= r["train_error"] <= 1 for r in results["runs"])  # eval-mode error on the training subset
    records = [json.loads(x) for x in (out / "runs" / "baseline/cifar_resnet8/seed0/analysis.jsonl").read_text()
               .splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    seeds = [json.loads((out / "runs" / f"baseline/cifar_plain8/seed{s}/config.json").read_text())["seed"]
             for s in (0, 1)]
    assert seeds == [0, 1]
    start = json.loads((out / "runs" / "baseline/cifar_plain8/seed0/metrics.jsonl").read_text().splitlines()[0])
    assert start["schedule"]["train_eval_examples"] == degradation.QUICK_TRAIN_EVAL_EXAMPLES
    assert start["schedule"]["eval_every_steps"] == 1  # 2 steps, QUICK_EVALUATIONS evaluations
    assert start["schedule"]["eval_examples"] == degradation.QUICK_TEST_EXAMPLES
    assert start["schedule"]["checkpoint_every_steps"] == 1  # at the evaluations only
    evals = [json.loads(x) for x in (out / "runs" / "baseline/cifar_plain8/seed0/metrics.jsonl").read_text()
             .splitlines() if '"split": "eval"' in x]
    assert [r["count"] for r in evals] == [degradation.QUICK_TEST_EXAMPLES] * 2
    files = sorted(out.glob("runs/*/*/seed*/metrics.jsonl"))
    before = {p: p.read_bytes() for p in files}
    wall = (out / "runs" / "wall_time.jsonl").read_text()
    invocations = [json.loads(x) for x in wall.splitlines()]
    assert len(invocations) == 6  # each says what decided its rounding besides the config
    assert {r["jax"] for r in invocations} == {jax.__version__}
    assert {r["convolutions"] for r in invocations} == {"onednn" if onednn_conv.enabled() else "xla"}

    lines.clear()
    degradation.run_degradation(out, **kwargs, report=lines.append)
    assert sum("not retrained" in str(line) for line in lines) == 6
    assert {p: p.read_bytes() for p in files} == before
    assert (out / "runs" / "wall_time.jsonl").read_text() == wall
    for name in degradation_plots.OUTPUTS:
        assert (out / name).is_file(), name


def test_the_last_window_weights_each_line_by_the_steps_it_averages():
    lines = [{"step": 980, "split": "train", "accuracy": 0.0, "steps": 20},
             {"step": 983, "split": "train", "accuracy": 0.5, "steps": 3},  # cut by a SIGTERM, then resumed
             {"step": 1000, "split": "train", "accuracy": 0.9, "steps": 17}]
    assert degradation_results.window_error(lines, 1000, 20) == pytest.approx(1 - (3 * 0.5 + 17 * 0.9) / 20)
    older = [{"step": 980, "accuracy": 0.0}, {"step": 1000, "accuracy": 0.8}]  # before `steps`: the distance
    assert degradation_results.window_error(older, 1000, 20) == pytest.approx(0.2)


def test_lines_of_a_killed_attempt_after_the_step_resumed_from_do_not_count():
    metrics = [{"step": 20, "split": "train", "accuracy": 0.1}, {"step": 40, "split": "train", "accuracy": 0.2},
               {"step": 40, "split": "eval", "accuracy": 0.3},  # killed before checkpoint 40 was saved
               {"step": 20, "split": "event", "start": True, "event": "resumed from checkpoint 20"},
               {"step": 30, "split": "train", "accuracy": 0.4, "steps": 10}]
    kept = degradation_results.current_attempt(metrics)
    assert [(r["step"], r["split"]) for r in kept] == [(20, "train"), (20, "event"), (30, "train")]


def test_a_killed_invocation_counts_the_span_of_its_records():
    start = {"split": "event", "start": True}
    metrics = [dict(start, step=0, time=100.0), {"step": 12, "split": "train", "time": 250.0},
               {"step": 24, "split": "train", "time": 400.0},  # killed here: no wall time recorded
               dict(start, step=12, time=1000.0), {"step": 24, "split": "train", "time": 1150.0},
               {"step": 36, "split": "eval", "time": 1200.0}]
    spans = degradation_results.attempt_spans(metrics)
    assert spans == [(100.0, 400.0), (1000.0, 1200.0)]
    assert degradation_results.wall_time(spans, [(1205.0, 210.0)]) == pytest.approx(300.0 + 210.0)
    assert degradation_results.wall_time(spans, []) == pytest.approx(300.0 + 200.0)  # both killed
    assert degradation_results.wall_time(spans, [(450.0, 360.0), (1205.0, 210.0)]) == pytest.approx(570.0)
    assert math.isnan(degradation_results.wall_time([], []))


def test_kernel_norms_and_their_growth_come_from_the_gradient_and_its_ratio():
    first = MonitorRecord(0, "batch", dL_dW={"a": 2.0, "b": 1.0, "c": 0.0},
                          dL_dW_rel={"a": 0.5, "b": 0.25, "c": 0.0})  # ||W||: 4, 4, -
    last = MonitorRecord(100, "batch", dL_dW={"a": 1.0, "b": 1.0, "c": 1.0},
                         dL_dW_rel={"a": 0.01, "b": 0.125, "c": 0.5})  # 100, 8, 2
    norms = degradation_results.kernel_norms(last)
    assert norms == pytest.approx({"a": 100.0, "b": 8.0, "c": 2.0})
    growth = degradation_results.kernel_norm_growth(first, last)
    assert growth["a"] == pytest.approx(25.0) and growth["b"] == pytest.approx(2.0) and math.isnan(growth["c"])


def test_the_mechanism_is_compared_like_the_errors(grid):
    """Norm growth (largest kernel, step 0 to the end) paired by seed in log10: plain56 grows its
    kernels 100x where plain20 grows them 1x (depth: +2), warmup on plain56 10x (effect: -1)."""
    for seed in range(3):
        for name, growth in (("baseline/cifar_plain56", 100.0), ("warmup/cifar_plain56", 10.0 * (1 + 0.1 * seed))):
            path = grid / "runs" / name / f"seed{seed}" / "analysis.jsonl"
            write_jsonl(path, [analysis_record(0, (1.0, 2.0, 0.5, 1.0)),
                               analysis_record(100, (1.0, 2.0, 0.5, 1.0), norms=(growth, 1.0))])
    results, _ = degradation_results.collect(grid)
    assert by(results["runs"], run="baseline/cifar_plain56/seed1")["kernel_norm_growth_max"] == pytest.approx(100.0)
    mechanism = results["mechanism"]["comparisons"]
    depth = by(mechanism, kind="depth", condition="baseline")
    assert depth["difference"].mean == pytest.approx(2.0) and depth["verdict"] == "grows the kernel norms more"
    effect = by(mechanism, kind="effect", condition="warmup")
    assert effect["difference"].mean == pytest.approx(np.mean([math.log10(10 * (1 + 0.1 * s)) - 2 for s in range(3)]))
    assert effect["verdict"] == "grows them less"
    assert "log10 of the largest kernel-norm growth" in degradation_results.markdown(results)
