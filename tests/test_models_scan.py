"""scan_units: identical consecutive blocks run by one lax.scan give the unrolled model's
numbers (same variables, same layout) and a program whose size does not grow with depth."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxres.analysis.restore import check_variables
from jaxres.models import ResNet, VGG, stack_identical_units, unstack_identical_units
from jaxres.models.scan_layout import identical_runs
from jaxres.train.state import create_train_state
from jaxres.train.step import train_step

X = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))


def tiny(n=3, **kw):
    return ResNet(stage_sizes=(n, n), widths=(4, 8), stem="cifar", shortcut="A", num_classes=5, **kw)


@pytest.fixture(scope="module")
def model_and_vars():
    m = tiny()
    return m, m.init(jax.random.key(1), X)


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda p, q: float(jnp.max(jnp.abs(p - q))), a, b)))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_equals_unrolled(model_and_vars, remat):
    m, v = model_and_vars
    s = dataclasses.replace(m, scan_units=True, remat_units=remat)
    np.testing.assert_allclose(s.apply(v, X), m.apply(v, X), rtol=0, atol=1e-6)
    (ya, sa), (yb, sb) = (mod.apply(v, X, True, mutable=["batch_stats"]) for mod in (m, s))
    np.testing.assert_allclose(yb, ya, rtol=0, atol=1e-6)
    assert jax.tree.structure(sa) == jax.tree.structure(sb) and _max_diff(sa, sb) < 1e-6

    def loss(mod):
        return lambda p: jnp.sum(mod.apply({**v, "params": p}, X, True, mutable=["batch_stats"])[0] ** 2)

    ga, gb = jax.grad(loss(m))(v["params"]), jax.grad(loss(s))(v["params"])
    assert _max_diff(ga, gb) < 1e-5 * max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ga))


def test_runs_group_identical_blocks_only():
    specs = tiny().unit_specs(False)  # stem, 3 blocks of 4, 3 blocks of 8 (first: pad shortcut), head
    assert [[s.name for s in g] for g in identical_runs(specs)] == [
        ["stem"], ["unit_1", "unit_2", "unit_3"], ["unit_4"], ["unit_5", "unit_6"], ["head"]]


def test_runs_compare_fields_not_partial_identity():
    def copied(value):  # an equal partial that is a different object
        if isinstance(value, functools.partial):
            return functools.partial(value.func, *value.args, **{k: copied(v) for k, v in value.keywords.items()})
        return value

    specs = tiny().unit_specs(False)
    per_block = [dataclasses.replace(s, build=copied(s.build)) for s in specs]
    assert [len(g) for g in identical_runs(per_block)] == [1, 3, 1, 2, 1]


def test_vgg_scans_its_identical_conv_layers():
    m = VGG(layers=(4, 8, 8, 8, 8, "M"), norm="batchnorm", pool_size=1, classifier_widths=(), num_classes=3)
    assert [[s.name for s in g] for g in identical_runs(m.unit_specs(False))] == [
        ["stem"], ["unit_1"], ["unit_2", "unit_3"], ["unit_4"], ["head"]]
    v = m.init(jax.random.key(2), X)
    s = m.clone(scan_units=True)
    np.testing.assert_allclose(s.apply(v, X), m.apply(v, X), rtol=0, atol=1e-6)
    (ya, sa), (yb, sb) = (mod.apply(v, X, True, mutable=["batch_stats"]) for mod in (m, s))
    np.testing.assert_allclose(yb, ya, rtol=0, atol=1e-6)
    assert _max_diff(sa, sb) < 1e-6


def test_probes_and_unit_ranges_still_see_every_unit(model_and_vars):
    m, v = model_and_vars
    s = dataclasses.replace(m, scan_units=True)
    (_, oa), (_, ob) = m.apply(v, X, capture=True), s.apply(v, X, capture=True)
    assert list(oa) == list(ob) and _max_diff(oa, ob) == 0.0
    h = oa["unit_1"]
    np.testing.assert_allclose(s.apply(v, h, start="unit_2", stop="unit_6"), m.apply(v, h, start="unit_2", stop="unit_6"),
                               rtol=0, atol=1e-6)
    _, inter = s.apply(v, X, probes=True, mutable=["intermediates"])
    assert "out_unit_5" in inter["intermediates"]


def test_convolutions_traced_do_not_grow_with_depth():
    def convs(n, scan):
        m = tiny(n, scan_units=scan)
        v = jax.eval_shape(m.init, jax.random.key(0), X)

        def train(v, x):
            return jnp.sum(m.apply(v, x, True, mutable=["batch_stats"])[0])

        # XLA's convolution, or oneDNN's primitives where the jaxres[onednn] extra routes them
        jaxpr = str(jax.make_jaxpr(jax.grad(train))(v, X))
        return len(re.findall(r"\b(?:conv_general_dilated|onednn_conv_\w+)\[", jaxpr))

    assert convs(3, True) == convs(12, True)  # one traced body per run of identical blocks
    assert convs(12, False) > convs(3, False)


def test_one_compile_per_shape(model_and_vars):
    m, v = model_and_vars
    s = dataclasses.replace(m, scan_units=True)
    step = jax.jit(lambda v, x: s.apply(v, x, True, mutable=["batch_stats"]))
    for _ in range(3):
        _, stats = step(v, X)
        v = {**v, **stats}
    assert step._cache_size() == 1


def test_stacked_layout_round_trips(model_and_vars):
    m, v = model_and_vars
    stacked = stack_identical_units(m, v)
    assert sorted(stacked["params"]) == ["head", "stem", "unit_1..unit_3", "unit_4", "unit_5..unit_6"]
    assert stacked["batch_stats"]["unit_1..unit_3"]["norm1"]["mean"].shape == (3, 4)
    assert jax.tree.structure(unstack_identical_units(m, stacked)) == jax.tree.structure(v)
    assert _max_diff(unstack_identical_units(m, stacked), v) == 0.0
    assert unstack_identical_units(m, v) == {k: dict(t) for k, t in v.items()}  # per-unit: unchanged


def test_stacked_layout_runs_full_model_and_unit_ranges(model_and_vars):
    m, v = model_and_vars
    s = dataclasses.replace(m, scan_units=True)
    stacked = stack_identical_units(m, v)
    np.testing.assert_allclose(s.apply(stacked, X), m.apply(v, X), rtol=0, atol=1e-6)
    _, outs = m.apply(v, X, capture=True)
    # A range that cuts into runs reads (and in training updates) slices of the stacked arrays.
    np.testing.assert_allclose(s.apply(stacked, outs["unit_1"], start="unit_2", stop="unit_5"),
                               m.apply(v, outs["unit_1"], start="unit_2", stop="unit_5"), rtol=0, atol=1e-6)
    _, sa = m.apply(v, outs["unit_1"], True, start="unit_2", stop="unit_5", mutable=["batch_stats"])
    _, sb = s.apply(stacked, outs["unit_1"], True, start="unit_2", stop="unit_5", mutable=["batch_stats"])
    assert _max_diff(unstack_identical_units(m, sb), sa) < 1e-6


def test_stacked_layout_refuses_unit_by_unit_passes_with_the_fix(model_and_vars):
    m, v = model_and_vars
    stacked = stack_identical_units(m, v)
    with pytest.raises(ValueError, match="unstack_identical_units"):
        dataclasses.replace(m, scan_units=True).apply(stacked, X, capture=True)
    with pytest.raises(ValueError, match="unstack_identical_units"):
        m.apply(stacked, X)
    with pytest.raises(ValueError, match="not runs of identical units of this model"):
        unstack_identical_units(tiny(4), stacked)


def test_training_state_of_a_scanned_model_is_stacked_and_steps_like_unrolled():
    batch = {"image": jnp.tile(X, (2, 1, 1, 1)), "label": jnp.arange(8) % 5}
    states = {}
    for scan in (False, True):
        state = create_train_state(tiny(scan_units=scan), optax.sgd(0.1, momentum=0.9), jax.random.PRNGKey(0), X.shape)
        for _ in range(2):
            state, metrics = jax.jit(train_step)(state, batch)
        states[scan] = (state, metrics)
    (a, ma), (b, mb) = states[False], states[True]
    assert "unit_1..unit_3" in b.params and "unit_1" not in b.params
    np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-5)
    m = tiny()
    got = unstack_identical_units(m, {"params": b.params, "batch_stats": b.batch_stats, "momentum": b.opt_state[0].trace})
    assert _max_diff(got["params"], a.params) < 1e-5
    assert _max_diff(got["batch_stats"], a.batch_stats) < 1e-5
    assert _max_diff(got["momentum"], a.opt_state[0].trace) < 1e-5


def test_analysis_reads_a_stacked_training_checkpoint_per_unit(model_and_vars):
    m, v = model_and_vars
    got = check_variables(m, stack_identical_units(m, v), X)
    assert _max_diff(got, v) == 0.0 and jax.tree.structure(got) == jax.tree.structure({k: dict(t) for k, t in v.items()})


def test_training_step_program_does_not_grow_with_depth():
    # What keeps cifar_resnet1202's step compiling in seconds: with the stacked layout the
    # optimizer, gradient norm and BatchNorm updates touch a fixed number of arrays.
    def top_level_ops(n, scan):
        state = jax.eval_shape(lambda: create_train_state(tiny(n, scan_units=scan), optax.sgd(0.1, momentum=0.9),
                                                          jax.random.PRNGKey(0), X.shape))
        batch = {"image": X, "label": jnp.zeros(4, jnp.int32)}
        return len(jax.make_jaxpr(train_step)(state, batch).jaxpr.eqns)

    assert top_level_ops(3, True) == top_level_ops(12, True)
    assert top_level_ops(12, False) > top_level_ops(3, False)


def widest_fusion(n: int) -> int:
    """The most operands any activation-shaped fusion (an array of the batch's 4 examples) of the
    compiled training step of tiny(n) reads (the optimizer's fusions grow with the parameters)."""
    state = create_train_state(tiny(n), optax.sgd(0.1, momentum=0.9), jax.random.PRNGKey(0), X.shape)
    batch = {"image": X, "label": jnp.zeros(4, jnp.int32)}
    hlo = jax.jit(train_step).lower(state, batch).compile().as_text()
    return max(line.split(" fusion(", 1)[1].split(")", 1)[0].count("%")
               for line in hlo.splitlines() if re.search(r"= f32\[4,\d+,\d+,\d+\]\S* fusion\(", line))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the unit outputs are materialized on XLA:CPU only")
def test_no_fusion_of_the_training_step_recomputes_earlier_units():
    # Each unit's output is computed once (models.conv.materialized_on_cpu). Without that, XLA:CPU
    # fused every earlier unit's BatchNorm, residual add and ReLU of a stage into each later unit's
    # output fusion, so the widest fusion grew with the units per stage (here 30 -> 45 operands
    # from 2 to 6 units; cifar_resnet56: 50): quadratic work in depth.
    assert widest_fusion(6) == widest_fusion(2)
