"""Gradient propagation measured during training (jaxres.analysis.monitor): the records are
the library's exact numbers, survive a kill and resume, and cost one compilation per run."""

import json
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.analysis import TrainingMonitor, end_to_end_norms, forward_statistics, read_analysis
from jaxres.analysis.monitor import ReusedSegments, json_safe
from jaxres.data import eval_transform, probe_batch
from jaxres.train.step import cross_entropy
from jaxres.workdir import Workdir
from tests.conftest import init, tiny_cifar_resnet

BATCH = 4


@pytest.fixture(scope="module")
def setup():
    """The tiny CIFAR ResNet (widths 4/8/16) on an 8x8x3 probe batch of 4 (small enough for
    exact unit Jacobians; compile time does not depend on the image size), with non-trivial
    running statistics (so bn="eval" is not the identity), and one shared unit-code cache."""
    model = tiny_cifar_resnet()
    x = np.asarray(jax.random.normal(jax.random.key(0), (BATCH, 8, 8, 3)))
    labels = np.array([0, 3, 7, 9])
    variables = init(model, x)
    stats = jax.tree.map(lambda s: np.asarray(s) + 0.3, variables["batch_stats"])
    variables = jax.tree.map(np.asarray, {"params": variables["params"], "batch_stats": stats})
    return model, variables, x, labels, ReusedSegments()


def scaled(variables, factor):
    """Other variables of the same shapes (numpy, so making them compiles nothing)."""
    return jax.tree.map(lambda a: a * np.float32(factor), variables)


@pytest.fixture(scope="module")
def measured(setup, tmp_path_factory):
    """Records of both BatchNorm policies at step 0, for the residual net and its plain twin."""
    model, variables, x, labels, cache = setup
    out = {}
    for residual in (True, False):
        twin = model.clone(residual=residual)
        workdir = tmp_path_factory.mktemp("monitor")
        with TrainingMonitor(twin, x, labels, workdir=workdir, bn=("eval", "batch"), cache=cache) as monitor:
            out[residual] = {r["bn"]: r for r in monitor.measure(0, variables)}
    return out


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("bn", ["eval", "batch"])
def test_record_is_end_to_end_norms(setup, measured, bn, residual):
    model, variables, x, labels, cache = setup
    model = model.clone(residual=residual)
    record = measured[residual][bn]
    e2e = end_to_end_norms(model, variables, x, labels, bn=bn, cache=cache)
    assert record["units"] == list(model.unit_names()) == list(e2e["units"])
    assert (record["step"], record["bn"], record["probe_size"]) == (0, bn, BATCH)
    assert record["loss"] == pytest.approx(e2e["loss"], rel=1e-6)
    for unit, entry in e2e["units"].items():
        # ||dL/dh|| over the whole batch = sqrt of the sum of the per-example squares
        assert record["dL_dh"][unit] == pytest.approx(np.linalg.norm(entry["input"]["loss_grad"]), rel=1e-6)
        jac = entry["input"]["logit_jac_summed_rows"]
        assert record["dlogits_dh"][unit] == pytest.approx(
            {"median": np.median(jac), "q10": np.quantile(jac, 0.1), "q90": np.quantile(jac, 0.9)}, rel=1e-6)
        for path, grad in entry["param_grad"].items():
            kernel = variables["params"][unit]
            for key in path.split("/"):
                kernel = kernel[key]
            assert record["dL_dW"][f"{unit}/{path}"] == pytest.approx(grad, rel=1e-6)
            assert record["dL_dW_rel"][f"{unit}/{path}"] == pytest.approx(grad / np.linalg.norm(kernel), rel=1e-6)
    assert "unit_jacobian" not in record


@pytest.mark.parametrize("bn", ["eval", "batch"])
def test_response_std_is_forward_statistics_in_forward_order(setup, measured, bn):
    model, variables, x, _, _ = setup
    stats = forward_statistics(model, variables, x, bn)
    expected = {f"{unit}/{probe}": std for unit, probes in stats.items() for probe, std in probes.items()
                if probe != "out"}
    record = measured[True][bn]["response_std"]
    assert list(record) == list(expected)  # stem/layer1, unit_1/layer1, unit_1/layer2, ...
    assert record == pytest.approx(expected, rel=1e-5)  # one whole-model pass vs the unit chain


def test_batch_policy_gives_the_training_gradients(setup, measured):
    """bn="batch" measures what training sees: ||dL/dx|| and ||dL/dW|| of jax.grad of the mean
    cross-entropy with train-mode BatchNorm (as in jaxres.train.step.train_step)."""
    model, variables, x, labels, _ = setup

    def loss(params, images):
        logits, _ = model.apply({**variables, "params": params}, images, True, mutable=["batch_stats"])
        return cross_entropy(logits, labels).mean()

    grad_w, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], jnp.asarray(x))
    record = measured[True]["batch"]
    assert record["dL_dh"]["stem"] == pytest.approx(float(jnp.linalg.norm(grad_x)), rel=1e-5)
    assert record["dL_dW"]["unit_2/conv1/kernel"] == pytest.approx(
        float(jnp.linalg.norm(grad_w["unit_2"]["conv1"]["kernel"])), rel=1e-5)


def test_plain_twin_is_measured_as_plain(measured):
    # same variables, different computation: the shared cache must not mix the twins up
    assert measured[True]["batch"]["dL_dh"]["stem"] != measured[False]["batch"]["dL_dh"]["stem"]


def compilations():
    """A list that collects the names of XLA backend compilations while registered."""
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(kwargs.get("fun_name"))

    return names, listener


def test_later_measurements_compile_nothing(setup, measured, tmp_path):
    model, variables, x, labels, cache = setup  # `measured` compiled this model's unit code
    monitor = TrainingMonitor(model, x, labels, workdir=tmp_path, bn=("eval", "batch"), cache=cache)
    monitor.measure(0, variables)  # compiles whatever the shared cache lacks
    others = [scaled(variables, f) for f in (0.9, 1.1)]
    names, listener = compilations()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for step, v in zip((100, 200), others):
            monitor.measure(step, v)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        monitor.close()
    assert names == []


def test_resumed_run_ends_with_the_uninterrupted_records(setup, measured, tmp_path):
    model, variables, x, labels, cache = setup
    states = {0: variables, 10: scaled(variables, 0.9), 20: scaled(variables, 1.1)}
    with TrainingMonitor(model, x, labels, workdir=tmp_path, cache=cache) as monitor:
        first = {step: monitor.measure(step, v)[0] for step, v in states.items()}
    # killed after step 20 was measured, resumed from the checkpoint of step 10
    restored = jnp.asarray(10, jnp.int32)  # as a restored state.step
    with TrainingMonitor(model, x, labels, workdir=tmp_path, resume_step=restored, cache=cache) as monitor:
        assert monitor.recorded_steps() == {0, 10}
        monitor.measure(20, states[20])
    records = read_analysis(tmp_path)
    assert [(r["step"], r["bn"]) for r in records] == [(0, "batch"), (10, "batch"), (20, "batch")]
    for record in records:
        expected = {k: v for k, v in first[record["step"]].items() if k != "time_s"}
        assert {k: v for k, v in record.items() if k != "time_s"} == expected


def write_lines(path, lines):
    path.write_text("".join(lines))


def test_opening_drops_torn_lines_and_duplicates(setup, tmp_path):
    model, _, x, labels, _ = setup
    lines = [json.dumps({"step": s, "bn": "batch", "loss": s}) + "\n" for s in (0, 5, 5)]
    write_lines(tmp_path / "analysis.jsonl", lines + ['{"step": 9, "bn": "ba'])  # killed mid-line
    TrainingMonitor(model, x, labels, workdir=tmp_path, tensorboard=False).close()
    assert [(r["step"], r["loss"]) for r in read_analysis(tmp_path)] == [(0, 0), (5, 5)]
    assert (tmp_path / "analysis.jsonl").read_text().endswith("\n")


def test_a_step_is_recorded_only_when_every_policy_is(setup, tmp_path):
    model, _, x, labels, _ = setup
    write_lines(tmp_path / "analysis.jsonl", [json.dumps({"step": 0, "bn": b}) + "\n" for b in ("eval", "batch")]
                + [json.dumps({"step": 5, "bn": "eval"}) + "\n"])  # killed between the policies of step 5
    with TrainingMonitor(model, x, labels, workdir=tmp_path, bn="eval,batch", tensorboard=False) as monitor:
        assert monitor.recorded_steps() == {0}


def test_non_finite_numbers_are_written_as_strings():
    record = json_safe({"loss": np.float32("nan"), "dL_dh": {"stem": float("inf"), "head": -np.inf},
                        "ok": np.float64(0.5), "exact": np.bool_(True)})
    assert record == {"loss": "nan", "dL_dh": {"stem": "inf", "head": "-inf"}, "ok": 0.5, "exact": True}
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert float(record["loss"]) != float(record["loss"])  # float() reads both forms back


def test_a_diverged_model_is_recorded_with_nan_strings(setup, measured, tmp_path):
    model, variables, x, labels, cache = setup
    diverged = jax.tree.map(np.array, variables)
    diverged["params"]["head"]["fc"]["kernel"][0, 0] = np.nan
    with TrainingMonitor(model, x, labels, workdir=tmp_path, cache=cache) as monitor:
        monitor.measure(0, diverged)
    record = read_analysis(tmp_path)[0]
    assert record["loss"] == record["dL_dh"]["stem"] == record["dlogits_dh"]["stem"]["median"] == "nan"


def tensorboard_tags(logdir) -> set[str]:
    """Summary tags in the TFRecord event files under `logdir` (no tensorboard needed)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in logdir.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            offset += 12 + length + 4  # length, its crc, the record, its crc
    return tags


def test_tensorboard_gets_per_unit_scalars_and_the_unit_by_step_image(setup, measured, tmp_path):
    model, variables, x, labels, cache = setup
    with TrainingMonitor(model, x, labels, workdir=tmp_path, cache=cache) as monitor:
        for step in (0, 10):
            monitor.measure(step, variables)
    tags = tensorboard_tags(Workdir(tmp_path).tensorboard_dir)  # the run's one TensorBoard directory
    assert {"analysis_batch/loss", "analysis_batch/dL_dh/stem", "analysis_batch/dL_dh/unit_3",
            "analysis_batch/log10_dL_dh_unit_by_step"} <= tags


def test_unit_jacobians_are_the_exact_unit_norms(setup, measured, tmp_path):
    """On 8x8 inputs unit_3 (4x4x8 -> 2x2x16) is small enough for exact norms: compare with
    the materialized jax.jacrev Jacobian of the unit (example 0 / the whole batch map).
    unit_jacobians=2 samples two of the inner units unit_1 (shape-keeping), unit_2 and unit_3
    (transitions), centred: the first and the last (`stages.sample_units`, within="net")."""
    model, variables, x, labels, cache = setup
    with TrainingMonitor(model, x, labels, workdir=tmp_path, bn=("eval", "batch"), unit_jacobians=2,
                         tensorboard=False, cache=cache) as monitor:
        records = {r["bn"]: r for r in monitor.measure(0, variables)}
    for bn, train in (("eval", False), ("batch", True)):
        # the input of unit_3 under this policy (batch 4)
        h = model.apply(variables, jnp.asarray(x), train, stop="unit_2", mutable=["batch_stats"] if train else False)
        h = h[0] if train else h
        assert list(records[bn]["unit_jacobian"]) == ["unit_1", "unit_3"]
        # unit_1 (8x8x4): 256 JVPs per example (exact), 1024 for the batch map (Hutchinson)
        assert records[bn]["unit_jacobian"]["unit_1"]["exact"] is (bn == "eval")
        entry = records[bn]["unit_jacobian"]["unit_3"]
        assert entry["exact"] is True

        def unit(h, train=train):
            if train:
                return model.apply(variables, h, True, start="unit_3", stop="unit_3", mutable=["batch_stats"])[0]
            return model.apply(variables, h, False, start="unit_3", stop="unit_3")

        jac = jax.jit(jax.jacrev(unit))(h[:1] if bn == "eval" else h)
        matrix = np.asarray(jac).reshape(int(np.prod(jac.shape[:jac.ndim // 2])), -1)
        assert entry["frobenius_sq"] == pytest.approx(float(np.sum(matrix.astype(np.float64) ** 2)), rel=1e-4)
        assert entry["sigma_max"] == pytest.approx(np.linalg.svd(matrix, compute_uv=False)[0], rel=2e-2)


class NotAUnitModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


def bad_arguments(case, model, x, labels, tmp_path) -> dict:
    args = {"model": model, "images": x, "labels": labels, "workdir": tmp_path, "bn": "batch"}
    if case == "under_a_file":  # tests run as root: chmod would not stop a write
        (tmp_path / "a_file").write_text("")
        return {**args, "workdir": tmp_path / "a_file" / "run"}
    if case == "records_path_is_a_directory":
        (tmp_path / "analysis.jsonl").mkdir()
        return args
    return {**args, **{
        "no_units": {"model": NotAUnitModel()},
        "one_example": {"images": x[:1], "labels": labels[:1]},
        "nchw": {"images": x.transpose(0, 3, 1, 2)},
        "few_labels": {"labels": labels[:2]},
        "nonsense_bn": {"bn": "nonsense"},
        "no_bn": {"bn": ()},
        "negative_jacobians": {"unit_jacobians": -1},
        "fractional_resume_step": {"resume_step": 2.5},
    }[case]}


@pytest.mark.parametrize("case, error, match", [
    ("no_units", ValueError, "unit interface"),
    ("one_example", ValueError, "at least 2 examples"),
    ("nchw", ValueError, "NCHW"),
    ("few_labels", ValueError, "labels must be 4 integers"),
    ("nonsense_bn", ValueError, r"unknown BatchNorm policy \(bn\) 'nonsense' \(valid: batch, eval\)"),
    ("no_bn", ValueError, "at least one BatchNorm policy"),
    ("negative_jacobians", ValueError, "unit_jacobians must be an integer >= 0"),
    ("fractional_resume_step", ValueError, "resume_step .* must be an integer >= 0, got 2.5"),
    ("under_a_file", OSError, r"cannot write to workdir .*a_file/run' \(Not a directory\)"),
    ("records_path_is_a_directory", OSError, r"cannot rewrite or append to .*analysis.jsonl"),
])
def test_bad_arguments_are_refused_before_training(setup, tmp_path, case, error, match):
    model, _, x, labels, _ = setup
    args = bad_arguments(case, model, x, labels, tmp_path)
    with pytest.raises(error, match=match):
        TrainingMonitor(args.pop("model"), args.pop("images"), args.pop("labels"), tensorboard=False, **args)


def test_stacked_scan_units_variables_are_refused_with_the_fix(setup, tmp_path):
    model, _, x, labels, _ = setup
    with TrainingMonitor(model, x, labels, workdir=tmp_path, tensorboard=False) as monitor:
        with pytest.raises(ValueError, match="unstack_identical_units"):
            monitor.measure(0, {"params": {"unit_1..unit_3": {}}})


class RecordSource:
    """Example i: a 28x28x1 image filled with i and label i % 10."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return {"image": np.full((28, 28, 1), i, np.uint8), "label": i % 10}


def test_probe_batch_is_fixed_by_the_seed_and_not_augmented():
    transform = eval_transform("mnist", 32, (0.0,), (1.0,))
    first = probe_batch(RecordSource(), transform=transform, size=8, seed=0)
    again = probe_batch(RecordSource(), transform=transform, size=8, seed=0)
    other = probe_batch(RecordSource(), transform=transform, size=8, seed=1)
    assert first["image"].shape == (8, 32, 32, 1) and first["image"].dtype == np.float32
    np.testing.assert_array_equal(first["image"], again["image"])
    assert not np.array_equal(first["image"], other["image"])
    indices = np.rint(first["image"][:, 16, 16, 0] * 255).astype(int)  # the centre keeps its value
    assert list(indices) == list(np.random.default_rng(0).permutation(50)[:8])
    assert list(first["label"]) == list(indices % 10)


def test_probe_batch_larger_than_the_split_is_refused():
    with pytest.raises(ValueError, match="at least 64; this one has 50"):
        probe_batch(RecordSource(), transform=eval_transform("mnist", 32, (0.0,), (1.0,)), size=64, seed=0)
