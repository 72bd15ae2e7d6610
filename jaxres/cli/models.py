"""`jaxres models`: the registry as a table (name, family, parameters, MACs, input, published
ImageNet top-1 of its pretrained weights, paper)."""

from __future__ import annotations

import json

from jaxres.choices import closest_names
from jaxres.models.registry import model_card
from jaxres.weights.descriptors import published_models, torchvision_weights
from jaxres.weights.loading import list_models


def model_table(names) -> list[dict]:
    published = set(published_models())
    rows = []
    for name in names:
        card = model_card(name)
        best = torchvision_weights(name) if name in published else None  # torchvision's DEFAULT
        rows.append({
            "name": name,
            "family": card.family,
            "params": card.params,
            "macs": card.macs,
            "input_size": card.input_size,
            "num_classes": card.num_classes,
            "paper": card.paper,
            "note": card.note,
            "pretrained": best.spec if best else None,
            "top1": best.top1 if best else None,
        })
    return rows


def format_table(rows) -> str:
    header = f"{'name':<20} {'family':<20} {'params':>13} {'GMACs':>8} {'input':>9} {'top-1':>7}  reference"
    lines = [header, "-" * len(header)]
    for r in rows:
        size = f"{r['input_size']}x{r['input_size']}"
        top1 = f"{r['top1']:.3f}" if r["top1"] is not None else "-"
        lines.append(
            f"{r['name']:<20} {r['family']:<20} {r['params']:>13,d} {r['macs'] / 1e9:>8.3f} {size:>9} {top1:>7}  "
            f"{r['paper'].split(',')[0]} {r['paper'].split('(')[-1].rstrip(')')}; {r['note']}"
        )
    return "\n".join(lines)


def run(args) -> int:
    names = list_models(args.family, pretrained=args.pretrained)
    if args.name:
        matching = [n for n in names if any(part in n for part in args.name)]
        if not matching:
            family = f" of family {args.family!r}" if args.family else ""
            raise ValueError(
                f"no model{family} has a name containing {' or '.join(map(repr, args.name))}"
                f"{''.join(closest_names(part, names) for part in args.name)} (`jaxres models` with no NAME lists "
                f"them all)"
            )
        names = matching
    rows = model_table(names)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the model zoo: parameters, MACs, input size, paper",
        description="Every registry entry with its trainable parameters and multiply-accumulates "
        "per example at its default input size (computed abstractly from the model, no weights).",
    )
    parser.add_argument("name", nargs="*", help="only names containing one of these substrings")
    parser.add_argument("--family", help="only this family (vgg, resnet, plain, cifar_resnet, ...)")
    parser.add_argument("--pretrained", action="store_true", help="only models with published ImageNet weights "
                        "(top-1: torchvision's published accuracy of the best; load with jaxres.pretrained)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
