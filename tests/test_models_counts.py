"""Exact parameter and MAC counts of every registry entry, against their published sources."""

import pytest

import jaxres

# Trainable parameters at the default number of classes (1000 ImageNet / 10 CIFAR).
EXPECTED_PARAMS = {
    # torchvision.models (sum of p.numel() for p in model.parameters())
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg13": 133_047_848,
    "vgg13_bn": 133_053_736,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    # He et al. 2015 Table 6 (0.27M/0.46M/0.66M/0.85M/1.7M/19.4M); option-A shortcuts are
    # parameter-free, so the plain twins have exactly the same count.
    "cifar_resnet20": 269_722,
    "cifar_resnet32": 464_154,
    "cifar_resnet44": 658_586,
    "cifar_resnet56": 853_018,
    "cifar_resnet110": 1_727_962,
    "cifar_resnet1202": 19_421_274,
    "cifar_plain20": 269_722,
    "cifar_plain32": 464_154,
    "cifar_plain44": 658_586,
    "cifar_plain56": 853_018,
    "cifar_plain110": 1_727_962,
    # Plain ImageNet twins: resnet minus the three option-B projections (conv 1x1 + BN):
    # resnet18 - (64*128 + 128*256 + 256*512 + 2*(128+256+512)) = 11,515,688.
    "plain18": 11_515_688,
    "plain34": 21_623_848,
    # Pre-activation nets (He et al. 2016): projections are bare 1x1 convs fed by the
    # shared pre-activation, so resnet18 - 2*(128+256+512) of projection BN = 11,687,720.
    "preact_resnet18": 11_687_720,
    "preact_resnet34": 21_795_880,
    "preact_resnet50": 25_549_352,
    "preact_resnet101": 44_541_480,
    "preact_resnet152": 60_185_128,
    # He et al. 2016 Table 2/3: ResNet-110 1.7M, ResNet-164 1.7M, ResNet-1001 10.2M. Our
    # 1001 counts 10.33M: its 333 bottlenecks alone hold 10.29M with the paper's widths
    # (16/32/64 -> 64/128/256), so the paper's figure is rounded down or counts differently.
    "preact_resnet110": 1_730_522,
    "preact_resnet164": 1_703_258,
    "preact_resnet1001": 10_327_706,
    # CIFAR VGGs: torchvision's features + Linear(512, 10); vgg16_bn is the widely used
    # 14.7M CIFAR VGG-16 (e.g. kuangliu/pytorch-cifar).
    "cifar_vgg11": 9_225_610,
    "cifar_vgg11_bn": 9_231_114,
    "cifar_vgg13": 9_410_122,
    "cifar_vgg13_bn": 9_416_010,
    "cifar_vgg16": 14_719_818,
    "cifar_vgg16_bn": 14_728_266,
    "cifar_vgg19": 20_029_514,
    "cifar_vgg19_bn": 20_040_522,
}

PAPER_MILLIONS = {  # He et al. 2015, Table 6
    "cifar_resnet20": 0.27, "cifar_resnet32": 0.46, "cifar_resnet44": 0.66,
    "cifar_resnet56": 0.85, "cifar_resnet110": 1.7, "cifar_resnet1202": 19.4,
}

# torchvision's model tables list "GFLOPS", which are multiply-accumulates of conv + linear.
TORCHVISION_GMACS = {
    "resnet18": 1.81, "resnet34": 3.66, "resnet50": 4.09, "resnet101": 7.80, "resnet152": 11.51,
    "vgg11": 7.61, "vgg13": 11.31, "vgg16": 15.47, "vgg19": 19.63,
}


def test_every_registry_entry_has_an_expected_count():
    assert sorted(jaxres.list_models()) == sorted(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count(name):
    assert jaxres.model_card(name).params == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PAPER_MILLIONS))
def test_cifar_counts_round_to_the_paper(name):
    digits = 1 if PAPER_MILLIONS[name] >= 1 else 2
    assert round(EXPECTED_PARAMS[name] / 1e6, digits) == PAPER_MILLIONS[name]


@pytest.mark.parametrize("name", sorted(TORCHVISION_GMACS))
def test_macs_match_torchvision_tables(name):
    assert round(jaxres.model_card(name).macs / 1e9, 2) == TORCHVISION_GMACS[name]


def test_cifar_resnet_macs_match_the_paper():
    # He et al. 2015 section 4.2: ResNet-110 has "1.7M params and ~0.25 GFLOPs" (MACs).
    assert round(jaxres.model_card("cifar_resnet110").macs / 1e9, 2) == 0.25


def test_num_classes_changes_only_the_head():
    resnet = jaxres.model_card("resnet50")
    from jaxres.models.complexity import abstract_variables, count_params

    ten = count_params(abstract_variables(jaxres.create_model("resnet50", num_classes=10), 224))
    assert resnet.params - ten == 990 * (2048 + 1)
