"""Gradient propagation measured during training, on a fixed probe batch.

`TrainingMonitor(model, images, labels, workdir=...)` measures a model at a given step with
the library's exact routines (`end_to_end_norms`, and with `unit_jacobians > 0` the grouped
per-unit Jacobians of `unit_groups.measure_group`) and appends one JSON object per BatchNorm
policy to the run's analysis log (`Workdir.analysis_log`: written, flushed and fsynced line by
line), with TensorBoard scalars and a unit x step image in the run's TensorBoard events
(`Workdir.tensorboard`, shared with the training metrics).

A record is a `quantities.MonitorRecord`: `step`, `bn`, `probe_size`, `time_s`, `loss`, `units`,
then the quantities of `quantities.MONITOR` - `dL_dh[unit]` (||dL/dh|| over the whole probe
batch at the unit's input), `dlogits_dh[unit]` (quantiles over examples of
||sum_j d z_j / d h_i||_F), `dL_dW[path]` and `dL_dW_rel[path]` per kernel, `response_std`
per layer probe and, only with `unit_jacobians > 0`, `unit_jacobian[unit]` - each defined
there (what it is, where it is measured, its form, exact or estimate, how it is reduced).
The per-unit Jacobians use `unit_groups.JacobianOptions()`.

Non-finite numbers are written as the strings "nan", "inf", "-inf" (as the metrics log
does; `float(value)` reads both forms back), so every line is strict JSON.

Compiled once per run: unit ops are shared between units of one computation and cached in
the monitor's `SegmentCache`, and the units are traced only at the first measurement (later
ones reuse the traced segments with the new variables), so a measurement at a later step
compiles nothing while the shapes stay the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis import quantities as q
from jaxres.analysis.endtoend import check_labels, end_to_end
from jaxres.analysis.segments import SegmentCache, check_bn, unit_variables
from jaxres.analysis.stages import sample_units, unit_places
from jaxres.analysis.unit_groups import JacobianOptions, measure_group
from jaxres.models.scan_layout import is_stacked
from jaxres.workdir import Workdir


def json_safe(value):
    """`value` with numpy scalars as Python numbers and non-finite floats as "nan"/"inf"/"-inf"."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    return value


def read_analysis(workdir) -> list[dict]:
    """The records of a run's analysis log in file order (`Workdir.analysis_records`: a line torn
    by a kill, or any line without `step` and `bn`, is skipped)."""
    return Workdir(workdir).analysis_records()


def _line(record: dict) -> str:
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def check_unit_model(model) -> tuple[str, ...]:
    """`model.unit_names()`, or a ValueError for a model without the unit interface."""
    names = getattr(model, "unit_names", None)
    if not callable(names):
        raise ValueError(
            f"the analysis needs a model with the unit interface (model.unit_names() and "
            f"model.apply(v, h, start=u, stop=u), see the docs' Model zoo page, 'The unit interface'); got {type(model).__name__}"
        )
    return tuple(names())


def check_probe(model, images, labels):
    """The probe batch as arrays: images (N, H, W, C) float with N >= 2, labels (N,) int."""
    images = np.asarray(images)
    if images.ndim != 4 or not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"probe images must be a float NHWC batch (N, H, W, C); got shape {images.shape} "
                         f"{images.dtype}")
    if images.shape[0] < 2:
        raise ValueError(f"the probe batch needs at least 2 examples (BatchNorm batch statistics, quantiles "
                         f"over examples); got {images.shape[0]}")
    channels = getattr(model, "in_channels", images.shape[-1])
    if images.shape[-1] != channels:
        raise ValueError(f"probe images have {images.shape[-1]} channels, the model takes {channels}; got shape "
                         f"{images.shape} (NHWC expected: pass x.transpose(0, 2, 3, 1) for NCHW)")
    labels = check_labels(labels, images.shape[0], getattr(model, "num_classes", np.iinfo(np.int32).max))
    return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


def check_step(value, name: str = "step") -> int:
    """An integer >= 0 from any integer scalar (int, numpy or a 0-d jax array such as
    `state.step`), or a ValueError naming `name`."""
    try:
        step = operator.index(value) if not isinstance(value, bool) else -1
    except TypeError:
        step = -1
    if step < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return step


def check_bns(bn) -> tuple[str, ...]:
    """BatchNorm policies from a tuple or a comma-separated string ("eval,batch"), checked."""
    bns = tuple(b.strip() for b in bn.split(",")) if isinstance(bn, str) else tuple(bn)
    if not bns:
        raise ValueError("bn must name at least one BatchNorm policy ('batch', 'eval')")
    for b in bns:
        check_bn(b)
    return tuple(dict.fromkeys(bns))


class ReusedSegments(SegmentCache):
    """A `SegmentCache` that traces a model's units once per (model, input shape, policy,
    variable shapes): later calls reuse the traced segments with the new variables (tracing
    the 29 units of a cifar_resnet56 took ~0.8 s of every measurement otherwise)."""

    def __init__(self):
        super().__init__()
        self._traced: dict = {}

    def segments(self, model, variables, x_shape, bn: str = "eval", dtype=jnp.float32):
        leaves, tree = jax.tree.flatten(variables)
        shapes = tuple((np.shape(a), jnp.result_type(a)) for a in leaves)
        key = (model, tuple(x_shape), bn, jnp.dtype(dtype), tree, shapes)
        if key not in self._traced:
            self._traced[key] = super().segments(model, variables, x_shape, bn, dtype)
        return [dataclasses.replace(s, cvars=unit_variables(variables, s.name)) for s in self._traced[key]]


def _kernel_norm(params: dict, path: str) -> float:
    node = params
    for key in path.split("/"):
        node = node[key]
    return float(np.linalg.norm(np.asarray(node, np.float64)))


def _record(step: int, bn: str, n: int, e2e_units: dict, loss: float, params: dict) -> q.MonitorRecord:
    """The record's quantities derived from `endtoend.end_to_end` (`time_s` still None)."""
    dl_dh, dlogits_dh, dl_dw, dl_dw_rel, response_std = {}, {}, {}, {}, {}
    for unit, entry in e2e_units.items():
        dl_dh[unit] = q.whole_batch_norm(entry["input"][q.DL_DH.source])
        dlogits_dh[unit] = q.median_q10_q90(entry["input"][q.DLOGITS_DH.source])
        for path, grad in entry[q.DL_DW.source].items():
            full = f"{unit}/{path}"
            dl_dw[full] = grad
            with np.errstate(divide="ignore", invalid="ignore"):
                dl_dw_rel[full] = float(np.float64(grad) / _kernel_norm(params, full))
        forward = entry[q.RESPONSE_STD.source]
        for probe in sorted((p for p in forward if p != "out"), key=lambda p: int(p.removeprefix("layer") or 0)):
            response_std[f"{unit}/{probe}"] = forward[probe]
    return q.MonitorRecord(step=step, bn=bn, probe_size=n, loss=loss, units=list(e2e_units), dL_dh=dl_dh,
                           dlogits_dh=dlogits_dh, dL_dW=dl_dw, dL_dW_rel=dl_dw_rel, response_std=response_std)


class TrainingMonitor:
    """Measures a model's gradient propagation on a fixed probe batch and appends the records
    to the analysis log of `workdir` (format: module docstring).

    model: a unit-interface model; images: float NHWC (N, H, W, C), N >= 2; labels: int (N,);
    bn: BatchNorm policies measured at every step (tuple or "eval,batch"); unit_jacobians:
    per-unit Jacobians on that many evenly spaced inner units, transitions included
    (`stages.sample_units(..., within="net")`; 0: none; costs extra JVP/VJPs).
    workdir: a path, or a run's `Workdir` (training passes its own: the monitor then writes
    through it and shares its TensorBoard writer; the workdir closes them).
    resume_step: a resumed run's restored step; records after it are dropped (the file is
    rewritten atomically), so a killed-and-resumed run ends with the records of an
    uninterrupted one; TensorBoard events after it are purged. Records are kept unique by
    (step, bn) in any case: a step measured again replaces its record.
    cache: compiled unit code to share with other monitors of this process (default: a new
    one). Bad arguments raise ValueError, an unwritable workdir OSError, here - before training;
    a record that cannot be written later raises `jaxres.files.FileWriteError` naming the file.
    report: where a torn last line of the analysis log, set aside on opening, is reported.
    """

    def __init__(self, model, images, labels, *, workdir, bn=("batch",), unit_jacobians: int = 0,
                 resume_step: int | None = None, tensorboard: bool = True, cache: ReusedSegments | None = None,
                 report=print):
        self.model = model
        self.unit_names = check_unit_model(model)
        self.images, self.labels = check_probe(model, images, labels)
        self.bns = check_bns(bn)
        if isinstance(unit_jacobians, bool) or not isinstance(unit_jacobians, int) or unit_jacobians < 0:
            raise ValueError(f"unit_jacobians must be an integer >= 0 (0: none), got {unit_jacobians!r}")
        resume_step = None if resume_step is None else check_step(resume_step, "resume_step (None: a new run)")
        self.unit_jacobians = unit_jacobians
        self.jacobian_options = JacobianOptions()
        self.own_workdir = not isinstance(workdir, Workdir)
        # a path: OSError naming the fix when it cannot be written
        self.workdir = Workdir(workdir, create=True) if self.own_workdir else workdir
        self.path = self.workdir.analysis_path
        self.lines, self.records = self.workdir.analysis_log(keep_through=resume_step, report=report)
        self.cache = ReusedSegments() if cache is None else cache
        self.tb = None
        if tensorboard:
            self.tb = self.workdir.tensorboard(purge_step=None if resume_step is None else resume_step + 1)

    def recorded_steps(self) -> set[int]:
        """Steps whose records exist for every policy of `bn` (a step cut short is not one)."""
        have = {(r["step"], r["bn"]) for r in self.records}
        return {s for s, _ in have if all((s, b) in have for b in self.bns)}

    def measure(self, step: int, variables: dict) -> list[dict]:
        """Measures `variables` ({"params", "batch_stats"} in the per-unit layout, host or
        device arrays) at `step`; appends and returns one record per BatchNorm policy."""
        step = check_step(step)
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError("variables must be a dict with 'params' (and 'batch_stats'), as for model.apply")
        if is_stacked(variables):
            raise ValueError("variables are in the stacked scan_units layout; pass "
                             "jaxres.models.unstack_identical_units(model, variables)")
        records = self._append([self._measure_one(step, bn, variables) for bn in self.bns])
        if self.tb is not None:
            self._tensorboard(records)
        return records

    def _measure_one(self, step: int, bn: str, variables: dict) -> q.MonitorRecord:
        start = time.perf_counter()
        segments = self.cache.segments(self.model, variables, self.images.shape, bn, self.images.dtype)
        # summed rows only: the per-example blocks of a batch map cost N*C backward rows
        e2e = end_to_end(segments, self.images, self.labels, per_example_blocks=False)
        record = _record(step, bn, int(self.images.shape[0]), e2e.units, e2e.loss, variables["params"])
        if self.unit_jacobians:
            record = dataclasses.replace(record, unit_jacobian=self._unit_jacobians(segments, e2e.activations, bn))
        return dataclasses.replace(record, time_s=time.perf_counter() - start)

    def _unit_jacobians(self, segments: list, hs: list, bn: str) -> dict:
        """Per-unit ||J||_F^2 and sigma_max on the sampled inner units, grouped by computation
        (one vmapped op per group, as `jaxres analyze` does); fixed seeds, so the Hutchinson
        probes and Lanczos starts are the same at every step."""
        picked = sample_units(unit_places(segments), self.unit_jacobians, within="net")
        groups: dict[int, list[int]] = {}
        for i in picked:
            groups.setdefault(id(segments[i].ops), []).append(i)
        out = {}
        for g, members in enumerate(groups.values()):
            results = measure_group([(segments[i], hs[i]) for i in members], [False] * len(members), bn,
                                    self.jacobian_options, g)
            for i, result in zip(members, results):
                fro = result["frobenius_sq"]
                out[segments[i].name] = {"frobenius_sq": float(np.ravel(fro["estimate"])[0]),
                                         "sigma_max": float(result["spectral_norm"]["sigma"][0]),
                                         "exact": fro["method"] == "exact"}
        return {s.name: out[s.name] for s in segments if s.name in out}

    def _append(self, records: list[q.MonitorRecord]) -> list[dict]:
        """Writes `records` as JSON lines (replacing earlier ones of the same step and policy);
        returns them as written (non-finite numbers as strings)."""
        records = [json_safe(r.to_json()) for r in records]
        new = {(r["step"], r["bn"]) for r in records}
        if any((r["step"], r["bn"]) in new for r in self.records):  # measured again: replace
            self.records = [r for r in self.records if (r["step"], r["bn"]) not in new]
            self.lines.rewrite(self.records, _line)
        for record in records:
            self.lines.write(record)  # one line, flushed and fsynced
        self.records.extend(records)
        return records

    def _tensorboard(self, records: list[dict]) -> None:
        """Per-unit scalars and the unit x step image of every record."""
        for record in records:
            prefix, step = f"analysis_{record['bn']}", record["step"]
            self._scalar(f"{prefix}/{q.LOSS.key}", record[q.LOSS.key], step)
            for unit, value in record[q.DL_DH.key].items():
                self._scalar(f"{prefix}/{q.DL_DH.key}/{unit}", value, step)
            for unit, value in record.get(q.UNIT_JACOBIAN.key, {}).items():
                self._scalar(f"{prefix}/sigma_max/{unit}", value["sigma_max"], step)
            image = gradient_map(self.records, record["bn"])
            self.tb.add_image(f"{prefix}/log10_{q.DL_DH.key}_unit_by_step", image, step)
        self.tb.flush()

    def _scalar(self, tag: str, value, step: int) -> None:
        """One finite scalar (records hold non-finite numbers as strings; those stay in the
        JSON lines only; TensorBoard would show them as gaps or warn)."""
        value = float(value)
        if math.isfinite(value):
            self.tb.add_scalar(tag, value, step)

    def close(self) -> None:
        """Closes the analysis log, and the workdir this monitor opened from a path."""
        self.lines.close()
        if self.own_workdir:
            self.workdir.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def gradient_map(records: list[dict], bn: str, max_width: int = 512) -> np.ndarray:
    """uint8 (H, W, 3) image of log10 ||dL/dh||: one row band per unit (stem at the top), one
    column band per measured step (in step order), viridis scaled to this image's finite
    range; non-finite cells are grey. Built from the records so far (cheap: no plotting)."""
    import matplotlib

    rows = sorted((r for r in records if r["bn"] == bn), key=lambda r: r["step"])
    units = rows[-1]["units"] if rows else []
    values = np.array([[float(r[q.DL_DH.key].get(u, "nan")) for r in rows] for u in units], np.float64).reshape(
        len(units), len(rows))
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(values)
    finite = np.isfinite(logs)
    low, high = (logs[finite].min(), logs[finite].max()) if finite.any() else (0.0, 1.0)
    scaled = np.where(finite, (logs - low) / max(high - low, 1e-12), 0.0)
    image = matplotlib.colormaps["viridis"](scaled)[..., :3]
    image[~finite] = 0.5
    cell_w = max(1, min(8, max_width // max(len(rows), 1)))
    image = np.repeat(np.repeat(image, 6, axis=0), cell_w, axis=1)
    return (image * 255).astype(np.uint8)
