"""The degradation experiment of He et al. 2015 (arXiv 1512.03385, Fig. 1 and Fig. 6) on
Fashion-MNIST: deeper *plain* nets reach a higher training error than shallower ones, while
their residual twins do not; gradient propagation is measured during training.

One run per invocation; `jaxres experiment degradation` runs the whole grid and plots it:

    jaxres data import fashion_mnist --from /usr/share/datasets/fashion-mnist
    jaxres train --config experiments/configs/degradation.py:cifar_plain56 --workdir runs/degr/plain56
    jaxres train --config experiments/configs/degradation.py:cifar_resnet20,300 --workdir /tmp/r20

ARG: MODEL[,NUM_STEPS]. MODEL is cifar_plainD or cifar_resnetD with D = 6n+2 (8, 20, 32, 44,
56, 110); depths the registry lacks (8) are built as `ResNet` from model_overrides with the
same layout (3x3 stem, stages of 16/32/64 filters, option-A shortcuts). NUM_STEPS defaults
to NUM_STEPS below.

The same recipe for every model (He et al. 2015, section 4.2, compressed in time): SGD 0.1,
momentum 0.9, weight decay 1e-4 on all weights, batch 128, lr divided by 10 at 50% and 75%
of the steps; MNIST-family augmentation (pad 28 -> 32, normalization). Evaluation on all
10,000 test images every quarter of the run, a checkpoint every eighth, and the gradient
monitor (`analysis_*`: ||dL/dh|| at every unit input, layer response stds) on a fixed probe
batch of 32 training images with batch statistics, every 100 steps (every NUM_STEPS / 8
for shorter runs) and at the end.

Measured on the 2-core CPU this was written on, shared with other jobs (load ~2 / ~3.5), in
seconds per training step at batch 128 on 32x32x1: plain-8 0.16 / 0.25, resnet-8 0.15 / 0.27,
plain-20 0.41 / 0.60, resnet-20 0.39 / 0.57, plain-56 1.11 / 1.62, resnet-56 1.07 / 1.40. One
evaluation of the 10,000 test images: 6-12 s (depth 8), 12-20 s (20), 20-40 s (56); one gradient
measurement: 0.5-2 s (depth 8-20), 3.5-5.5 s (56), the first 3-14 s with compilation. So the
default grid (plain and residual 20 and 56, NUM_STEPS = 1000 steps = 2.1 epochs each) is
predicted at about 56 min (load ~2) to 80 min (load ~3.5); `--quick` (depths 8 and 20, 160
steps) took 5 min 48 s at load ~2 (200 steps took 10 min 7 s at load ~4).

Measured so far (96 steps of depth 56, 160 of depths 8 and 20): at initialization ||dL/dh|| at
the input of unit_1 is 7.3e3 times that at the head's input in plain-56 and 31 times in
ResNet-56 (22 and 8.3 at depth 20): with batch statistics, gradients grow toward the input, far
more without shortcuts. After 96 steps plain-56 has 74% training error, ResNet-56 63%. The
full 1000-step grid has not been run here yet.
"""

from jaxres.models import list_models
from jaxres.train.config import base_config

NUM_STEPS = 1000
FAMILIES = {"cifar_plain": False, "cifar_resnet": True}  # family -> residual


def parse_model(name: str) -> tuple[bool, int]:
    """(residual, depth) of cifar_plainD / cifar_resnetD."""
    family = name.rstrip("0123456789")
    depth = name[len(family):]
    if family not in FAMILIES or not depth or int(depth) < 8 or (int(depth) - 2) % 6:
        raise ValueError(f"degradation model must be cifar_plainD or cifar_resnetD with depth D = 6n+2 "
                         f"(8, 20, 32, 44, 56, 110); got {name!r}")
    return FAMILIES[family], int(depth)


def get_config(arg: str = "cifar_plain20"):
    name, _, steps = arg.partition(",")
    residual, depth = parse_model(name)
    if steps and (not steps.isdigit() or int(steps) < 1):
        raise ValueError(f"degradation config argument is MODEL[,NUM_STEPS] with NUM_STEPS >= 1; got {arg!r}")
    num_steps = int(steps) if steps else NUM_STEPS
    c = base_config()
    if name in list_models():
        c.model = name
    else:  # the same layout as jaxres.models.cifar_resnet(depth, residual=...)
        n = (depth - 2) // 6
        c.model = "ResNet"
        c.model_overrides = {"stage_sizes": (n, n, n), "widths": (16, 32, 64), "stem": "cifar", "shortcut": "A",
                             "residual": residual}
    c.dataset = "fashion_mnist"
    c.batch_size = 128
    c.eval_batch_size = 1000
    c.num_steps = num_steps
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.schedule = "piecewise"
    c.lr_boundaries = {str(num_steps // 2): 0.1, str(3 * num_steps // 4): 0.1}
    c.analysis_every_steps = min(100, max(1, num_steps // 8))
    c.analysis_batch_size = 32
    c.analysis_bn = "batch"
    c.log_every_steps = min(50, max(1, num_steps // 50))
    c.eval_every_steps = max(1, num_steps // 4)
    c.checkpoint_every_steps = max(1, num_steps // 8)
    return c
