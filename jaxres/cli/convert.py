"""`jaxres convert torchvision`: a torchvision VGG/ResNet state_dict -> a jaxres weights file.

    jaxres convert torchvision --model resnet50 --from resnet50-11ad3fa6.pth --out weights/
    jaxres convert torchvision --model resnet50 --weights IMAGENET1K_V2 --out weights/ --verify
    jaxres convert torchvision --from hf-hub:timm/resnet50.tv2_in1k --out weights/   # no torch

writes weights/resnet50.safetensors (format: jaxres/weights/io.py), loadable without torch by
`jaxres.pretrained("resnet50", "weights/resnet50.safetensors")`.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxres.cli.paths import check_output_dir
from jaxres.models.complexity import count_params
from jaxres.weights.cache import fetch_torchvision_file
from jaxres.weights.descriptors import TORCHVISION_WEIGHTS, hub_weights, torchvision_weights
from jaxres.weights.hub import HUB_PREFIX, fetch_hub_file, hub_model_name, parse_hub_spec
from jaxres.weights.io import save_weights
from jaxres.weights.state_dict import identify, read_state_dict, state_dict_num_classes
from jaxres.weights.torchvision import convertible_models, from_torchvision


def _descriptor_for(model: str, source: Path):
    """The published descriptor whose file name is `source`'s, if any (for its preprocessing)."""
    for descriptor in TORCHVISION_WEIGHTS.values():
        if descriptor.model == model and descriptor.filename == source.name:
            return descriptor
    return None


def run(args) -> int:
    if (args.source is None) == (args.weights is None):
        raise ValueError("give exactly one of --from FILE and --weights TAG (e.g. IMAGENET1K_V1)")
    out = Path(args.out)
    check_output_dir(out.parent if out.suffix == ".safetensors" else out,
                     expected="a directory (for MODEL.safetensors) or a .safetensors path")
    if args.weights is not None:
        if args.model is None:
            raise ValueError("--weights needs --model (e.g. --model resnet50)")
        descriptor = torchvision_weights(args.model, args.weights)
        source = fetch_torchvision_file(descriptor)
    elif args.source.startswith(HUB_PREFIX):
        repo_id, _ = parse_hub_spec(args.source)
        descriptor = hub_weights(repo_id)
        source = fetch_hub_file(args.source)
        holds = hub_model_name(repo_id)
        if args.model and holds and args.model != holds:
            raise ValueError(f"{args.source} holds timm's {holds} weights, not {args.model}; pass --model {holds}")
    else:
        source = Path(args.source)
        descriptor = None
    state_dict = read_state_dict(source)
    model = args.model or identify(state_dict)
    if model is None:
        raise ValueError(f"cannot tell which torchvision model {source} holds; pass --model ({', '.join(convertible_models())})")
    descriptor = descriptor or _descriptor_for(model, source)
    num_classes = state_dict_num_classes(state_dict)
    path = out if out.suffix == ".safetensors" else out / f"{model}.safetensors"
    if path.exists() and not args.overwrite:
        raise ValueError(f"{path} exists; pass --overwrite to replace it, or another --out")
    variables = from_torchvision(state_dict, model, num_classes=num_classes)
    if args.source and args.source.startswith(HUB_PREFIX):
        source_text = args.source + (f" (timm's copy of torchvision {descriptor.spec})" if descriptor else "")
    elif descriptor:
        source_text = f"torchvision {descriptor.spec} {descriptor.url}"
    else:
        source_text = f"torchvision state_dict {os.path.basename(source)}"
    save_weights(
        path, variables, model, num_classes=num_classes, source=source_text,
        preprocessing=descriptor.preprocessing if descriptor else None, overwrite=args.overwrite,
    )
    print(f"{model}: {count_params(variables):,d} parameters from {source}")
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    if descriptor:
        p = descriptor.preprocessing
        print(f"published ImageNet-1K top-1 {descriptor.top1:.3f}%, top-5 {descriptor.top5:.3f}% with resize "
              f"{p.resize_size}, center crop {p.crop_size}, mean {p.mean}, std {p.std}")
    if args.verify:
        from jaxres.weights.parity import logit_difference

        diff = logit_difference(model, state_dict, variables)
        print(f"verified against torchvision on a random 1x3x224x224 input: max |logit difference| "
              f"{diff['max_abs_diff']:.3g} (logit scale {diff['logit_scale']:.3g})")
    print(f'load with: model, variables = jaxres.pretrained("{model}", "{path}")')
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert published weights (torchvision VGG/ResNet) to a jaxres weights file",
        description="Convert a torchvision VGG/ResNet state_dict (.pth needs torch; .safetensors does not) "
        "into a jaxres weights file (safetensors with a checksum; see jaxres/weights/io.py).",
    )
    parser.add_argument("source_format", choices=["torchvision"], help="where the weights come from")
    parser.add_argument("--model", help="registry name (default: recognized from the file): "
                        + ", ".join(convertible_models()))
    parser.add_argument("--from", dest="source", metavar="FILE", help="a torchvision state_dict: .pth, .pt or "
                        ".safetensors, or timm's Hub copy as hf-hub:timm/MODEL.TAG (e.g. hf-hub:timm/resnet50.tv2_in1k)")
    parser.add_argument("--weights", metavar="TAG", help="torchvision's published weights from its cache or "
                        "download: IMAGENET1K_V1, IMAGENET1K_V2 or DEFAULT (needs torch)")
    parser.add_argument("--out", required=True, help="output directory (writes MODEL.safetensors) or a .safetensors path")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--verify", action="store_true", help="compare logits with torchvision's model (needs torch)")
    parser.set_defaults(func=run)
