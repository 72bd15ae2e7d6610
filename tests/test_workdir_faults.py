"""Fault injection on a run's workdir: every way a run or its records could be lost, mixed or
misreported, made to happen for real (signals sent to the process, a full or read-only file
system, a second process, a torn line) at the awkward moments, not only between steps.

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
from jaxres.train import run as run_module
from jaxres.train.metrics import MetricsWriter
from jaxres.train.run import Run
from jaxres.analysis.monitor import read_analysis
from jaxres.files import JsonlAppender, read_jsonl
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
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint 6 .* holds other arrays .*rng has shape \(2,\), this run needs \(4,\)"):
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

class Killed(BaseException):
    """An in-process SIGKILL at an exact moment: it unwinds through `finally` blocks, which close
    files but write no record, so the workdir is left as a real kill there would leave it
    (tests/test_train_resume.py does it with real SIGKILLs)."""


def killed_during(monkeypatch, owner, name, when=lambda *a, **k: True, after=False):
    """Makes `owner.name` raise Killed when `when(*args)` holds (once): before the call, or
    `after` it has returned."""
    original = getattr(owner, name)
    done = []

    def wrapped(*args, **kwargs):
        hit = not done and when(*args, **kwargs)
        if hit and not after:
            done.append(True)
            raise Killed(name)
        result = original(*args, **kwargs)
        if hit:
            done.append(True)
            raise Killed(name)
        return result

    monkeypatch.setattr(owner, name, wrapped)
    return done


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


def train_lines(workdir):
    return [r for r in read_jsonl(Path(workdir) / "metrics.jsonl") if r["split"] == "train"]


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    """An uninterrupted 8-step run logging every 4 steps: the windows to compare with."""
    workdir = tmp_path_factory.mktemp("windows")
    train_and_evaluate(tiny_config(num_steps=8, log_every_steps=4, checkpoint_every_steps=8), workdir, **QUIET)
    return train_lines(workdir)


@pytest.mark.parametrize("stop_at", [6, 1], ids=["mid-window", "first step"])
def test_a_window_cut_by_sigterm_says_how_many_steps_each_line_averages(windows, monkeypatch, tmp_path, stop_at):
    # Logs every 4 steps; SIGTERM at step `stop_at` logs and saves there, and the resumed run's
    # first window starts after it: both lines are shorter than 4 steps and say so.
    config = tiny_config(num_steps=8, log_every_steps=4, checkpoint_every_steps=8)
    sigterm_during(monkeypatch, loop.StopSignal, "poll", lambda self, step: step == stop_at)
    assert train_and_evaluate(config, tmp_path, **QUIET)["step"] == stop_at
    monkeypatch.undo()
    train_and_evaluate(config, tmp_path, **QUIET)
    lines = train_lines(tmp_path)
    assert all(isinstance(r["steps"], int) for r in lines + windows)
    assert [r["steps"] for r in windows] == [4, 4]
    # each line covers steps (step - steps, step]: together they tile the run once
    covered = [s for r in lines for s in range(r["step"] - r["steps"] + 1, r["step"] + 1)]
    assert covered == list(range(1, 9))
    # a reader weighting the lines by `steps` recovers the uninterrupted window means
    for window in windows:
        parts = [r for r in lines if window["step"] - window["steps"] < r["step"] <= window["step"]]
        mean = sum(r["loss"] * r["steps"] for r in parts) / sum(r["steps"] for r in parts)
        assert mean == pytest.approx(window["loss"], rel=1e-6)
    assert len(lines) == 3  # one window was cut in two


SIGTERM_DURING_START = ("import os, signal, sys\n"
                        "import jaxres.train\n"
                        "load_config = jaxres.train.load_config\n"
                        "def sigterm_then_load(*args):\n"
                        "    os.kill(os.getpid(), signal.SIGTERM)\n"
                        "    return load_config(*args)\n"
                        "jaxres.train.load_config = sigterm_then_load\n"
                        "from jaxres.cli import main\n"
                        "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.slow
def test_sigterm_during_start_up_stops_before_the_first_step_and_exits_0(tmp_path):
    # The signal arrives while `jaxres train` reads its config, before JAX is set up.
    done = subprocess.run([sys.executable, "-c", SIGTERM_DURING_START, "train", "--config", CONFIG,
                           "--workdir", str(tmp_path), *TINY], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "SIGTERM before the first step: nothing trained, nothing new to save (no checkpoint yet)" in done.stdout
    assert not (tmp_path / "checkpoints").exists()
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["event"] == "stopped by SIGTERM before the first step"


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


# -- a torn last line is set aside, never glued to the next record ---------------------------------

def test_a_torn_last_line_is_moved_aside_and_reported_before_appending(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl')  # a kill mid-line
    reports = []
    lines = JsonlAppender(path, report=reports.append)
    lines.write({"step": 3, "split": "train"})
    lines.close()
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]
    assert path.read_text().count("\n") == 2  # every line whole
    kept = list(tmp_path.glob("log.jsonl.torn-*"))
    assert len(kept) == 1 and kept[0].read_text() == '{"step": 2, "spl'
    assert "last line was torn (16 bytes" in reports[0] and str(kept[0]) in reports[0]


@pytest.mark.parametrize("ending, records, kept", [
    ('{"step": 2}', [1, 2], None),  # a whole record that lost only its newline: completed in place
    ("\0\0\0\0\n", [1], "\0\0\0\0\n"),  # zeros (a file extended but never written: a power loss)
    ("", [1], None),  # nothing wrong
])
def test_only_a_last_line_that_is_not_a_record_is_set_aside(tmp_path, ending, records, kept):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n' + ending)
    JsonlAppender(path, report=lambda *_: None).close()
    assert path.read_text().endswith("\n") and [r["step"] for r in read_jsonl(path)] == records
    assert [t.read_text() for t in tmp_path.glob("log.jsonl.torn-*")] == ([kept] if kept else [])


def test_a_metrics_file_torn_by_a_kill_is_repaired_and_the_run_notes_it(tmp_path):
    # Killed before its first checkpoint while writing a train line: the rerun starts again,
    # sets the torn line aside and says so in the file, and no line is glued to another.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.3}\n{"step": 2, "split": "tra')
    messages = []
    train_and_evaluate(tiny_config(), tmp_path, report=messages.append)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert all(json.loads(line) for line in text.splitlines())  # every line parses: nothing glued
    kept = list(tmp_path.glob("metrics.jsonl.torn-*"))
    assert [k.read_text() for k in kept] == ['{"step": 2, "split": "tra']
    assert any("last line was torn" in m for m in messages)
    events = [r["event"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "event"]
    assert any("last line was torn" in e and "metrics.jsonl.torn-" in e for e in events)


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


def test_a_full_disk_at_start_names_the_file_that_could_not_be_written(tmp_path, capsys):
    with small_filesystem(tmp_path / "fs") as fs:
        (fs / "run").mkdir()
        fill(fs)
        assert main(["train", "--config", CONFIG, "--workdir", str(fs / "run"), *TINY]) == 2
        err = capsys.readouterr().err
        assert f"could not write the trainer's PID to {fs / 'run' / '.lock'} (No space left on device)" in err, err
        assert "Traceback" not in err


FULL_DISK_DURING = ("import contextlib, os, sys\n"
                    "from pathlib import Path\n"
                    "from jaxres.cli import main\n"
                    "from jaxres.train.metrics import MetricsWriter\n"
                    "from jaxres.workdir import Workdir\n"
                    "fs, owner, name, at, leave = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), "
                    "int(sys.argv[5])\n"
                    "owner = {'Workdir': Workdir, 'MetricsWriter': MetricsWriter}[owner]\n"
                    "original = getattr(owner, name)\n"
                    "def fill_then_call(self, step, *args, **kwargs):\n"
                    "    if step == at and not (fs / 'filler').exists():\n"
                    "        with open(fs / 'filler', 'wb') as f, contextlib.suppress(OSError):\n"
                    "            while True:\n"
                    "                f.write(bytes(4096)); f.flush()\n"
                    "        os.truncate(fs / 'filler', max(0, (fs / 'filler').stat().st_size - leave))\n"
                    "    return original(self, step, *args, **kwargs)\n"
                    "setattr(owner, name, fill_then_call)\n"
                    "sys.exit(main(sys.argv[6:]))\n")


@pytest.mark.slow
@pytest.mark.parametrize("owner, name, at, leave", [
    ("Workdir", "save", 4, 60_000),  # the disk fills while the final checkpoint is written
    ("MetricsWriter", "write", 3, 0),  # full from step 3 on: whichever record is next fails
], ids=["during a checkpoint", "mid-run"])
def test_a_full_disk_mid_run_ends_in_one_line_naming_what_was_not_written(finished, tmp_path, capsys,
                                                                            owner, name, at, leave):
    # A real process: orbax's and tensorstore's threads, and what Python prints at exit, are seen.
    with small_filesystem(tmp_path / "fs") as fs:
        workdir = fs / "run"
        args = ["train", "--config", CONFIG, "--workdir", str(workdir), *TINY, "--config.analysis_every_steps=2",
                "--config.analysis_batch_size=4", "--config.analysis_bn=eval,batch"]
        done = subprocess.run([sys.executable, "-c", FULL_DISK_DURING, str(fs), owner, name, str(at), str(leave), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
        err = done.stderr.strip()
        assert len(err.splitlines()) == 1 and err.startswith("jaxres train: error: could not write "), err[-3000:]
        assert "No space left on device" in err and "latest: 2" in err, err
        assert "saved checkpoint" not in done.stdout  # no false "saved"
        with Workdir(workdir) as wd:
            assert wd.steps() == [2]
        (fs / "filler").unlink()
        assert main(args) == 0
        assert "resumed from checkpoint 2" in capsys.readouterr().out
        assert_trees_equal(final_tree(workdir, finished[1], 4)[0], finished[2])
        assert [(r["step"], r["bn"]) for r in read_analysis(workdir)] == [(s, b) for s in (0, 2, 4)
                                                                          for b in ("eval", "batch")]


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
    monkeypatch.setattr(run_module, "make_schedule",
                        lambda config, steps: lambda count: jnp.where(count >= 2, jnp.inf, 0.1))
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
