"""What `jaxres analyze` measures: the study's configuration and the models it names."""

from __future__ import annotations

import dataclasses
import itertools

from jaxres.analysis.segments import BN_POLICIES, check_bn
from jaxres.analysis.unit_groups import JacobianOptions
from jaxres.choices import closest_names, pick
from jaxres.models.layers import ACTIVATIONS, NORMS
from jaxres.models.registry import model_card
from jaxres.models.registry import model_names as registry_names


@dataclasses.dataclass(frozen=True)
class Setting:
    """One column of the grid: normalization, activation and BatchNorm policy."""

    norm: str = "batchnorm"
    activation: str = "relu"
    bn: str = "batch"

    @property
    def label(self) -> str:
        norm = f"BN-{self.bn}" if self.norm == "batchnorm" else "no norm"
        return f"{norm} {self.activation}"


@dataclasses.dataclass(frozen=True)
class StudyModel:
    """A registry entry of the study: its name, family and depth (None when the name has none)."""

    name: str
    family: str
    depth: int | None


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What to measure. `models` are families ("cifar_plain", "cifar_resnet") combined with
    `depths`, or full registry names; by default the plain nets and their post-activation
    residual twins at depths 20/56/110, and He et al. 2016's pre-activation ResNet-110 (its
    own initialization: projection shortcuts at the transitions make it no weight-sharing twin).

    bns: BatchNorm policies. "batch" (batch statistics, as in training) is the default.
    "eval" uses running statistics: a checkpoint's, or at initialization (where Flax's
    running statistics are 0 and 1 and eval-mode BN is the identity) statistics calibrated
    on the study's own inputs (`study.calibrate_batch_stats`).
    jacobian_units: per-unit Jacobians on this many evenly spaced shape-keeping units per
    stage (0: every unit, transitions included). Every unit of the three-depth grid would
    take well over 10 min on the 2-core CPU (one bn="batch" group of 30 stage-1 units, each a
    65,536-dim batch map, ran > 1 min).
    spectrum_max_dim: the exact SVD spectrum of each model's last shape-keeping unit with
    <= this many input values per example (4096: an 8x8x64 stage-3 unit); 0: none. One such
    SVD took 30-60 s on the 2-core CPU.
    float64: measure in float64 (`jax.enable_x64` around each setting, the models built
    with float64 compute and parameter dtypes, inputs and variables cast); deep plain
    BN-batch nets amplify float32 rounding.
    """

    models: tuple = ("cifar_plain", "cifar_resnet", "preact_resnet110")
    depths: tuple = (20, 56, 110)
    norms: tuple = ("batchnorm", "none")
    activations: tuple = ("relu", "tanh")
    bns: tuple = ("batch",)
    batch_size: int = 4
    method: str = "auto"
    seed: int = 0
    num_probes: int = 8
    jacobian_examples: int = 1
    jacobian_units: int = 1
    spectrum_max_dim: int = 0
    tol: float = 1e-2
    max_iter: int = 32
    chunk_size: int = 64
    in_channels: int = 3  # image channels the models take (1 for a net trained on Fashion-MNIST)
    float64: bool = False

    def __post_init__(self):
        # An empty list (`--bn ""`, an unset shell variable) would measure nothing and fail only
        # when plotting, after the study: refused before any work, naming the choices.
        for field, option, choices in (
                ("models", "--models", "a family (cifar_plain, cifar_resnet, ...) with --depths, or names from "
                                       "`jaxres models`"),
                ("norms", "--norm", ", ".join(NORMS)), ("activations", "--activation", ", ".join(ACTIVATIONS)),
                ("bns", "--bn", ", ".join(BN_POLICIES))):
            if isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"{field} ({option}) must be a non-empty list; got {getattr(self, field)!r}: "
                                 f"name at least one of {choices}")
        for norm in self.norms:
            pick("normalization", norm, dict.fromkeys(NORMS))
        for act in self.activations:
            pick("activation", act, ACTIVATIONS)
        for bn in self.bns:
            check_bn(bn)
        for name, value, low in (("batch_size", self.batch_size, 1), ("seed", self.seed, 0),
                                 ("jacobian_units", self.jacobian_units, 0),
                                 ("spectrum_max_dim", self.spectrum_max_dim, 0), ("in_channels", self.in_channels, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch statistics, gradient correlations), "
                             f"got {self.batch_size}")
        if not isinstance(self.float64, bool):
            raise ValueError(f"float64 must be True or False, got {self.float64!r}")
        self.jacobian_options  # noqa: B018 - checks method, num_probes, tol, max_iter, chunk_size
        study_models(self)

    @property
    def jacobian_options(self) -> JacobianOptions:
        return JacobianOptions(method=self.method, num_probes=self.num_probes, tol=self.tol, max_iter=self.max_iter,
                               chunk_size=self.chunk_size, examples=self.jacobian_examples)

    def settings(self) -> list[Setting]:
        out = []
        for norm, act in itertools.product(self.norms, self.activations):
            for bn in (self.bns if norm == "batchnorm" else ("eval",)):  # no BN: the policy is moot
                out.append(Setting(norm, act, bn))
        return out


def _depth(name: str) -> int | None:
    """The depth a registry name ends with (cifar_resnet56 -> 56, preact_resnet110 -> 110)."""
    digits = name[len(name.rstrip("0123456789")):]
    return int(digits) if digits else None


def study_models(config: StudyConfig) -> list[StudyModel]:
    """The registry entries of the study, checked (unknown names and depths raise ValueError)."""
    out, known = [], registry_names()
    families = {model_card(n).family for n in known}
    for entry in config.models:
        if entry in known:
            family = model_card(entry).family
            out.append(StudyModel(entry, family, _depth(entry)))
        elif entry in families:
            if not config.depths:
                raise ValueError(f"{entry} is a family, and depths (--depths) is empty: give its depths, e.g. "
                                 f"--depths 20,56, or full names such as {entry}20")
            members = registry_names(entry)
            for depth in config.depths:
                name = f"{entry}{depth}"
                if name not in members:
                    valid = sorted(int(n.removeprefix(entry)) for n in members if n.removeprefix(entry).isdigit())
                    raise ValueError(f"{entry} has no depth {depth} (valid depths: {valid})")
                out.append(StudyModel(name, entry, depth))
        else:
            raise ValueError(
                f"unknown model or family {entry!r}{closest_names(entry, known + sorted(families))}; "
                f"use a family such as cifar_plain / cifar_resnet with --depths, or a name from `jaxres models`"
            )
    return list(dict.fromkeys(out))


def model_names(config: StudyConfig) -> list[str]:
    """Registry names of the study, in order."""
    return [m.name for m in study_models(config)]
