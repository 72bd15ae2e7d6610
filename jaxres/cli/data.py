"""`jaxres data list | import NAME --from DIR | prepare NAME`: make datasets readable."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="list, import (offline IDX files) or prepare (TFDS download) datasets",
        description="Datasets are read from a TFDS data dir (--data-dir, else $TFDS_DATA_DIR, else "
                    "~/tensorflow_datasets) in array_record format, without TensorFlow.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the datasets and whether each is ready in the data dir")
    listing.add_argument("--data-dir", default="")
    imp = actions.add_parser("import", help="convert IDX files (fashion_mnist, mnist) into a TFDS dataset, offline")
    imp.add_argument("name", help="fashion_mnist or mnist")
    imp.add_argument("--from", dest="source", required=True,
                     help="directory with the four IDX files (Debian: /usr/share/datasets/fashion-mnist)")
    imp.add_argument("--data-dir", default="")
    prep = actions.add_parser("prepare", help="download and prepare a TFDS dataset (needs jaxres[prepare])")
    prep.add_argument("name")
    prep.add_argument("--data-dir", default="")
    prep.add_argument("--manual-dir", default="", help="where manually downloaded files are (imagenet2012)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from jaxres.data import sources

    data_dir = args.data_dir or sources.default_data_dir()
    sources.check_data_dir(data_dir)
    if args.action == "list":
        for name, spec in sources.DATASETS.items():
            found = sources.prepared_dir(name, data_dir)
            ready = "built in" if spec.prepare == "builtin" else (str(found) if found else "not prepared")
            print(f"{name:<14} {spec.num_classes:>5} classes  {spec.image_size}x{spec.image_size}x{spec.channels}  "
                  f"{ready}")
        return 0
    if args.action == "import":
        from jaxres.data.importer import import_idx

        path = import_idx(args.name, args.source, data_dir)
        print(f"imported {args.name} into {path}")
        return 0
    try:
        return prepare(args.name, data_dir, args.manual_dir)
    except ModuleNotFoundError as err:
        # A TFDS builder imports packages of its own dataset (apache_beam, ...), unknown to jaxres's
        # extras: naming the one to install is this command's alone (jaxres.cli.main reports the rest).
        print(f"jaxres data: error: {err}", file=sys.stderr)
        return 2


def prepare(name: str, data_dir: str, manual_dir: str = "") -> int:
    """Runs the official TFDS builder, writing array_record (random access, no TF to read)."""
    from jaxres.data import sources

    spec = sources.dataset_spec(name)
    if spec.prepare == "builtin":
        raise ValueError(f"{name!r} is built in and needs no preparation")
    if spec.prepare == "manual" and not manual_dir:
        raise ValueError(f"{name} cannot be downloaded automatically; download it as TFDS documents and pass "
                         f"--manual-dir DIR")
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:  # TFDS encodes Image features with TensorFlow
        raise ModuleNotFoundError(
            f"preparing {name} needs TensorFlow to encode its images once: pip install 'jaxres[prepare]' "
            f"(training and evaluation never need it)"
            + (f"; or, offline: jaxres data import {name} --from IDX_DIR" if spec.prepare == "import" else "")
        )
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    builder.download_and_prepare(download_config=config)
    print(f"prepared {name} in {builder.data_dir}")
    return 0
