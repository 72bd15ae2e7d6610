"""The unit interface: named boundaries, ranges, and exact composition."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import jaxres
from jaxres.models import ResNet, VGG
from tests.conftest import init, tiny_cifar_resnet

# One small instance per block type and family; each is compiled once per module.
MODELS = {
    "basic_A": tiny_cifar_resnet(),
    "basic_B_v1": tiny_cifar_resnet(shortcut="B"),
    "bottleneck_imagenet": ResNet(stage_sizes=(1, 1), block="bottleneck", widths=(4, 8), stride_in_1x1=True),
    "preact_basic": tiny_cifar_resnet(preact=True, shortcut="B"),
    "preact_bottleneck": tiny_cifar_resnet(preact=True, block="bottleneck", shortcut="B"),
    "vgg_bn": VGG(layers=(8, "M", 16, 16, "M"), norm="batchnorm", pool_size=2, classifier_widths=(32,), num_classes=5),
}
SIZES = {"bottleneck_imagenet": 64}


@functools.cache
def setup(kind):
    model = MODELS[kind]
    size = SIZES.get(kind, 16)
    x = jax.random.normal(jax.random.key(1), (3, size, size, 3))
    variables = init(model, x)
    return model, variables, x


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_composing_every_unit_reproduces_the_forward_pass(kind):
    model, variables, x = setup(kind)
    # eager on both sides: the same ops in the same order must give the same bits
    full, outputs = model.apply(variables, x, capture=True)
    names = model.unit_names()
    assert [k for k in outputs if k in names] == list(names)
    h = x
    for name in names:
        h = model.apply(variables, h, start=name, stop=name)
        np.testing.assert_array_equal(h, outputs[name])
    np.testing.assert_array_equal(h, full)


@pytest.mark.parametrize("kind", ["basic_A", "vgg_bn"])
def test_a_range_of_units_equals_the_same_units_one_by_one(kind):
    model, variables, x = setup(kind)
    _, outputs = model.apply(variables, x, capture=True)
    names = model.unit_names()
    ranged = model.apply(variables, outputs[names[0]], start=names[1], stop=names[-2])
    np.testing.assert_array_equal(ranged, outputs[names[-2]])


def test_unit_names_of_the_registry_families():
    assert jaxres.create_model("cifar_resnet20").unit_names() == ("stem", *[f"unit_{k}" for k in range(1, 10)], "head")
    assert len(jaxres.create_model("resnet50").unit_names()) == 16 + 2
    # VGG-16: 13 conv layers = stem + 12 units
    assert len(jaxres.create_model("vgg16").unit_names()) == 13 + 1


def test_unit_outputs_shapes_cifar_resnet():
    model, variables, x = setup("basic_A")
    logits, outputs = jaxres.unit_outputs(model, variables, x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert [outputs[n].shape[1:] for n in model.unit_names()[:-1]] == [(16, 16, 4), (16, 16, 4), (8, 8, 8), (4, 4, 16)]


def test_vgg_pool_is_attached_to_the_end_of_its_unit():
    model, variables, x = setup("vgg_bn")
    _, outputs = model.apply(variables, x, capture=True)
    # layers (8, M, 16, 16, M): stem ends with a pool; unit_1 does not; unit_2 does.
    assert [outputs[n].shape[1:3] for n in ("stem", "unit_1", "unit_2")] == [(8, 8), (8, 8), (4, 4)]


def test_probes_cover_every_weight_layer():
    model, variables, x = setup("bottleneck_imagenet")
    _, state = model.apply(variables, x, probes=True, mutable=["intermediates"])
    probes = state["intermediates"]
    assert sorted(probes["unit_1"]) == ["layer1", "layer2", "layer3"]
    assert "out_unit_2" in probes and "out_head" not in probes
    assert sorted(variables) == ["batch_stats", "params"]  # no probe collections


def test_probes_are_off_unless_asked_for():
    model, variables, x = setup("bottleneck_imagenet")
    # mutable=True makes every collection mutable; without probes=True nothing is sown
    _, state = model.apply(variables, x, True, mutable=True)
    assert sorted(state) == ["batch_stats", "params"]
    _, state = model.apply(variables, x, mutable=["intermediates", "perturbations"])
    assert state == {}


def test_probe_collections_use_distinct_names():
    model, variables, x = setup("basic_A")
    _, state = model.apply(variables, x, probes=True, mutable=["intermediates", "perturbations"])
    assert "out_unit_2" in state["intermediates"] and "d_out_unit_2" in state["perturbations"]
    assert sorted(state["perturbations"]["unit_1"]) == ["d_layer1", "d_layer2"]
    # NNX's bridge keeps a module's variables of every collection in one namespace
    inter, pert = (set(flatten_dict(state[c])) for c in ("intermediates", "perturbations"))
    assert len(inter) == len(pert) == 1 + 3 * 2 + 4 and not inter & pert  # stem, 3 blocks, 4 outputs


def test_perturbations_give_gradients_at_unit_boundaries():
    model, variables, x = setup("basic_A")
    _, state = model.apply(variables, x, probes=True, mutable=["perturbations"])
    perturbations = state["perturbations"]

    def total(p):
        return model.apply({**variables, "perturbations": p}, x, probes=True).sum()

    grads = jax.grad(total)(perturbations)
    # the same gradient by the unit interface: d(sum logits)/d(output of unit_2)
    _, outputs = model.apply(variables, x, capture=True)
    direct = jax.grad(lambda h: model.apply(variables, h, start="unit_3").sum())(outputs["unit_2"])
    np.testing.assert_allclose(grads["d_out_unit_2"], direct, rtol=1e-5, atol=1e-7)


def test_apply_units_helper_and_bad_ranges():
    model, variables, x = setup("basic_A")
    _, outputs = model.apply(variables, x, capture=True)
    np.testing.assert_array_equal(jaxres.apply_units(model, variables, outputs["stem"], "unit_1", "unit_1"), outputs["unit_1"])
    with pytest.raises(ValueError, match="unknown unit 'unit_9'.*stem, unit_1"):
        model.apply(variables, x, start="unit_9")
    with pytest.raises(ValueError, match="comes after"):
        model.apply(variables, outputs["unit_1"], start="unit_2", stop="unit_1")
