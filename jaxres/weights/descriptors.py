"""What torchvision publishes about its ImageNet weights for the VGG and ResNet of the zoo.

A `WeightDescriptor` records, for one torchvision weights enum member (e.g.
`torchvision.models.ResNet50_Weights.IMAGENET1K_V2`): the download URL, the sha256 prefix
torchvision checks, the evaluation preprocessing and the published ImageNet-1K accuracy.
The table is written out here (torch is an optional dependency) and checked field by field
against the installed torchvision in tests/test_weights_descriptors.py.

torchvision publishes no full sha256 for these files: the 8 hex digits after the last '-' of
the file name are the prefix of the file's sha256, which `torch.hub.download_url_to_file`
verifies on download. We record exactly that and nothing invented.
"""

from __future__ import annotations

import dataclasses

from jaxres.choices import closest_names
from jaxres.imagenet_stats import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """torchvision's ImageClassification preset for evaluation.

    Resize the shorter side to `resize_size` (bilinear, antialiased), center-crop
    `crop_size` x `crop_size`, scale to [0, 1], subtract `mean` and divide by `std` per RGB
    channel. jaxres models then take the result as NHWC float32 (torchvision: NCHW).
    """

    resize_size: int
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"


@dataclasses.dataclass(frozen=True)
class WeightDescriptor:
    """One set of published weights for one zoo model.

    `top1`/`top5` are torchvision's published ImageNet-1K validation accuracies (%), measured
    with `preprocessing`; converted weights give the same logits to float32 rounding
    (tests/test_torchvision_parity.py), so the same accuracy.
    """

    model: str  # jaxres registry name == torchvision builder name
    tag: str  # torchvision enum member, e.g. "IMAGENET1K_V2"
    url: str
    preprocessing: Preprocessing
    top1: float
    top5: float
    num_params: int  # torchvision meta["num_params"]
    recipe: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        """The first hex digits of the file's sha256, as torchvision's file name carries them."""
        return self.filename.rsplit("-", 1)[-1].split(".", 1)[0]

    @property
    def spec(self) -> str:
        """The `weights=` string that selects these weights."""
        return f"torchvision:{self.tag}"

    @property
    def num_classes(self) -> int:
        return 1000

    @property
    def hub_spec(self) -> str:
        """The `weights=` string of the same weights as timm republishes them on the Hugging Face Hub."""
        return f"hf-hub:timm/{self.model}.{HUB_TAGS[self.tag]}"


# timm republishes each file on the Hugging Face Hub as timm/<model>.<tag> (timm's resnet.py and
# vgg.py default_cfgs); its tv_in1k files are torchvision's V1 weights under their older file
# names (e.g. resnet50-19c8e357.pth), which torchvision reports with the same accuracy.
HUB_TAGS = {"IMAGENET1K_V1": "tv_in1k", "IMAGENET1K_V2": "tv2_in1k"}
_BASE = "https://download.pytorch.org/models/"
_V1_PREP = Preprocessing(resize_size=256)
_V2_PREP = Preprocessing(resize_size=232)  # the 2021 recipe evaluates at resize 232 (torchvision #3995)
_VGG_RECIPE = "https://github.com/pytorch/vision/tree/main/references/classification#alexnet-and-vgg"
_RESNET_RECIPE = "https://github.com/pytorch/vision/tree/main/references/classification#resnet"
_NEW_RECIPE = "https://github.com/pytorch/vision/issues/3995#new-recipe"

# (model, tag, file name, top-1, top-5, num_params, recipe): torchvision 0.29 weights meta.
_TABLE = (
    ("vgg11", "IMAGENET1K_V1", "vgg11-8a719046.pth", 69.020, 88.628, 132863336, _VGG_RECIPE),
    ("vgg11_bn", "IMAGENET1K_V1", "vgg11_bn-6002323d.pth", 70.370, 89.810, 132868840, _VGG_RECIPE),
    ("vgg13", "IMAGENET1K_V1", "vgg13-19584684.pth", 69.928, 89.246, 133047848, _VGG_RECIPE),
    ("vgg13_bn", "IMAGENET1K_V1", "vgg13_bn-abd245e5.pth", 71.586, 90.374, 133053736, _VGG_RECIPE),
    ("vgg16", "IMAGENET1K_V1", "vgg16-397923af.pth", 71.592, 90.382, 138357544, _VGG_RECIPE),
    ("vgg16_bn", "IMAGENET1K_V1", "vgg16_bn-6c64b313.pth", 73.360, 91.516, 138365992, _VGG_RECIPE),
    ("vgg19", "IMAGENET1K_V1", "vgg19-dcbb9e9d.pth", 72.376, 90.876, 143667240, _VGG_RECIPE),
    ("vgg19_bn", "IMAGENET1K_V1", "vgg19_bn-c79401a0.pth", 74.218, 91.842, 143678248, _VGG_RECIPE),
    ("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth", 69.758, 89.078, 11689512, _RESNET_RECIPE),
    ("resnet34", "IMAGENET1K_V1", "resnet34-b627a593.pth", 73.314, 91.420, 21797672, _RESNET_RECIPE),
    ("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth", 76.130, 92.862, 25557032, _RESNET_RECIPE),
    ("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 80.858, 95.434, 25557032,
     "https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621"),
    ("resnet101", "IMAGENET1K_V1", "resnet101-63fe2227.pth", 77.374, 93.546, 44549160, _RESNET_RECIPE),
    ("resnet101", "IMAGENET1K_V2", "resnet101-cd907fc2.pth", 81.886, 95.780, 44549160, _NEW_RECIPE),
    ("resnet152", "IMAGENET1K_V1", "resnet152-394f9c45.pth", 78.312, 94.046, 60192808, _RESNET_RECIPE),
    ("resnet152", "IMAGENET1K_V2", "resnet152-f82ba261.pth", 82.284, 96.002, 60192808, _NEW_RECIPE),
)
# vgg16's IMAGENET1K_FEATURES (SSD's backbone, 0-255 inputs, no classifier) is left out: it
# cannot classify and its preprocessing differs.

TORCHVISION_WEIGHTS: dict[tuple[str, str], WeightDescriptor] = {
    (model, tag): WeightDescriptor(
        model, tag, _BASE + filename, _V2_PREP if tag == "IMAGENET1K_V2" else _V1_PREP, top1, top5, params, recipe
    )
    for model, tag, filename, top1, top5, params, recipe in _TABLE
}


def default_tag(model: str) -> str:
    """torchvision's `DEFAULT`: the best published weights (V2 where it exists)."""
    tags = [tag for name, tag in TORCHVISION_WEIGHTS if name == model]
    return max(tags)


def torchvision_weights(model: str, tag: str = "DEFAULT") -> WeightDescriptor:
    """The descriptor of torchvision's `tag` weights ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT")."""
    models = sorted({name for name, _ in TORCHVISION_WEIGHTS})
    if model not in models:
        raise ValueError(
            f"torchvision publishes no ImageNet weights for {model!r}{closest_names(model, models)}; "
            f"models with weights: {', '.join(models)}"
        )
    if tag == "DEFAULT":
        tag = default_tag(model)
    if (model, tag) not in TORCHVISION_WEIGHTS:
        tags = [t for name, t in TORCHVISION_WEIGHTS if name == model]
        raise ValueError(
            f"torchvision has no {tag!r} weights for {model}; valid: {', '.join(tags + ['DEFAULT'])}"
        )
    return TORCHVISION_WEIGHTS[(model, tag)]


def list_torchvision_weights(model: str | None = None) -> list[WeightDescriptor]:
    """Every descriptor, or those of one model, in table order."""
    return [d for d in TORCHVISION_WEIGHTS.values() if model in (None, d.model)]


def published_models() -> list[str]:
    """Registry names with published ImageNet weights, in table order."""
    return list(dict.fromkeys(d.model for d in TORCHVISION_WEIGHTS.values()))


def hub_weights(repo_id: str) -> WeightDescriptor | None:
    """The descriptor of the weights timm republishes as Hub repository `repo_id`, if any."""
    for descriptor in TORCHVISION_WEIGHTS.values():
        if descriptor.hub_spec == f"hf-hub:{repo_id}":
            return descriptor
    return None
