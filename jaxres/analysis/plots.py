"""PNG plots of a study: gradient norms vs unit index (plain vs residual, one curve per depth),
histograms of per-unit spectral quantities, and histograms of exact singular values
(dynamical isometry). Matplotlib with the Agg backend, no display."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxres.analysis import quantities as q
from jaxres.files import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(setting: dict) -> str:
    norm = f"BN ({setting['bn']} stats)" if setting["norm"] == "batchnorm" else "no normalization"
    return f"{norm}, {setting['activation']}"


def _by_setting(results):
    groups = defaultdict(list)
    for measurement in results["measurements"]:
        groups[tuple(sorted(measurement["setting"].items()))].append(measurement)
    return groups


def _style(measurement) -> str:
    """Line style: dashed plain, solid residual (post-activation), dash-dot pre-activation."""
    if not measurement["residual"]:
        return "--"
    return "-." if "preact" in measurement["family"] else "-"


def _theory_line(ax, measurement, values, colour) -> bool:
    """Dotted: each stage's predicted rate, drawn from the measured norm at the stage's end
    back over its shape-keeping units; False when no stage has a prediction."""
    drawn = False
    index = {u["name"]: i for i, u in enumerate(measurement["units"])}
    for stage in measurement["summary"][q.STAGES.key]:
        theory = stage.get(q.THEORY.key)
        if not theory:
            continue
        idx = [index[name] for name in stage["units"]]
        end = max(idx) + 1  # the input of the unit after the stage's last shape-keeping unit
        xs = np.arange(min(idx), end + 1)
        ax.semilogy(xs, values[end] * float(theory["rate"]) ** (end - xs), ls=":", lw=1.2, color=colour)
        drawn = True
    return drawn


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Writes `fig` as a PNG through a temporary file and a rename, then closes it (pyplot keeps
    every open figure alive: code that plots again and again would pile them up)."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        fig.clf()
        pyplot().close(fig)
    return path


def plot_norms(results: dict, path, quantity: str = q.LOGIT_JAC.key) -> Path:
    """Median ||d z_i / d h_i||_F (or another per-example quantity of the study's units:
    `loss_grad`, `gradient_scale`; `quantities.OVER_EXAMPLES`) vs unit index, log scale;
    one panel per setting, solid = residual, dashed = plain, dash-dot = pre-activation, one
    colour per depth; dotted: the theory's per-stage rates (`logit_jac`, where predicted)."""
    plt = pyplot()
    groups = _by_setting(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    depths = sorted({m["depth"] or 0 for m in results["measurements"]})
    colours = dict(zip(depths, plt.cm.viridis(np.linspace(0.0, 0.85, max(len(depths), 1)))))
    theory = False
    for ax, (key, measurements) in zip(axes[0], groups.items()):
        for m in measurements:
            values = np.array([u[quantity]["median"] for u in m["units"]], np.float64)
            colour = colours[m["depth"] or 0]
            ax.semilogy(range(len(values)), values, ls=_style(m), color=colour, label=m["model"])
            if quantity == q.LOGIT_JAC.key:
                theory |= _theory_line(ax, m, values, colour)
        ax.set_title(_label(dict(key)), fontsize=9)
        ax.set_xlabel("unit index (0 = stem input = image)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel(f"median {q.quantity(quantity).label()}")
    axes[0][-1].legend(fontsize=7, loc="best")
    draws = {m["summary"].get(q.WEIGHT_DRAWS.key, 1) for m in results["measurements"]}
    drawn = f"{draws.pop()} weight draw(s) per curve" if len(draws) == 1 else "weight draws differ"
    note = ", dotted = mean-field stage rates (whole net)" if theory else ""
    fig.suptitle(f"Solid = residual, dashed = plain, dash-dot = pre-activation{note}; {drawn}", fontsize=10)
    return save_figure(fig, Path(path))


def plot_spectra(results: dict, path) -> Path:
    """Histograms of per-unit sigma_max(J_l) and sqrt(mean squared singular value) of the
    inner units, plain vs residual, one panel per setting (all depths pooled)."""
    plt = pyplot()
    groups = _by_setting(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (key, measurements) in zip(axes[0], groups.items()):
        for residual, colour in ((False, "tab:red"), (True, "tab:blue")):
            units = [u[q.JACOBIAN.key] for m in measurements if m["residual"] == residual for u in m["units"]
                     if u[q.JACOBIAN.key] and u["kind"] in ("shape-keeping", "transition")]
            sig = [s for u in units for s in np.ravel(u["spectral_norm"]["sigma"])]
            rms = [np.sqrt(v) for u in units for v in np.ravel(u["mean_sq_singular_value"]["estimate"])]
            name = "residual" if residual else "plain"
            if sig:
                ax.hist(sig, bins=20, alpha=0.5, color=colour, label=f"{name}: sigma_max")
                ax.hist(rms, bins=20, alpha=0.9, color=colour, histtype="step", label=f"{name}: rms sigma")
        ax.set_title(_label(dict(key)), fontsize=9)
        ax.set_xlabel("singular value of a unit Jacobian")
    axes[0][-1].legend(fontsize=7)
    return save_figure(fig, Path(path))


def _spectrum_values(measurement, source: str) -> list[float]:
    if source == "unit":  # exact SVD of a unit's J (opt-in, see StudyConfig.spectrum_max_dim)
        return [v for u in measurement["units"] if q.SPECTRUM.key in u for v in u[q.SPECTRUM.key]["singular_values"]]
    # d z_i / d h_i at the input of unit_1, each example's values over its largest
    values = []
    for row in measurement["units"][1][q.LOGIT_JAC_SINGULAR_VALUES.key]:
        values.extend(np.asarray(row) / max(row[0], 1e-300))
    return values


def plot_exact_spectra(results: dict, path, source: str = "logits") -> Path | None:
    """Histograms of exact singular values, plain vs residual, one panel per setting, all
    depths pooled, log-spaced bins; None if the results hold none.

    source="logits": sigma_i / sigma_1 of d z_i / d h_i at unit_1's input (C values per
    example; 1 everywhere would be isometry). source="unit": the exact spectra of unit
    Jacobians (`unit_groups.exact_spectrum`, opt-in)."""
    groups = _by_setting(results)
    if not any(_spectrum_values(m, source) for ms in groups.values() for m in ms):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (key, measurements) in zip(axes[0], groups.items()):
        values = {residual: [v for m in measurements if m["residual"] == residual for v in _spectrum_values(m, source)]
                  for residual in (False, True)}
        positive = [v for vs in values.values() for v in vs if v > 0]
        if positive:
            low, high = max(min(positive), 1e-6 * max(positive)), max(positive)
            bins = np.geomspace(low, high * 1.001, 40)
            for residual, colour in ((False, "tab:red"), (True, "tab:blue")):
                if values[residual]:
                    ax.hist(np.clip(values[residual], low, None), bins=bins, alpha=0.5, color=colour,
                            label=f"{'residual' if residual else 'plain'} ({len(values[residual])} values)")
            ax.set_xscale("log")
        ax.set_title(_label(dict(key)), fontsize=9)
        ax.set_xlabel("sigma_i / sigma_1 of d logits / d h (unit_1 input)" if source == "logits"
                      else "exact singular value of a unit Jacobian")
    axes[0][0].set_ylabel("count")
    axes[0][-1].legend(fontsize=7)
    title = ("Exact spectra of d logits / d h at unit_1's input, at initialization" if source == "logits"
             else "Exact singular-value spectra of unit Jacobians at initialization")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, Path(path))
