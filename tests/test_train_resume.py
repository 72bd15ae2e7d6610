"""Kill-and-resume with real processes: a run killed by SIGKILL at an arbitrary moment, or
stopped by SIGTERM, and restarted with the same command ends bitwise identical (CPU) to an
uninterrupted run with the same seed, and with its records (a SIGKILL between a checkpoint and
its gradient measurement included)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxres.analysis.monitor import read_analysis
from jaxres.train import apply_overrides, load_config
from jaxres.train.run import Run
from jaxres.train.state import checkpoint_tree
from jaxres.workdir import Workdir

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS = 40
OVERRIDES = ["--config.model_overrides.widths=(4, 8, 16)", "--config.batch_size=32",
             f"--config.num_steps={NUM_STEPS}", "--config.checkpoint_every_steps=5",
             "--config.eval_every_steps=0", "--config.log_every_steps=5", "--config.progress_bar=False",
             "--config.lr_boundaries={'20': 0.1}"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The runs share JAX's persistent compilation cache: the first process compiles, the
    others load the same executables (identical programs, so identical results) and skip
    most of their start-up cost."""
    cache = tmp_path_factory.mktemp("jax_cache")
    saved = {k: os.environ.get(k) for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    os.environ.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def command(workdir):
    return [sys.executable, "-c", "import sys; from jaxres.cli import main; sys.exit(main())", "train",
            "--config", "synthetic", "--workdir", str(workdir), *OVERRIDES]


def start(workdir):
    return subprocess.Popen(command(workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(workdir, proc, at_least, timeout=300):
    """Polls until a complete checkpoint >= `at_least` exists (orbax renames it into place)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if steps and max(steps) >= at_least:
            return max(steps)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def final_state(workdir):
    config = apply_overrides(load_config("synthetic"), list(OVERRIDES))
    with Workdir(workdir) as wd:
        assert wd.latest_step() == NUM_STEPS
        saved = wd.restore(NUM_STEPS, checkpoint_tree(Run(config, need_train=False).state))
    return saved.state, saved.data


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return final_state(workdir)


def test_sigkill_mid_run_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_for_checkpoint(tmp_path, proc, 10)
    time.sleep(0.05)  # into the next steps: the kill lands between checkpoints, 30 steps before the end
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # it really died before finishing
    killed_at = max(int(p.name) for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit())
    assert killed_at < NUM_STEPS
    resumed = subprocess.run(command(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resumed from checkpoint {killed_at}" in resumed.stdout
    tree, data_state = final_state(tmp_path)
    assert data_state == uninterrupted[1] == {"next_index": NUM_STEPS}
    assert_bitwise_equal(tree, uninterrupted[0])


def test_sigterm_saves_exits_cleanly_and_resumes_bitwise(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_for_checkpoint(tmp_path, proc, 10)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: saved checkpoint" in out
    stopped_at = int(out.split("SIGTERM: saved checkpoint ")[1].split()[0])
    assert stopped_at < NUM_STEPS and (tmp_path / "checkpoints" / str(stopped_at)).is_dir()
    resumed = subprocess.run(command(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resumed from checkpoint {stopped_at}" in resumed.stdout
    assert_bitwise_equal(final_state(tmp_path)[0], uninterrupted[0])


KILL_IN_MEASUREMENT = ("import os, signal, sys\n"
                       "from jaxres.analysis.monitor import TrainingMonitor\n"
                       "measure = TrainingMonitor.measure\n"
                       "def sigkill_at(self, step, variables):\n"
                       "    if step == int(sys.argv[1]):\n"
                       "        os.kill(os.getpid(), signal.SIGKILL)\n"
                       "    return measure(self, step, variables)\n"
                       "TrainingMonitor.measure = sigkill_at\n"
                       "from jaxres.cli import main\n"
                       "sys.exit(main(sys.argv[2:]))\n")


@pytest.mark.parametrize("kill_at", [20, NUM_STEPS], ids=["mid-run", "final step"])
def test_sigkill_between_a_checkpoint_and_its_measurement_then_resume_measures_that_step(uninterrupted, tmp_path,
                                                                                        kill_at):
    # Evaluated steps save their checkpoint before the gradient measurement.
    args = command(tmp_path)[3:] + ["--config.eval_every_steps=10", "--config.analysis_every_steps=10",
                                    "--config.analysis_batch_size=4"]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_MEASUREMENT, str(kill_at), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert max(int(p.name) for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit()) == kill_at
    assert kill_at not in [r["step"] for r in read_analysis(tmp_path)]
    resumed = subprocess.run(command(tmp_path)[:3] + args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resumed from checkpoint {kill_at}" in resumed.stdout
    assert [r["step"] for r in read_analysis(tmp_path)] == [0, 10, 20, 30, 40]
    assert_bitwise_equal(final_state(tmp_path)[0], uninterrupted[0])
