"""The plain-vs-residual study behind `jaxres analyze` (and `make demo`).

For every model and every setting (normalization, activation, BatchNorm policy), at
initialization or on given variables, on one fixed batch of synthetic inputs (an arc through
image space, `shattered.arc_inputs`; labels drawn at random):

- exact end-to-end norms at every unit input and layer probe (`endtoend`): the per-example
  blocks ||d z_i / d h_i|| (the headline), with bn="batch" also the summed rows
  ||sum_j d z_j / d h_i|| and the cross-example share, the gradient scale coefficient, the
  exact singular values of d z_i / d h_i;
- per-stage growth rates over the shape-keeping units and the transitions' rates (`stages`);
- per-unit Jacobians of sampled shape-keeping units (`unit_groups`): ||J_l||_F^2 (exact or
  Hutchinson with a 95% interval), sigma_max by Lanczos, the identity/branch split;
- forward response stds (He et al. 2015, Fig. 7) and shattered-gradient correlations.

Every model is initialized on its own with `config.seed`. Flax derives each parameter's key
from its path, so a plain net and its residual twin (same parameter tree) start from the
same weights and the comparison is controlled (tested).

`run_study` measures the settings one after the other; `measure_setting` is the unit of
work a caller may run concurrently (the CLI runs settings in threads: their numbers do not
depend on it), reporting progress through `on_progress(description, done, new_steps)`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis import quantities as q
from jaxres.analysis.endtoend import end_to_end
from jaxres.analysis.segments import SegmentCache, identity_unit
from jaxres.analysis.shattered import arc_inputs, gradient_correlations
from jaxres.analysis.stages import sample_units, unit_places
from jaxres.analysis.study_config import Setting, StudyConfig, StudyModel, study_models
from jaxres.analysis.summary import summarize
from jaxres.analysis.unit_groups import exact_spectrum, measure_group
from jaxres.models.registry import create_model, model_card

Progress = Callable[[str, int, int], None]  # (what starts now, steps done, steps newly found)


def _no_progress(description: str, done: int, new_steps: int) -> None:
    return None


@dataclasses.dataclass
class Measurement:
    """One model in one setting: per-unit numbers (JSON-ready dicts: `quantities.UNIT_FIELDS`,
    then the `quantities.STUDY_UNIT` entries, each defined there), the shattered-gradient
    correlations, the summary (`summary.summarize`: `quantities.SUMMARY`) and the seconds spent."""

    model: str
    family: str
    depth: int | None
    setting: Setting
    residual: bool  # identity-shortcut units recognized from the outside (`identity_unit`)
    units: list[dict]
    loss: float
    shattered: dict
    bn_statistics: str | None
    seconds: float
    summary: dict | None = None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "setting": dataclasses.asdict(self.setting)}


@dataclasses.dataclass
class StudyResults:
    """What `run_study` returns; `to_json()` is the content of results.json."""

    config: StudyConfig
    measurements: list[Measurement]
    reductions: list[str]
    seconds: float | None = None
    checkpoint: str | None = None

    def to_json(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "reductions": self.reductions,
                "checkpoint": self.checkpoint, "seconds": self.seconds,
                "measurements": [m.to_json() for m in self.measurements]}


@dataclasses.dataclass
class _ModelPass:
    """A measurement under way, with what its per-unit Jacobians need."""

    measurement: Measurement
    segments: list
    activations: list


def study_inputs(config: StudyConfig, input_shape=(32, 32, 3), num_classes: int = 10):
    """The fixed synthetic batch: arc images (N, H, W, C), float32 (float64 with
    `config.float64`), and random labels (N,)."""
    key = jax.random.key(config.seed)
    x = arc_inputs(jax.random.fold_in(key, 1), config.batch_size, input_shape)
    labels = jax.random.randint(jax.random.fold_in(key, 2), (config.batch_size,), 0, num_classes, jnp.int32)
    # drawn in float32 and cast: a float64 draw would be other numbers, not the same ones exactly
    return (x.astype(jnp.float64) if config.float64 else x), labels


def calibrate_batch_stats(model, variables, x) -> dict:
    """`variables` with every BatchNorm's running statistics set to the batch statistics of
    `x` (the mean and biased variance of each BN layer's input in a train-mode pass), so that
    eval-mode BN on `x` computes the same forward pass as batch-mode BN, with the statistics
    held constant. Two train-mode passes, from running statistics 0 and 1, give
    a = (1 - m) s and b = m + (1 - m) s whatever the momentum m, so m = b - a and
    s = a / (1 - m)."""
    if "batch_stats" not in variables:
        return variables
    rngs = {"dropout": jax.random.key(0)}

    def updated(fill):
        stats = jax.tree.map(lambda s: jnp.full_like(s, fill), variables["batch_stats"])
        _, state = model.apply({**variables, "batch_stats": stats}, x, True, mutable=["batch_stats"], rngs=rngs)
        return state["batch_stats"]

    from_zero, from_one = updated(0.0), updated(1.0)

    def solve(a, b):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        momentum = float(np.median(b64 - a64))  # one constant per layer; the median drops rounding
        return jnp.asarray(a64 / (1.0 - momentum), jnp.asarray(a).dtype)

    return {**variables, "batch_stats": jax.tree.map(solve, from_zero, from_one)}


def _unit_entries(e2e, segments, places) -> list[dict]:
    """Each unit's entry: what it is (`quantities.UNIT_FIELDS`), then the `quantities.STUDY_UNIT`
    it measures (`jacobian` still None)."""
    per_example = (q.LOGIT_JAC, q.GRADIENT_SCALE, q.LOSS_GRAD)
    units = []
    for index, (seg, place) in enumerate(zip(segments, places)):
        entry = e2e.units[seg.name]
        inp = entry["input"]
        unit = dict(zip(q.UNIT_FIELDS, (seg.name, place.kind, place.stage, list(seg.in_shape), list(seg.out_shape))))
        unit.update({k.key: q.over_examples(inp[k.source]) for k in per_example})
        unit[q.LOGIT_JAC_SINGULAR_VALUES.key] = inp[q.LOGIT_JAC_SINGULAR_VALUES.source].astype(np.float32).tolist()
        if q.LOGIT_JAC_SUMMED_ROWS.source in inp and q.CROSS_EXAMPLE_SHARE.source in inp:
            unit[q.LOGIT_JAC_SUMMED_ROWS.key] = q.over_examples(inp[q.LOGIT_JAC_SUMMED_ROWS.source])
            unit[q.CROSS_EXAMPLE_SHARE.key] = {"estimate": inp[q.CROSS_EXAMPLE_SHARE.source], "method": "exact"}
            unit[q.LOGIT_JAC_SINGULAR_VALUES_SUMMED_ROWS.key] = inp[
                q.LOGIT_JAC_SINGULAR_VALUES_SUMMED_ROWS.source].astype(np.float32).tolist()
        unit[q.PROBES.key] = {p: {k: q.over_examples(v) for k, v in measured.items() if k != q.CROSS_EXAMPLE_SHARE.key}
                              for p, measured in entry[q.PROBES.source].items()}
        unit[q.FORWARD_STD.key] = entry[q.FORWARD_STD.source]
        unit[q.PARAM_GRAD.key] = entry[q.PARAM_GRAD.source]
        unit[q.IDENTITY_SHORTCUT.key] = identity_unit(e2e.activations[index + 1], e2e.pre_activations[index])
        unit[q.JACOBIAN.key] = None
        units.append(unit)
    return units


def _model_pass(study_model: StudyModel, setting: Setting, config: StudyConfig, cache: SegmentCache,
                variables_for: Callable | None) -> _ModelPass:
    """The exact end-to-end pass of one model (per-unit `jacobian` still None)."""
    start = time.perf_counter()
    card = model_card(study_model.name)
    build = functools.partial(create_model, study_model.name, activation=setting.activation, norm=setting.norm,
                              in_channels=config.in_channels)
    model = build(dtype=jnp.float64, param_dtype=jnp.float64) if config.float64 else build()
    x, labels = study_inputs(config, (card.input_size, card.input_size, config.in_channels), card.num_classes)
    # the float32 model's variables, cast: a float64 initialization would draw other numbers
    variables = (build().init(jax.random.key(config.seed), x.astype(jnp.float32)) if variables_for is None
                 else variables_for(study_model.name, build(), x.astype(jnp.float32)))
    if config.float64:
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    bn_statistics = None
    if setting.bn == "eval" and "batch_stats" in variables:
        if variables_for is None:
            variables = calibrate_batch_stats(model, variables, x)
            bn_statistics = (f"calibrated: the batch statistics of the {config.batch_size} study inputs "
                             f"(exact, from train-mode passes); at initialization Flax's are 0 and 1")
        else:
            bn_statistics = "the checkpoint's running statistics"
    segments = cache.segments(model, variables, x.shape, setting.bn, x.dtype)
    places = unit_places(segments)
    e2e = end_to_end(segments, x, labels, per_example_blocks=True)
    units = _unit_entries(e2e, segments, places)
    shattered = {"correlation_by_lag": gradient_correlations(e2e.input_grads).tolist(), "method": "exact"}
    if setting.bn == "batch" and setting.norm == "batchnorm":
        shattered["correlation_by_lag_summed_rows"] = gradient_correlations(e2e.input_grads_summed_rows).tolist()
    measurement = Measurement(
        model=study_model.name, family=study_model.family, depth=study_model.depth, setting=setting,
        residual=any(u[q.IDENTITY_SHORTCUT.key] for u in units), units=units, loss=e2e.loss, shattered=shattered,
        bn_statistics=bn_statistics, seconds=time.perf_counter() - start)
    return _ModelPass(measurement, segments, e2e.activations)


def spectrum_unit_index(segments, max_dim: int) -> int | None:
    """The last inner unit (before the head) that keeps its shape and whose per-example input
    has <= max_dim values: the unit whose exact singular spectrum the study reports."""
    for index in range(len(segments) - 2, 0, -1):
        seg = segments[index]
        if seg.keeps_shape and math.prod(seg.in_shape[1:]) <= max_dim:
            return index
    return None


def measure_setting(setting: Setting, config: StudyConfig, variables_for: Callable | None = None,
                    on_progress: Progress = _no_progress) -> list[Measurement]:
    """Every model of one setting: end-to-end passes, then the per-unit Jacobians of all
    models at once, grouped by computation (`unit_groups.measure_group`: one compiled op per
    distinct unit), then the exact spectra (opt-in). `variables_for(name, model, x)` supplies
    trained variables (None: each model's initialization with `config.seed`). In float64
    (`config.float64`) the whole setting runs inside `jax.enable_x64()`."""
    with jax.enable_x64(config.float64):
        return _measure_setting(setting, config, variables_for, on_progress)


def _measure_setting(setting, config, variables_for, on_progress) -> list[Measurement]:
    cache = SegmentCache()  # compiled unit code is shared by every model of a setting
    passes = []
    for study_model in study_models(config):
        on_progress(f"[{setting.label}] {study_model.name} end-to-end", 0, 0)
        passes.append(_model_pass(study_model, setting, config, cache, variables_for))
        on_progress("", 1, 0)
    groups: dict[int, list[tuple[_ModelPass, int]]] = {}
    for p in passes:
        places = unit_places(p.segments)
        for i in sample_units(places, config.jacobian_units):
            groups.setdefault(id(p.segments[i].ops), []).append((p, i))
    spectra = []
    if config.spectrum_max_dim:
        indices = [(p, spectrum_unit_index(p.segments, config.spectrum_max_dim)) for p in passes]
        spectra = [(p, i) for p, i in indices if i is not None]
    on_progress("", 0, len(groups) + len(spectra))
    options = config.jacobian_options
    for g, members in enumerate(groups.values()):
        first_pass, first_index = members[0]
        on_progress(f"[{setting.label}] per-unit Jacobians: {len(members)} x "
                    f"{first_pass.segments[first_index].name}-like", 0, 0)
        start = time.perf_counter()
        measured = measure_group([(p.segments[i], p.activations[i]) for p, i in members],
                                 [p.measurement.units[i][q.IDENTITY_SHORTCUT.key] for p, i in members],
                                 setting.bn, options, config.seed + g)
        share = (time.perf_counter() - start) / len(members)
        for (p, i), result in zip(members, measured):
            p.measurement.units[i][q.JACOBIAN.key] = result
            p.measurement.seconds += share
        on_progress("", 1, 0)
    for p, i in spectra:
        on_progress(f"[{setting.label}] exact spectrum {p.measurement.model} {p.segments[i].name}", 0, 0)
        start = time.perf_counter()
        p.measurement.units[i][q.SPECTRUM.key] = exact_spectrum(p.segments[i], p.activations[i], setting.bn)
        p.measurement.seconds += time.perf_counter() - start
        on_progress("", 1, 0)
    for p in passes:
        p.measurement.summary = summarize(p.measurement)
    return [p.measurement for p in passes]


def total_steps(config: StudyConfig) -> int:
    """Progress steps known before the study starts (one end-to-end pass per model and setting)."""
    return len(config.settings()) * len(study_models(config))


def default_workers(num_settings: int) -> int:
    """Settings measured at once, one thread each, up to the machine's cores: a setting's
    compiles and runs release the GIL, so two settings keep both cores of a 2-core CPU busy
    (one setting alone keeps about one core busy: it is mostly single-threaded XLA compiles)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, num_settings))


def setting_cost_rank(setting: Setting) -> int:
    """0 for the costliest settings: BatchNorm with batch statistics (per-example blocks of a
    batch map: N*C backward rows, and batch-map unit Jacobians), then BatchNorm eval, then
    no normalization."""
    return 0 if setting.norm == "batchnorm" and setting.bn == "batch" else 1 if setting.norm == "batchnorm" else 2


def run_study(config: StudyConfig | None = None, variables_for: Callable | None = None,
              on_progress: Progress = _no_progress, *, workers: int = 1) -> StudyResults:
    """Measures every setting of `config` (default: `StudyConfig()`; see `measure_setting`):
    one after the other with `workers=1`, else in that many threads (None: `default_workers`),
    the costliest settings first so that the threads finish close together. Every number is
    the same either way (tested bit for bit): each setting's seeds, compiled code and order of
    operations are its own. `on_progress` may be called from several threads at once."""
    config = StudyConfig() if config is None else config
    settings = config.settings()
    workers = default_workers(len(settings)) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    start = time.perf_counter()
    if workers == 1:
        per_setting = [measure_setting(s, config, variables_for, on_progress) for s in settings]
    else:
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="analyze") as pool:
            started = {i: pool.submit(measure_setting, settings[i], config, variables_for, on_progress)
                       for i in sorted(range(len(settings)), key=lambda i: setting_cost_rank(settings[i]))}
            per_setting = [started[i].result() for i in range(len(settings))]
    return collect(config, per_setting, time.perf_counter() - start)


def collect(config: StudyConfig, per_setting: list[list[Measurement]], seconds: float | None = None) -> StudyResults:
    """The study's results from the measurements of each setting (in `config.settings()` order)."""
    return StudyResults(config, [m for measurements in per_setting for m in measurements], reductions(config),
                        seconds)


def reductions(config: StudyConfig) -> list[str]:
    """What this configuration leaves out, in words (written to results.json)."""
    out = [f"synthetic batch of {config.batch_size} inputs"]
    if config.jacobian_units:
        out.append(f"per-unit Jacobians on {config.jacobian_units} shape-keeping unit(s) per stage, evenly "
                   f"spaced (jacobian_units=0: every unit)")
    if "eval" in config.bns or "none" in config.norms:
        out.append(f"bn='eval'/no-norm per-unit Jacobians on the first {config.jacobian_examples} example(s)")
    if not config.spectrum_max_dim:
        out.append("no exact unit-Jacobian spectra (spectrum_max_dim=0); exact spectra of d logits/d h only")
    if not config.float64:
        out.append("float32 (float64=True for a float64 re-run)")
    return out
