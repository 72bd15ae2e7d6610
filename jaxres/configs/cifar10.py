"""CIFAR-10 recipes of He et al. 2015 (arXiv 1512.03385), section 4.2.

    jaxres train --config cifar10:resnet56 --workdir runs/cifar10_resnet56

ARG: resnet20 | resnet32 | resnet44 | resnet56 | resnet110 | resnet1202 | plain20 | plain32 |
plain44 | plain56 | plain110.

Recipe: SGD, momentum 0.9, weight decay 1e-4 on all weights, batch 128, lr 0.1 divided by 10
at 32k and 48k iterations, 64k iterations in all; BN, He initialization, option-A (zero-pad)
shortcuts; 4-pixel pad + random 32x32 crop + horizontal flip, per-channel normalization.
Depth 110 (ResNet and plain) and 1202 warm up at lr 0.01 until iteration 400, then 0.1 (section 4.2;
1202 is "trained as described above"). ResNet-1202 runs its identical blocks with one lax.scan per
stage (`model_overrides.scan_units`): its step compiles in seconds instead of minutes; add
`--config.model_overrides.remat_units=True` to trade recomputation for activation memory. The paper trains on
45k images and validates on 5k to choose the schedule, then reports the 50k-trained test error;
this recipe trains on all 50k and evaluates on the 10k test images.

Expected test error (Table 6): ResNet-20 8.75%, -32 7.51%, -44 7.17%, -56 6.97%, -110 6.43%
(best of 5 runs; 6.61 +- 0.16 mean), -1202 7.93% (overfitting, says the paper). Plain nets (Fig. 6, left) get *worse* with depth
(degradation): plain-56 has higher training and test error than plain-20, plain-110's error
is far higher. Time: about 1-2 h for ResNet-20 on one modern GPU; CPUs are far slower.
"""

from jaxres.configs.base import base_config

DEPTHS = {"resnet": (20, 32, 44, 56, 110, 1202), "plain": (20, 32, 44, 56, 110)}


def get_config(arg: str = "resnet20"):
    kind, depth = arg.rstrip("0123456789"), arg[len(arg.rstrip("0123456789")):]
    if kind not in DEPTHS or not depth or int(depth) not in DEPTHS[kind]:
        raise ValueError(f"cifar10 config argument must be resnet + one of {DEPTHS['resnet']} or plain + one of "
                         f"{DEPTHS['plain']} (e.g. resnet56, plain20); got {arg!r}")
    c = base_config()
    c.model = f"cifar_{kind}{depth}"
    c.dataset = "cifar10"
    c.batch_size = 128
    c.num_steps = 64_000
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.schedule = "piecewise"
    c.lr_boundaries = {"32000": 0.1, "48000": 0.1}
    if depth == "1202":
        c.model_overrides.scan_units = True
    if depth in ("110", "1202"):
        # "we use 0.01 to warm up the training until the training error is below 80%
        # (about 400 iterations), and then go back to 0.1" (section 4.2).
        c.learning_rate = 0.01
        c.lr_boundaries = {"400": 10.0, "32000": 0.1, "48000": 0.1}
    c.eval_batch_size = 500
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 2000
    return c
