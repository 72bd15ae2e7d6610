"""`jaxres bench`: the numbers it reports are consistent with each other (not timed tests), and
the side-by-side runner (`jaxres.bench.side_by_side`) times workers in processes of their own."""

import json
import pathlib
import subprocess
import sys

import pytest

import jaxres

from jaxres.bench import bench_train_step, training_flops
from jaxres.bench.peaks import ACCELERATOR_PEAKS, cpu_peak_flops
from jaxres.train.precision import compute_dtype
from jaxres.cli import main


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
