"""`jaxres bench`: the benchmarks, one suite per run, each printed as a table and written as JSON.

The default suite, `step`, times a training step (speed, MFU, PyTorch side by side); the others
are `--suite conv|compile|analysis|monitor`. Each suite is a module of jaxres.bench whose
docstring says what it measures and how (SUITES). An option that belongs to some suites only
(SUITE_OPTIONS) is refused, in one line, by the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys

from jaxres.choices import pick


# suite -> (its module in jaxres.bench, the function that yields its rows, one line of help)
SUITES = {
    "step": ("train_step", "bench_train_step",
             "training-step time, images/s and MFU per model, optionally side by side with PyTorch (default)"),
    "conv": ("conv_rules", "bench_conv_rules",
             "convolution gradients on the zoo's shapes: XLA's rule against each of jaxres's CPU rules"),
    "compile": ("compile_time", "bench_compile_time",
                "compile time of the training step vs depth, unrolled and with scanned blocks"),
    "analysis": ("analysis_cost", "bench_analysis_cost",
                 "time and peak memory of exact end-to-end norms, exact Frobenius norms, Lanczos vs power"),
    "monitor": ("monitor_cost", "bench_monitor_cost",
                "cost of measuring gradient propagation during training (the analysis monitor)"),
}

# The options each suite takes (argparse dests). The parser's defaults are SUPPRESS, so an
# option appears in the parsed arguments only when given: the step suite fills in STEP_DEFAULTS,
# the others pass what was given to their library function, whose signature holds the defaults.
STEP_DEFAULTS = {
    "batch_size": 128, "steps": 10, "dtype": "float32", "driver": "single", "warmup": 2, "input_size": None,
    "peak_tflops": None, "scan": False, "remat": False, "mode": "train", "torch": False,
    "torch_python": sys.executable, "jax_python": sys.executable, "pipeline": None, "data_dir": None,
    "onednn": False,
}
SUITE_OPTIONS = {
    "step": set(STEP_DEFAULTS),
    "conv": {"repeats", "only", "onednn"},  # step takes --onednn too (STEP_DEFAULTS)
    "compile": {"batch_size", "variants"},
    "analysis": {"batch_size", "repeats", "chunks", "only"},
    "monitor": {"batch_size", "steps", "repeats", "probe_sizes", "bns", "unit_jacobians", "every", "run_steps"},
}
# suite -> (the least, the most positional models (None: any), the library keyword they go to)
SUITE_MODELS = {"step": (1, None, None), "conv": (0, 0, None), "compile": (0, None, "models"),
                "analysis": (0, 1, "model"), "monitor": (0, 1, "model")}

# argparse dest -> the option's flag, for error messages (filled by `register`)
FLAGS: dict[str, str] = {}


def check_suite_arguments(args) -> str:
    """The suite named by --suite, after refusing an unknown suite, another suite's options and
    models the suite does not take, each in one line that names the fix."""
    suite = args.suite
    pick("bench suite", suite, SUITES)
    others = set().union(*SUITE_OPTIONS.values()) - SUITE_OPTIONS[suite]
    foreign = sorted(dest for dest in others if hasattr(args, dest))
    if foreign:
        owners = [f"{FLAGS[d]} ({', '.join(s for s in SUITES if d in SUITE_OPTIONS[s])})" for d in foreign]
        raise ValueError(f"the {suite} suite does not take {', '.join(owners)}: drop "
                         f"{'it' if len(foreign) == 1 else 'them'}, or choose the suite in brackets with --suite")
    least, most, _ = SUITE_MODELS[suite]
    if most == 0 and args.models:
        raise ValueError(f"the {suite} suite takes no models; got {' '.join(args.models)}")
    if most is not None and len(args.models) > most:
        raise ValueError(f"the {suite} suite measures one model per run; got {len(args.models)}: "
                         f"{' '.join(args.models)}")
    if len(args.models) < least:
        raise ValueError(f"the {suite} suite needs one or more models, e.g. jaxres bench cifar_resnet20 "
                         f"(the other suites: --suite {'|'.join(s for s in SUITES if s != suite)})")
    from jaxres.models import model_card

    for name in args.models:
        model_card(name)  # unknown names fail before anything compiles
    return suite


def execution_overrides(args) -> dict:
    """--scan/--remat as model fields; they exist on ResNets only."""
    from jaxres.models import model_card

    if args.remat and not args.scan:
        raise ValueError("--remat rematerializes scanned blocks: pass it together with --scan")
    if not args.scan:
        return {}
    for name in args.models:
        if model_card(name).family.endswith("vgg"):
            raise ValueError(f"--scan applies to ResNets; {name} is a VGG (drop --scan for it)")
    return {"scan_units": True, "remat_units": args.remat}


def side_by_side(args, overrides: dict) -> list[dict]:
    """--torch: each framework in a worker process of its own, steps interleaved; --onednn: jaxres
    with oneDNN's convolutions and with XLA's as two sides (and PyTorch as a third with --torch)."""
    from jaxres.bench.side_by_side import Side, format_table, interleaved
    from jaxres.models import onednn_conv

    for python in (args.jax_python, *([args.torch_python] if args.torch else [])):
        if shutil.which(python) is None:
            raise ValueError(f"no Python at {python!r}: pass --jax-python/--torch-python PATH to an interpreter")
    if args.onednn:
        reason = onednn_conv.unavailable_reason()
        if reason:
            raise ValueError(f"--onednn: oneDNN's convolutions are unavailable here ({reason}); "
                             f"pip install -e '.[onednn]'")
        sides = [Side("jax", args.jax_python, env={onednn_conv.SWITCH: "1"}, label="onednn"),
                 Side("jax", args.jax_python, env={onednn_conv.SWITCH: "0"}, label="xla")]
        sides += [Side("torch", args.torch_python)] if args.torch else []
        return _sides_by_model(args, overrides, sides)
    jax_side, torch_side = Side("jax", args.jax_python), Side("torch", args.torch_python)
    rows = []
    print(f"each framework in its own process, {args.steps} rounds of steps alternating jax torch / torch jax, "
          f"after 1 + {args.warmup} warm-up steps; load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs",
          flush=True)
    for name in args.models:
        rows.append(interleaved(jax_side, torch_side, _worker_spec(args, name, overrides), rounds=args.steps))
        print(format_table(rows[-1:]), flush=True)
    sides = {s: rows[0][s] for s in ("jax", "torch")}
    for s, summary in sides.items():
        print(f"{s}: {summary['framework']} on Python {summary['python']} ({summary['executable']})")
    if len(rows) > 1:
        print(format_table(rows))
    return rows


def with_step_defaults(args):
    """`args` with the step suite's defaults (STEP_DEFAULTS) where an option was not given."""
    for dest, default in STEP_DEFAULTS.items():
        if not hasattr(args, dest):
            setattr(args, dest, default)
    return args


def _worker_spec(args, name: str, overrides: dict) -> dict:
    """What a side-by-side worker builds: model `name`'s step as the arguments ask."""
    from jaxres.models import model_card

    card = model_card(name)
    return {"model": name, "mode": args.mode, "batch_size": args.batch_size, "dtype": args.dtype,
            "input_size": args.input_size or card.input_size, "num_classes": card.num_classes,
            "warmup": args.warmup, "driver": args.driver, "overrides": overrides}


def _sides_by_model(args, overrides: dict, sides) -> list[dict]:
    """--onednn: every model's step on each of `sides`, the order rotated round by round."""
    from jaxres.bench.side_by_side import format_sides_table, interleaved_sides

    names = [side.name for side in sides]
    print(f"{' / '.join(names)}, each in its own process, {args.steps} rounds of steps in rotated order, after "
          f"1 + {args.warmup} warm-up steps; load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs", flush=True)
    rows = []
    for name in args.models:
        rows.append(interleaved_sides(sides, _worker_spec(args, name, overrides), rounds=args.steps))
        print(format_sides_table(rows[-1:], names), flush=True)
    for n in names:
        print(f"{n}: {rows[0][n]['framework']} on Python {rows[0][n]['python']} ({rows[0][n]['executable']})")
    return rows


def step_suite(args) -> list[dict]:
    """The training step of each model (or --torch side by side), then --pipeline."""
    from jaxres.bench.train_step import bench_train_step, format_rows

    args = with_step_defaults(args)
    overrides = execution_overrides(args)
    rows = []
    if args.torch or args.onednn:
        rows = side_by_side(args, overrides)
    else:
        print(format_rows([]), flush=True)
        for name in args.models:
            rows.append(bench_train_step(name, batch_size=args.batch_size, dtype=args.dtype, driver=args.driver,
                                         steps=args.steps, warmup=args.warmup, input_size=args.input_size,
                                         peak_tflops=args.peak_tflops, mode=args.mode, **overrides))
            print(format_rows(rows[-1:], header=False), flush=True)
    if args.pipeline:
        from jaxres.bench.pipeline import bench_pipeline

        rows.append(bench_pipeline(args.pipeline, batch_size=args.batch_size, steps=args.steps,
                                   data_dir=args.data_dir))
    for r in rows:
        if "pipeline" in r:
            print(f"input pipeline {r['pipeline']}: {r['images_per_s']:.0f} images/s "
                  f"(batch {r['batch_size']}, {r['steps']} batches)")
    return rows


def other_suite(suite: str, args) -> list[dict]:
    """A suite whose library function yields its rows: each printed as it comes, then its notes."""
    module_name, function, _ = SUITES[suite]
    module = importlib.import_module(f"jaxres.bench.{module_name}")
    kwargs = {dest: getattr(args, dest) for dest in SUITE_OPTIONS[suite] if hasattr(args, dest)}
    keyword = SUITE_MODELS[suite][2]
    if args.models:
        kwargs[keyword] = args.models if keyword == "models" else args.models[0]
    print(module.format_rows([]), flush=True)
    rows = []
    for row in getattr(module, function)(**kwargs):
        rows.append(row)
        print(module.format_rows([row], header=False), flush=True)
    notes = module.notes(rows) if hasattr(module, "notes") else ""
    if notes:
        print(notes)
    return rows


def run(args) -> int:
    suite = check_suite_arguments(args)
    rows = step_suite(args) if suite == "step" else other_suite(suite, args)
    text = json.dumps(rows, indent=1)
    if args.json:
        from jaxres.files import write_text_atomic

        write_text_atomic(args.json, text)
        print(f"wrote {args.json}")
    else:
        print(text)
    return 0


def comma_separated(kind):
    """An argparse type: comma-separated values of `kind` (str or int), as a tuple."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(item) for item in text.split(",") if item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, e.g. "
                                             f"{'32,64' if kind is int else 'unrolled,scan'}; got {text!r}") from None
    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def register(subparsers) -> None:
    from jaxres.train.drivers import DRIVERS
    from jaxres.train.precision import COMPUTE_DTYPES

    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: a training step (images/s, MFU, vs PyTorch) and the suites conv, compile, analysis, monitor",
        description="Benchmarks, one suite per run; each prints a table and writes its rows as JSON. The "
        "default suite, step, times jaxres's training step (SGD momentum, cross-entropy, train-mode BN) on a "
        "fixed synthetic batch: compile time, median synchronized step time after warm-up, images/s and "
        "model-FLOPs utilization (6 x MACs x batch per step over the device's peak). Suites: "
        + "; ".join(f"{name}: {line}" for name, (_, _, line) in SUITES.items()) + ".",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("models", nargs="*", default=[],
                        help="registry names, e.g. cifar_resnet20 resnet50 (step: one or more; compile: any, default "
                        "cifar_resnet110 cifar_resnet1202 preact_resnet1001; analysis: a CIFAR ResNet, default "
                        "cifar_resnet56; monitor: one, default cifar_resnet56; conv: none)")
    parser.add_argument("--suite", default="step", metavar="{" + ",".join(SUITES) + "}",
                        help="what to measure (default step)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the JSON rows here instead of stdout")

    shared = parser.add_argument_group("options of several suites")
    shared.add_argument("--batch-size", type=int, metavar="N",
                        help="batch size (step: global, default 128; compile 32; analysis 32; monitor: training, 128)")
    shared.add_argument("--steps", type=int, metavar="N",
                        help="timed training steps (step: default 10, median reported; monitor 3)")
    shared.add_argument("--repeats", type=int, metavar="N",
                        help="timed calls after a warm-up one (conv: default 5; analysis 3; monitor: measurements, 3)")
    shared.add_argument("--only", metavar="NAMES",
                        help="conv, analysis: run only the cases whose label contains one of these comma-separated "
                        "strings (conv: e.g. k1 or 8x56x56; analysis: e.g. lanczos,power)")

    shared.add_argument("--onednn", action="store_true",
                        help="needs the jaxres[onednn] extra. conv: also time oneDNN's convolutions through XLA's "
                        "FFI; step: time jaxres with oneDNN's convolutions and with XLA's side by side, each in "
                        "its own process, steps in rotated order (with --torch, PyTorch as a third side)")

    step = parser.add_argument_group("step suite")
    step.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), help="compute dtype (params stay float32)")
    step.add_argument("--driver", choices=DRIVERS, help="parallel driver (default single)")
    step.add_argument("--warmup", type=int, metavar="N",
                      help="untimed steps after the first (compiling) call (default 2)")
    step.add_argument("--input-size", type=int, metavar="N", help="square input side (default: the model's)")
    step.add_argument("--peak-tflops", type=float, metavar="TFLOPS",
                      help="device peak for MFU, overriding the built-in table")
    step.add_argument("--scan", action="store_true",
                      help="ResNets: run identical consecutive blocks with one lax.scan (scan_units=True)")
    step.add_argument("--remat", action="store_true", help="with --scan: rematerialize each scanned block")
    step.add_argument("--inference", dest="mode", action="store_const", const="inference",
                      help="time the eval-mode forward pass (and loss) instead of a training step")
    step.add_argument("--torch", action="store_true",
                      help="time the same step in PyTorch/torchvision side by side: each framework in its own "
                      "process, --steps rounds alternating jax torch / torch jax, ratio per round, min and median, "
                      "cores busy, peak memory above the library's baseline")
    step.add_argument("--torch-python", metavar="PATH",
                      help="with --torch: the Python whose torch/torchvision to use (default: this one)")
    step.add_argument("--jax-python", metavar="PATH",
                      help="with --torch: the Python whose JAX to use (default: this one)")
    step.add_argument("--pipeline", metavar="DATASET", help="also time the host input pipeline alone")
    step.add_argument("--data-dir", help="TFDS data dir for --pipeline")

    compile_ = parser.add_argument_group("compile suite")
    compile_.add_argument("--variants", type=comma_separated(str), metavar="NAMES",
                          help="comma-separated, of unrolled, scan, scan+remat (default all three)")

    analysis = parser.add_argument_group("analysis suite")
    analysis.add_argument("--chunks", type=comma_separated(int), metavar="SIZES",
                          help="chunk sizes (JVPs per chunk) of the exact Frobenius norm (default 128,512,2048)")

    monitor = parser.add_argument_group("monitor suite")
    monitor.add_argument("--probe-sizes", type=comma_separated(int), metavar="SIZES",
                         help="probe batch sizes (default 32,64)")
    monitor.add_argument("--bns", nargs="+", metavar="BN",
                         help="BatchNorm policies, one per case, e.g. batch eval,batch (default batch)")
    monitor.add_argument("--unit-jacobians", type=int, metavar="N", help="the monitor's unit_jacobians (default 0)")
    monitor.add_argument("--every", type=int, metavar="N", help="analysis_every_steps (default 100)")
    monitor.add_argument("--run-steps", type=int, metavar="N",
                         help="run length for the amortized overhead (default 3000: the fashion_mnist recipe)")

    FLAGS.update({action.dest: action.option_strings[0] for action in parser._actions if action.option_strings})
    parser.set_defaults(func=run)
