"""Fault injection on a run's workdir: every way a run could be lost, mixed or misreported,
made to happen for real (signals sent to the process, a full or read-only file system, a
second process) at the awkward moments, not only between steps.

The cases that already held before (SIGKILL anywhere then resume: tests/test_train_resume.py;
a truncated checkpoint moved aside, a NaN stop, a changed learning rate refused:
tests/test_train_loop.py) stay where they are."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.cli import main
from jaxres.train import NonFiniteLossError, train_and_evaluate
from jaxres.train import loop
from jaxres.train.loop import Run
from jaxres.train.metrics import MetricsWriter
from jaxres.files import read_jsonl
from jaxres.workdir import CheckpointMismatchError, Workdir, WorkdirBusyError, find_checkpoint, is_workdir_layout
from tests.test_train_loop import CONFIG, assert_trees_equal, final_tree, tiny_config

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(report=lambda *_: None)
TINY = ["--config.model_overrides.widths=(4, 8, 16)", "--config.batch_size=16", "--config.num_steps=4",
        "--config.checkpoint_every_steps=2", "--config.eval_every_steps=0", "--config.log_every_steps=1",
        "--config.progress_bar=False", "--config.num_data_threads=1"]  # = tiny_config()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4) and its final state: the reference."""
    workdir = tmp_path_factory.mktemp("finished")
    config = tiny_config()
    train_and_evaluate(config, workdir, **QUIET)
    return workdir, config, final_tree(workdir, config, 4)[0]


def listing(workdir):
    return sorted(str(p.relative_to(workdir)) for p in Path(workdir).rglob("*")
                  if "tensorboard" not in p.parts and p.name not in ("metrics.jsonl", "config.json"))


@contextlib.contextmanager
def small_filesystem(path, size="8m"):
    """A real tmpfs of `size` at `path` (root only; skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- a changed recipe is refused before anything is restored or moved ----------------------------

@pytest.mark.parametrize("change, field", [
    ({"model_overrides": {"stage_sizes": (1, 1, 1), "widths": (8, 16, 64), "stem": "cifar", "shortcut": "A"}},
     "model_overrides"),
    ({"dtype": "float16"}, "dtype"),
    ({"model": "cifar_resnet20", "model_overrides": {}}, "model"),
])
def test_resuming_with_another_model_or_dtype_is_refused_and_moves_nothing(finished, change, field):
    workdir, _, reference = finished
    before = listing(workdir)
    changed = tiny_config(**change)
    with pytest.raises(CheckpointMismatchError, match=rf"different config \({field}: saved .*nothing was restored"):
        train_and_evaluate(changed, workdir, **QUIET)
    assert listing(workdir) == before  # no checkpoints.corrupt/, nothing moved
    assert_trees_equal(final_tree(workdir, tiny_config(), 4)[0], reference)


def test_a_checkpoint_of_other_shapes_is_refused_not_quarantined(finished, tmp_path):
    # Same config, other arrays (e.g. written by another version of the code): refuse, keep it.
    workdir, config, _ = finished
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    with Workdir(copy) as wd:
        saved = wd.restore(4, final_tree(workdir, config, 4)[0])
        tree = dict(saved.state, rng=saved.state["rng"][:2])
        wd.save(6, tree, saved.data, saved.config)
    before = listing(copy)
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint 6 .* holds other arrays .*rng: saved \(2,\)"):
        train_and_evaluate(tiny_config(num_steps=8), copy, **QUIET)
    assert listing(copy) == before


def test_num_steps_is_part_of_a_cosine_recipe_only(finished, tmp_path):
    cosine = tiny_config(schedule="cosine")
    train_and_evaluate(cosine, tmp_path / "cos", **QUIET)
    with pytest.raises(CheckpointMismatchError, match=r"num_steps: saved 4, now 8\).*cosine schedule reads num_steps"):
        train_and_evaluate(tiny_config(schedule="cosine", num_steps=8), tmp_path / "cos", **QUIET)
    # The piecewise schedule does not read it: 4 more steps continue the run.
    workdir, config, _ = finished
    longer = tmp_path / "longer"
    shutil.copytree(workdir, longer)
    assert train_and_evaluate(tiny_config(num_steps=6), longer, **QUIET)["step"] == 6


# -- SIGTERM always leaves the checkpoint it announces --------------------------------------------

def sigterm_during(monkeypatch, owner, name, when=lambda *a, **k: True):
    """Sends this process a real SIGTERM from inside `owner.name` (once, when `when` holds)."""
    original = getattr(owner, name)
    sent = []

    def wrapped(*args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return sent


@pytest.mark.parametrize("moment", ["eval", "eval save", "periodic save", "metrics write"])
def test_sigterm_at_an_awkward_moment_saves_the_checkpoint_it_names(finished, monkeypatch, tmp_path, moment):
    # Intervals that do not line up: eval every 3 steps, checkpoints every 2, logs every 4.
    config = tiny_config(num_steps=4, eval_every_steps=3, checkpoint_every_steps=2, log_every_steps=4)
    where = {"eval": (Run, "evaluate", lambda *a, **k: True),
             "eval save": (Workdir, "save", lambda self, step, *a, **k: step == 3),
             "periodic save": (Workdir, "save", lambda self, step, *a, **k: step == 2),
             "metrics write": (MetricsWriter, "write", lambda self, step, *a: step == 3)}[moment]
    sent = sigterm_during(monkeypatch, *where)
    messages = []
    summary = train_and_evaluate(config, tmp_path, report=messages.append)
    assert sent and summary["stopped"]
    stopped_at = summary["step"]
    assert f"SIGTERM: saved checkpoint {stopped_at} in {tmp_path / 'checkpoints'}" in messages[-2]
    with Workdir(tmp_path) as wd:
        assert wd.latest_step() == stopped_at  # on disk, as announced
    monkeypatch.undo()
    assert train_and_evaluate(config, tmp_path, **QUIET)["step"] == 4
    assert_trees_equal(final_tree(tmp_path, config, 4)[0], finished[2])  # resumed bitwise


@pytest.mark.slow
def test_sigterm_to_a_real_process_whose_log_and_checkpoint_intervals_differ(tmp_path):
    command = [sys.executable, "-c", "import sys; from jaxres.cli import main; sys.exit(main())", "train",
               "--config", CONFIG, "--workdir", str(tmp_path), *TINY, "--config.num_steps=400",
               "--config.log_every_steps=3", "--config.checkpoint_every_steps=7"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "7").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere between checkpoints
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    step = int(out.split("SIGTERM: saved checkpoint ")[1].split()[0])
    assert (tmp_path / "checkpoints" / str(step) / "state").is_dir(), (step, os.listdir(tmp_path / "checkpoints"))


# -- one trainer per workdir ----------------------------------------------------------------------

HOLD = ("import sys, time; from jaxres.workdir import Workdir\n"
        "with Workdir(sys.argv[1], create=True).lock():\n    print('locked', flush=True); time.sleep(600)")


def test_a_second_trainer_is_refused_with_the_holders_pid_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", "--config", CONFIG, "--workdir", str(tmp_path), *TINY]) == 1
        err = capsys.readouterr().err
        assert f"in use by another training process (PID {holder.pid} on" in err, err
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait()
    with Workdir(tmp_path).lock():  # the OS released it
        pass
    with pytest.raises(WorkdirBusyError):  # and the lock holds within one process too
        with Workdir(tmp_path).lock(), Workdir(tmp_path).lock():
            pass


# -- metrics are never lost silently -----------------------------------------------------------

def test_a_metrics_file_deleted_during_the_run_is_recreated(monkeypatch, tmp_path):
    original = MetricsWriter.write

    def write(self, step, split, scalars):
        original(self, step, split, scalars)
        if step == 2 and split == "train":
            os.remove(self.path)

    monkeypatch.setattr(MetricsWriter, "write", write)
    train_and_evaluate(tiny_config(), tmp_path, **QUIET)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert "metrics.jsonl was missing; reopened" in records[0]["event"]
    assert [r["step"] for r in records if r["split"] == "train"] == [3, 4]


# -- file-system faults: a full disk, a read-only workdir, a path that is a file ------------------

def fill(directory):
    """Fills the file system of `directory` to the last byte."""
    with open(directory / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()


def test_a_full_disk_during_a_checkpoint_stops_cleanly_and_the_run_resumes_bitwise(finished, monkeypatch, tmp_path,
                                                                                    capsys):
    with small_filesystem(tmp_path / "fs") as fs:
        workdir = fs / "run"
        original = Workdir.save

        def save(self, step, *args, **kwargs):
            if step == 4:
                fill(fs)  # the disk fills up just before the final checkpoint
            return original(self, step, *args, **kwargs)

        monkeypatch.setattr(Workdir, "save", save)
        code = main(["train", "--config", CONFIG, "--workdir", str(workdir), *TINY])
        err = capsys.readouterr().err
        assert code == 2 and "No space left on device" in err and "Traceback" not in err, err
        monkeypatch.undo()
        with Workdir(workdir) as wd:
            assert wd.steps() == [2]  # the earlier checkpoint is intact
        (fs / "filler").unlink()
        assert main(["train", "--config", CONFIG, "--workdir", str(workdir), *TINY]) == 0
        assert "resumed from checkpoint 2" in capsys.readouterr().out
        assert_trees_equal(final_tree(workdir, finished[1], 4)[0], finished[2])


def test_a_read_only_workdir_is_refused_before_training_and_can_still_be_evaluated(finished, tmp_path, capsys):
    with small_filesystem(tmp_path / "fs") as fs:
        shutil.copytree(finished[0], fs / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        assert main(["train", "--config", CONFIG, "--workdir", str(fs / "run"), *TINY]) == 2
        err = capsys.readouterr().err
        assert "cannot write to workdir" in err and "Read-only file system" in err and "Traceback" not in err, err
        assert main(["eval", "--workdir", str(fs / "run")]) == 0
        assert "(257 examples)" in capsys.readouterr().out


def test_a_workdir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--config", CONFIG, "--workdir", str(tmp_path / "file"), *TINY]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


# -- damaged checkpoints: eval names the alternatives, the analysis names the file ------------------

def test_eval_of_a_damaged_newest_checkpoint_names_the_usable_ones_and_moves_nothing(finished, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished[0], copy)
    for item in (copy / "checkpoints" / "4" / "state").rglob("d/*"):
        item.write_bytes(b"garbage")
    before = listing(copy)
    assert main(["eval", "--workdir", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint 4 in" in err and "cannot be read" in err and "available: [2]" in err, err
    assert listing(copy) == before
    assert main(["eval", "--workdir", str(copy), "--checkpoint", "2"]) == 0


def test_analyze_names_a_checkpoint_that_is_a_file_or_damaged(finished, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["analyze", "--checkpoint", str(tmp_path / "file"), "--models", "cifar_resnet20",
                 "--out", str(tmp_path / "out")]) == 2
    assert "is a file; pass the checkpoint's directory" in capsys.readouterr().err
    copy = tmp_path / "copy"
    shutil.copytree(finished[0] / "checkpoints" / "4" / "state", copy)
    (copy / "_METADATA").write_bytes(b"\xff\xfe garbage")
    assert main(["analyze", "--checkpoint", str(copy), "--models", "cifar_resnet20", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and "damaged or it is not an orbax checkpoint" in err and "Traceback" not in err, err


# -- a NaN stop gives advice that works -----------------------------------------------------------

def test_after_a_nan_stop_a_new_run_goes_on_from_the_last_good_checkpoint(tmp_path, monkeypatch):
    # From the third step on the learning rate is inf (the schedules refuse to build one), so
    # step 3 makes the weights non-finite.
    monkeypatch.setattr(loop, "make_schedule", lambda config, steps: lambda count: jnp.where(count >= 2, jnp.inf, 0.1))
    bad = tiny_config(checkpoint_every_steps=1)
    with pytest.raises(NonFiniteLossError, match="non-finite at step 3") as err:
        train_and_evaluate(bad, tmp_path / "bad", **QUIET)
    monkeypatch.undo()
    good = int(str(err.value).split("Last good checkpoint: checkpoint ")[1].split()[0])
    assert good == 2 and f"--config.init_from={tmp_path / 'bad'}" in str(err.value)
    messages = []
    retry = tiny_config(lr_boundaries={"2": 0.1}, init_from=str(tmp_path / "bad"))
    assert train_and_evaluate(retry, tmp_path / "retry", report=messages.append)["step"] == 4
    assert any(f"started from checkpoint {good} in {tmp_path / 'bad' / 'checkpoints'}" in m for m in messages)
    first = [r for r in read_jsonl(tmp_path / "retry" / "metrics.jsonl") if r["split"] == "train"][0]
    assert first["step"] == good + 1
    assert json.loads((tmp_path / "retry" / "config.json").read_text())["init_from"] == str(tmp_path / "bad")


def test_eval_passes_a_data_problem_through_instead_of_blaming_the_checkpoint(finished, capsys):
    # The checkpoint is fine; the split is not: the message must say so, not "cannot be read".
    assert main(["eval", "--workdir", str(finished[0]), "--split", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "nonsense" in err and "cannot be read" not in err, err


# -- one checkpoint manager keeps the latest and the best ------------------------------------------

def test_the_best_evaluated_checkpoint_outlives_the_latest_n_and_is_what_best_names(tmp_path):
    accuracies = {1: 0.1, 2: 0.5, 3: 0.2, 4: None, 5: 0.3}  # 4: a periodic checkpoint, not evaluated
    with Workdir(tmp_path, create=True, keep=2) as wd:
        for step, accuracy in accuracies.items():
            metrics = None if accuracy is None else {"loss": 1.0, "accuracy": accuracy, "count": 10.0}
            wd.save(step, {"step": np.int32(step), "w": np.zeros(3, np.float32)}, {"next_index": step}, {}, metrics)
    with Workdir(tmp_path) as wd:  # a fresh reader: orbax reads the metrics back from disk
        assert wd.steps() == [2, 4, 5]  # the latest 2, and the best besides them
        assert wd.best() == ("checkpoints", 2)
        assert wd.best_eval() == {"loss": 1.0, "accuracy": 0.5, "count": 10.0, "step": 2}
    for path in (tmp_path / "best", tmp_path):
        workdir, kind, step = find_checkpoint(path, "best" if path == tmp_path else "latest")
        assert (kind, step) == ("checkpoints", 2)
    assert is_workdir_layout(tmp_path / "best")


def test_an_older_workdirs_best_directory_is_still_read(tmp_path):
    with Workdir(tmp_path, create=True) as wd:
        wd.save(3, {"step": np.int32(3)}, {"next_index": 3}, {"model": "ResNet"},
                {"loss": 1.0, "accuracy": 0.25, "count": 4.0})
    (tmp_path / "best").mkdir()
    shutil.move(tmp_path / "checkpoints" / "3", tmp_path / "best" / "3")  # the layout before one manager
    with Workdir(tmp_path) as wd:
        assert wd.best() == ("best", 3) and wd.best_eval()["accuracy"] == 0.25
        assert wd.stored_json(3, "config", "best") == {"model": "ResNet"}
    assert find_checkpoint(tmp_path / "best")[1:] == ("best", 3)
    never_evaluated = tmp_path / "never_evaluated"
    with Workdir(never_evaluated, create=True) as wd:
        wd.save(1, {"step": np.int32(1)}, {"next_index": 1}, {})
    with pytest.raises(FileNotFoundError, match="holds no evaluated checkpoint, so no best one"):
        find_checkpoint(never_evaluated, "best")
