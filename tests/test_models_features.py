"""Features and heads for zoo users (timm / big_vision conventions): `num_classes=0`,
`pre_logits` and VGG's fc6/fc7 in `capture`, `stage_outputs`, CIFAR defaults, `remat_units`."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxres
from jaxres.models import VGG, stage_outputs
from jaxres.models.complexity import abstract_variables
from tests.conftest import init, tiny_cifar_resnet

MODELS = {
    "resnet": tiny_cifar_resnet(),
    "preact_resnet": tiny_cifar_resnet(preact=True, shortcut="B"),  # its head has a BN before the pool
    "vgg": VGG(layers=(8, "M", 16, "M"), pool_size=2, classifier_widths=(32, 24), num_classes=5),
}
X = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))


@functools.cache
def setup(kind):
    model = MODELS[kind]
    return model, init(model, X)


def without(variables, *path):
    """`variables` minus params[path] (the classifier a num_classes=0 model does not have)."""
    params = dict(variables["params"])
    tree = params
    for key in path[:-1]:
        tree[key] = dict(tree[key])
        tree = tree[key]
    del tree[path[-1]]
    return {**variables, "params": params}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_features_through_the_classifier_give_the_logits(kind):
    model, variables = setup(kind)
    logits, outputs = model.apply(variables, X, capture=True)
    layer = model.classifier_path()
    features_model = model.clone(num_classes=0)
    features = features_model.apply(without(variables, *layer), X)
    np.testing.assert_array_equal(features, outputs["pre_logits"])
    fc = variables["params"][layer[0]][layer[1]]
    np.testing.assert_allclose(features @ fc["kernel"] + fc["bias"], logits, rtol=1e-5, atol=1e-6)
    # num_classes=0 builds no classifier at all
    abstract = jax.eval_shape(lambda: features_model.init(jax.random.key(0), X))
    assert layer[1] not in abstract["params"].get(layer[0], {})


def test_vgg_capture_returns_fc6_fc7_and_pre_logits():
    model, variables = setup("vgg")
    _, outputs = model.apply(variables, X, capture=True)
    assert outputs["fc6"].shape == (3, 32) and outputs["fc7"].shape == (3, 24)
    assert float(jnp.min(outputs["fc7"])) >= 0  # post-ReLU, as the classic "fc7 features"
    np.testing.assert_array_equal(outputs["pre_logits"], outputs["fc7"])  # eval: dropout is the identity
    # train mode: the last linear layer reads fc7 after dropout
    rngs = {"dropout": jax.random.key(2)}
    (logits, train_outputs), _ = model.apply(variables, X, True, capture=True, rngs=rngs, mutable=["batch_stats"])
    kept = np.asarray(train_outputs["pre_logits"] != 0)
    np.testing.assert_allclose(np.asarray(train_outputs["pre_logits"])[kept], 2 * np.asarray(train_outputs["fc7"])[kept],
                               rtol=1e-6)
    fc = variables["params"]["head"]["fc3"]
    np.testing.assert_allclose(train_outputs["pre_logits"] @ fc["kernel"] + fc["bias"], logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, size, width", [("resnet18", 64, 512), ("resnet50", 64, 2048),
                                                ("vgg16", 32, 4096), ("cifar_vgg11_bn", 32, 512)])
def test_create_model_with_0_classes_returns_the_pooled_features(name, size, width):
    model = jaxres.create_model(name, num_classes=0)
    variables = abstract_variables(model, size)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, width)


def test_stage_outputs_of_resnet50_have_timms_channels_and_strides():
    model = jaxres.create_model("resnet50")
    variables = abstract_variables(model, 64)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    shapes = jax.eval_shape(lambda v, x: stage_outputs(model, v, x, out_indices=(1, 2, 3, 4)), variables, x)
    assert [s.shape for s in shapes] == [(2, 16, 16, 256), (2, 8, 8, 512), (2, 4, 4, 1024), (2, 2, 2, 2048)]
    assert model.stage_names() == ("stem", "unit_3", "unit_7", "unit_13", "unit_16")


def test_stage_outputs_are_the_stage_ends_and_skip_the_rest():
    model, variables = setup("resnet")
    _, outputs = model.apply(variables, X, capture=True)
    assert model.stage_names() == ("stem", "unit_1", "unit_2", "unit_3")
    # the head never runs: variables without it are enough
    got = stage_outputs(model, without(variables, "head"), X, out_indices=(2, 0))
    np.testing.assert_array_equal(got[0], outputs["unit_2"])
    np.testing.assert_array_equal(got[1], outputs["stem"])
    every = stage_outputs(model, variables, X)
    assert [h.shape[1:] for h in every] == [(16, 16, 4), (16, 16, 4), (8, 8, 8), (4, 4, 16)]


def test_vgg_stages_end_at_its_max_pools():
    model, variables = setup("vgg")
    assert [h.shape[1:] for h in stage_outputs(model, variables, X)] == [(8, 8, 8), (4, 4, 16)]
    assert jaxres.create_model("vgg16").stage_names() == ("unit_1", "unit_3", "unit_6", "unit_9", "unit_12")


@pytest.mark.parametrize("bad", [5, -1, True, "unit_2"])
def test_stage_outputs_name_the_valid_indices(bad):
    model, variables = setup("resnet")
    with pytest.raises(ValueError, match=r"out_indices must be stage numbers 0\.\.3 \(this model's stages end at stem, unit_1"):
        stage_outputs(model, variables, X, out_indices=(1, bad))


def test_cifar_builders_default_to_10_classes():
    assert jaxres.models.cifar_resnet(8).num_classes == 10
    assert jaxres.models.cifar_resnet(11, block="bottleneck").num_classes == 10
    assert jaxres.models.cifar_vgg(11).num_classes == 10
    assert jaxres.models.cifar_resnet(8, num_classes=100).num_classes == 100


def test_remat_units_alone_rematerializes_with_the_same_numbers():
    model, variables = setup("resnet")
    remat = model.clone(remat_units=True)

    def loss(m):
        def f(params):
            logits, state = m.apply({**variables, "params": params}, X, True, mutable=["batch_stats"])
            return jnp.sum(logits**2), state

        return f

    (la, sa), ga = jax.value_and_grad(loss(model), has_aux=True)(variables["params"])
    (lb, sb), gb = jax.value_and_grad(loss(remat), has_aux=True)(variables["params"])
    np.testing.assert_allclose(lb, la, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), sa, sb)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6), ga, gb)
    assert jax.tree.structure(ga) == jax.tree.structure(gb)

    def convs(m, grad):
        f = (lambda p: loss(m)(p)[0]) if not grad else jax.grad(lambda p: loss(m)(p)[0])
        # XLA's convolution, or oneDNN's primitives where the jaxres[onednn] extra routes them
        jaxpr = str(jax.make_jaxpr(f)(variables["params"]))
        return len(re.findall(r"\b(?:conv_general_dilated|onednn_conv_\w+)\[", jaxpr))

    # remat is really on: the backward pass recomputes every forward conv (7: stem + 3 blocks x 2)
    assert convs(model, grad=False) == 7
    assert convs(remat, grad=True) == convs(model, grad=True) + 7
