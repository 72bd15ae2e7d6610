"""Signal-propagation plots (Brock, De & Smith 2021, arXiv 2101.08692, Fig. 1) and the
branch/skip variance ratio of residual blocks (De & Smith 2020, arXiv 2002.10444).

For every unit of a model on one NHWC batch, from the unit interface only:

- `mean_sq`: the average channel squared mean of the unit's output, mean_c (mean_{n,h,w} y)^2;
- `variance`: the average channel variance of the unit's output, mean_c var_{n,h,w} y;
- `branch_variance`: for identity-shortcut units (shape-keeping, recognized numerically as
  output = act(h + last probe) or h + last probe: `segments.identity_unit`), the average channel variance of the
  residual branch's output (the last layer probe); NaN elsewhere;
- `skip_variance`: the same for the skip path (the unit's input h); `branch_skip_ratio` =
  branch / skip. De & Smith 2020: BatchNorm on the branch of a pre-activation block keeps
  its variance ~1 while the skip path accumulates all earlier branches, so the ratio falls
  like 1 / depth: BN biases residual blocks towards the identity.

All statistics are exact over the batch (N x H x W values per channel), in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis.segments import SegmentCache, check_bn, identity_unit, last_probe
from jaxres.analysis.stages import unit_places


@dataclasses.dataclass(frozen=True)
class SignalPropagation:
    """Per-unit statistics (arrays of length `len(units)`, stem first, head excluded)."""

    units: tuple
    kinds: tuple  # "stem" | "transition" | "shape-keeping" (see `stages.unit_places`)
    mean_sq: np.ndarray
    variance: np.ndarray
    branch_variance: np.ndarray
    skip_variance: np.ndarray
    identity_shortcut: np.ndarray  # bool: the unit adds its input to its branch

    @property
    def branch_skip_ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.branch_variance / self.skip_variance

    def as_dict(self) -> dict:
        return {"units": list(self.units), "kinds": list(self.kinds), "mean_sq": self.mean_sq.tolist(),
                "variance": self.variance.tolist(), "branch_variance": self.branch_variance.tolist(),
                "skip_variance": self.skip_variance.tolist(), "branch_skip_ratio": self.branch_skip_ratio.tolist(),
                "identity_shortcut": self.identity_shortcut.tolist()}


def channel_stats(y) -> tuple[jax.Array, jax.Array]:
    """(average channel squared mean, average channel variance) of an NHWC (or NC) array."""
    y = y.astype(jnp.float32).reshape(-1, y.shape[-1])
    return jnp.mean(jnp.square(jnp.mean(y, 0))), jnp.mean(jnp.var(y, 0))


def _build_signal(fn, capture_fn):
    """Segment op: (cvars, h) -> (output, {"out": stats, "skip": stats, and for a shape-keeping
    unit with layer probes "branch": stats and "sum": h + branch (for `identity_unit`)})."""

    def signal(cvars, h):
        out, probes = capture_fn(cvars, h)
        stats = {"out": channel_stats(out), "skip": channel_stats(h)}
        if probes and out.shape == h.shape:
            branch = last_probe(probes)
            stats["branch"] = channel_stats(branch)
            stats["sum"] = h + branch
        return out, stats

    return signal


def signal_propagation(model, variables, x, *, bn: str = "batch",
                       cache: SegmentCache | None = None) -> SignalPropagation:
    """Channel statistics of every unit's output (stem to the last unit before the head) on
    the NHWC batch `x`; `bn` as in `segments` ("batch": train-mode statistics, the setting of
    Brock et al.'s plots at initialization)."""
    check_bn(bn)
    cache = SegmentCache() if cache is None else cache
    segments = cache.segments(model, variables, x.shape, bn, x.dtype)
    places = unit_places(segments)
    h = x
    rows = []
    for seg in segments[:-1]:
        out, stats = seg.op("signal", _build_signal)(seg.cvars, h)
        identity = "branch" in stats and identity_unit(out, stats["sum"])
        rows.append((float(stats["out"][0]), float(stats["out"][1]),
                     float(stats["branch"][1]) if identity else np.nan,
                     float(stats["skip"][1]) if identity else np.nan, identity))
        h = out
    mean_sq, variance, branch, skip, identity = (np.array(c) for c in zip(*rows))
    return SignalPropagation(tuple(s.name for s in segments[:-1]), tuple(p.kind for p in places[:-1]),
                             mean_sq, variance, branch, skip, identity.astype(bool))


def plot_signal_propagation(results: dict, path, title: str = "Signal propagation at initialization"):
    """Brock et al. 2021 Fig. 1: average channel squared mean, average channel variance and
    the residual branch's variance per unit (log scale), one line per `{label: SignalPropagation}`;
    a fourth panel draws De & Smith's branch/skip variance ratio."""
    from jaxres.analysis.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    panels = (("mean_sq", "avg channel squared mean"), ("variance", "avg channel variance"),
              ("branch_variance", "residual branch variance"), ("branch_skip_ratio", "branch / skip variance"))
    for ax, (field, label) in zip(axes, panels):
        for index, (name, sp) in enumerate(results.items()):
            values = np.asarray(getattr(sp, field), float)
            if np.isfinite(values).any():  # one colour per net in every panel, even where one is absent
                ax.plot(np.arange(len(values)), values, marker=".", label=name, color=f"C{index}")
        ax.set_yscale("log")
        ax.set_xlabel("unit (0 = stem)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)
