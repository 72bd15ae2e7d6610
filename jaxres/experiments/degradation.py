"""The degradation experiment (He et al. 2015, arXiv 1512.03385, Fig. 1 and 6) on Fashion-MNIST,
with gradient propagation measured during training.

`run_degradation(OUT)` trains each model of the grid with the recipe
`experiments/configs/degradation.py` by `jaxres.train.train_and_evaluate`, one after the other
in this process, each in its own ordinary `jaxres train` workdir `OUT/runs/<model>`: rerunning
resumes an interrupted run and skips a finished one. After each run it rewrites the figures,
results.md and results.json in OUT (`degradation_plots.write_outputs`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jaxres.experiments import degradation_plots

RECIPE = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "degradation.py"
MODELS = ("cifar_plain20", "cifar_plain56", "cifar_resnet20", "cifar_resnet56")
QUICK_MODELS = ("cifar_plain8", "cifar_plain20", "cifar_resnet8", "cifar_resnet20")
QUICK_STEPS = 160
DATASET = "fashion_mnist"
DEBIAN_IDX_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def recipe(model: str, num_steps: int | None = None):
    """The config of one run: `get_config("MODEL[,NUM_STEPS]")` of the recipe file."""
    from jaxres.train import load_config

    if not RECIPE.is_file():
        raise FileNotFoundError(f"the degradation recipe {RECIPE} is missing; run from a jaxres source checkout")
    config = load_config(f"{RECIPE}:{model}" + (f",{num_steps}" if num_steps else ""))
    config.progress_bar = sys.stderr.isatty()
    return config


def ensure_dataset(data_dir: str, report=print) -> str:
    """The data dir holding Fashion-MNIST; imports Debian's IDX files into it when it has none."""
    from jaxres.data import sources

    data_dir = data_dir or sources.default_data_dir()
    if sources.prepared_dir(DATASET, data_dir) is not None:
        return data_dir
    if not (DEBIAN_IDX_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise FileNotFoundError(f"dataset {DATASET!r} is not prepared in {data_dir}; "
                                f"{sources.how_to_prepare(DATASET, data_dir)}")
    from jaxres.data.importer import import_idx

    report(f"importing {DATASET} from {DEBIAN_IDX_DIR} into {data_dir}")
    import_idx(DATASET, DEBIAN_IDX_DIR, data_dir)
    return data_dir


def finished_step(workdir) -> int | None:
    """The step of the last evaluation in `workdir`'s metrics.jsonl (the loop evaluates at the
    end of every run), or None."""
    from jaxres.files import read_jsonl

    steps = [r["step"] for r in read_jsonl(Path(workdir) / "metrics.jsonl") if r.get("split") == "eval"]
    return max(steps) if steps else None


def check_same_length(workdir: Path, num_steps: int) -> None:
    """Refuses to continue a run planned with another number of steps: its schedule differs."""
    saved = workdir / "config.json"
    if saved.is_file():
        before = json.loads(saved.read_text()).get("num_steps")
        if before != num_steps:
            raise ValueError(f"{workdir} holds a run of {before} steps, not {num_steps}; rerun with "
                             f"--num-steps {before}, or choose another --out")


def run_degradation(out_dir, *, models=MODELS, quick: bool = False, num_steps: int | None = None,
                    plot_only: bool = False, data_dir: str = "", report=print) -> dict:
    """Trains `models` (default: plain and residual nets of depth 20 and 56) on Fashion-MNIST
    with one recipe, then writes OUT/degradation_errors.png, gradient_heatmaps.png,
    gradient_ratio.png, response_std.png, results.md and results.json; returns the results.

    quick=True: depths 8 and 20 (unless `models` is given) for QUICK_STEPS steps, minutes on a
    laptop CPU. `num_steps` overrides the recipe's length. The outputs cover every run under
    OUT/runs, finished or partial; plot_only=True trains nothing and only writes them."""
    out = Path(out_dir)
    if quick and models == MODELS:
        models = QUICK_MODELS
    num_steps = num_steps or (QUICK_STEPS if quick else None)
    results = None
    if plot_only:
        if not (out / "runs").is_dir():
            raise FileNotFoundError(f"{out / 'runs'} does not exist: nothing to plot; train first (without --plot-only)")
    else:
        configs = {m: recipe(m, num_steps) for m in models}  # bad names fail before anything runs
        data_dir = ensure_dataset(data_dir, report)
        for i, (model, config) in enumerate(configs.items()):
            config.data_dir = data_dir
            stopped = train_one(out, model, config, f"{i + 1}/{len(models)}", report)
            results = degradation_plots.write_outputs(out)  # figures so far, after every run
            if stopped:
                report(f"stopped by SIGTERM during {model}; rerun the same command to continue")
                break
    results = results or degradation_plots.write_outputs(out)
    report(degradation_plots.markdown_table(results))
    report(f"wrote {', '.join(degradation_plots.OUTPUTS)} to {out}/")
    return results


def train_one(out: Path, model: str, config, position: str, report) -> bool:
    """Trains one run in OUT/runs/<model> unless it has finished; appends the invocation's wall
    time to OUT/runs/wall_time.jsonl. Returns True when SIGTERM stopped it."""
    from jaxres.train import train_and_evaluate

    workdir = out / "runs" / model
    check_same_length(workdir, config.num_steps)
    done = finished_step(workdir)
    if done is not None and done >= config.num_steps:
        report(f"[{position}] {model}: finished ({done} steps) in {workdir}; not retrained")
        return False
    report(f"[{position}] {model}: training {config.num_steps} steps in {workdir}"
           + (f" (resuming; last evaluation at step {done})" if done is not None else ""))
    summary = train_and_evaluate(config, workdir, report=report)
    record = {"model": model, "time": round(time.time(), 3), "step": summary["step"],
              "wall_time_s": round(summary["wall_time_s"], 3), "stopped": summary["stopped"]}
    with open(out / "runs" / degradation_plots.WALL_TIME_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    return summary["stopped"]
