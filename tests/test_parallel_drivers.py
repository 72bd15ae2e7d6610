"""The pmap and sharded drivers give the single-device result (issue 5)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxres.parallel import check_batch_size, initialize_distributed, make_driver

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
