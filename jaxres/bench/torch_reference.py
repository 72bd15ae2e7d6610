"""The same training step in PyTorch, on the same machine, for side-by-side ratios.

ImageNet models are torchvision's own; CIFAR ResNets (absent from torchvision) are built here
to the same architecture as jaxres's (He et al. 2015, option-A shortcut), so the comparison
is of frameworks, not of models. Needs the optional `torch` extra.
"""

from __future__ import annotations

import os
import re


def _torch():
    try:
        import torch
        import torchvision
    except ImportError as err:
        raise ValueError(
            f"--torch needs torch and torchvision ({err}); install them with "
            "`pip install -e '.[torch]'` (here: pip install torch==2.14.1 torchvision==0.29.1)"
        ) from None
    return torch, torchvision


def cifar_resnet_torch(depth: int, residual: bool = True, num_classes: int = 10):
    torch, _ = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            if residual:
                s = x[:, :, :: self.stride, :: self.stride]
                y = y + nn.functional.pad(s, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return torch.relu(y)

    n = (depth - 2) // 6
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            layers.append(Block(cin, width, 2 if stage and not i else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def torch_model(name: str, num_classes: int):
    torch, torchvision = _torch()
    match = re.fullmatch(r"cifar_(resnet|plain)(\d+)", name)
    if match:
        return cifar_resnet_torch(int(match.group(2)), match.group(1) == "resnet", num_classes)
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise ValueError(f"no PyTorch counterpart for {name!r}: --torch covers torchvision's VGG/ResNets and cifar_resnet/cifar_plain")


def torch_step(name: str, *, batch_size: int, input_size: int, num_classes: int, dtype: str = "float32",
               mode: str = "train"):
    """(step, threads): one synchronous step of the PyTorch model on the CPU, on a fixed
    normal(0, 1) batch (NCHW), using every core this process may run on. "train": SGD with
    momentum, cross-entropy, train-mode BatchNorm, like `jaxres.bench.train_step`; "inference":
    the eval-mode forward pass and the loss under `torch.inference_mode`."""
    torch, _ = _torch()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.manual_seed(0)
    model = torch_model(name, num_classes).train(mode == "train")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch_size, 3, input_size, input_size)
    y = torch.randint(0, num_classes, (batch_size,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def inference_step():
        with torch.inference_mode(), autocast:
            torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

    return (train_step if mode == "train" else inference_step), torch.get_num_threads()
