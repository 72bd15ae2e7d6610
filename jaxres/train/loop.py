"""`train_and_evaluate(config, workdir)`: the training loop around the pure step functions.

It builds data -> model -> state from the config, resumes from the newest readable
checkpoint in `workdir`, runs `train_step` through a parallel driver (jaxres.parallel: one
device, pmap or jit+shard_map), evaluates on the full split,
logs metrics, and checkpoints every `checkpoint_every_steps`, at the end and on SIGTERM.
The state after step k depends only on (config, k): a run killed at any moment and
restarted with the same command ends bitwise identical (on CPU) to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import jax
import numpy as np

from jaxres import data, models
from jaxres.train import config as config_lib
from jaxres.train import precision
from jaxres.train.drivers import check_batch_size, make_driver
from jaxres.train.metrics import MetricsWriter, summary_table
from jaxres.train.optim import make_optimizer, make_schedule, schedule_reads_num_steps
from jaxres.train.state import TrainState, checkpoint_tree, create_train_state
from jaxres.workdir import CheckpointMismatchError, Workdir, describe_error, find_checkpoint

# Fields that do not change the trajectory: a resumed run may change them.
BOOKKEEPING = {"parallel", "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
               "num_data_threads", "progress_bar", "num_steps", "data_dir", "eval_batch_size", "eval_split"}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def build_model(config, spec: data.DatasetSpec):
    """The registry entry `config.model`, or the class `ResNet`/`VGG` built from
    `config.model_overrides` alone, sized for the dataset's classes and channels."""
    overrides = dict(config.model_overrides.to_dict()) if config.model_overrides else {}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    overrides.setdefault("in_channels", spec.channels)
    overrides.setdefault("dtype", precision.compute_dtype(config.dtype, jax.devices()[0].platform))
    overrides.setdefault("num_classes", spec.num_classes)
    classes = {"ResNet": models.ResNet, "VGG": models.VGG}
    if config.model in classes:
        return classes[config.model](**overrides)
    return models.create_model(config.model, **overrides)


class Run:
    """Everything derived from a config: data sources, model, optimizer, initial state."""

    def __init__(self, config, *, need_train: bool = True):
        self.config = config
        self.spec = data.dataset_spec(config.dataset)
        self.data_dir = config.data_dir or data.default_data_dir()
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        if config.batch_size < 1 or config.batch_size % self.process_count:
            raise ValueError(f"batch_size {config.batch_size} must be a positive multiple of the "
                             f"{self.process_count} host(s)")
        if config.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {config.num_steps}")
        augment = config.augment or self.spec.augment
        stats = (self.spec.image_size, self.spec.mean, self.spec.std)
        self.train_transform = data.train_transform(augment, *stats)
        self.eval_transform = data.eval_transform(augment, *stats)
        self.train_source = (data.load_source(config.dataset, config.train_split or self.spec.train_split,
                                              self.data_dir, seed=config.seed) if need_train else None)
        self.eval_source = data.load_source(config.dataset, config.eval_split or self.spec.eval_split,
                                            self.data_dir, seed=config.seed)
        num_train = len(self.train_source) if need_train else config.batch_size
        self.steps_per_epoch = max(1, num_train // config.batch_size)
        self.model = build_model(config, self.spec)
        self.schedule = make_schedule(config, self.steps_per_epoch)
        tx = make_optimizer(self.schedule, momentum=config.momentum, nesterov=config.nesterov,
                            weight_decay=config.weight_decay,
                            exclude_bn_and_bias=config.weight_decay_exclude_bn_and_bias)
        parallel = config.parallel
        if parallel == "auto":
            parallel = "single" if jax.device_count() == 1 else "sharded"
        # Donation reuses the state's buffers on accelerators; XLA:CPU ignores it with a warning.
        self.driver = make_driver(parallel, label_smoothing=config.label_smoothing,
                                  donate=jax.default_backend() != "cpu")
        local = self.driver.num_devices // self.process_count
        check_batch_size(config.batch_size // self.process_count, local)
        check_batch_size(config.eval_batch_size, local, name="eval_batch_size")
        shape = (1, self.spec.image_size, self.spec.image_size, self.spec.channels)
        loss_scale = precision.DynamicLossScale.create(config.loss_scale_initial) if config.dtype == "float16" else None
        self.state = create_train_state(self.model, tx, jax.random.PRNGKey(config.seed), shape, loss_scale)

    def train_batches(self):
        ds = data.train_dataset(self.train_source, batch_size=self.config.batch_size // self.process_count,
                                seed=self.config.seed, transform=self.train_transform,
                                process_index=self.process_index, process_count=self.process_count)
        return data.train_iterator(ds, num_threads=self.config.num_data_threads)

    def analysis_model(self):
        """The model as the analysis sees it: units one by one (scan_units only changes how
        training executes them)."""
        if getattr(self.model, "scan_units", False):
            return self.model.clone(scan_units=False, remat_units=False)
        return self.model

    def analysis_variables(self, state: TrainState) -> dict:
        """Host copies of `state`'s variables in the per-unit layout the analysis reads."""
        return models.unstack_identical_units(self.model, jax.device_get(state.variables()))

    def probe_batch(self, size: int):
        """(images, labels): the analysis probe batch, a fixed set of `size` training examples
        (the same for every run with this seed and dataset), eval transform."""
        batch = data.probe_batch(self.train_source, transform=self.eval_transform, size=size, seed=self.config.seed)
        return batch["image"], batch["label"]

    def evaluate(self, state: TrainState) -> dict:
        """Loss and accuracy over every example of the eval split (padded, masked batches);
        `state` is in the driver's device layout."""
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        for batch in data.eval_batches(self.eval_source, batch_size=self.config.eval_batch_size,
                                       transform=self.eval_transform, process_index=self.process_index,
                                       process_count=self.process_count,
                                       num_threads=self.config.num_data_threads):
            sums = jax.device_get(self.driver.eval_step(state, self.driver.put_batch(batch)))
            for k in totals:
                totals[k] += float(sums[k])
        count = totals["count"]
        return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count, "count": count}


def check_resumable(saved: dict, config, workdir) -> None:
    """Refuses to continue a run whose trajectory-defining fields differ from `config`:
    everything but the bookkeeping fields, and `num_steps` when the schedule reads it."""
    now = config_lib.to_json(config)
    free = BOOKKEEPING - ({"num_steps"} if schedule_reads_num_steps(config) else set())
    changed = [k for k in sorted(set(now) | set(saved)) if k not in free and saved.get(k) != now.get(k)]
    if not changed:
        return
    diffs = [f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in changed]
    why = ""
    if "num_steps" in changed:
        why = (f" The {config.schedule} schedule reads num_steps, so it is part of the recipe here; it may "
               f"change on resume only with schedules that do not read it (piecewise, step, constant).")
    raise CheckpointMismatchError(
        f"{workdir} holds a run with a different config ({'; '.join(diffs)}); nothing was restored or moved."
        f"{why} Resume with the same config, or start a new run from this one's latest checkpoint with the "
        f"new config: --workdir NEW --config.init_from={workdir}")


class StopSignal:
    """Turns SIGTERM into a flag the loop checks between steps (then it saves and exits)."""

    def __init__(self):
        self.received = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


all_finite = jax.jit(precision.all_finite)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def train_and_evaluate(config, workdir, *, report=print) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns a summary
    dict: final step, last train metrics, final and best eval metrics, wall time, stopped
    (True after SIGTERM). Raises NonFiniteLossError on a NaN/inf loss, WorkdirBusyError when
    another process trains in `workdir`, CheckpointMismatchError when it holds another run."""
    t0 = time.time()
    wd = Workdir(workdir, create=True, keep=config.keep_checkpoints)
    # One trainer per workdir; in a multi-host job process 0 holds the lock for all.
    with (wd.lock() if jax.process_index() == 0 else contextlib.nullcontext()), wd:
        summary = _train(config, wd, report)
    summary["wall_time_s"] = time.time() - t0
    report(format_summary(config, summary))
    return summary


def _start_state(config, wd: Workdir, run: Run, report):
    """(checkpoint or None, how, resumed): the newest usable checkpoint of this run (resumed), else
    the one named by `config.init_from` (a new run continuing another's state), else None (step 0)."""
    target = checkpoint_tree(run.state)
    restored = wd.restore_latest_good(target, check_config=lambda saved: check_resumable(saved, config, wd.path),
                                      report=report)
    if restored is not None:
        return restored, f"resumed from checkpoint {restored.step} in {wd.directory()}", True
    if config.init_from:
        source, kind, step = find_checkpoint(config.init_from)
        with source:
            restored = source.restore(step, target, kind)
        return restored, f"started from checkpoint {step} in {source.directory(kind)} (init_from)", False
    return None, "", False


def _best_eval(config, wd: Workdir, report) -> dict | None:
    """The eval metrics of the best checkpoint (read from its meta item alone), or None."""
    for step in reversed(wd.steps("best")):
        try:
            saved_config, meta = wd.stored_json(step, "config", "best"), wd.stored_json(step, "meta", "best")
        except Exception as err:  # noqa: BLE001 - its files cannot be read
            wd.quarantine("best", step, err, report)
            continue
        check_resumable(saved_config, config, wd.path)
        return dict(meta.get("eval", {}), step=step)
    return None


def _train(config, wd: Workdir, report) -> dict:
    run = Run(config)
    state = run.state
    batches = run.train_batches()
    config_json = config_lib.to_json(config)
    restored, how, resumed = _start_state(config, wd, run, report)
    if restored is not None:
        # Host copies: orbax hands back arrays committed to this process's first device, which a
        # multi-process driver could only place on the global mesh by cross-host transfers.
        state = state.replace(**jax.device_get(restored.state))
        batches.set_state(restored.data)
        report(how)
    best_eval = _best_eval(config, wd, report)
    primary = run.process_index == 0
    if primary:
        wd.write_config(config.to_json(indent=2))
    writer = MetricsWriter(wd.path) if primary else None
    step = int(state.step)
    if writer and restored is not None:
        writer.event(step, how)
    # Records past the starting step are a killed run's: dropped, so that a resumed run ends with
    # the records of an uninterrupted one.
    monitor = _make_monitor(config, run, wd, resume_step=step) if primary else None

    driver = run.driver
    state = driver.put_state(state)
    pending, last_train, last_eval, stopped, saved_at = [], {}, None, False, None
    window_start, window_steps = time.time(), 0

    def flush():
        """Checks the pending steps' losses, then logs their means (one host sync)."""
        nonlocal pending, last_train, window_start, window_steps
        if not pending:
            return
        values = jax.device_get(pending)
        first = step - len(values) + 1
        for offset, m in enumerate(values):
            if not np.isfinite(m["loss"]):
                stop_non_finite(f"loss is {float(m['loss'])} at step {first + offset}")
        elapsed = time.time() - window_start
        # window means, except the count of float16 steps skipped for overflowing gradients
        last_train = {k: float((np.sum if k == "skipped" else np.mean)([m[k] for m in values])) for k in values[0]}
        last_train["learning_rate"] = float(run.schedule(step - 1))
        last_train["step_time"] = elapsed / max(window_steps, 1)
        last_train["images_per_second"] = config.batch_size * window_steps / max(elapsed, 1e-9)
        if writer:
            writer.write(step, "train", last_train)
        pending, window_start, window_steps = [], time.time(), 0

    def stop_non_finite(what):
        good = wd.latest_step()
        where = f"checkpoint {good} in {wd.directory()} (intact)" if good is not None else "none saved yet"
        advice = (f"To go on from it with other settings (e.g. a lower learning rate), start a new run from it: "
                  f"jaxres train ... --workdir NEW --config.init_from={wd.path}" if good is not None else
                  "Lower the learning rate or check the data and start again")
        raise NonFiniteLossError(f"{what}; training stopped. Last good checkpoint: {where}. {advice}.")

    def host_tree():
        # A finite loss can still come with an overflowing update: never save such a state.
        tree = checkpoint_tree(driver.get_state(state))
        if not bool(all_finite(tree)):
            stop_non_finite(f"parameters or optimizer state are non-finite at step {step}")
        return tree

    def save(kind="checkpoints"):
        nonlocal saved_at
        wd.save(step, host_tree(), batches.get_state(), config_json, {"eval": last_eval} if last_eval else None,
                kind=kind)
        if kind == "checkpoints":
            saved_at = step

    def measure():
        nonlocal monitor
        if monitor is None or step in monitor.recorded_steps():
            return
        try:
            monitor.measure(step, run.analysis_variables(driver.get_state(state)))
        except Exception as err:  # noqa: BLE001 - a failed measurement never costs the training run
            report(f"analysis at step {step} failed ({type(err).__name__}: {err}); training goes on without it")
            if writer:
                writer.event(step, f"analysis stopped: {type(err).__name__}: {err}")
            monitor.close()
            monitor = None

    from tqdm.auto import tqdm

    progress = tqdm(total=config.num_steps, initial=step, disable=not config.progress_bar, unit="step",
                    dynamic_ncols=True)
    try:
        with StopSignal() as stop:
            if not resumed:  # a new run's first state (step 0, or init_from's)
                measure()
            while step < config.num_steps:
                state, metrics = driver.train_step(state, driver.put_batch(next(batches)))
                step += 1
                window_steps += 1
                pending.append(metrics)
                progress.update(1)
                final = step == config.num_steps
                evaluate = final or _due(step, config.eval_every_steps)
                if (_due(step, config.log_every_steps) or evaluate or final or stop.received
                        or _due(step, config.checkpoint_every_steps)):
                    flush()
                    progress.set_postfix(loss=f"{last_train['loss']:.4f}", refresh=False)
                if evaluate:
                    last_eval = run.evaluate(state)
                    if writer:
                        writer.write(step, "eval", last_eval)
                    if best_eval is None or last_eval["accuracy"] > best_eval["accuracy"]:
                        best_eval = dict(last_eval, step=step)
                        save("best")
                if final or _due(step, config.analysis_every_steps):
                    measure()
                # Read the flag only now: a SIGTERM that arrived during the eval, the measurement or
                # a save above must still get its checkpoint.
                if final or stop.received or _due(step, config.checkpoint_every_steps):
                    save()
                if stop.received:
                    if saved_at != step:  # the signal came during the save of another kind
                        save()
                    stopped = True
                    report(f"SIGTERM: saved checkpoint {step} in {wd.directory()}; rerun the same command to resume")
                    if writer:
                        writer.event(step, "stopped by SIGTERM")
                    break
        if last_eval is None and not stopped:  # resumed a finished run: evaluate it again
            last_eval = run.evaluate(state)
    finally:
        progress.close()
        if writer:
            writer.close()
        if monitor is not None:
            monitor.close()

    return {"step": step, "train": last_train, "eval": last_eval, "best_eval": best_eval, "stopped": stopped,
            "workdir": str(wd.path)}


def _make_monitor(config, run: Run, wd: Workdir, resume_step):
    """The gradient-propagation monitor of `config.analysis_*`, or None when it is off. Every
    check (probe batch size, the model's unit interface, a writable analysis file) happens here,
    before training starts."""
    if config.analysis_every_steps <= 0:
        return None
    from jaxres.analysis.monitor import TrainingMonitor

    images, labels = run.probe_batch(config.analysis_batch_size)
    return TrainingMonitor(run.analysis_model(), images, labels, workdir=wd.path, bn=config.analysis_bn,
                           unit_jacobians=config.analysis_unit_jacobians, resume_step=resume_step)


def format_summary(config, summary: dict) -> str:
    def pct(m):
        return f"{100 * m['accuracy']:.2f}% ({int(m['count'])} examples)" if m else "-"

    rows = [("model", config.model), ("dataset", config.dataset),
            ("steps", f"{summary['step']} / {config.num_steps}" + (" (stopped by SIGTERM)" if summary["stopped"] else ""))]
    if summary["train"]:
        rows.append(("train loss (last window)", f"{summary['train']['loss']:.4f}"))
    if summary["eval"]:
        rows += [("eval loss", f"{summary['eval']['loss']:.4f}"), ("eval accuracy", pct(summary["eval"]))]
    if summary["best_eval"]:
        rows.append(("best eval accuracy", f"{pct(summary['best_eval'])} at step {summary['best_eval']['step']}"))
    rows += [("wall time", f"{summary['wall_time_s']:.1f} s"), ("workdir", summary["workdir"])]
    return summary_table(rows)


def evaluate_workdir(workdir, *, checkpoint: str = "latest", split: str = "", data_dir: str = "",
                     report=print) -> dict:
    """Evaluates a checkpoint of a run (`latest`, `best` or a step number) on its eval split
    (or `split`), with the config stored in that checkpoint. Reads only: a damaged checkpoint
    is reported with the ones that can be used instead, never moved."""
    kind = "best" if checkpoint == "best" else "checkpoints"
    wd, kind, wanted = find_checkpoint(Path(workdir) / kind, "latest" if checkpoint in ("latest", "best") else checkpoint)
    def unreadable(err):
        others = [s for s in wd.steps(kind) if s != wanted]
        return ValueError(f"checkpoint {wanted} in {wd.directory(kind)} cannot be read ({describe_error(err)}); "
                          f"evaluate another with --checkpoint STEP (available: {others or 'none'}), or rerun "
                          f"training, which moves it aside and resumes from the previous one")

    with wd:
        try:
            config = config_lib.from_json(wd.stored_json(wanted, "config", kind))
        except Exception as err:  # noqa: BLE001 - the checkpoint's files cannot be read
            raise unreadable(err) from None
        if split:
            config.eval_split = split
        if data_dir:
            config.data_dir = data_dir
        run = Run(config, need_train=False)  # its own errors (a missing dataset, ...) pass through as they are
        try:
            tree = wd.restore(wanted, checkpoint_tree(run.state), kind).state
        except CheckpointMismatchError:
            raise
        except Exception as err:  # noqa: BLE001 - the checkpoint's files cannot be read
            raise unreadable(err) from None
    result = run.evaluate(run.driver.put_state(run.state.replace(**tree)))
    report(summary_table([("checkpoint", f"{kind}/{wanted}"), ("model", config.model),
                          ("split", f"{config.dataset}:{config.eval_split or run.spec.eval_split}"),
                          ("loss", f"{result['loss']:.4f}"),
                          ("accuracy", f"{100 * result['accuracy']:.2f}% ({int(result['count'])} examples)")]))
    return dict(result, step=wanted)
