"""Bad input gets a clear error naming the problem and the fix."""

import jax
import jax.numpy as jnp
import pytest

import jaxres
from jaxres.models import VGG, ResNet, cifar_resnet, imagenet_resnet, vgg
from tests.conftest import init, tiny_cifar_resnet


@pytest.fixture(scope="module")
def tiny():
    model = tiny_cifar_resnet()
    return model, init(model, jnp.zeros((1, 16, 16, 3)))


def test_unknown_model_names_the_closest_matches():
    with pytest.raises(ValueError, match=r"unknown model 'resnet51'; did you mean 'resnet50'"):
        jaxres.create_model("resnet51")
    with pytest.raises(ValueError, match="cifar_resnet56"):
        jaxres.create_model("cifar_resnet_56")


def test_unknown_override():
    with pytest.raises(TypeError, match=r"unknown override\(s\) activaton; did you mean 'activation'"):
        jaxres.create_model("resnet18", activaton="tanh")
    with pytest.raises(TypeError, match="stage_sizes"):  # structural: pick another entry
        jaxres.create_model("resnet18", stage_sizes=(1, 1, 1, 1))


@pytest.mark.parametrize("bad", [-1, -3, 2.5, True])
@pytest.mark.parametrize("name", ["cifar_resnet20", "vgg11"])
def test_num_classes_must_be_a_positive_integer_or_0(name, bad):
    with pytest.raises(ValueError, match=r"num_classes must be a positive integer, or 0 for the pooled features"):
        jaxres.create_model(name, num_classes=bad)


@pytest.mark.parametrize("depth", [51, 21, 1])
def test_cifar_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match=r"6n\+2 \(20, 32, 44, 56, 110, 1202\); got"):
        cifar_resnet(depth)


def test_cifar_bottleneck_depth_must_be_9n_plus_2():
    with pytest.raises(ValueError, match=r"9n\+2 \(164, 1001\); got 100"):
        cifar_resnet(100, block="bottleneck")


def test_imagenet_and_vgg_depths():
    with pytest.raises(ValueError, match=r"one of \[18, 34, 50, 101, 152\]; got 20"):
        imagenet_resnet(20)
    with pytest.raises(ValueError, match=r"one of \[11, 13, 16, 19\]; got 12"):
        vgg(12)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("activation", "rleu", "unknown activation 'rleu'; did you mean 'relu'"),
        ("norm", "layernorm", "unknown normalization 'layernorm'"),
        ("kernel_init", "he_normal", "unknown kernel initializer 'he_normal'; did you mean"),
        ("shortcut", "D", "unknown shortcut option 'D'"),
    ],
)
def test_unknown_study_switches(field, value, message):
    with pytest.raises(ValueError, match=message):
        jaxres.create_model("cifar_resnet20", **{field: value})


def test_nchw_input_is_recognised(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match=r"3 channels in the last \(NHWC\) axis, got shape \(2, 3, 16, 16\); it looks like NCHW"):
        model.apply(variables, jnp.zeros((2, 3, 16, 16)))


def test_wrong_rank(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match=r"4-D NHWC batch.*got shape \(16, 16, 3\); add a batch axis"):
        model.apply(variables, jnp.zeros((16, 16, 3)))


def test_integer_images_are_rejected(tiny):
    model, variables = tiny
    with pytest.raises(TypeError, match="floating point, got uint8"):
        model.apply(variables, jnp.zeros((1, 16, 16, 3), jnp.uint8))


def test_a_unit_range_checks_its_own_input_channels(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match="input to 'unit_2' must have 4 channels"):
        model.apply(variables, jnp.zeros((1, 8, 8, 8)), start="unit_2")


def test_option_a_cannot_narrow():
    model = ResNet(stage_sizes=(1, 1), widths=(8, 4), stem="cifar", shortcut="A")
    with pytest.raises(ValueError, match="option A cannot zero-pad unit_2 from 8 to 4 channels; use shortcut='B'"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_mismatched_stage_config():
    with pytest.raises(ValueError, match="same length"):
        ResNet(stage_sizes=(1, 1), widths=(4,))


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family 'resnets'; did you mean 'resnet'"):
        jaxres.list_models("resnets")


def test_one_list_models():
    """jaxres.list_models is the one listing (architectures, and with pretrained=True the ones with
    weights); the registry's own is model_names, and the old jaxres.models.list_models points to both."""
    import jaxres.models

    assert jaxres.list_models() == jaxres.models.model_names()
    assert jaxres.list_models("cifar_plain") == jaxres.models.model_names("cifar_plain")
    with pytest.raises(AttributeError, match="now jaxres.list_models.*model_names"):
        jaxres.models.list_models  # noqa: B018


# A zero width used to end in a ZeroDivisionError inside an initializer, a negative one in an
# MLIRError from XLA, and no stage at all in an IndexError in resnet.py: refused when built.
@pytest.mark.parametrize("fields, message", [
    (dict(widths=(0, 8)), r"ResNet widths must be positive integers \(conv channels per stage, e\.g\. "
                          r"\(64, 128, 256, 512\)\); got widths=\(0, 8\)"),
    (dict(widths=(-4, 8)), r"ResNet widths must be positive integers .*; got widths=\(-4, 8\)"),
    (dict(widths=(4.0, 8)), r"ResNet widths must be positive integers .*; got widths=\(4\.0, 8\)"),
    (dict(in_channels=0), r"ResNet in_channels must be a positive integer \(image channels: 3 for RGB, 1 for "
                          r"grayscale\); got in_channels=0"),
    (dict(stage_sizes=(), widths=()), r"ResNet stage_sizes is empty; it needs at least one entry \(blocks per stage, "
                                      r"e\.g\. \(2, 2, 2, 2\)\)"),
    (dict(stage_sizes=(1, 1.5)), r"ResNet stage_sizes must be positive integers .*; got stage_sizes=\(1, 1\.5\)"),
], ids=["zero-width", "negative-width", "float-width", "no-channels", "no-stages", "float-blocks"])
def test_resnet_sizes_must_be_positive_integers(fields, message):
    with pytest.raises(ValueError, match=message):
        ResNet(**{"stage_sizes": (1, 1), "widths": (4, 8), "stem": "cifar", **fields})


@pytest.mark.parametrize("fields, message", [
    (dict(in_channels=0), r"VGG in_channels must be a positive integer \(image channels: .*\); got in_channels=0"),
    (dict(pool_size=0), r"VGG pool_size must be a positive integer \(the side of the pooled map the classifier "
                        r"reads: 7 in torchvision, 1 for CIFAR\); got pool_size=0"),
    (dict(classifier_widths=(0,)), r"VGG classifier_widths must be positive integers \(hidden Dense layers, e\.g\. "
                                   r"\(4096, 4096\), or \(\) for none\); got classifier_widths=\(0,\)"),
    (dict(classifier_widths=(-3,)), r"VGG classifier_widths must be positive integers .*; got classifier_widths=\(-3,\)"),
    (dict(dropout=1.5), r"VGG dropout must be a probability in \[0, 1\) \(torchvision: 0\.5; 0: none\); got "
                        r"dropout=1\.5"),
], ids=["no-channels", "pool-0", "zero-hidden", "negative-hidden", "dropout-above-1"])
def test_vgg_sizes_must_be_positive_integers(fields, message):
    # unchecked: pool_size=0 ends in a ZeroDivisionError, a negative hidden width in a shape
    # error; a zero one gives constant logits and dropout 1.5 zeroes the classifier, silently
    with pytest.raises(ValueError, match=message):
        VGG(**{"layers": (4, "M"), "pool_size": 1, "classifier_widths": (), **fields})


def test_registry_overrides_meet_the_same_checks():
    with pytest.raises(ValueError, match="ResNet in_channels must be a positive integer .*got in_channels=0"):
        jaxres.create_model("cifar_resnet20", in_channels=0)
    with pytest.raises(ValueError, match="VGG in_channels must be a positive integer .*got in_channels=0"):
        jaxres.create_model("vgg11", in_channels=0)
