"""`jaxres bench`: training-step speed, MFU, and PyTorch side by side, as a table and JSON."""

from __future__ import annotations

import json
import os
import shutil
import sys

from jaxres.bench.train_step import bench_train_step
from jaxres.models import model_card
from jaxres.train.drivers import DRIVERS
from jaxres.train.precision import COMPUTE_DTYPES


HEADER = (f"{'model':<18} {'mode':<9} {'batch':>5} {'dtype':<8} {'driver':<7} {'compile s':>9} "
          f"{'step ms':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6}")


def format_rows(rows, header: bool = True) -> str:
    """Rows of `bench_train_step` as a text table."""
    lines = [HEADER, "-" * len(HEADER)] if header else []
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"{r['model']:<18} {r['mode']:<9} {r['batch_size']:>5} {r['dtype']:<8} {r['driver']:<7} "
                     f"{r['compile_s']:>9.1f} {1e3 * r['step_s']:>9.1f} {r['images_per_s']:>9.1f} "
                     f"{r['model_tflops_per_s']:>8.3f} {mfu:>6}")
    return "\n".join(lines)


def execution_overrides(args) -> dict:
    """--scan/--remat as model fields; they exist on ResNets only."""
    if args.remat and not args.scan:
        raise ValueError("--remat rematerializes scanned blocks: pass it together with --scan")
    if not args.scan:
        return {}
    for name in args.models:
        if model_card(name).family.endswith("vgg"):
            raise ValueError(f"--scan applies to ResNets; {name} is a VGG (drop --scan for it)")
    return {"scan_units": True, "remat_units": args.remat}


def side_by_side(args, overrides: dict) -> list[dict]:
    """--torch: each framework in a worker process of its own, steps interleaved."""
    from jaxres.bench.side_by_side import Side, format_table, interleaved

    for python in (args.jax_python, args.torch_python):
        if shutil.which(python) is None:
            raise ValueError(f"no Python at {python!r}: pass --jax-python/--torch-python PATH to an interpreter")
    jax_side, torch_side = Side("jax", args.jax_python), Side("torch", args.torch_python)
    rows = []
    print(f"each framework in its own process, {args.steps} rounds of steps alternating jax torch / torch jax, "
          f"after 1 + {args.warmup} warm-up steps; load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs",
          flush=True)
    for name in args.models:
        card = model_card(name)
        spec = {"model": name, "mode": args.mode, "batch_size": args.batch_size, "dtype": args.dtype,
                "input_size": args.input_size or card.input_size, "num_classes": card.num_classes,
                "warmup": args.warmup, "driver": args.driver, "overrides": overrides}
        rows.append(interleaved(jax_side, torch_side, spec, rounds=args.steps))
        print(format_table(rows[-1:]), flush=True)
    sides = {s: rows[0][s] for s in ("jax", "torch")}
    for s, summary in sides.items():
        print(f"{s}: {summary['framework']} on Python {summary['python']} ({summary['executable']})")
    if len(rows) > 1:
        print(format_table(rows))
    return rows


def run(args) -> int:
    rows = []
    for name in args.models:
        model_card(name)  # unknown names fail before anything compiles
    overrides = execution_overrides(args)
    if args.torch:
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
    text = json.dumps(rows, indent=1)
    if args.json:
        from jaxres.files import write_text_atomic

        write_text_atomic(args.json, text)
        print(f"wrote {args.json}")
    else:
        print(text)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time a training step: compile, step time, images/s, MFU (optionally vs PyTorch)",
        description="Times jaxres's training step (SGD momentum, cross-entropy, train-mode BN) on a fixed "
        "synthetic batch: compile time, median synchronized step time after warm-up, images/s and "
        "model-FLOPs utilization (6 x MACs x batch per step over the device's peak).",
    )
    parser.add_argument("models", nargs="+", help="registry names, e.g. cifar_resnet20 resnet50")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (default 128)")
    parser.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default="float32", help="compute dtype (params stay float32)")
    parser.add_argument("--driver", choices=DRIVERS, default="single", help="parallel driver (default single)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) call")
    parser.add_argument("--input-size", type=int, help="square input side (default: the model's)")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU, overriding the built-in table")
    parser.add_argument("--scan", action="store_true",
                        help="ResNets: run identical consecutive blocks with one lax.scan (scan_units=True)")
    parser.add_argument("--remat", action="store_true", help="with --scan: rematerialize each scanned block")
    parser.add_argument("--inference", dest="mode", action="store_const", const="inference", default="train",
                        help="time the eval-mode forward pass (and loss) instead of a training step")
    parser.add_argument("--torch", action="store_true",
                        help="time the same step in PyTorch/torchvision side by side: each framework in its own "
                        "process, --steps rounds alternating jax torch / torch jax, ratio per round, min and median, "
                        "cores busy, peak memory above the library's baseline")
    parser.add_argument("--torch-python", default=sys.executable, metavar="PATH",
                        help="with --torch: the Python whose torch/torchvision to use (default: this one)")
    parser.add_argument("--jax-python", default=sys.executable, metavar="PATH",
                        help="with --torch: the Python whose JAX to use (default: this one)")
    parser.add_argument("--pipeline", metavar="DATASET", help="also time the host input pipeline alone")
    parser.add_argument("--data-dir", help="TFDS data dir for --pipeline")
    parser.add_argument("--json", metavar="PATH", help="write the JSON rows here instead of stdout")
    parser.set_defaults(func=run)
