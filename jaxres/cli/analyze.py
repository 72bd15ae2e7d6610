"""`jaxres analyze`: the plain-vs-residual gradient-propagation study (see jaxres.analysis.study).

Writes results.json (every per-unit number), norms.png, loss_grads.png, spectra.png,
singular_values.png (exact spectra of d logits/d h), unit_spectra.png (exact unit spectra,
when requested) and table.txt into --out; nothing is
written until the study has finished, and each file is written to a temporary name and
renamed, so an error leaves no partial file behind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _list(text: str, cast=str) -> tuple:
    items = [t for t in text.replace(",", " ").split() if t]
    try:
        return tuple(cast(t) for t in items)
    except ValueError:
        raise ValueError(f"expected a comma-separated list of {cast.__name__}s, got {text!r}") from None


def check_output_dir(directory, option: str = "--out", expected: str = "a directory") -> Path:
    """Refuses, before any work, an output directory that could not be created or written at
    the end: an existing file, a path under a file, a directory without write permission."""
    directory = Path(directory)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == directory else f"is under {existing}, which is a file"
        raise NotADirectoryError(f"{option} {directory} {where}; {option} must be {expected}: choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        action = "write into" if existing == directory else f"create it in {existing}"
        raise PermissionError(f"{option} {directory}: no permission to {action}; choose a writable path")
    return directory


DEFAULT_MODELS = "cifar_plain,cifar_resnet"


def trained_as(checkpoint) -> dict:
    """For a `jaxres train` workdir (or its checkpoints), the study settings that rebuild the
    model as it was trained: its registry name, norm, activation and input channels, from the
    config stored in the checkpoint ({} for other checkpoints, or a model not in the registry)."""
    from jaxres.data import dataset_spec
    from jaxres.workdir import find_checkpoint, is_workdir_layout

    if not is_workdir_layout(checkpoint):
        return {}
    workdir, kind, step = find_checkpoint(checkpoint)
    with workdir:
        stored = workdir.stored_json(step, "config", kind)
    overrides = stored.get("model_overrides") or {}
    if stored.get("model") in ("ResNet", "VGG"):
        return {}
    return {"models": stored["model"], "norm": overrides.get("norm", "batchnorm"),
            "activation": overrides.get("activation", "relu"),
            "in_channels": overrides.get("in_channels", dataset_spec(stored["dataset"]).channels)}


def run(args) -> int:
    from jaxres.analysis import plots, report
    from jaxres.analysis.study import StudyConfig, run_study
    from jaxres.files import write_text_atomic

    out = check_output_dir(args.out)  # before the study, which may take an hour
    trained = trained_as(args.checkpoint) if args.checkpoint else {}
    config = StudyConfig(
        models=_list(args.models or trained.get("models", DEFAULT_MODELS)), depths=_list(args.depths, int),
        norms=_list(args.norm or trained.get("norm", "batchnorm,none")),
        activations=_list(args.activation or trained.get("activation", "relu,tanh")), bns=_list(args.bn),
        batch_size=args.batch_size, method=args.method, seed=args.seed, num_probes=args.num_probes,
        jacobian_units=args.jacobian_units, spectrum_max_dim=args.spectrum_max_dim,
        in_channels=args.in_channels or trained.get("in_channels", 3),
    )
    variables_for = None
    if args.checkpoint:
        from jaxres.analysis.restore import check_variables, restore_variables

        restored = restore_variables(args.checkpoint)
        variables_for = lambda name, model, x: check_variables(model, restored, x, name)  # noqa: E731
    start = time.perf_counter()
    results = run_study(config, variables_for=variables_for, progress_bar=not args.no_progress,
                        workers=args.workers)
    results["checkpoint"] = str(args.checkpoint) if args.checkpoint else None
    results["seconds"] = time.perf_counter() - start
    table = report.format_table(results)
    report.write_results(results, out / "results.json")
    plots.plot_norms(results, out / "norms.png", "logit_jac")
    plots.plot_norms(results, out / "loss_grads.png", "loss_grad")
    plots.plot_spectra(results, out / "spectra.png")
    exact = plots.plot_exact_spectra(results, out / "singular_values.png")
    units = plots.plot_exact_spectra(results, out / "unit_spectra.png", source="unit")
    write_text_atomic(out / "table.txt", table + "\n")
    print(table)
    print(f"\n{len(results['runs'])} runs in {results['seconds']:.0f} s; wrote results.json, norms.png, "
          f"loss_grads.png, spectra.png, {'singular_values.png, ' if exact else ''}"
          f"{'unit_spectra.png, ' if units else ''}table.txt to {out}/")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="exact gradient-propagation study: plain vs residual twins at initialization",
        description="Measures, at every unit boundary of plain and residual twins, the exact end-to-end "
        "Jacobian ||d logits/d h_l|| and loss gradient, per-unit Jacobian norms (Frobenius exact or "
        "Hutchinson with 95%% intervals, spectral norm by Lanczos), forward response stds and "
        "shattered-gradient correlations, on a fixed synthetic batch. Offline; no dataset.",
    )
    parser.add_argument("--models", default=None,
                        help=f"families combined with --depths, or full model names (default: {DEFAULT_MODELS}; "
                        f"with --checkpoint of a jaxres train workdir: the model it trained)")
    parser.add_argument("--depths", default="20,56,110", help="depths for the families (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="synthetic inputs per model (default: 4)")
    parser.add_argument("--method", default="auto", choices=("auto", "exact", "estimate"),
                        help="per-unit Frobenius norms: exact (basis JVP/VJPs), estimate (Hutchinson), or "
                        "auto (exact when <= 256 products)")
    parser.add_argument("--bn", default="eval,batch",
                        help="BatchNorm policies: eval (running stats) and/or batch (batch stats); at "
                        "initialization eval-mode BN is the identity, i.e. the same as --norm none "
                        "(default: %(default)s)")
    parser.add_argument("--activation", default=None,
                        help="activations, e.g. relu,tanh (default: relu,tanh; with --checkpoint of a workdir: "
                        "the trained one)")
    parser.add_argument("--norm", default=None, help="normalizations (default: batchnorm,none; with --checkpoint of "
                        "a workdir: the trained one)")
    parser.add_argument("--in-channels", type=int, default=None,
                        help="image channels of the models (default: 3; with --checkpoint of a workdir: its dataset's)")
    parser.add_argument("--seed", type=int, default=0, help="initialization/input/probe seed (default: 0)")
    parser.add_argument("--num-probes", type=int, default=8, help="Hutchinson probes per unit (default: 8)")
    parser.add_argument("--jacobian-units", type=int, default=4,
                        help="per-unit Jacobians on this many evenly spaced units per model, 0 = all (default: 4; "
                        "all units of the full grid take well over 10 min on 2 CPU cores)")
    parser.add_argument("--spectrum-max-dim", type=int, default=0,
                        help="exact SVD spectrum of each model's last shape-keeping unit if its input has "
                        "<= this many values per example, e.g. 4096 for the 8x8x64 stage-3 units (30-60 s "
                        "per unit on 2 CPU cores); 0 = none (default: 0)")
    parser.add_argument("--out", default="runs/analyze", help="output directory (default: %(default)s)")
    parser.add_argument("--checkpoint", default=None,
                        help="orbax checkpoint directory with 'params' (+ 'batch_stats') to analyze trained "
                        "variables instead of the initialization (see jaxres.analysis.restore)")
    parser.add_argument("--workers", type=int, default=None,
                        help="settings measured concurrently, one thread each (default: the number of CPU cores, "
                        "at most the number of settings); the numbers do not depend on it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
