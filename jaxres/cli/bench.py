"""`jaxres bench`: training-step speed, MFU, and PyTorch side by side, as a table and JSON."""

from __future__ import annotations

import json

from jaxres.bench.train_step import bench_train_step
from jaxres.models import model_card
from jaxres.train.drivers import DRIVERS
from jaxres.train.precision import COMPUTE_DTYPES


HEADER = (f"{'model':<18} {'fw':<6} {'batch':>5} {'dtype':<8} {'driver':<7} {'compile s':>9} "
          f"{'step ms':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'torch/jax':>9}")


def format_rows(rows, header: bool = True) -> str:
    lines = [HEADER, "-" * len(HEADER)] if header else []
    for r in rows:
        fw = "jax" if r["framework"] == "jax" else "torch"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        compile_s = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
        tflops = f"{r['model_tflops_per_s']:.3f}" if "model_tflops_per_s" in r else "-"
        ratio = f"{r['torch_over_jax']:.2f}x" if "torch_over_jax" in r else ""
        lines.append(f"{r['model']:<18} {fw:<6} {r['batch_size']:>5} {r['dtype']:<8} {r.get('driver', '-'):<7} "
                     f"{compile_s:>9} {1e3 * r['step_s']:>9.1f} {r['images_per_s']:>9.1f} {tflops:>8} {mfu:>6} {ratio:>9}")
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


def run(args) -> int:
    rows = []
    for name in args.models:
        model_card(name)  # unknown names fail before anything compiles
    overrides = execution_overrides(args)
    print(format_rows([]), flush=True)
    for name in args.models:
        row = bench_train_step(name, batch_size=args.batch_size, dtype=args.dtype, driver=args.driver,
                               steps=args.steps, warmup=args.warmup, input_size=args.input_size,
                               peak_tflops=args.peak_tflops, **overrides)
        rows.append(row)
        if args.torch:
            from jaxres.bench.torch_reference import bench_torch_train_step

            ref = bench_torch_train_step(name, batch_size=args.batch_size, input_size=row["input_size"],
                                         num_classes=model_card(name).num_classes, steps=args.steps,
                                         warmup=args.warmup, dtype=args.dtype)
            ref["torch_over_jax"] = ref["step_s"] / row["step_s"]
            rows.append(ref)
        print(format_rows(rows[-1 - args.torch:], header=False), flush=True)
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
    parser.add_argument("--torch", action="store_true", help="also time the same step in PyTorch/torchvision")
    parser.add_argument("--pipeline", metavar="DATASET", help="also time the host input pipeline alone")
    parser.add_argument("--data-dir", help="TFDS data dir for --pipeline")
    parser.add_argument("--json", metavar="PATH", help="write the JSON rows here instead of stdout")
    parser.set_defaults(func=run)
