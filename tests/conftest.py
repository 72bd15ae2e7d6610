"""Shared fixtures: small models compiled once per session."""

import os

# XLA:CPU compiles JAX's default threefry PRNG slowly: measured here, jit(model.init) of a
# 3-block ResNet took 50 s with threefry and 4.4 s with "rbg" (one normal draw: 4.7 s vs
# 0.4 s). Tests only need *a* deterministic PRNG, so they (and the subprocesses they start,
# which inherit the environment) use rbg. Library defaults are untouched.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

import jax  # noqa: E402  (after the environment is set)
import pytest

from jaxres.models import ResNet


def tiny_cifar_resnet(**overrides) -> ResNet:
    """A 3-stage CIFAR ResNet with one block per stage and widths 4/8/16: every code path of
    cifar_resnet (option-A shortcut with pad + stride) at a fraction of the compile time."""
    config = dict(stage_sizes=(1, 1, 1), widths=(4, 8, 16), stem="cifar", shortcut="A", num_classes=10)
    config.update(overrides)
    return ResNet(**config)


@pytest.fixture(scope="session")
def key():
    return jax.random.key(0)


def init(model, x, seed: int = 0):
    """`model.init` compiled as one program: far faster than op-by-op for every test model."""
    return jax.jit(model.init)(jax.random.key(seed), x)
