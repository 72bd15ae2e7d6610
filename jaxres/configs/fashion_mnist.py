"""A small ResNet on Fashion-MNIST (Xiao et al. 2017), trainable on a laptop CPU offline.

    apt-get install dataset-fashion-mnist    # Debian/Ubuntu; or any copy of the 4 IDX files
    jaxres data import fashion_mnist --from /usr/share/datasets/fashion-mnist
    jaxres train --config fashion_mnist --workdir runs/fmnist

ARG (optional): "small" (default): a 3-stage CIFAR-style ResNet with one basic block per stage
and widths 8/16/32 (option-A shortcuts, 19,074 parameters with one input channel), images
padded 28 -> 32; SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 70% and 90% of
the steps, batch 128.
"resnet20": cifar_resnet20 (0.27M parameters) with the same schedule.

Measured on 2 shared CPU cores (all 10,000 test images): 300 steps with lr /10 at 200 and 260
(the test suite's run, tests/test_train_fashion_mnist.py) reach 83.46% in about 2 minutes of
CPU time; 600 steps with /10 at 420 and 540 reach 86.92%. The full 3000-step recipe has not
been run here.
"""

from jaxres.configs.base import base_config


def get_config(arg: str = "small"):
    if arg not in ("small", "resnet20"):
        raise ValueError(f"fashion_mnist config argument must be small or resnet20; got {arg!r}")
    c = base_config()
    if arg == "small":
        c.model = "ResNet"
        c.model_overrides = {"stage_sizes": (1, 1, 1), "widths": (8, 16, 32), "stem": "cifar", "shortcut": "A"}
    else:
        c.model = "cifar_resnet20"
    c.dataset = "fashion_mnist"
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_steps = 3000
    c.learning_rate = 0.1
    c.weight_decay = 1e-4
    c.schedule = "piecewise"
    c.lr_boundaries = {"2100": 0.1, "2700": 0.1}
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 500
    c.log_every_steps = 50
    return c
