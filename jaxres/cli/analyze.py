"""`jaxres analyze`: the plain-vs-residual gradient-propagation study (see jaxres.analysis.study).

Writes results.json (every per-unit number), norms.png, loss_grads.png, gradient_scale.png,
spectra.png, singular_values.png (exact spectra of d z_i/d h_i), unit_spectra.png (exact unit
spectra, when requested) and table.txt into --out; nothing is written until the study has
finished, and each file is written to a temporary name and renamed, so an error leaves no
partial file behind. The settings run concurrently, one thread each, with a progress bar.
"""

from __future__ import annotations

import threading

from jaxres.cli.paths import check_output_dir


def _list(text: str, cast=str) -> tuple:
    items = [t for t in text.replace(",", " ").split() if t]
    try:
        return tuple(cast(t) for t in items)
    except ValueError:
        raise ValueError(f"expected a comma-separated list of {cast.__name__}s, got {text!r}") from None


DEFAULT_MODELS = "cifar_plain,cifar_resnet,preact_resnet110"


class Progress:
    """A tqdm bar that several setting threads update (its total grows as groups are found);
    called as `study.Progress`: `(description, done, new_steps)`."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, disable=not enabled, desc="analyze", unit="step")
        self._lock = threading.Lock()

    def __call__(self, description: str, done: int, new_steps: int) -> None:
        with self._lock:
            if description:
                self._bar.set_description(f"analyze {description}")
            self._bar.total += new_steps
            self._bar.update(done)

    def close(self):
        self._bar.close()


def run(args) -> int:
    from jaxres.analysis import plots, report, study
    from jaxres.analysis import quantities as q
    from jaxres.analysis.restore import study_settings
    from jaxres.files import write_text_atomic

    out = check_output_dir(args.out)  # before the study, which may take an hour
    trained = study_settings(args.checkpoint) if args.checkpoint else {}

    def given(option, default):  # given empty (or 0), it stays so, for StudyConfig to refuse
        return default if option is None else option

    config = study.StudyConfig(
        models=_list(given(args.models, trained.get("models", DEFAULT_MODELS))), depths=_list(args.depths, int),
        norms=_list(given(args.norm, trained.get("norm", "batchnorm,none"))),
        activations=_list(given(args.activation, trained.get("activation", "relu,tanh"))), bns=_list(args.bn),
        batch_size=args.batch_size, method=args.method, seed=args.seed, num_probes=args.num_probes,
        jacobian_units=args.jacobian_units, spectrum_max_dim=args.spectrum_max_dim,
        in_channels=given(args.in_channels, trained.get("in_channels", 3)), float64=args.float64,
    )
    variables_for = None
    if args.checkpoint:
        from jaxres.analysis.restore import check_variables, restore_variables

        restored = restore_variables(args.checkpoint)
        variables_for = lambda name, model, x: check_variables(model, restored, x, name)  # noqa: E731
    progress = Progress(study.total_steps(config), not args.no_progress)
    try:
        results = study.run_study(config, variables_for=variables_for, on_progress=progress, workers=args.workers)
    finally:
        progress.close()
    results.checkpoint = str(args.checkpoint) if args.checkpoint else None
    payload = results.to_json()
    table = report.format_table(payload)
    report.write_results(payload, out / "results.json")
    for name, quantity in (("norms.png", q.LOGIT_JAC), ("loss_grads.png", q.LOSS_GRAD),
                           ("gradient_scale.png", q.GRADIENT_SCALE)):
        plots.plot_norms(payload, out / name, quantity.key)
    plots.plot_spectra(payload, out / "spectra.png")
    exact = plots.plot_exact_spectra(payload, out / "singular_values.png")
    units = plots.plot_exact_spectra(payload, out / "unit_spectra.png", source="unit")
    write_text_atomic(out / "table.txt", table + "\n\n" + report.table_legend(payload) + "\n")
    print(table)
    draws = report.weight_draws(payload)
    drawn = "weight draws that differ by measurement" if draws is None else \
        f"{draws} weight draw{'s' if draws != 1 else ''} (seed {config.seed}) per measurement"
    print(f"\nStage rates: {drawn}, beside the mean field's predictions (tolerances are for means over >= 4 "
          f"draws).")
    print(f"{len(results.measurements)} measurements in {results.seconds:.0f} s; wrote results.json, norms.png, "
          f"loss_grads.png, gradient_scale.png, spectra.png, {'singular_values.png, ' if exact else ''}"
          f"{'unit_spectra.png, ' if units else ''}table.txt to {out}/")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="exact gradient-propagation study: plain vs residual twins at initialization",
        description="Measures, at every unit boundary of plain and residual twins, the exact end-to-end "
        "Jacobian per example ||d z_i/d h_i|| (and, with batch statistics, the summed rows "
        "||sum_j d z_j/d h_i||), the gradient scale coefficient and the loss gradient; per-stage growth "
        "rates; per-unit Jacobian norms (Frobenius exact or Hutchinson with 95% intervals, spectral norm "
        "by Lanczos), forward response stds and shattered-gradient correlations, on a fixed synthetic "
        "batch. Offline; no dataset.",
    )
    parser.add_argument("--models", default=None,
                        help=f"families combined with --depths, or full model names (default: {DEFAULT_MODELS}; "
                        f"with --checkpoint of a jaxres train workdir: the model it trained)")
    parser.add_argument("--depths", default="20,56,110", help="depths for the families (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="synthetic inputs per model (default: 4)")
    parser.add_argument("--method", default="auto", choices=("auto", "exact", "estimate"),
                        help="per-unit Frobenius norms: exact (basis JVP/VJPs), estimate (Hutchinson), or "
                        "auto (exact when <= 256 products)")
    parser.add_argument("--bn", default="batch",
                        help="BatchNorm policies: batch (batch statistics, as in training) and/or eval (running "
                        "statistics: a checkpoint's, or at initialization statistics calibrated on the study's "
                        "inputs) (default: %(default)s)")
    parser.add_argument("--activation", default=None,
                        help="activations, e.g. relu,tanh (default: relu,tanh; with --checkpoint of a workdir: "
                        "the trained one)")
    parser.add_argument("--norm", default=None, help="normalizations (default: batchnorm,none; with --checkpoint of "
                        "a workdir: the trained one)")
    parser.add_argument("--in-channels", type=int, default=None,
                        help="image channels of the models (default: 3; with --checkpoint of a workdir: its dataset's)")
    parser.add_argument("--seed", type=int, default=0, help="initialization/input/probe seed (default: 0)")
    parser.add_argument("--num-probes", type=int, default=8, help="Hutchinson probes per unit (default: 8)")
    parser.add_argument("--jacobian-units", type=int, default=1,
                        help="per-unit Jacobians on this many evenly spaced shape-keeping units per stage, 0 = every "
                        "unit (default: 1; every unit of the full grid takes well over 10 min on 2 CPU cores)")
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
    parser.add_argument("--float64", action="store_true",
                        help="measure in float64 (jax_enable_x64 within the study; about twice the time on a CPU): "
                        "deep plain nets with batch statistics amplify float32 rounding")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
