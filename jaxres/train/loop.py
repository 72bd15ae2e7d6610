"""`train_and_evaluate(config, workdir)`: the training loop around the pure step functions.

It builds data -> model -> state from the config, resumes from the newest readable
checkpoint in `workdir`, runs `train_step` through a parallel driver (jaxres.train.drivers: one
device, pmap or jit+shard_map), evaluates on the full split (and on a fixed training subset),
measures gradient propagation (jaxres.analysis.monitor) as `jaxres.records.RecordSchedule`
says, logs metrics, and checkpoints every `checkpoint_every_steps`, at the end and on SIGTERM.
The state after step k depends only on (config, k): a run killed at any moment and
restarted with the same command ends bitwise identical (on CPU) to an uninterrupted run, and
with the same records: a resumed run makes the records its restored step lacks.
"""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np

from jaxres import data, models
from jaxres.files import FileWriteError
from jaxres.preemption import StopSignal
from jaxres.records import SCHEDULE_FIELDS, RecordSchedule, check_train_eval_examples, schedule_fields
from jaxres.train import config as config_lib
from jaxres.train import precision
from jaxres.train.drivers import check_batch_size, make_driver
from jaxres.train.metrics import MetricsWriter, StepTimer, summary_table
from jaxres.train.optim import make_optimizer, make_schedule, schedule_reads_num_steps
from jaxres.train.state import TrainState, abstract_train_state, checkpoint_tree, create_train_state
from jaxres.workdir import CheckpointMismatchError, CheckpointWriteError, Workdir, describe_error, find_checkpoint

# Fields that do not change the trajectory: a resumed run may change them (the record schedule
# among them: analysis_*, train_eval_examples).
BOOKKEEPING = {"parallel", "keep_checkpoints", "num_data_threads", "device_prefetch", "progress_bar", "num_steps",
               "data_dir", "eval_batch_size", "eval_split", *SCHEDULE_FIELDS}
# The fixed training subset evaluated at every evaluation (train_eval_examples): the first N of a
# permutation of the training split drawn from this seed, not the run's, so that every run and
# every seed is scored on the same images.
TRAIN_EVAL_SEED = 0


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
    """Everything derived from a config: data sources, model, optimizer, initial state.

    `need_train=False` (evaluation, restore targets) skips the training split and builds the
    state abstractly (ShapeDtypeStruct leaves, no `init` compiled): fill it from a checkpoint.
    """

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
        self.train_eval_source = self._train_eval_source(config) if need_train else None
        num_train = len(self.train_source) if need_train else config.batch_size
        self.steps_per_epoch = max(1, num_train // config.batch_size)
        self.model = build_model(config, self.spec)
        self.schedule = make_schedule(config, self.steps_per_epoch)
        tx = make_optimizer(self.schedule, momentum=config.momentum, nesterov=config.nesterov,
                            weight_decay=config.weight_decay,
                            exclude_bn_and_bias=config.weight_decay_exclude_bn_and_bias,
                            optimizer=config.optimizer, trust_coefficient=config.trust_coefficient)
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
        loss_scale = precision.dynamic_loss_scale(config.loss_scale_initial) if config.dtype == "float16" else None
        build_state = create_train_state if need_train else abstract_train_state
        self.state = build_state(self.model, tx, jax.random.PRNGKey(config.seed), shape, loss_scale)

    def _train_eval_source(self, config):
        """The first `train_eval_examples` of a TRAIN_EVAL_SEED permutation of the training split, or None."""
        size = check_train_eval_examples(config.get("train_eval_examples", 0))
        if not size:
            return None
        if size > len(self.train_source):
            raise ValueError(f"train_eval_examples {size} exceeds the {len(self.train_source)} examples of the "
                             f"training split; use at most that many (0: off)")
        return data.SourceSubset(self.train_source, data.permuted_indices(len(self.train_source), size,
                                                                          TRAIN_EVAL_SEED))

    def evaluation_sources(self) -> dict:
        """{metrics split: source} of one evaluation: "eval" (the eval split) and, with
        `train_eval_examples`, "train_eval" (the fixed training subset, evaluated the same way)."""
        sources = {"eval": self.eval_source}
        if self.train_eval_source is not None:
            sources["train_eval"] = self.train_eval_source
        return sources

    def train_batches(self):
        ds = data.train_dataset(self.train_source, batch_size=self.config.batch_size // self.process_count,
                                seed=self.config.seed, transform=self.train_transform)
        return data.train_iterator(ds, num_threads=self.config.num_data_threads)

    def analysis_model(self):
        """The model as the analysis sees it: units one by one (scan_units only changes how
        training executes them)."""
        return self.model.clone(scan_units=False, remat_units=False)

    def analysis_variables(self, state: TrainState) -> dict:
        """Host copies of `state`'s variables in the per-unit layout the analysis reads."""
        return models.unstack_identical_units(self.model, jax.device_get(state.variables()))

    def probe_batch(self, size: int):
        """(images, labels): the analysis probe batch, a fixed set of `size` training examples
        (the same for every run with this seed and dataset), eval transform."""
        batch = data.probe_batch(self.train_source, transform=self.eval_transform, size=size, seed=self.config.seed)
        return batch["image"], batch["label"]

    def evaluate(self, state: TrainState, source=None) -> dict:
        """Loss and accuracy over every example of `source` (default: the eval split), in eval
        mode (running BatchNorm statistics, eval transform; padded, masked batches); `state` is in
        the driver's device layout."""
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        # One host sync at the end: the host prepares the next batch while the devices compute.
        batches = data.eval_batches(self.eval_source if source is None else source,
                                    batch_size=self.config.eval_batch_size,
                                    transform=self.eval_transform, num_threads=self.config.num_data_threads)
        per_batch = [self.driver.eval_step(state, self.driver.put_batch(batch)) for batch in batches]
        for sums in jax.device_get(per_batch):
            for k in totals:
                totals[k] += float(sums[k])
        count = totals["count"]
        return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count, "count": count}


def check_resumable(saved: dict, config, workdir) -> None:
    """Refuses to continue a run whose trajectory-defining fields differ from `config`:
    everything but the bookkeeping fields, and `num_steps` when the schedule reads it. A field
    that a run saved by an older jaxres lacks counts as its default (`base_config`), the value
    that run trained with."""
    now = config_lib.to_json(config)
    saved = {**config_lib.to_json(config_lib.base_config()), **saved}
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


all_finite = jax.jit(precision.all_finite)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def train_and_evaluate(config, workdir, *, report=print) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints) and returns a summary
    dict: final step, last train metrics, final eval (and train_eval) and best eval metrics, wall
    time, stopped (True after SIGTERM). Raises NonFiniteLossError on a NaN/inf loss,
    WorkdirBusyError when another process trains in `workdir`, CheckpointMismatchError when it
    holds another run, CheckpointWriteError / RecordWriteError when a checkpoint or a record
    cannot be written (naming the file and the latest intact checkpoint). SIGTERM, from the
    start on (or already held by a caller's StopSignal, as `jaxres train` installs one first
    thing), stops it with a checkpoint of the last step trained."""
    t0 = time.time()
    schedule = RecordSchedule.from_config(config)  # a bad schedule is refused before the workdir is made
    wd = Workdir(workdir, create=True, keep=config.keep_checkpoints)
    # One trainer per workdir; in a multi-host job process 0 holds the lock for all.
    with (wd.lock() if jax.process_index() == 0 else contextlib.nullcontext()), wd, \
            StopSignal(wd.reached_preemption if jax.process_count() > 1 else None) as stop:
        summary = _train(config, wd, schedule, stop, report)
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


def _train(config, wd: Workdir, schedule: RecordSchedule, stop: StopSignal, report) -> dict:
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
    best_eval = wd.best_eval(report) if resumed else None
    primary = run.process_index == 0
    step = int(state.step)
    if primary:
        wd.write_config(config.to_json(indent=2))
    writer = MetricsWriter(wd.path, purge_step=step + 1, report=report) if primary else None
    if writer:
        # At every start: the records after this line are made under this schedule, and lines
        # written before it at later steps were a killed attempt's (readers drop them).
        writer.event(step, how or f"started at step {step}", start=True, schedule=schedule_fields(config_json))
    # Records past the starting step are a killed run's: dropped, so that a resumed run ends with
    # the records of an uninterrupted one.
    monitor = _make_monitor(config, schedule, run, wd, resume_step=step, report=report) if primary else None

    driver = run.driver
    state = driver.put_state(state)
    batches = data.DevicePrefetch(batches, driver.put_batch, size=config.device_prefetch)
    pending, last_train, last_eval, last_train_eval, stopped = [], {}, None, None, False
    saved_at = step if resumed else None  # the restored checkpoint is on disk
    timer = StepTimer(config.batch_size)

    def flush():
        """Checks the pending steps' losses, then logs their means (one host sync)."""
        nonlocal pending, last_train
        if not pending:
            return
        values = jax.device_get(pending)
        throughput = timer.lap()
        first = step - len(values) + 1
        for offset, m in enumerate(values):
            if not np.isfinite(m["loss"]):
                stop_non_finite(f"loss is {float(m['loss'])} at step {first + offset}")
        # window means, except the count of float16 steps skipped for overflowing gradients
        last_train = {k: float((np.sum if k == "skipped" else np.mean)([m[k] for m in values])) for k in values[0]}
        # the steps averaged (first..step): fewer than log_every_steps after a start or before a stop
        last_train["steps"] = len(values)
        last_train["learning_rate"] = float(run.schedule(step - 1))
        last_train.update(throughput)
        if writer:
            with timer.paused():
                writer.write(step, "train", last_train)
        pending = []

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

    def save(eval_metrics=None):
        """Checkpoints `step`, once; `eval_metrics` make it a candidate for the best checkpoint."""
        nonlocal saved_at
        if saved_at == step:
            return
        with timer.paused(state):
            if writer:
                writer.sync()  # the lines a checkpoint covers are durable before it is
            wd.save(step, host_tree(), batches.get_state(), config_json, eval_metrics)
        saved_at = step

    def evaluate(splits):
        """Evaluates the state on `splits` ("eval", "train_eval") and logs each line."""
        nonlocal last_eval, last_train_eval
        with timer.paused(state):
            for split, source in run.evaluation_sources().items():
                if split in splits:
                    result = run.evaluate(state, source)
                    if writer:
                        writer.write(step, split, result)
                    if split == "eval":
                        last_eval = result
                    else:
                        last_train_eval = result

    def measure():
        nonlocal monitor
        if monitor is None or step in monitor.recorded_steps():
            return
        try:
            with timer.paused(state):
                monitor.measure(step, run.analysis_variables(driver.get_state(state)))
        except FileWriteError:
            raise  # a record that cannot be written stops the run (below); a failed measurement does not
        except Exception as err:  # noqa: BLE001 - a failed measurement never costs the training run
            report(f"analysis at step {step} failed ({type(err).__name__}: {err}); training goes on without it")
            if writer:
                writer.event(step, f"analysis stopped: {type(err).__name__}: {err}")
            monitor.close()
            monitor = None

    def complete_restored_step():
        """The records the schedule wants at the restored step that are not on disk (a kill
        between its checkpoint and them, or a schedule that now asks for more): made now."""
        missing = schedule.wanted(step) - wd.records_at(step)
        if missing & set(schedule.eval_splits):
            evaluate(missing)
        if schedule.measures(step):
            measure()

    from tqdm.auto import tqdm

    progress = tqdm(total=config.num_steps, initial=step, disable=not config.progress_bar, unit="step",
                    dynamic_ncols=True, desc="compiling" if step < config.num_steps else None)
    try:
        try:
            if not stop.received:
                if resumed:
                    complete_restored_step()
                else:  # a new run's first state (step 0, or init_from's)
                    measure()
            if stop.received:  # during start-up: nothing trained by this process, nothing new to save
                stopped = True
                latest = wd.latest_step()
                report(f"SIGTERM before the first step: nothing trained, nothing new to save "
                       + (f"(latest checkpoint: {latest} in {wd.directory()}); rerun the same command to resume"
                          if latest is not None else "(no checkpoint yet); rerun the same command to start"))
                if writer:
                    writer.event(step, "stopped by SIGTERM before the first step")
            compiled = False
            while step < config.num_steps and not stopped:
                state, metrics = driver.train_step(state, next(batches))
                step += 1
                if compiled:
                    timer.step()
                else:  # the first step of this process compiled the step function
                    timer.first_step_done(metrics)
                    progress.set_description(None, refresh=False)
                    compiled = True
                pending.append(metrics)
                progress.update(1)
                stop.poll(step)
                final = step == config.num_steps
                evaluating = schedule.evaluates(step)  # every eval_every_steps and the final step
                if (_due(step, config.log_every_steps) or evaluating or stop.received
                        or _due(step, config.checkpoint_every_steps)):
                    flush()
                    progress.set_postfix(loss=f"{last_train['loss']:.4f}", refresh=False)
                if evaluating:
                    evaluate(schedule.eval_splits)
                    if best_eval is None or last_eval["accuracy"] >= best_eval["accuracy"]:
                        best_eval = dict(last_eval, step=step)  # orbax's BestN keeps the latest of equals
                    save(last_eval)
                # At an evaluated step the measurement follows the checkpoint: a kill between them is
                # made good on resume (complete_restored_step).
                if schedule.measures(step):
                    measure()
                # Read the flag only now: a SIGTERM that arrived during the eval, the measurement or
                # a save above gets its checkpoint at this step.
                if final or stop.received or _due(step, config.checkpoint_every_steps):
                    save()
                if stop.received and saved_at == step:  # (one that came after the line above: next step)
                    stopped = True
                    report(f"SIGTERM: saved checkpoint {step} in {wd.directory()}; rerun the same command to resume")
                    if writer:
                        writer.event(step, "stopped by SIGTERM")
                    break
        except FileWriteError as err:
            if isinstance(err, CheckpointWriteError):
                raise
            raise wd.record_write_failed(err, step) from err
        if last_eval is None and not stopped:  # resumed a finished run: evaluate it again
            last_eval = run.evaluate(state)
    finally:
        progress.close()
        if writer:
            writer.close()
        if monitor is not None:
            monitor.close()

    return {"step": step, "train": last_train, "eval": last_eval, "train_eval": last_train_eval,
            "best_eval": best_eval, "stopped": stopped, "workdir": str(wd.path)}


def _make_monitor(config, schedule: RecordSchedule, run: Run, wd: Workdir, resume_step, report):
    """The gradient-propagation monitor of `config.analysis_*`, or None when it is off. Every
    check (probe batch size, the model's unit interface, a writable analysis file) happens here,
    before training starts."""
    if not schedule.monitor_on:
        return None
    from jaxres.analysis.monitor import TrainingMonitor

    images, labels = run.probe_batch(config.analysis_batch_size)
    return TrainingMonitor(run.analysis_model(), images, labels, workdir=wd.path, bn=config.analysis_bn,
                           unit_jacobians=config.analysis_unit_jacobians, resume_step=resume_step, report=report)


def format_summary(config, summary: dict) -> str:
    def pct(m):
        return f"{100 * m['accuracy']:.2f}% ({int(m['count'])} examples)" if m else "-"

    rows = [("model", config.model), ("dataset", config.dataset),
            ("steps", f"{summary['step']} / {config.num_steps}" + (" (stopped by SIGTERM)" if summary["stopped"] else ""))]
    if summary["train"]:
        rows.append(("train loss (last window)", f"{summary['train']['loss']:.4f}"))
    if summary["eval"]:
        rows += [("eval loss", f"{summary['eval']['loss']:.4f}"), ("eval accuracy", pct(summary["eval"]))]
    if summary.get("train_eval"):
        rows.append(("train-subset accuracy (eval mode)", pct(summary["train_eval"])))
    if summary["best_eval"]:
        rows.append(("best eval accuracy", f"{pct(summary['best_eval'])} at step {summary['best_eval']['step']}"))
    rows += [("wall time", f"{summary['wall_time_s']:.1f} s"), ("workdir", summary["workdir"])]
    return summary_table(rows)


def evaluate_workdir(workdir, *, checkpoint: str = "latest", split: str = "", data_dir: str = "",
                     report=print) -> dict:
    """Evaluates a checkpoint of a run (`latest`, `best` or a step number) on its eval split
    (or `split`), with the config stored in that checkpoint. Reads only: a damaged checkpoint
    is reported with the ones that can be used instead, never moved."""
    wd, kind, wanted = find_checkpoint(workdir, checkpoint)

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
