"""Weight descriptors record what torchvision publishes, and agree with the installed torchvision."""

import math

import pytest

import jaxres
from jaxres.weights import list_torchvision_weights, torchvision_weights
from jaxres.weights.descriptors import hub_weights
from jaxres.weights.torchvision import convertible_models


def test_published_accuracies_and_preprocessing():
    # torchvision docs / weights meta: ResNet50_Weights.IMAGENET1K_V1 76.130, V2 80.858 (resize 232),
    # VGG16_Weights.IMAGENET1K_V1 71.592.
    v1, v2 = torchvision_weights("resnet50", "IMAGENET1K_V1"), torchvision_weights("resnet50", "IMAGENET1K_V2")
    assert (v1.top1, v2.top1, torchvision_weights("vgg16").top1) == (76.130, 80.858, 71.592)
    assert (v1.preprocessing.resize_size, v2.preprocessing.resize_size) == (256, 232)
    assert v2.preprocessing.crop_size == 224
    assert v2.preprocessing.mean == (0.485, 0.456, 0.406) and v2.preprocessing.std == (0.229, 0.224, 0.225)
    assert v2.url == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    assert (v2.filename, v2.sha256_prefix, v2.spec) == ("resnet50-11ad3fa6.pth", "11ad3fa6", "torchvision:IMAGENET1K_V2")


def test_default_is_the_best_published_weights():
    assert torchvision_weights("resnet50").tag == "IMAGENET1K_V2"  # torchvision's DEFAULT
    assert torchvision_weights("resnet18").tag == "IMAGENET1K_V1"  # no V2 for resnet18
    assert torchvision_weights("vgg19_bn").tag == "IMAGENET1K_V1"


def test_every_convertible_model_has_weights_and_the_zoo_parameter_count():
    assert sorted({d.model for d in list_torchvision_weights()}) == sorted(convertible_models())
    assert len(list_torchvision_weights()) == 16  # 8 VGG + 5 ResNet V1 + 3 ResNet V2
    for descriptor in list_torchvision_weights():
        assert len(descriptor.sha256_prefix) == 8 and int(descriptor.sha256_prefix, 16) >= 0
        # the zoo's model has exactly the parameters torchvision's meta states
        assert jaxres.model_card(descriptor.model).params == descriptor.num_params, descriptor.model



def test_every_descriptor_names_timms_hub_copy():
    # timm's resnet.py and vgg.py default_cfgs: hf_hub_id 'timm/', tags tv_in1k (V1) and tv2_in1k (V2)
    expected = {f"hf-hub:timm/vgg{d}{bn}.tv_in1k" for d in (11, 13, 16, 19) for bn in ("", "_bn")}
    expected |= {f"hf-hub:timm/resnet{d}.tv_in1k" for d in (18, 34, 50, 101, 152)}
    expected |= {f"hf-hub:timm/resnet{d}.tv2_in1k" for d in (50, 101, 152)}
    assert {d.hub_spec for d in list_torchvision_weights()} == expected
    assert hub_weights("timm/resnet50.tv2_in1k") == torchvision_weights("resnet50", "IMAGENET1K_V2")
    assert hub_weights("timm/resnet50.a1_in1k") is None  # timm's own recipe: not torchvision's weights

def test_unknown_model_or_tag_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"no ImageNet weights for 'resnet51'; did you mean 'resnet50'"):
        torchvision_weights("resnet51")
    with pytest.raises(ValueError, match="no 'IMAGENET1K_V2' weights for resnet18; valid: IMAGENET1K_V1, DEFAULT"):
        torchvision_weights("resnet18", "IMAGENET1K_V2")
    with pytest.raises(ValueError, match="cifar_resnet20"):
        torchvision_weights("cifar_resnet20")


@pytest.mark.torch
def test_descriptors_equal_installed_torchvision_meta():
    torchvision = pytest.importorskip("torchvision", reason="comparing with torchvision needs it installed")
    published = set()
    for name in convertible_models():
        for weights in torchvision.models.get_model_weights(name):
            metrics = weights.meta["_metrics"]["ImageNet-1K"]
            if math.isnan(metrics["acc@1"]):  # vgg16 IMAGENET1K_FEATURES: no classifier, left out
                continue
            published.add((name, weights.name))
            ours = torchvision_weights(name, weights.name)
            transforms = weights.transforms()
            assert ours.url == weights.url
            assert (ours.top1, ours.top5) == (metrics["acc@1"], metrics["acc@5"])
            assert ours.num_params == weights.meta["num_params"]
            assert ours.recipe == weights.meta["recipe"]
            assert [ours.preprocessing.resize_size] == list(transforms.resize_size)
            assert [ours.preprocessing.crop_size] == list(transforms.crop_size)
            assert list(ours.preprocessing.mean) == list(transforms.mean)
            assert list(ours.preprocessing.std) == list(transforms.std)
            assert ours.preprocessing.interpolation == transforms.interpolation.value
        assert torchvision_weights(name).tag == torchvision.models.get_model_weights(name).DEFAULT.name
    assert published == {(d.model, d.tag) for d in list_torchvision_weights()}
