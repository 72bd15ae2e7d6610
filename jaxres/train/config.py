"""Run configurations: `ml_collections.ConfigDict`s built by `get_config()` functions in
`experiments/configs/*.py`, loaded from `PATH[:ARG]` and overridden from the command line
with `--config.FIELD=VALUE` (as absl's config_flags, without absl)."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import ml_collections

from jaxres.choices import closest_names


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with defaults; recipes override some of them."""
    c = ml_collections.ConfigDict()
    c.model = "cifar_resnet20"  # a registry name (jaxres models)
    c.model_overrides = ml_collections.ConfigDict()  # model dataclass fields, e.g. {"dropout": 0.5}
    c.dataset = "cifar10"  # see jaxres.data.DATASETS
    c.data_dir = ""  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.train_split = ""  # "" = the dataset's default
    c.eval_split = ""
    c.augment = ""  # "" = the dataset's paper augmentation ("cifar", "imagenet", "mnist", "none")
    c.batch_size = 128  # global batch (all hosts)
    c.eval_batch_size = 500
    c.num_steps = 64000
    c.seed = 0
    # A new run that continues another's state: a workdir (its latest checkpoint), its
    # checkpoints/ or best/ directory, or one step directory. Read only while this run's own
    # workdir holds no checkpoint (e.g. to go on with a lower learning rate after a NaN).
    c.init_from = ""
    # Optimizer: SGD with momentum and L2 weight decay (He et al. 2015).
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.weight_decay_exclude_bn_and_bias = False
    c.label_smoothing = 0.0
    # Precision and scale-out (jaxres.train.precision, jaxres.train.drivers).
    c.dtype = "float32"  # compute dtype: "float32" | "bfloat16" | "float16" (params stay float32)
    c.loss_scale_initial = 2.0**15  # float16 only: dynamic loss scaling starts here
    c.parallel = "auto"  # "auto" (single on one device, else sharded) | "single" | "pmap" | "sharded"
    c.schedule = "piecewise"  # "piecewise" | "step" | "cosine" | "constant"
    c.lr_boundaries = ml_collections.ConfigDict({"32000": 0.1, "48000": 0.1})  # iteration -> factor
    c.decay_every_epochs = 30.0  # schedule="step"
    c.decay_factor = 0.1
    c.warmup_steps = 0  # a linear warm-up over the first updates (any schedule; cosine's starts from 0)
    c.optimizer = "sgd"  # "sgd" | "lars" (per-kernel trust ratio: every layer steps the same fraction of its norm)
    c.trust_coefficient = 0.001  # lars only: a kernel's step before the learning rate, as a fraction of its norm
    # Gradient propagation measured during training (jaxres.analysis.monitor), on a fixed probe
    # batch of the training split, at step 0, every `analysis_every_steps`, at each step of
    # `analysis_steps` and at the end (jaxres.records); on when either of the two is set.
    c.analysis_every_steps = 0  # 0 = off
    c.analysis_steps = ()  # extra steps to measure at, e.g. (1, 2, 4, 8, 16, 32, 64): early dynamics
    c.analysis_batch_size = 32  # probe examples (the first of a seed-fixed permutation of the train split)
    c.analysis_bn = "batch"  # BatchNorm policy: "batch" (as trained), "eval" (running statistics), "eval,batch"
    c.analysis_unit_jacobians = 0  # per-unit ||J||_F^2 and sigma_max on this many evenly spaced units
    # At every evaluation, also the net in eval mode on this many training examples (metrics split
    # "train_eval"): the first N of a permutation of the training split drawn from a fixed seed
    # (jaxres.train.loop.TRAIN_EVAL_SEED), the same images for every run and seed. 0 = off.
    c.train_eval_examples = 0
    # Bookkeeping.
    c.log_every_steps = 100
    c.eval_every_steps = 2000  # also at the end; 0 = only at the end
    c.checkpoint_every_steps = 1000  # also at the end and on SIGTERM
    c.keep_checkpoints = 3  # the latest; the best evaluated one is kept besides them
    c.num_data_threads = 2
    c.device_prefetch = 2  # training batches on the devices ahead of the step, this one included; 1 = none
    c.progress_bar = True
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Runs `get_config(ARG)` (or `get_config()`) from the file in `PATH[:ARG]`."""
    path, _, arg = str(spec).partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist (e.g. experiments/configs/cifar10.py:resnet20)")
    module_spec = importlib.util.spec_from_file_location(f"jaxres_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        config = None if get_config is None else get_config(arg) if arg else get_config()
    except Exception as err:
        # A mistake in the config file: name its line, not a traceback through importlib.
        import traceback

        if isinstance(err, SyntaxError):
            lines = [err.lineno] if err.filename and Path(err.filename).resolve() == file.resolve() else []
        else:
            lines = [frame.lineno for frame in traceback.extract_tb(err.__traceback__)
                     if Path(frame.filename).resolve() == file.resolve()]
        if not lines:
            raise
        reason = f"{err.msg}: {(err.text or '').strip()}" if isinstance(err, SyntaxError) else str(err)
        raise ValueError(f"config file {path}, line {lines[-1]}: {type(err).__name__}: {reason}") from err
    if get_config is None:
        raise ValueError(f"config file {path} defines no get_config()")
    return config


def parse_value(text: str):
    """A Python literal when the text is one (3, 0.1, True, (1, 2), {"a": 1}), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=VALUE` (or `--config.a.b VALUE`) items to `config` in place."""
    items = list(overrides)
    while items:
        item = items.pop(0)
        if not item.startswith("--config."):
            raise ValueError(f"unexpected argument {item!r}; overrides look like --config.num_steps=1000")
        key, eq, value = item[len("--config."):].partition("=")
        if not eq:
            if not items:
                raise ValueError(f"{item} needs a value: {item}=VALUE")
            value = items.pop(0)
        set_field(config, key, parse_value(value))
    return config


# Sub-dicts whose keys are free (model fields, schedule boundaries): new keys are allowed.
FREE_FORM = {("model_overrides",), ("lr_boundaries",)}


# The type a field's current value asks of a new one: (current type, accepted types, in words);
# bool before int, which it subclasses.
FIELD_TYPES = ((bool, (bool,), "True or False"), (int, (int,), "an integer"), (float, (int, float), "a number"),
               (tuple, (tuple, list), "a tuple"))


def check_field_type(dotted: str, current, value) -> None:
    """Refuses a value of another type than the field's current one, naming both."""
    for kind, accepted, words in FIELD_TYPES:
        if isinstance(current, kind):
            if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
                raise TypeError(f"--config.{dotted} must be {words} (it is {current!r} now); got {value!r}")
            return


def set_field(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for depth, name in enumerate(parents):
        group = ".".join(parents[:depth + 1])
        if name not in node:  # node is a ConfigDict: checked below for the next name
            raise ValueError(f"config has no field {group!r}{closest_names(name, node.keys())}")
        node = node[name]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ValueError(f"--config.{dotted}: {group} is a value ({node!r}), not a group of fields; "
                             f"set it with --config.{group}=VALUE")
    if leaf not in node and tuple(parents) not in FREE_FORM:
        raise ValueError(f"config has no field {dotted!r}{closest_names(leaf, node.keys())}")
    current = node.get(leaf)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, str) and not isinstance(value, str):
        value = str(value)
    check_field_type(dotted, current, value)
    if isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
    try:
        node[leaf] = value
    except TypeError as err:
        raise TypeError(f"--config.{dotted}: {err}") from None
    if dotted.split(".")[0] == "lr_boundaries":
        schedule_boundaries(config)  # refused now, not after the workdir is made


def schedule_boundaries(config: ml_collections.ConfigDict) -> dict[int, float]:
    """`config.lr_boundaries` as {iteration: factor}: its keys are iteration numbers written as
    names ("32000"), its values the factors the learning rate is multiplied by there."""
    boundaries = {}
    for key, factor in config.lr_boundaries.items():
        if not str(key).isdigit():
            raise ValueError(f"lr_boundaries keys must be iteration numbers, e.g. --config.lr_boundaries.32000=0.1 "
                             f"(in a config file: {{'32000': 0.1}}); got {key!r}")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ValueError(f"lr_boundaries.{key} must be a number, the factor of the learning rate from iteration "
                             f"{key} on (e.g. 0.1); got {factor!r}")
        boundaries[int(key)] = float(factor)
    return boundaries


def to_json(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe dict of the config (stored in every checkpoint)."""
    return json.loads(config.to_json())


def from_json(data: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(data)
