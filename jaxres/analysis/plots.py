"""PNG plots of a study: gradient norms vs unit index (plain vs residual, one curve per depth)
and histograms of per-unit spectral quantities. Matplotlib with the Agg backend, no display."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from jaxres.analysis.report import atomic_write


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(setting: dict) -> str:
    norm = f"BN ({setting['bn']} stats)" if setting["norm"] == "batchnorm" else "no normalization"
    return f"{norm}, {setting['activation']}"


def _by_setting(results):
    groups = defaultdict(list)
    for run in results["runs"]:
        groups[tuple(sorted(run["setting"].items()))].append(run)
    return groups


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    return path


def plot_norms(results: dict, path, quantity: str = "logit_jac") -> Path:
    """Median ||d logits / d h_l||_F (or `loss_grad`) vs unit index, log scale; one panel per
    setting, solid = residual, dashed = plain, one colour per depth."""
    plt = _figure()
    groups = _by_setting(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    depths = sorted({run["depth"] for run in results["runs"]})
    colours = dict(zip(depths, plt.cm.viridis(np.linspace(0.0, 0.85, max(len(depths), 1)))))
    for ax, (key, runs) in zip(axes[0], groups.items()):
        for run in runs:
            values = [u[quantity]["median"] for u in run["units"]]
            ax.semilogy(range(len(values)), values, ls="-" if run["residual"] else "--",
                        color=colours[run["depth"]], label=run["model"])
        ax.set_title(_label(dict(key)), fontsize=9)
        ax.set_xlabel("unit index (0 = stem input = image)")
        ax.grid(alpha=0.3, which="both")
    ylabel = {"logit_jac": "median ||d logits / d h_l||_F", "loss_grad": "median ||dL / d h_l||"}[quantity]
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("At initialization: solid = residual, dashed = plain", fontsize=10)
    return _save(fig, Path(path))


def plot_spectra(results: dict, path) -> Path:
    """Histograms of per-unit sigma_max(J_l) and sqrt(mean squared singular value) of the
    inner units, plain vs residual, one panel per setting (all depths pooled)."""
    plt = _figure()
    groups = _by_setting(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    for ax, (key, runs) in zip(axes[0], groups.items()):
        for residual, colour in ((False, "tab:red"), (True, "tab:blue")):
            sig = [s for run in runs if run["residual"] == residual for u in run["units"]
                   if u["jacobian"] and u["name"] not in ("stem", "head")
                   for s in np.ravel(u["jacobian"]["spectral_norm"]["sigma"])]
            rms = [np.sqrt(m) for run in runs if run["residual"] == residual for u in run["units"]
                   if u["jacobian"] and u["name"] not in ("stem", "head")
                   for m in np.ravel(u["jacobian"]["mean_sq_singular_value"])]
            name = "residual" if residual else "plain"
            if sig:
                ax.hist(sig, bins=20, alpha=0.5, color=colour, label=f"{name}: sigma_max")
                ax.hist(rms, bins=20, alpha=0.9, color=colour, histtype="step", label=f"{name}: rms sigma")
        ax.set_title(_label(dict(key)), fontsize=9)
        ax.set_xlabel("singular value of a unit Jacobian")
    axes[0][-1].legend(fontsize=7)
    return _save(fig, Path(path))
