"""The pmap and sharded drivers give the single-device result."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxres.train.distributed import initialize_distributed
from jaxres.train.drivers import check_batch_size, make_driver

ROOT = Path(__file__).resolve().parent.parent
WORKER = [sys.executable, str(ROOT / "tests" / "parallel_worker.py")]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run_worker(*args, timeout=300):
    out = subprocess.run([*WORKER, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single():
    return run_worker("single", 1)


def assert_same_training(result, reference):
    # float32, 3 SGD steps: cross-device means reassociate sums, nothing else differs
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
    assert result["step"] == reference["step"] == 3
    assert result["variables"].keys() == reference["variables"].keys()
    for name, value in reference["variables"].items():
        np.testing.assert_allclose(result["variables"][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["pmap", "sharded"])
def test_eight_cpu_devices_match_one(driver, single):
    result = run_worker(driver, 8)
    assert result["devices"] == 8
    assert_same_training(result, single)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["sharded", "pmap"])
def test_two_processes_of_two_devices_agree_with_one_device(driver, single):
    port = free_port()
    procs = [subprocess.Popen([*WORKER, driver, "2", str(pid), "2", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for pid in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["processes"] for r in results] == [2, 2] and results[0]["devices"] == 4
    assert results[0]["variables"] == results[1]["variables"]  # both hosts hold the same state
    assert_same_training(results[0], single)


@pytest.mark.slow
def test_two_process_training_job_checkpoints_collectively_and_resumes(tmp_path):
    """`jaxres train` on 2 processes x 2 CPU devices into one workdir: orbax writes each
    checkpoint once for the job, one process can read it, and the job resumes from it.
    (Numerics across device counts: the driver tests above. Each host shuffles its own share
    of the data, so the batches depend on the number of processes.)"""
    from jaxres.workdir import Workdir
    from jaxres.train.run import Run
    from jaxres.train.state import checkpoint_tree
    from tests.test_train_loop import tiny_config

    cli = "import sys; from jaxres.cli import main; sys.exit(main(sys.argv[1:]))"

    def job(num_steps):
        port = free_port()
        procs = [subprocess.Popen(
            [sys.executable, "-c", cli, "train", "--config", "synthetic", "--workdir",
             str(tmp_path), "--config.model_overrides.widths=(4, 8, 16)", "--config.batch_size=16",
             f"--config.num_steps={num_steps}", "--config.checkpoint_every_steps=2", "--config.eval_every_steps=0",
             "--config.log_every_steps=1", "--config.progress_bar=False", "--config.num_data_threads=1"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAXRES_COORDINATOR": f"127.0.0.1:{port}",
                 "JAXRES_NUM_PROCESSES": "2", "JAXRES_PROCESS_ID": str(pid)}) for pid in range(2)]
        outputs = [proc.communicate(timeout=600) for proc in procs]
        for proc, (_, err) in zip(procs, outputs):
            assert proc.returncode == 0, err[-3000:]
        return [out + err for out, err in outputs]

    job(4)
    with Workdir(tmp_path) as wd:
        assert wd.steps() == [2, 4]
        saved = wd.restore(4, checkpoint_tree(Run(tiny_config(), need_train=False).state)).state
    assert int(saved["step"]) == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(saved["params"]))
    logs = job(6)
    assert all("resumed from checkpoint 4" in log for log in logs), logs[0][-2000:]
    with Workdir(tmp_path) as wd:
        assert wd.steps() == [2, 4, 6]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # process 0 logs once per step, across the restart


def test_global_batch_must_split_evenly():
    with pytest.raises(ValueError, match="global batch size 10 is not divisible by the 4 devices; use a multiple of 4"):
        check_batch_size(10, 4)


def test_unknown_driver():
    with pytest.raises(ValueError, match="unknown parallel driver 'pjit'"):
        make_driver("pjit")


def test_distributed_arguments_are_checked():
    initialize_distributed()  # one host, nothing configured: a no-op
    with pytest.raises(ValueError, match="needs all three"):
        initialize_distributed(coordinator="localhost:1234")
    with pytest.raises(ValueError, match="process_id must be in \\[0, num_processes\\); got process_id=2"):
        initialize_distributed("localhost:1234", 2, 2)
