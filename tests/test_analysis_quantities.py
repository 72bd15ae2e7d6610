"""The one place that defines the analysis quantities (jaxres.analysis.quantities): what the
training monitor and the study write, measured on a tiny net, is what it defines (and the other
way round), and the monitor's committed records read and write back byte for byte."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxres.analysis import TrainingMonitor
from jaxres.analysis import quantities as q
from jaxres.analysis.endtoend import end_to_end
from jaxres.analysis.monitor import _line
from jaxres.analysis.report import COLUMNS, table_legend
from jaxres.analysis.segments import SegmentCache
from jaxres.analysis.stages import unit_places
from jaxres.analysis.study import Measurement, _unit_entries
from jaxres.analysis.study_config import Setting
from jaxres.analysis.summary import summarize
from tests.conftest import init, tiny_cifar_resnet

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted((ROOT / "experiments/results/degradation/runs").glob("*/*/seed*/analysis.jsonl"))
PLACES = {q.UNIT_INPUT, q.LAYER_PROBE, q.KERNEL, q.UNIT, q.NET, q.STAGE}


@pytest.fixture(scope="module")
def tiny():
    """The tiny CIFAR ResNet (widths 4/8/16) at initialization on a probe batch of 4 8x8 images."""
    model = tiny_cifar_resnet()
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 8, 8, 3)))
    return model, init(model, x), x, np.array([0, 3, 7, 9])


@pytest.fixture(scope="module")
def monitor_records(tiny, tmp_path_factory):
    """The monitor's records of both BatchNorm policies, per-unit Jacobians on."""
    model, variables, x, labels = tiny
    with TrainingMonitor(model, x, labels, workdir=tmp_path_factory.mktemp("monitor"), bn=("eval", "batch"),
                         unit_jacobians=1, tensorboard=False) as monitor:
        return monitor.measure(0, variables)


@pytest.fixture(scope="module")
def study_units(tiny):
    """The study's per-unit entries (`study._unit_entries`) of both BatchNorm policies."""
    model, variables, x, labels = tiny
    cache = SegmentCache()
    out = {}
    for bn in ("eval", "batch"):
        segments = cache.segments(model, variables, x.shape, bn, x.dtype)
        e2e = end_to_end(segments, x, labels, per_example_blocks=True)
        out[bn] = (_unit_entries(e2e, segments, unit_places(segments)), e2e)
    return out


def test_every_key_is_defined_once_with_its_place_form_and_method():
    groups = (q.LOSS,) + q.STUDY_UNIT + q.SUMMARY + (q.THEORY,) + q.MONITOR[1:]
    assert len({g.key for g in groups}) == len(groups) == len(q.QUANTITIES)
    for quantity in q.QUANTITIES.values():
        assert set(quantity.where.split(", ")) <= PLACES, quantity.key
        assert quantity.name and quantity.meaning and quantity.form and quantity.method, quantity.key
    assert q.quantity("dL_dh") is q.DL_DH
    with pytest.raises(ValueError, match=r"unknown analysis quantity 'dl_dh'; known: \[.*'dL_dh'"):
        q.quantity("dl_dh")


def test_the_monitor_writes_exactly_the_record_fields(monitor_records):
    assert set(q.MONITOR) <= set(q.QUANTITIES.values())
    assert {m.key for m in q.MONITOR} <= set(q.RECORD_FIELDS)
    for record in monitor_records:
        assert list(record) == list(q.RECORD_FIELDS)  # every field, in the order written
        assert {k for k in record if k in q.QUANTITIES} == {m.key for m in q.MONITOR}


def test_a_monitor_record_reads_and_writes_back_byte_for_byte(monitor_records):
    for record in monitor_records:
        typed = q.MonitorRecord.from_json(record)
        assert typed.bn == record["bn"] and typed.dL_dh == record[q.DL_DH.key]
        assert _line(typed.to_json()) == _line(record)


@pytest.mark.skipif(not COMMITTED, reason="no committed degradation runs")
def test_committed_monitor_records_read_and_write_back_byte_for_byte():
    for path in COMMITTED:
        lines = path.read_text().splitlines(keepends=True)
        for line in lines[:3] + lines[-2:]:
            assert _line(q.MonitorRecord.from_json(json.loads(line)).to_json()) == line, path


def test_an_older_record_without_some_quantities_reads_them_as_empty():
    old = {"step": 100, "bn": "batch", "probe_size": 32, "time_s": 1.0, "loss": 2.3, "units": ["stem", "head"],
           "dL_dh": {"stem": 0.1, "head": 0.2}}
    record = q.MonitorRecord.from_json(old)
    assert record.response_std == {} and record.dL_dW_rel == {} and record.unit_jacobian is None
    assert "unit_jacobian" not in record.to_json()
    with pytest.raises(ValueError, match="a monitor record needs 'step' and 'bn'"):
        q.MonitorRecord.from_json({"dL_dh": {}})


@pytest.mark.parametrize("bn", ["eval", "batch"])
def test_the_study_writes_exactly_the_unit_quantities(study_units, bn):
    units, _ = study_units[bn]
    written = [k for k in q.STUDY_UNIT if k is not q.SPECTRUM and (bn == "batch" or k not in q.BATCH_ONLY)]
    for unit in units:
        assert list(unit) == list(q.UNIT_FIELDS) + [k.key for k in written]  # spectrum: opt-in, added later
        for probe in unit[q.PROBES.key].values():
            assert set(probe) == {k.key for k in q.STUDY_PROBE}
            assert set(probe[q.LOGIT_JAC.key]) == set(q.OVER_EXAMPLES.strip("{}").replace(": (N,)", "").split(", "))


def test_the_summary_writes_only_summary_quantities(study_units):
    units, e2e = study_units["eval"]
    measurement = Measurement(model="tiny", family="cifar_resnet", depth=8, setting=Setting(bn="eval"), residual=True,
                              units=units, loss=e2e.loss, shattered={"correlation_by_lag": [0.5]},
                              bn_statistics=None, seconds=0.0)
    summary = summarize(measurement)
    batch_only = {q.FIRST_LAST_RATIO_SUMMED_ROWS, q.CROSS_EXAMPLE_SHARE_UNIT_1, q.GRAD_CORRELATION_LAG1_SUMMED_ROWS}
    assert set(summary) == {k.key for k in q.SUMMARY if k not in batch_only}


def test_the_table_legend_is_the_columns_definitions():
    summary = {q.UNIT_MSV.key: {"method": "exact"}}
    legend = table_legend({"measurements": [{"summary": summary}]})
    for _, quantity, _ in COLUMNS:
        if quantity is not None:
            assert f"{quantity.name}: {quantity.meaning}" in legend
