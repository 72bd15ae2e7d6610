"""`jaxres bench`: the numbers it reports are consistent with each other (not timed tests)."""

import json

import pytest

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
