"""Learning-rate schedules, L2 weight decay and the SGD optimizer of the papers.

Schedules are functions of optax's update count c = the number of updates already applied
(c = 0 for the first iteration); "divide by 10 at 32k iterations" means c >= 32000 uses the
smaller rate, i.e. iterations 32001 on (1-based).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxres.choices import pick
from jaxres.train.config import schedule_boundaries


def piecewise_constant(base_lr: float, boundaries: Mapping[int, float]) -> optax.Schedule:
    """lr(c) = base_lr * product of scales[b] over boundaries b <= c
    (`optax.piecewise_constant_schedule`, which switches at c == b).

    He et al. 2015, section 4.2 (CIFAR): base 0.1, {32000: 0.1, 48000: 0.1}; ResNet-110
    warms up at 0.01 until 400 iterations: base 0.01, {400: 10, 32000: 0.1, 48000: 0.1}.
    """
    items = {int(b): float(s) for b, s in dict(boundaries).items()}
    if any(b < 0 for b in items):
        raise ValueError(f"schedule boundaries must be non-negative iterations, got {sorted(items)}")
    value, largest = abs(float(base_lr)), float(np.finfo(np.float32).max)
    for boundary, scale in sorted(items.items()):
        value *= abs(scale)
        # optax computes 0 * scale * lr before a boundary: a scale or rate beyond float32 makes
        # every earlier rate NaN, not only the later ones.
        if max(value, abs(scale)) > largest:
            raise ValueError(f"the scale {scale:g} at step {boundary} (learning rate {value:.3g}) exceeds float32 "
                             f"(max {largest:.3g}); use a smaller scale")
    return optax.piecewise_constant_schedule(base_lr, items or None)


def step_decay(base_lr: float, every_steps: int, factor: float = 0.1) -> optax.Schedule:
    """lr(c) = base_lr * factor ** (c // every_steps): ImageNet's /10 every 30 epochs
    (`optax.exponential_decay` with `staircase=True`)."""
    if every_steps < 1:
        raise ValueError(f"step decay period must be >= 1 step, got {every_steps}")
    if not factor > 0:  # optax turns a zero rate into a constant schedule
        raise ValueError(f"step decay factor must be > 0 (0.1 divides by ten), got {factor}")
    return optax.exponential_decay(base_lr, every_steps, factor, staircase=True)


def warmup_cosine(base_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to base_lr over `warmup_steps`, then cosine decay to `end_lr` at
    `total_steps` (Goyal et al. 2017 warm-up; Loshchilov & Hutter 2017 cosine)."""
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps, max(total_steps, warmup_steps + 1), end_lr)


def linear_warmup(schedule: optax.Schedule, warmup_steps: int) -> optax.Schedule:
    """lr(c) = schedule(c) * min(1, (c + 1) / warmup_steps): a linear ramp over the first
    `warmup_steps` updates up to the schedule's own rate (Goyal et al. 2017, arXiv 1706.02677,
    section 2.2), which it then follows unchanged (its boundaries do not move)."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0 (0: no warm-up), got {warmup_steps!r}")
    if warmup_steps == 0:
        return schedule
    return lambda count: schedule(count) * jnp.minimum(1.0, (count + 1) / warmup_steps)


def make_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The schedule named by `config.schedule`: "piecewise" (boundaries in iterations),
    "step" (decay every `decay_every_epochs` epochs), "cosine", or "constant"; with
    `config.warmup_steps` > 0 it starts with a linear warm-up (cosine: its own, from 0)."""
    kind = config.schedule
    pick("learning-rate schedule", kind, dict.fromkeys(("piecewise", "step", "cosine", "constant")))
    if kind == "cosine":
        return warmup_cosine(config.learning_rate, config.warmup_steps, config.num_steps)
    if kind == "piecewise":
        schedule = piecewise_constant(config.learning_rate, schedule_boundaries(config))
    elif kind == "step":
        schedule = step_decay(config.learning_rate, int(config.decay_every_epochs * steps_per_epoch),
                              config.decay_factor)
    else:
        schedule = optax.constant_schedule(config.learning_rate)
    return linear_warmup(schedule, config.warmup_steps)


def schedule_reads_num_steps(config) -> bool:
    """Whether `config.schedule` depends on `num_steps` (then changing it changes the run)."""
    return config.schedule == "cosine"


def kernel_mask(params):
    """True for the conv and dense kernels, False for BatchNorm scales/offsets and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def decay_mask(params, exclude_bn_and_bias: bool):
    """True for the leaves L2 weight decay applies to: all of them (the papers; Caffe decays
    every parameter), or only conv/dense kernels when `exclude_bn_and_bias`."""
    return kernel_mask(params) if exclude_bn_and_bias else jax.tree_util.tree_map(lambda _: True, params)


OPTIMIZERS = ("sgd", "lars")


def make_optimizer(schedule: optax.Schedule, *, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0, exclude_bn_and_bias: bool = False, optimizer: str = "sgd",
                   trust_coefficient: float = 0.001) -> optax.GradientTransformation:
    """optimizer="sgd": SGD with momentum and L2 weight decay: g <- g + wd * w (on the masked
    leaves), then m <- g + momentum * m, w <- w - lr * m (torch.optim.SGD, dampening 0). Adding
    wd * w to the gradient is exactly the gradient of (wd / 2) * ||w||^2 in the loss.

    optimizer="lars" (You et al. 2017, arXiv 1708.03888; `optax.lars`): the same, except that
    every kernel's g + wd * w is rescaled to trust_coefficient * ||w|| before the learning
    rate and momentum, so that each conv/dense layer moves by the same fraction of its norm
    whatever the size of its gradient; BatchNorm parameters and biases take plain SGD steps."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    pick("optimizer", optimizer, dict.fromkeys(OPTIMIZERS))
    if optimizer == "lars":
        if not trust_coefficient > 0:
            raise ValueError(f"trust_coefficient must be > 0 (the step of each kernel as a fraction of its norm, "
                             f"before the learning rate), got {trust_coefficient}")
        return optax.lars(schedule, weight_decay, weight_decay_mask=lambda p: decay_mask(p, exclude_bn_and_bias),
                          trust_coefficient=trust_coefficient, trust_ratio_mask=kernel_mask,
                          momentum=momentum, nesterov=nesterov)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=lambda p: decay_mask(p, exclude_bn_and_bias)),
        optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov),
    )
