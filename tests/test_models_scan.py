"""scan_units: identical consecutive blocks run by one lax.scan give the unrolled model's
numbers (same variables, same layout) and a program whose size does not grow with depth."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.models import ResNet
from jaxres.models.units import identical_runs

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


def test_probes_and_unit_ranges_still_see_every_unit(model_and_vars):
    m, v = model_and_vars
    s = dataclasses.replace(m, scan_units=True)
    (ya, oa), (yb, ob) = m.apply(v, X, capture=True), s.apply(v, X, capture=True)
    assert list(oa) == list(ob) and _max_diff(oa, ob) == 0.0
    h = oa["unit_1"]
    np.testing.assert_allclose(s.apply(v, h, start="unit_2", stop="unit_6"), m.apply(v, h, start="unit_2", stop="unit_6"),
                               rtol=0, atol=1e-6)
    _, inter = s.apply(v, X, mutable=["intermediates"])
    assert "out_unit_5" in inter["intermediates"]


def test_convolutions_traced_do_not_grow_with_depth():
    def convs(n, scan):
        m = tiny(n, scan_units=scan)
        v = jax.eval_shape(m.init, jax.random.key(0), X)

        def train(v, x):
            return jnp.sum(m.apply(v, x, True, mutable=["batch_stats"])[0])

        return str(jax.make_jaxpr(jax.grad(train))(v, X)).count("conv_general_dilated[")

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
