"""Converted torchvision weights compute torchvision's function: logits and every unit boundary.

The reference is torchvision itself (0.29): each architecture is built with random weights,
its BatchNorm affine parameters and running statistics randomized too (so the BN conversion
is really exercised, not the identity of fresh BN layers), converted, and run on the same
random batch in float32 (torch NCHW, jaxres NHWC). These tests double as the architecture
check of the model zoo: a jaxres model that differed from torchvision's in any layer, stride,
padding or pooling would fail them.

Tolerance: max |jaxres - torch| <= 1e-4 * max |torch| per compared tensor (float32 sums in a
different order; measured differences are ~1e-6 relative, see the weights report).
CPU time: one jit per architecture, batch 2, 64x64 inputs except one 224x224 model per
family.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install 'jaxres[torch]')")
torchvision = pytest.importorskip("torchvision", reason="parity tests need torchvision (pip install 'jaxres[torch]')")

import jaxres  # noqa: E402
from jaxres.weights import from_torchvision  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

RTOL = 1e-4
# One 224x224 model per family (the published input size; VGG's 7x7 map then feeds its
# classifier unpooled); the rest at 64x64, where VGG's 2x2 map still makes the NCHW->NHWC
# reordering of its first linear layer visible (a constant map would hide it).
SIZES = {
    "vgg11": 64, "vgg11_bn": 64, "vgg13": 64, "vgg13_bn": 64, "vgg16": 224, "vgg16_bn": 64, "vgg19": 64,
    "vgg19_bn": 64, "resnet18": 64, "resnet34": 64, "resnet50": 224, "resnet101": 64, "resnet152": 64,
}


def randomized_torchvision(name: str, seed: int = 0):
    """torchvision.models.<name>(weights=None) in eval mode with every BN made non-trivial:
    random scale, shift, running mean and running variance (so a swapped or dropped BN tensor
    changes the output). The running statistics are deliberately not calibrated on data:
    activations then grow with depth (resnet152's logits reach ~1e7) but float32 rounding does
    not compound. With statistics calibrated on a batch, the random network amplifies rounding
    from block to block (measured up to 9e-5 relative at resnet101's unit_32, in both
    frameworks alike): that measures the random network's conditioning, not the conversion."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
            elif isinstance(module, torch.nn.Linear):
                module.bias.normal_(0.0, 0.1)  # torchvision zeroes VGG's biases; make them count
            elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def boundary_modules(name: str, model) -> list:
    """torchvision's modules whose outputs are jaxres's stem, unit_1, ..., unit_K outputs."""
    if name.startswith("resnet"):
        blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
        return [model.maxpool, *blocks]
    # VGG: a unit ends after its ReLU, or after the MaxPool that follows it.
    layers, ends = list(model.features), []
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.ReLU):
            pooled = i + 1 < len(layers) and isinstance(layers[i + 1], torch.nn.MaxPool2d)
            ends.append(layers[i + 1] if pooled else layer)
    return ends


def torch_run(model, x: np.ndarray, modules) -> tuple[np.ndarray, list[np.ndarray]]:
    """(logits, [NHWC output of each module]) for the NCHW batch x."""
    captured = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone())) for m in modules]
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    for hook in hooks:
        hook.remove()
    assert len(captured) == len(modules)
    return logits.numpy(), [c.numpy().transpose(0, 2, 3, 1) for c in captured]


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module", params=list(SIZES))
def converted(request):
    """(name, torch model, jaxres model, variables, NCHW input) per architecture, built once."""
    name = request.param
    reference = randomized_torchvision(name)
    variables = from_torchvision(reference.state_dict(), name)
    x = np.random.default_rng(1).standard_normal((2, 3, SIZES[name], SIZES[name]), dtype=np.float32)
    return name, reference, jaxres.create_model(name), variables, x


def test_eval_logits_and_unit_boundaries_match_torchvision(converted):
    name, reference, model, variables, x = converted
    modules = boundary_modules(name, reference)
    expected_logits, expected_units = torch_run(reference, x, modules)
    logits, units = jax.jit(functools.partial(model.apply, capture=True))(variables, x.transpose(0, 2, 3, 1))
    names = model.unit_names()[:-1]
    assert len(names) == len(modules)  # every jaxres boundary has its torchvision point
    errors = {unit: relative_error(units[unit], out) for unit, out in zip(names, expected_units)}
    errors["logits"] = relative_error(logits, expected_logits)
    worst = max(errors, key=errors.get)
    print(f"\n{name} @ {x.shape[-1]}: max relative difference {errors[worst]:.2e} at {worst}; "
          f"logits {errors['logits']:.2e} (max |diff| {np.abs(np.asarray(logits) - expected_logits).max():.2e}, "
          f"scale {np.abs(expected_logits).max():.3g})")
    assert errors[worst] <= RTOL, errors


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11_bn"])
def test_train_mode_batchnorm_matches_torchvision(name):
    """Batch statistics in the forward pass and torch's running means, unit by unit.

    Each jaxres unit gets torchvision's input to that unit, so the comparison measures each
    unit's train-mode arithmetic alone: run end to end, tiny float32 differences grow by ~1.3x
    per bottleneck block in train mode (each BN divides by a fresh batch std; measured 1e-4
    relative at resnet50's last block, 2e-6 at its first), which says nothing about the code.
    """
    reference = randomized_torchvision(name, seed=2)
    variables = from_torchvision(reference.state_dict(), name)
    model = jaxres.create_model(name)
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64), dtype=np.float32)
    modules = boundary_modules(name, reference)
    reference.train()
    expected_logits, expected_units = torch_run(reference, x, modules)
    units = model.unit_names()
    inputs = dict(zip(units, [x.transpose(0, 2, 3, 1), *expected_units]))
    if name.startswith("vgg"):  # VGG's classifier has dropout, whose masks differ
        units = units[:-1]

    @jax.jit
    def each_unit(variables, inputs):
        results = {}
        for unit in units:
            out, updated = model.apply(variables, inputs[unit], True, start=unit, stop=unit, mutable=["batch_stats"])
            results[unit] = (out, updated["batch_stats"].get(unit, {}))
        return results

    results = each_unit(variables, inputs)
    for unit, expected in zip(units, [*expected_units, expected_logits]):
        assert relative_error(results[unit][0], expected) <= RTOL, unit

    # Running means: both keep 0.9 * old + 0.1 * batch mean (torch momentum 0.1 = Flax 0.9).
    torch_stats = from_torchvision(reference.state_dict(), name)["batch_stats"]
    for unit in units:
        for layer, stats in results[unit][1].items():
            assert relative_error(stats["mean"], torch_stats[unit][layer]["mean"]) <= RTOL, (unit, layer)


def test_running_variance_update_differs_from_torch_by_bessel_correction():
    """torch's running_var averages the *unbiased* batch variance (factor n/(n-1), n = N*H*W);
    Flax's BatchNorm averages the biased one. Outputs agree (both normalize by the biased
    variance), but after a train step the running variances differ by exactly that factor,
    which is large where n is small: the last block's BN sees 2 x 2 x 2 = 8 positions here."""
    reference = randomized_torchvision("resnet18", seed=4)
    variables = from_torchvision(reference.state_dict(), "resnet18")
    old_var = np.asarray(variables["batch_stats"]["unit_8"]["norm2"]["var"])
    x = np.random.default_rng(5).standard_normal((2, 3, 64, 64), dtype=np.float32)
    reference.train()
    with torch.no_grad():
        reference(torch.from_numpy(x))
    train_apply = jax.jit(functools.partial(jaxres.create_model("resnet18").apply, train=True, mutable=["batch_stats"]))
    _, updated = train_apply(variables, x.transpose(0, 2, 3, 1))
    n = 2 * 2 * 2  # 64x64 input -> 2x2 maps in layer4, batch 2
    flax_var = np.asarray(updated["batch_stats"]["unit_8"]["norm2"]["var"])
    torch_var = reference.layer4[1].bn2.running_var.numpy()
    batch_var_biased = (flax_var - 0.9 * old_var) / 0.1
    assert relative_error(0.9 * old_var + 0.1 * batch_var_biased * n / (n - 1), torch_var) <= RTOL
    assert relative_error(flax_var, torch_var) > 1e-3  # measured 8.5e-3: a real difference


def conv_linear_shapes_jaxres(name: str) -> list[tuple[int, ...]]:
    """Weight shapes of every conv/dense in forward order, read off the traced computation
    (torch layout: OIHW, (out, in))."""
    model = jaxres.create_model(name)
    variables = jaxres.models.complexity.abstract_variables(model, 224)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), np.float32)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x).jaxpr
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                h, w, i, o = eqn.invars[1].aval.shape
                shapes.append((o, i, h, w))
            elif eqn.primitive.name == "dot_general":
                fan_in, fan_out = eqn.invars[1].aval.shape
                shapes.append((fan_out, fan_in))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr)
    return shapes


@pytest.mark.parametrize("name", jaxres.list_models("vgg") + jaxres.list_models("resnet"))
def test_conv_and_linear_shapes_equal_torchvision_in_order(name):
    # torchvision builds on the meta device: shapes only, no memory, no init time.
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)(weights=None)
    expected = [
        tuple(m.weight.shape) for m in reference.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    assert conv_linear_shapes_jaxres(name) == expected
