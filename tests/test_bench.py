"""`jaxres bench`: the numbers it reports are consistent with each other (not timed tests), the
side-by-side runner (`jaxres.bench.side_by_side`) times workers in processes of their own, and
every suite (`--suite step|conv|compile|analysis|monitor`) runs from the one parser on a tiny case,
refusing another suite's options in one line."""

import json
import pathlib
import subprocess
import sys

import pytest

import jaxres

from jaxres.bench import bench_train_step, training_flops
from jaxres.bench.peaks import ACCELERATOR_PEAKS, cpu_peak_flops
from jaxres.train.precision import compute_dtype
from jaxres.cli import build_parser, main


def test_training_flops_are_six_macs_per_example():
    # forward 2 FLOPs per MAC, backward twice the forward (Kaplan et al. 2020's 6N rule)
    assert training_flops(40_551_040, 128) == 6 * 40_551_040 * 128


def test_bench_row_is_self_consistent():
    row = bench_train_step("cifar_resnet20", batch_size=4, steps=2, warmup=0)
    assert row["macs_per_example"] == 40_551_040  # He et al. 2015: ResNet-20, 41M MACs
    assert row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
    assert row["images_per_s"] == pytest.approx(4 / row["step_s"])
    assert row["model_tflops_per_s"] == pytest.approx(6 * 40_551_040 * 4 / row["step_s"] / 1e12)
    assert 0 < row["mfu"] < 1
    assert row["compile_s"] > 0


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "cifar_resnet20", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                 "--peak-tflops", "1.0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert rows[0]["model"] == "cifar_resnet20" and rows[0]["peak"] == "given"
    assert rows[0]["mfu"] == pytest.approx(rows[0]["model_tflops_per_s"] / 1.0)
    assert "cifar_resnet20" in capsys.readouterr().out


def test_bad_arguments_fail_before_compiling(capsys):
    assert main(["bench", "resnet5O"]) == 2
    assert "unknown model 'resnet5O'; did you mean 'resnet50'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown compute dtype 'float64'"):
        compute_dtype("float64", "cpu")
    with pytest.raises(ValueError, match="TPUs have no float16"):
        compute_dtype("float16", "tpu")
    assert main(["bench", "cifar_resnet20", "--remat"]) == 2
    assert "pass it together with --scan" in capsys.readouterr().err
    assert main(["bench", "vgg11", "--scan"]) == 2
    assert "vgg11 is a VGG" in capsys.readouterr().err


def test_peak_tables():
    peak, desc = cpu_peak_flops()
    assert peak > 0 and "estimate" in desc
    assert dict(ACCELERATOR_PEAKS)["a100"]["bfloat16"] == 312e12  # NVIDIA A100 datasheet, dense


def test_pipeline_bench_reads_real_batches():
    from jaxres.bench.pipeline import bench_pipeline

    row = bench_pipeline("synthetic", batch_size=8, steps=3)
    assert row["images_per_s"] == pytest.approx(3 * 8 / row["seconds"])


def test_inference_mode_counts_forward_flops_only():
    row = bench_train_step("cifar_resnet20", batch_size=2, steps=1, warmup=0, mode="inference")
    assert row["mode"] == "inference"
    assert row["model_tflops_per_s"] == pytest.approx(2 * 40_551_040 * 2 / row["step_s"] / 1e12)


def test_a_torch_worker_imports_no_jax():
    code = ("import sys, jaxres.bench, jaxres.bench.worker, jaxres.bench.torch_reference, jaxres.bench.side_by_side; "
            "print(sorted(m for m in ('jax', 'flax', 'torch') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_side_by_side_rounds_alternate_and_summarize():
    """Two JAX workers (the same step): one ratio per round, per-side summaries that agree
    with the per-step times, cores busy and memory read from each worker process."""
    from jaxres.bench.side_by_side import Side, format_table, interleaved

    spec = {"model": "cifar_resnet20", "mode": "inference", "batch_size": 2, "input_size": 32, "num_classes": 10,
            "warmup": 0}
    row = interleaved(Side("jax", label="a"), Side("jax", label="b"), spec, rounds=3)
    a, b = row["a"], row["b"]
    assert len(row["ratios"]) == row["rounds"] == 3 == len(a["step_s"]) == len(b["step_s"])
    assert row["ratios"] == pytest.approx([x / y for x, y in zip(a["step_s"], b["step_s"])])
    assert row["ratio_min"] <= row["ratio_median"] == pytest.approx(sorted(row["ratios"])[1])
    for side in (a, b):
        assert side["step_s_min"] == min(side["step_s"]) and side["framework"].startswith("jax ")
        assert 0 < side["cores_busy_min"] <= side["cores_busy_median"] <= side["cores_busy_max"]
        assert 0 < side["baseline_mb"] < side["peak_mb"]
        assert side["jaxres"] == str(pathlib.Path(jaxres.__file__).parent)  # the worker imports this jaxres
    assert "cifar_resnet20" in format_table([row], "a", "b")


def test_sides_need_distinct_names_before_any_worker_starts():
    from jaxres.bench.side_by_side import Side, interleaved_sides

    with pytest.raises(ValueError, match="distinct names"):
        interleaved_sides([Side("jax"), Side("jax")], {"model": "cifar_resnet20"}, rounds=1)
    with pytest.raises(ValueError, match="two or more sides"):
        interleaved_sides([Side("jax")], {"model": "cifar_resnet20"}, rounds=1)


def test_onednn_side_by_side_without_the_extra_says_how_to_install_it(capsys):
    from jaxres.models import onednn_conv

    if onednn_conv.available():
        pytest.skip("the oneDNN extra is installed here (tests/test_models_onednn.py runs the comparison)")
    assert main(["bench", "cifar_resnet20", "--onednn"]) == 2
    assert "pip install -e '.[onednn]'" in capsys.readouterr().err


def test_a_failing_worker_raises_with_its_stderr():
    from jaxres.bench.side_by_side import Side, interleaved

    spec = {"model": "resnet5O", "batch_size": 2, "input_size": 32, "num_classes": 10}
    with pytest.raises(RuntimeError, match=r"(?s)the jax worker .* exited with code 1.*unknown model 'resnet5O'"):
        interleaved(Side("jax"), Side("jax", label="b"), spec, rounds=1)


@pytest.mark.torch
def test_cli_times_torch_side_by_side(tmp_path, capsys):
    pytest.importorskip("torchvision", reason="needs torch and torchvision (pip install -e '.[torch]')")
    out = tmp_path / "bench.json"
    assert main(["bench", "cifar_resnet20", "--batch-size", "2", "--steps", "2", "--warmup", "0", "--torch",
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["ratio"] == "jax/torch" and len(row["ratios"]) == 2
    assert row["torch"]["framework"].startswith("torch ") and row["jax"]["framework"].startswith("jax ")
    assert "jax/torch min/med" in capsys.readouterr().out


# --- the suites of `jaxres bench` ---------------------------------------------------------------

def bench_json(tmp_path, *argv) -> list[dict]:
    out = tmp_path / "bench.json"
    assert main(["bench", *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("argv, given", [
    (["cifar_resnet20", "cifar_resnet56", "--batch-size", "128", "--torch"],
     {"models": ["cifar_resnet20", "cifar_resnet56"], "torch": True}),
    (["resnet50", "--batch-size", "8", "--dtype", "bfloat16", "--driver", "sharded", "--json", "bench.json"],
     {"models": ["resnet50"], "batch_size": 8, "dtype": "bfloat16", "driver": "sharded", "json": "bench.json"}),
    (["cifar_resnet1202", "--batch-size", "32", "--scan", "--remat"],
     {"models": ["cifar_resnet1202"], "batch_size": 32, "scan": True, "remat": True}),
    (["resnet50", "--inference", "--steps", "8", "--torch", "--torch-python", "/usr/bin/python3"],
     {"models": ["resnet50"], "mode": "inference", "steps": 8, "torch": True, "torch_python": "/usr/bin/python3"}),
    (["cifar_resnet20", "--pipeline", "cifar10"], {"models": ["cifar_resnet20"], "pipeline": "cifar10"}),
])
def test_the_step_suite_parses_its_old_command_lines_the_same(argv, given):
    from jaxres.cli.bench import STEP_DEFAULTS, check_suite_arguments, with_step_defaults

    args = build_parser("bench").parse_args(["bench", *argv])
    assert check_suite_arguments(args) == "step"
    # the old parser's defaults (batch 128, 10 steps, 2 warm-up, float32, single, train), then what was given
    expected = {**STEP_DEFAULTS, "models": [], "json": None, **given}
    assert {k: v for k, v in vars(with_step_defaults(args)).items() if k not in ("command", "suite", "func")} == expected


CONV_ROW = {"shape", "rule", "ms_min", "ms_median", "speedup", "max_rel_diff", "repeats", "backend", "jax"}


def test_the_conv_suite_times_each_rule_on_the_chosen_shapes(tmp_path, monkeypatch, capsys):
    from jaxres.bench import conv_rules

    monkeypatch.setattr(conv_rules, "SHAPES", [(2, 8, 4, 8, 3, 1), (2, 8, 4, 8, 1, 2)])  # tiny stand-ins
    (row,) = bench_json(tmp_path, "--suite", "conv", "--only", "k1", "--repeats", "1")
    assert set(row) == CONV_ROW and row["shape"] == "2x8x8x4->8 k1s2"
    assert row["rule"] == "matmul"  # tests/test_models_conv.py: every 1x1 kernel
    assert set(row["ms_median"]) == set(conv_rules.COLUMNS)  # a 1x1 kernel has all three rules
    assert row["speedup"] == pytest.approx(row["ms_median"]["kernel_lax"] / row["ms_median"]["kernel_matmul"])
    assert row["max_rel_diff"] < 1e-5
    assert "2x8x8x4->8 k1s2" in capsys.readouterr().out


def test_the_compile_suite_compiles_each_variant(tmp_path):
    (row,) = bench_json(tmp_path, "--suite", "compile", "cifar_resnet20", "--variants", "scan", "--batch-size", "2")
    assert row["model"] == "cifar_resnet20" and row["variant"] == "scan" and row["scan_units"] is True
    assert 0 < row["lower_s"] < row["compile_s"] and row["hlo_chars"] > 0


def test_the_analysis_suite_runs_each_case_in_a_process_of_its_own(tmp_path):
    (row,) = bench_json(tmp_path, "--suite", "analysis", "cifar_resnet20", "--only", "lanczos", "--batch-size", "2",
                        "--repeats", "1")
    assert {k: row[k] for k in ("case", "model", "batch_size")} == {"case": "lanczos", "model": "cifar_resnet20",
                                                                     "batch_size": 2}
    assert row["converged"] and row["sigma"] > 0 and row["iterations"] > 0 and row["residual"] <= 1e-3
    assert 0 < row["median_s"] == row["first_call_s"]  # an iterative routine is timed once, compile included
    assert row["peak_rss_mib"] > 100  # the case's process: JAX and the model (ru_maxrss)


def test_the_monitor_suite_relates_a_measurement_to_training_steps(tmp_path, capsys):
    step, measure = bench_json(tmp_path, "--suite", "monitor", "cifar_resnet20", "--batch-size", "2", "--probe-sizes",
                               "2", "--steps", "1", "--repeats", "1", "--every", "10", "--run-steps", "100")
    assert step["case"] == "train_step" and step["model"] == "cifar_resnet20" and step["batch_size"] == 2
    assert (measure["case"], measure["probe_size"], measure["bn"]) == ("measure", 2, "batch")
    # 100 steps measured every 10: 11 measurements and one compile
    assert measure["overhead_interval"] == pytest.approx((measure["measure_s"] + measure["compile_s"])
                                                         / (10 * step["step_s"]))
    assert measure["overhead_run"] == pytest.approx((11 * measure["measure_s"] + measure["compile_s"])
                                                    / (100 * step["step_s"]))
    assert len(measure["load_avg_1min"]) == 2 and measure["cpus"] > 0
    assert "11 measurements + one compile over 100 steps; bar: 10%" in capsys.readouterr().out


def test_a_failing_case_process_raises_with_its_stderr():
    from jaxres.bench.cases import run_isolated

    with pytest.raises(RuntimeError, match=r"(?s)exited with code 1.*unknown model 'resnet5O'"):
        run_isolated("jaxres.bench.monitor_cost", "train_step_case", model_name="resnet5O", batch_size=2, steps=1)


@pytest.mark.parametrize("argv, error", [
    (["--suite", "conv", "--torch"],
     "the conv suite does not take --torch (step): drop it, or choose the suite in brackets with --suite"),
    (["cifar_resnet20", "--repeats", "3", "--variants", "scan"],
     "the step suite does not take --repeats (conv, analysis, monitor), --variants (compile): drop them, "
     "or choose the suite in brackets with --suite"),
    (["--suite", "monitor", "--chunks", "128"], "the monitor suite does not take --chunks (analysis)"),
    (["--suite", "compile", "cifar_resnet20", "--inference"], "the compile suite does not take --inference (step)"),
    (["--suite", "convv"], "unknown bench suite 'convv'; did you mean 'conv'? "
                           "(valid: analysis, compile, conv, monitor, step)"),
    (["--suite", "conv", "cifar_resnet20"], "the conv suite takes no models; got cifar_resnet20"),
    (["--suite", "monitor", "cifar_resnet20", "cifar_resnet32"],
     "the monitor suite measures one model per run; got 2: cifar_resnet20 cifar_resnet32"),
    ([], "the step suite needs one or more models, e.g. jaxres bench cifar_resnet20 "
         "(the other suites: --suite conv|compile|analysis|monitor)"),
    (["--suite", "compile", "resnet5O"], "unknown model 'resnet5O'; did you mean 'resnet50'"),
    (["--suite", "conv", "--only", "k9"], "--only 'k9' matches none of the conv suite's cases; they are: "),
])
def test_a_wrong_suite_option_is_refused_in_one_line(capsys, argv, error):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxres bench: error: {error}") and err.count("\n") == 1, err
