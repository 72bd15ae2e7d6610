"""The degradation experiment of He et al. 2015 (arXiv 1512.03385, Fig. 1 and Fig. 6) on
Fashion-MNIST, and the interventions that test whether it comes from the gradients: deeper
*plain* nets reach a higher training error than shallower ones, while their residual twins do
not; gradient propagation is measured during training.

One run per invocation; `jaxres experiment degradation` runs the whole grid (conditions x models
x seeds) and plots it:

    jaxres data import fashion_mnist --from /usr/share/datasets/fashion-mnist
    jaxres train --config degradation:cifar_plain56 --workdir runs/degr/plain56
    jaxres train --config degradation:cifar_plain56,warmup --config.seed=1 --workdir W
    jaxres train --config degradation:cifar_resnet20,300 --workdir /tmp/r20

ARG: MODEL[,CONDITION][,NUM_STEPS]. MODEL is cifar_plainD or cifar_resnetD with D = 6n+2 (8, 14,
20, 32, 44, 56, 110); depths the registry lacks (8, 14) are built as `ResNet` from
model_overrides with the same layout (3x3 stem, stages of 16/32/64 filters, option-A
shortcuts). CONDITION is a key of CONDITIONS (default: baseline). NUM_STEPS defaults to
NUM_STEPS below. The seed is the ordinary `seed` field.

The baseline recipe (He et al. 2015, section 4.2, compressed in time): SGD 0.1, momentum 0.9,
weight decay 1e-4 on all weights, batch 128, learning rate divided by 10 at 50% and 75% of the
steps; MNIST-family augmentation (pad 28 -> 32, normalization). Every quarter of the run it
evaluates all 10,000 test images and, in eval mode (running BatchNorm statistics), a fixed
subset of TRAIN_EVAL_EXAMPLES training images (the training error He et al. mean); the
gradient monitor (||dL/dh|| at every unit input, ||dL/dW|| / ||W|| per kernel, layer
response stds, on 32 fixed training images with batch statistics, as trained) measures at
step 0, densely early (EARLY_STEPS, where plain nets go through their transient), then every
min(100, NUM_STEPS / 8) steps (75 in the default run) and at the end.

NUM_STEPS = 600 (1.3 epochs) is set by the budget: the default grid is 3 seeds x (4 baseline
nets + 4 interventions on cifar_plain56), 18 of its 24 runs at depth 56, and was planned for
6 hours on a 2-core CPU (experiments/results/degradation/README.md states the measured time). The first, single-seed grid ran
1000 steps; its plain gap was already 16.6 test-error points at step 500 (30.75 % vs 14.13 %).

The conditions change one thing of the baseline each (`CONDITIONS`); the experiment runs the
interventions on its deepest plain net (SkipInit on its deepest residual net).
"""

import dataclasses
from typing import Callable

from jaxres.configs.base import base_config
from jaxres.models import model_names

NUM_STEPS = 600
EARLY_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96)
TRAIN_EVAL_EXAMPLES = 10_000
FAMILIES = {"cifar_plain": False, "cifar_resnet": True}  # family -> residual
# The equalized condition's step of every kernel, as a fraction of its norm before the learning
# rate: 0.01 is the median ||dL/dW|| / ||W|| over the kernels of the baseline cifar_plain56 at
# steps 100-1000 (0.008-0.013, seed 0 of the first grid), so the median layer keeps its step
# and the small ones (the first layers: 1e-5 to 4e-4 of their norm) get it too.
TRUST_COEFFICIENT = 0.01


@dataclasses.dataclass(frozen=True)
class Condition:
    """One change to the baseline recipe: `summary` says what and why, `models` which nets it
    makes sense for ("any" or "residual"), `apply(config)` makes it."""

    summary: str
    models: str
    apply: Callable


def _model_fields(c, **fields):
    c.model_overrides = dict(c.model_overrides.to_dict() if c.model_overrides else {}, **fields)


def _warmup(c):
    c.warmup_steps = max(1, c.num_steps // 10)


def _equalized(c):
    c.optimizer = "lars"
    c.trust_coefficient = TRUST_COEFFICIENT


CONDITIONS = {
    "baseline": Condition("the recipe as it is", "any", lambda c: None),
    "warmup": Condition("the learning rate ramps up linearly over the first 10% of the steps (Goyal et al. 2017) "
                        "instead of starting at 0.1: if the early transient is what hurts, this must shrink the gap",
                        "any", _warmup),
    "equalized": Condition("LARS (You et al. 2017): every kernel's update rescaled to the same fraction of its norm "
                           f"(trust coefficient {TRUST_COEFFICIENT}), so no layer's step is small relative to its "
                           "weights: if small or large gradients caused the degradation, this must remove it",
                           "any", _equalized),
    "delta_orthogonal": Condition("delta-orthogonal kernels (Xiao et al. 2018), the dynamical-isometry "
                                  "initialization, instead of He's", "any",
                                  lambda c: _model_fields(c, kernel_init="delta_orthogonal")),
    "textbook": Condition("the case the vanishing-gradient story describes: no BatchNorm, sigmoid, Glorot's "
                          "uniform initialization (Glorot & Bengio 2010)", "any",
                          lambda c: _model_fields(c, norm="none", activation="sigmoid", kernel_init="glorot_uniform")),
    "skipinit": Condition("no BatchNorm, every residual branch's last conv starting at zero, so each unit starts "
                          "as the identity (SkipInit / Fixup): the skip connection without normalization",
                          "residual", lambda c: _model_fields(c, norm="none", zero_init_residual=True)),
}


def parse_model(name: str) -> tuple[bool, int]:
    """(residual, depth) of cifar_plainD / cifar_resnetD."""
    family = name.rstrip("0123456789")
    depth = name[len(family):]
    if family not in FAMILIES or not depth or int(depth) < 8 or (int(depth) - 2) % 6:
        raise ValueError(f"degradation model must be cifar_plainD or cifar_resnetD with depth D = 6n+2 "
                         f"(8, 14, 20, 32, 44, 56, 110); got {name!r}")
    return FAMILIES[family], int(depth)


def check_condition(condition: str, model: str) -> Condition:
    """The condition named `condition`, checked against `model`: a ValueError for an unknown name
    or a condition that makes no sense for this net (a zero-init residual branch on a plain net)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown degradation condition {condition!r} (valid: {', '.join(CONDITIONS)})")
    residual, _ = parse_model(model)
    if CONDITIONS[condition].models == "residual" and not residual:
        raise ValueError(f"condition {condition!r} changes residual branches; {model} has none: use it with a "
                         f"cifar_resnetD model")
    return CONDITIONS[condition]


def parse_arg(arg: str) -> tuple[str, str, int]:
    """(model, condition, num_steps) of "MODEL[,CONDITION][,NUM_STEPS]"."""
    model, *rest = [part.strip() for part in arg.split(",")]
    condition, num_steps = "baseline", NUM_STEPS
    for part in rest:
        if part.isdigit() and int(part) >= 1:
            num_steps = int(part)
        elif part in CONDITIONS:
            condition = part
        else:
            raise ValueError(f"degradation config argument is MODEL[,CONDITION][,NUM_STEPS] with NUM_STEPS >= 1 and "
                             f"CONDITION one of {', '.join(CONDITIONS)}; got {arg!r}")
    check_condition(condition, model)
    return model, condition, num_steps


def get_config(arg: str = "cifar_plain20"):
    name, condition, num_steps = parse_arg(arg)
    residual, depth = parse_model(name)
    c = base_config()
    if name in model_names():
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
    c.analysis_steps = tuple(s for s in EARLY_STEPS if s < num_steps)
    c.analysis_batch_size = 32
    c.analysis_bn = "batch"
    c.train_eval_examples = TRAIN_EVAL_EXAMPLES
    c.log_every_steps = min(50, max(1, num_steps // 50))
    c.eval_every_steps = max(1, num_steps // 4)
    c.checkpoint_every_steps = max(1, num_steps // 8)
    CONDITIONS[condition].apply(c)
    return c
