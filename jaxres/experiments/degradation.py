"""The degradation experiment (He et al. 2015, arXiv 1512.03385, Fig. 1 and 6) on Fashion-MNIST,
with gradient propagation measured during training and interventions on the deep plain net.

`run_degradation(OUT)` trains every (condition, model, seed) of the grid (`plan`) with the
recipe `jaxres.configs.degradation` by `jaxres.train.train_and_evaluate`, one after
the other in this process, seed by seed (a partial grid holds whole seeds), each in its own
ordinary `jaxres train` workdir `OUT/runs/<condition>/<model>/seed<k>`: rerunning resumes an
interrupted run and skips a finished one. After each run it rewrites the figures,
results.md and results.json in OUT (`degradation_plots.write_outputs`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from jaxres.experiments import degradation_plots

MODELS = ("cifar_plain20", "cifar_plain56", "cifar_resnet20", "cifar_resnet56")
QUICK_MODELS = ("cifar_plain8", "cifar_plain14", "cifar_resnet8", "cifar_resnet14")
# skipinit (no BatchNorm, zero-init residual branches) is opt-in: --conditions ...,skipinit
CONDITIONS = ("baseline", "warmup", "equalized", "delta_orthogonal", "textbook")
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)
QUICK_STEPS = 48
# --quick evaluates at half-time and at the end, on 2,000 test and 2,000 training images, saves
# checkpoints only then, and measures gradients at the early steps and the end: the cuts that
# bring its 16 runs under 10 minutes on a 2-core CPU (docs/experiments.md has the measurement)
QUICK_EVALUATIONS, QUICK_TEST_EXAMPLES, QUICK_TRAIN_EVAL_EXAMPLES = 2, 2000, 2000
DATASET = "fashion_mnist"
DEBIAN_IDX_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


@dataclasses.dataclass(frozen=True, order=True)
class RunSpec:
    """One training run of the grid: `condition` applied to `model`, trained with `seed`."""

    seed: int
    condition: str
    model: str

    @property
    def name(self) -> str:
        """Its path under OUT/runs: condition/model/seed<k>."""
        return f"{self.condition}/{self.model}/seed{self.seed}"


def recipe(model: str, num_steps: int | None = None, condition: str = "baseline", seed: int = 0):
    """The config of one run: `get_config("MODEL,CONDITION[,NUM_STEPS]")` of the recipe, with `seed`."""
    from jaxres.train import load_config

    config = load_config(f"degradation:{model},{condition}" + (f",{num_steps}" if num_steps else ""))
    config.seed = seed
    config.progress_bar = sys.stderr.isatty()
    return config


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds`: "N" is N seeds (0 .. N-1); "a,b,c" (or "a," for one) is that list. A ValueError
    for an empty or repeated list, or a negative seed."""
    text = str(text).strip()
    if text.isdigit():
        if int(text) < 1:
            raise ValueError(f"--seeds N needs N >= 1 (N seeds: 0 .. N-1), got {text!r}")
        return tuple(range(int(text)))
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"--seeds is a count N (seeds 0 .. N-1) or a comma-separated list of seeds >= 0 "
                         f"(e.g. 0,1,2; one seed: 5,); got {text!r}")
    seeds = tuple(int(p) for p in parts)
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds lists seed {', '.join(map(str, repeated))} more than once: {text!r}")
    return seeds


def plan(models=MODELS, conditions=CONDITIONS, seeds=SEEDS) -> list[RunSpec]:
    """The grid: the baseline on every model; every other condition on the deepest plain model
    (conditions that need residual branches: the deepest residual model), with every seed;
    ordered seed by seed. Bad names and combinations raise a ValueError before anything runs."""
    from jaxres.configs import degradation as degradation_recipe  # its CONDITIONS and checks
    if not models:
        raise ValueError("--models is empty: name at least one cifar_plainD / cifar_resnetD model")
    if not conditions:
        raise ValueError(f"--conditions is empty: name at least one of {', '.join(degradation_recipe.CONDITIONS)}")
    for name in (*models, *conditions):
        if (models + conditions).count(name) > 1:
            raise ValueError(f"{name!r} is listed twice in --models / --conditions")
    parsed = {m: degradation_recipe.parse_model(m) for m in models}  # (residual, depth)
    runs = []
    for condition in conditions:
        if condition not in degradation_recipe.CONDITIONS:
            raise ValueError(f"unknown degradation condition {condition!r} (valid: "
                             f"{', '.join(degradation_recipe.CONDITIONS)})")
        if condition == "baseline":
            targets = list(models)
        else:
            residual = degradation_recipe.CONDITIONS[condition].models == "residual"
            candidates = [m for m in models if parsed[m][0] == residual]
            if not candidates:
                raise ValueError(f"condition {condition!r} runs on the deepest {'residual' if residual else 'plain'} "
                                 f"model of --models, and there is none in {', '.join(models)}")
            targets = [max(candidates, key=lambda m: parsed[m][1])]
        for model in targets:
            degradation_recipe.check_condition(condition, model)
            runs += [RunSpec(seed, condition, model) for seed in seeds]
    return sorted(runs, key=lambda r: (r.seed, conditions.index(r.condition), models.index(r.model)))


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


def progress(workdir: Path, config) -> tuple[bool, int | None]:
    """(finished, step of the latest checkpoint or None) of the run of `config` in `workdir`:
    finished when its final checkpoint and that step's records are on disk (`Workdir.finished`),
    not when an eval line says so (one is written just before the checkpoint it belongs to); or
    when only the small files of a finished run are there (`Workdir.finished_records_only`: the
    committed runs copied into a new OUT), the step then being `config.num_steps`."""
    from jaxres.workdir import Workdir

    if not workdir.is_dir():
        return False, None
    with Workdir(workdir) as wd:
        if wd.finished_records_only(config):
            return True, config.num_steps
        return wd.finished(config), wd.latest_step()


def check_same_length(workdir: Path, num_steps: int) -> None:
    """Refuses to continue a run planned with another number of steps: its schedule differs."""
    from jaxres.workdir import Workdir

    saved = Workdir(workdir).config_path if workdir.is_dir() else None
    if saved is not None and saved.is_file():
        before = json.loads(saved.read_text()).get("num_steps")
        if before != num_steps:
            raise ValueError(f"{workdir} holds a run of {before} steps, not {num_steps}; rerun with "
                             f"--num-steps {before}, or choose another --out")


def run_degradation(out_dir, *, models=MODELS, conditions=CONDITIONS, seeds=SEEDS, quick: bool = False,
                    num_steps: int | None = None, plot_only: bool = False, data_dir: str = "",
                    report=print) -> dict:
    """Trains the grid `plan(models, conditions, seeds)` on Fashion-MNIST, then writes the figures
    and tables of `degradation_plots.write_outputs` into OUT; returns the results.

    quick=True: depths 8 and 14 (unless `models` is given) and seeds 0 and 1 (unless `seeds`
    is given) for QUICK_STEPS steps, evaluated twice on samples of the test and training splits,
    minutes on a laptop CPU. `num_steps` overrides the recipe's length. The outputs cover every
    run under OUT/runs, finished or partial; plot_only=True trains nothing and only writes them."""
    out = Path(out_dir)
    if quick:
        models = QUICK_MODELS if tuple(models) == MODELS else models
        seeds = QUICK_SEEDS if tuple(seeds) == SEEDS else seeds
    models, conditions, seeds = tuple(models), tuple(conditions), tuple(seeds)
    num_steps = num_steps or (QUICK_STEPS if quick else None)
    results = None
    if plot_only:
        if not (out / "runs").is_dir():
            raise FileNotFoundError(f"{out / 'runs'} does not exist: nothing to plot; train first (without --plot-only)")
    else:
        grid = plan(models, conditions, seeds)
        configs = {run: recipe(run.model, num_steps, run.condition, run.seed) for run in grid}
        for config in configs.values() if quick else ():
            config.eval_every_steps = max(1, config.num_steps // QUICK_EVALUATIONS)
            config.checkpoint_every_steps = config.eval_every_steps
            config.analysis_every_steps = config.num_steps
            config.eval_examples = QUICK_TEST_EXAMPLES
            config.train_eval_examples = QUICK_TRAIN_EVAL_EXAMPLES
        data_dir = ensure_dataset(data_dir, report)
        for i, (run, config) in enumerate(configs.items()):
            config.data_dir = data_dir
            stopped = train_one(out, run, config, f"{i + 1}/{len(grid)}", report)
            results = degradation_plots.write_outputs(out)  # figures so far, after every run
            if stopped:
                report(f"stopped by SIGTERM during {run.name}; rerun the same command to continue")
                break
    results = results or degradation_plots.write_outputs(out)
    report(degradation_plots.markdown_table(results))
    report(f"wrote {', '.join(degradation_plots.OUTPUTS)} to {out}/")
    return results


def diverged(out: Path, run: RunSpec, num_steps: int) -> dict | None:
    """The record of an earlier invocation in which `run` (of `num_steps` steps) diverged, if any:
    rerunning would diverge again at the same step, so it is not retried."""
    from jaxres.files import read_jsonl

    records = [r for r in read_jsonl(out / "runs" / degradation_plots.WALL_TIME_FILE)
               if r.get("run") == run.name and r.get("num_steps") == num_steps and r.get("diverged")]
    return records[-1] if records else None


def numerics() -> dict:
    """What decides a run's rounding besides its config: the JAX version and whose convolutions
    ran (oneDNN's where the extra is installed, else XLA's), kept with each invocation's wall time
    so runs trained on different setups can be told apart."""
    import jax

    from jaxres.models import onednn_conv

    return {"jax": jax.__version__, "convolutions": "onednn" if onednn_conv.enabled() else "xla"}


def train_one(out: Path, run: RunSpec, config, position: str, report) -> bool:
    """Trains one run in OUT/runs/<condition>/<model>/seed<k> unless it has finished or diverged;
    appends the invocation's wall time (and a divergence) to OUT/runs/wall_time.jsonl.
    Returns True when SIGTERM stopped it."""
    from jaxres.files import JsonlAppender
    from jaxres.train import NonFiniteLossError, train_and_evaluate

    workdir = out / "runs" / run.name
    check_same_length(workdir, config.num_steps)
    finished, done = progress(workdir, config)
    if finished:
        report(f"[{position}] {run.name}: finished ({done} steps) in {workdir}; not retrained")
        return False
    failed = diverged(out, run, config.num_steps)
    if failed:
        report(f"[{position}] {run.name}: diverged before ({failed['diverged']}); not retried")
        return False
    report(f"[{position}] {run.name}: training {config.num_steps} steps in {workdir}"
           + (f" (resuming from checkpoint {done})" if done is not None else ""))
    record = {"run": run.name, "condition": run.condition, "model": run.model, "seed": run.seed,
              "num_steps": config.num_steps, **numerics()}
    start = time.time()
    try:
        summary = train_and_evaluate(config, workdir, report=report)
    except NonFiniteLossError as err:  # a finding, not a failure of the grid: recorded, and the grid goes on
        report(f"[{position}] {run.name}: diverged: {err}")
        record.update(time=round(time.time(), 3), wall_time_s=round(time.time() - start, 3), diverged=str(err))
        summary = None
    else:
        record.update(time=round(time.time(), 3), step=summary["step"],
                      wall_time_s=round(summary["wall_time_s"], 3), stopped=summary["stopped"])
    lines = JsonlAppender(out / "runs" / degradation_plots.WALL_TIME_FILE, fsync=True)
    try:
        lines.write(record)
    finally:
        lines.close()
    return bool(summary and summary["stopped"])
