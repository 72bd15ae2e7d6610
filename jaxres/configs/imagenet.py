"""ImageNet (ILSVRC 2012) recipes: He et al. 2015 ResNets and plain nets, and VGG-16 of
Simonyan & Zisserman 2014.

    jaxres data prepare imagenet2012 --manual-dir DIR_WITH_ILSVRC2012_TARS   # once; needs jaxres[prepare]
    jaxres train --config imagenet:resnet50 --workdir runs/imagenet_resnet50

ARG: resnet18 | resnet34 | resnet50 | resnet101 | resnet152 | plain18 | plain34 | vgg16.

ResNets / plain nets (He et al. 2015, section 3.4): SGD, momentum 0.9, weight decay 1e-4,
batch 256, lr 0.1 divided by 10 every 30 epochs (the paper divides "when the error
plateaus"; torchvision's reference recipe fixes it at every 30 epochs), 90 epochs; random-
resized crop 224 + flip for training, resize 256 + centre crop 224 for evaluation (single
crop). Expected single-crop top-1 accuracy with this recipe (torchvision's reference runs):
ResNet-18 69.76%, -34 73.31%, -50 76.13%, -101 77.37%, -152 78.31%. Plain nets (paper
Table 2, 10-crop top-1 error): plain-18 27.94%, plain-34 28.54% (deeper plain is worse),
against ResNet-18 27.88%, ResNet-34 25.03%; single-crop numbers are about 2 points worse.

VGG-16 (Simonyan & Zisserman 2014, section 3.1): SGD lr 0.01, momentum 0.9, batch 256,
weight decay 5e-4, dropout 0.5 in the first two FC layers, lr divided by 10 three times
(here every 20 epochs), 74 epochs. Expected single-crop top-1 accuracy about 71.6%
(torchvision's vgg16). Time: days on one GPU; use a pod slice (see the scale-out drivers).
"""

from jaxres.configs.base import base_config

ARGS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain18", "plain34", "vgg16")
IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg: str = "resnet50"):
    if arg not in ARGS:
        raise ValueError(f"imagenet config argument must be one of {', '.join(ARGS)}; got {arg!r}")
    c = base_config()
    c.model = arg
    c.dataset = "imagenet2012"
    c.batch_size = 256
    c.eval_batch_size = 250
    c.momentum = 0.9
    c.schedule = "step"
    c.decay_factor = 0.1
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.batch_size
    if arg == "vgg16":
        c.learning_rate = 0.01
        c.weight_decay = 5e-4
        c.model_overrides = {"dropout": 0.5}
        c.decay_every_epochs = 20.0
        c.num_steps = 74 * steps_per_epoch
    else:
        c.learning_rate = 0.1
        c.weight_decay = 1e-4
        c.decay_every_epochs = 30.0
        c.num_steps = 90 * steps_per_epoch
    c.eval_every_steps = 5 * steps_per_epoch
    c.checkpoint_every_steps = 2000
    c.num_data_threads = 16
    return c
