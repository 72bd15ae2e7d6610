"""The trained twins (issue 22): lesions, loss landscapes, sharpness, Jacobian spectra and (the
residual nets) the gradient by path length of the degradation grid's trained nets, run as
`jaxres experiment twins`.

The nets are seed 0 of the degradation baseline (cifar_plain20/56, cifar_resnet20/56 on
Fashion-MNIST), exported with their training config as weights files
(`experiments/results/twins/weights/NET.safetensors`, `jaxres inspect export`), so everything
reruns from the repository alone: `TrainedNet` rebuilds the model, the data and the
initialization from the file. Each analysis writes OUT/NET/ANALYSIS.json (the two BatchNorm
controls OUT/NET/bn_batch/ANALYSIS.json) exactly as `jaxres inspect ANALYSIS` would with the
arguments in `ANALYSES`; then `trained_twins_plots.write_outputs` draws the figures and
tables.md from every JSON file present under OUT.

Wall time on the shared 2-core CPU (load 4-7; experiments/results/twins/tables.md): from under a
minute (cifar_resnet20's sharpness) to 14 minutes (cifar_plain56's spectra) per analysis and net,
about 1.6 hours for lesion, landscape, sharpness and spectrum of all four nets; the gradient paths
of the two residual nets 51 s and 132 s (load 12-14); `--plot-only` takes seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

from jaxres.experiments import trained_twins_plots
from jaxres.experiments.degradation import DATASET, ensure_dataset

NETS = trained_twins_plots.NETS
WEIGHTS_DIR = Path("experiments/results/twins/weights")

# name: (the TrainedNet method, the subdirectory of OUT/NET it writes into, its arguments); the
# rest as `jaxres inspect`'s defaults (seed 0, batches of 250 images)
ANALYSES = {
    "lesion": ("lesion", "", {"images": 2000, "draws": 5}),  # ks 1 .. min(10, units)
    "landscape": ("landscape", "", {"grid": "-1:1:15", "path_grid": "-0.25:1.25:13", "images": 500}),
    "sharpness": ("sharpness", "", {"init": True, "tol": 1e-3, "max_iter": 100}),  # the monitor's probe batch
    "spectrum": ("spectrum", "", {"init": True, "images": 2, "num_matvecs": 64, "num_probes": 8}),
    "paths": ("paths", "", {"images": 128, "batch_size": 16, "draws": 1}),  # test images; residual nets only
    # controls: BatchNorm recomputes its statistics on each batch of 250 images
    "lesion_bn_batch": ("lesion", "bn_batch", {"images": 2000, "draws": 5, "bn": "batch"}),
    "landscape_bn_batch": ("landscape", "bn_batch", {"grid": "-1:1:15", "path_grid": "-0.25:1.25:13",
                                                     "images": 500, "bn": "batch"}),
}
DEFAULT_ANALYSES = ("lesion", "landscape", "sharpness", "spectrum", "paths")
# analyses defined for some nets only: a plain net has no paths through residual branches
ONLY_FOR = {"paths": ("cifar_resnet20", "cifar_resnet56")}


def _checked(names, valid, what: str) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; valid: {', '.join(valid)}" if unknown
                         else f"nothing to run: name one or more {what} of {', '.join(valid)}")
    return names


def _method_arguments(options: dict) -> dict:
    """The `TrainedNet` method's keywords for an `ANALYSES` entry (grids parsed)."""
    from jaxres.analysis.landscape import parse_axis

    return {k: parse_axis(v, k) if k in ("grid", "path_grid") else v for k, v in options.items()}


def run_twins(out_dir, *, nets=NETS, analyses=DEFAULT_ANALYSES, weights_dir=WEIGHTS_DIR, plot_only: bool = False,
              data_dir: str = "", report=print) -> None:
    """Runs `analyses` (names of `ANALYSES`) on each of `nets` from WEIGHTS_DIR/NET.safetensors,
    writing OUT/NET[/bn_batch]/ANALYSIS.json, then the figures and tables.md into OUT
    (`trained_twins_plots.write_outputs`, over every JSON file under OUT). plot_only=True runs
    nothing and only redraws. Every name and weights file is checked before any work."""
    out = Path(out_dir)
    if plot_only:
        if not any((out / net).is_dir() for net in NETS):
            raise FileNotFoundError(f"{out} holds no results of the trained twins ({', '.join(NETS)}): nothing to "
                                    f"plot; run the analyses first (without --plot-only)")
    else:
        nets = _checked(nets, NETS, "nets")
        analyses = _checked(analyses, tuple(ANALYSES), "analyses")
        files = {net: Path(weights_dir) / f"{net}.safetensors" for net in nets}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"no weights file {', '.join(missing)}; pass --weights DIR, the directory of "
                                    f"NET.safetensors (`jaxres inspect export` writes one from a training run)")
        from jaxres.train.trained_net import TrainedNet

        for net_name, path in files.items():
            net = TrainedNet(path, data_dir)
            if net.config.dataset == DATASET:  # the grid's: import Debian's Fashion-MNIST files where it is missing
                net.config.data_dir = ensure_dataset(net.config.data_dir, report)
            for name in analyses:
                if net_name not in ONLY_FOR.get(name, (net_name,)):
                    report(f"== {net_name} {name}: skipped (only for {', '.join(ONLY_FOR[name])})")
                    continue
                method, subdirectory, options = ANALYSES[name]
                report(f"== {net_name} {name}")
                start = time.perf_counter()
                result = getattr(net, method)(**_method_arguments(options))
                seconds = time.perf_counter() - start
                directory = out / net_name / subdirectory
                directory.mkdir(parents=True, exist_ok=True)
                written = net.write_result(directory, method, result, seconds=seconds,
                                           arguments={"experiment": "twins", "analysis": name, **options})
                report(f"{name} of {net_name} in {seconds:.0f} s; wrote {written}")
    written = trained_twins_plots.write_outputs(out)
    report(f"wrote {', '.join(p.name for p in written)} to {out}/")
