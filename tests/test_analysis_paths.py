"""The gradient split by path length (jaxres.analysis.paths, Veit et al. 2016 Sec. 5) against
the path expansion done by hand: every one of the 2^6 paths of a 6-unit residual net backpropagated
through the shortcut (written out here: identity, or option A's subsample + zero-pad) or the
branch (the unit's last layer probe, read with `model.apply`) of each unit, at the masks of the
forward pass."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.analysis import paths
from jaxres.analysis.lesion import unit_inputs
from jaxres.analysis.loss import cross_entropies
from jaxres.analysis.segments import SegmentCache
from jaxres.models import ResNet

RESIDUAL = ("unit_1", "unit_2", "unit_3", "unit_4", "unit_5", "unit_6")


def tiny_net(**fields):
    """3 stages of 2 basic blocks (6 residual units, unit_3 and unit_5 stride-2 transitions),
    widths 2/3/4, 8x8 inputs, running statistics that are not the identity."""
    model = ResNet(stem="cifar", num_classes=5, **{"stage_sizes": (2, 2, 2), "widths": (2, 3, 4), "shortcut": "A",
                                                   **fields})
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    variables = {**variables, "batch_stats": jax.tree.map(
        lambda s: s + 0.3 * jax.random.uniform(jax.random.key(2), s.shape), variables["batch_stats"])}
    return model, variables, x, jnp.array([0, 3, 4])


@pytest.fixture(scope="module")
def net():
    model, variables, x, labels = tiny_net()
    cache = SegmentCache()
    segments = cache.segments(model, variables, x.shape, "eval")
    hs = unit_inputs(segments, x)
    cotangent = paths.logit_cotangent(hs[-1], labels)
    return model, variables, x, labels, segments, hs, cotangent, cache


def shortcut_by_hand(h, out_channels: int):
    """Option A (He et al. 2015): identity, or subsample by 2 and zero-pad the channels."""
    if out_channels == h.shape[-1]:
        return h
    h = h[:, ::2, ::2, :]
    extra = out_channels - h.shape[-1]
    return jnp.pad(h, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


def branch_by_hand(model, variables, name):
    """h -> the unit's last layer probe (its branch's output before the addition)."""
    def branch(h):
        _, state = model.apply(variables, h, False, start=name, stop=name, probes=True, mutable=["intermediates"])
        return state["intermediates"][name]["layer2"][0]
    return branch


def paths_by_hand(net):
    """{subset of units whose branch the path takes: gradient at unit_1's input} for all 2^6
    paths, each a chain of VJPs from the head down (paths sharing their upper part share it)."""
    model, variables, _, _, segments, hs, cotangent, _ = net
    index = {s.name: i for i, s in enumerate(segments)}
    _, head_vjp = jax.vjp(lambda h: model.apply(variables, h, False, start="head", stop="head"), hs[index["head"]])
    partial_paths = {frozenset(): head_vjp(cotangent)[0]}
    for name in reversed(RESIDUAL):
        h, out = hs[index[name]], hs[index[name] + 1]
        shortcut = jax.jit(lambda c, _h=h, _o=out: jax.vjp(lambda v: shortcut_by_hand(v, _o.shape[-1]), _h)[1](c)[0])
        branch = jax.jit(lambda c, _h=h, _f=branch_by_hand(model, variables, name): jax.vjp(_f, _h)[1](c)[0])
        mask = out > 0  # the ReLU after the addition, its mask from the forward pass
        grown = {}
        for taken, c in partial_paths.items():
            grown[taken] = shortcut(c * mask)
            grown[taken | {name}] = branch(c * mask)
        partial_paths = grown
    return {taken: np.asarray(c) for taken, c in partial_paths.items()}


@pytest.fixture(scope="module")
def by_hand(net):
    return paths_by_hand(net)


def test_the_residual_units_are_recognized_from_the_outside(net):
    *_, segments, hs, _, _ = net
    residual, others = paths.residual_units(segments, hs)
    assert tuple(residual) == RESIDUAL  # transitions included: their shortcut is option A's pad
    assert set(others) == {"stem", "head"}


def test_each_part_is_the_sum_of_the_paths_through_that_many_branches(net, by_hand):
    *_, segments, hs, cotangent, _ = net
    g = np.asarray(paths.path_gradients(segments, hs, cotangent, list(RESIDUAL)))
    assert g.shape == (7,) + hs[1].shape
    scale = np.abs(g).max()
    for k in range(7):
        expected = sum(v for subset, v in by_hand.items() if len(subset) == k)
        np.testing.assert_allclose(g[k], expected, rtol=1e-5, atol=1e-6 * scale)


def test_the_parts_add_up_to_the_ordinary_gradient(net):
    model, variables, _, labels, segments, hs, cotangent, _ = net
    g = paths.path_gradients(segments, hs, cotangent, list(RESIDUAL))

    def loss(h):
        logits = model.apply(variables, h, False, start="unit_1")
        return jnp.sum(cross_entropies(logits, labels))

    np.testing.assert_allclose(np.asarray(g.sum(0)), np.asarray(jax.jit(jax.grad(loss))(hs[1])), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("subset", [(), ("unit_2",), ("unit_3", "unit_6"), RESIDUAL])
def test_a_single_path_is_backpropagated_through_its_branches_only(net, by_hand, subset):
    *_, segments, hs, cotangent, _ = net
    row = np.array([[name in subset for name in RESIDUAL]])
    g = paths.single_path_gradients(segments, hs, cotangent, list(RESIDUAL), row)
    np.testing.assert_allclose(np.asarray(g[0]), by_hand[frozenset(subset)], rtol=1e-5, atol=1e-8)


def test_pre_activation_units_with_projection_shortcuts_split_exactly():
    model, variables, x, labels = tiny_net(preact=True, shortcut="B", stage_sizes=(1, 1), widths=(2, 3))
    segments = SegmentCache().segments(model, variables, x.shape, "eval")
    hs = unit_inputs(segments, x)
    residual, _ = paths.residual_units(segments, hs)
    assert tuple(residual) == ("unit_1", "unit_2")  # unit_2: a stride-2 transition with a 1x1 projection
    g = paths.path_gradients(segments, hs, paths.logit_cotangent(hs[-1], labels), residual)
    loss = lambda h: jnp.sum(cross_entropies(model.apply(variables, h, False, start="unit_1"), labels))  # noqa
    np.testing.assert_allclose(np.asarray(g.sum(0)), np.asarray(jax.jit(jax.grad(loss))(hs[1])), rtol=1e-5,
                               atol=1e-7)


def test_study_measures_exact_parts_and_veits_samples_at_two_points(net):
    model, variables, x, labels, *_, cache = net
    x6 = jnp.concatenate([x, -x])
    result = paths.path_study(model, variables, x6, jnp.concatenate([labels, labels]), draws=2, batch_size=3,
                              cache=cache)
    n = result["num_residual_units"]
    assert n == 6 and result["paths"] == [1, 6, 15, 20, 15, 6, 1]
    assert result["path_share"][3] == pytest.approx(20 / 64)
    assert result["draws_per_k"] == 12  # 2 paths of each length on each of the 6 images
    assert result["check"]["max_relative_difference_stack"] < 1e-5
    assert result["check"]["max_relative_difference_input"] < 1e-5
    exact, sampled = result["exact"]["norm_stack"]["estimate"], result["sampled"]["per_path"]["estimate"]
    # one path has no branch and one has all of them: Veit's sample of them is the exact part
    for k in (0, n):
        assert sampled[k] == pytest.approx(exact[k], rel=1e-5)
    assert result["exact"]["truncation"]["estimate"][n] == pytest.approx(0, abs=1e-5)
    assert result["exact"]["cumulative_share"][-1] == pytest.approx(1)
    for key in ("ci_low", "estimate", "ci_high"):
        assert np.all(np.asarray(result["sampled"]["total"][key])
                      == pytest.approx(np.asarray(result["sampled"]["per_path"][key]) * result["paths"]))


def test_a_plain_net_has_no_paths_to_count():
    model, variables, x, labels = tiny_net(residual=False, stage_sizes=(1,), widths=(2,))
    with pytest.raises(ValueError, match="cifar_plain_tiny has no residual unit.*unit_1: no shortcut"):
        paths.path_study(model, variables, x, labels, draws=1, model_name="cifar_plain_tiny")


@pytest.mark.parametrize("kwargs, match", [({"draws": 0}, "draws must be a positive integer, got 0"),
                                           ({"batch_size": 2}, r"number of images \(3\) must be a multiple"),
                                           ({"bn": "running"}, "BatchNorm policy")])
def test_bad_arguments_are_refused_before_any_gradient(net, kwargs, match):
    model, variables, x, labels, *_ = net
    with pytest.raises(ValueError, match=match):
        paths.path_study(model, variables, x, labels, **kwargs)


def write_tiny_weights(path, **overrides) -> str:
    """A weights file of a tiny ResNet (3 residual units) on the synthetic dataset, with its config."""
    from test_inspect_cli import OVERRIDES, tiny_config

    from jaxres.data import dataset_spec
    from jaxres.train import config as config_lib
    from jaxres.train.run import build_model
    from jaxres.weights.io import save_weights

    config = tiny_config(model_overrides={**OVERRIDES, **overrides})
    model = build_model(config_lib.from_json(config), dataset_spec("synthetic"))
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), False))(jax.random.key(3))
    save_weights(path, variables, "ResNet", num_classes=10, config=config)
    return str(path)


def test_inspect_paths_writes_the_parts_and_the_estimate(tmp_path, capsys):
    from jaxres.cli import main

    weights = write_tiny_weights(tmp_path / "tiny.safetensors")
    assert main(["inspect", "paths", "--checkpoint", weights, "--images", "4", "--batch-size", "2", "--draws", "2",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "paths.json").read_text())
    assert result["residual_units"] == ["unit_1", "unit_2", "unit_3"] and result["k"] == [0, 1, 2, 3]
    assert result["draws_per_k"] == 8 and len(result["exact"]["norm_input"]["estimate"]) == 4
    assert result["check"]["max_relative_difference_stack"] < 1e-5
    assert result["wall_time_s"] > 0 and len(result["load_average"]) == 3
    assert "Veit per path" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--images", "6", "--batch-size", "4"], "--images (6) must be a multiple of --batch-size (4)"),
    (["--draws", "0"], "--draws must be a positive integer, got 0"),
    (["--plain"], "ResNet has no residual unit (stem, unit_1, unit_2, unit_3: no shortcut"),
])
def test_inspect_paths_refuses_bad_arguments_and_plain_nets(tmp_path, capsys, argv, message):
    from jaxres.cli import main

    plain = argv == ["--plain"]
    weights = write_tiny_weights(tmp_path / "tiny.safetensors", **({"residual": False} if plain else {}))
    argv = ["--images", "2"] if plain else argv
    assert main(["inspect", "paths", "--checkpoint", weights, "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "paths.json").exists()
