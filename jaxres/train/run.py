"""`Run(config)`: everything a training run derives from its config - data sources, model,
optimizer, parallel driver and initial state - and its evaluation on a whole split."""

from __future__ import annotations

import jax

from jaxres import data, models
from jaxres.records import check_eval_examples, check_train_eval_examples
from jaxres.train import precision
from jaxres.train.drivers import check_batch_size, make_driver
from jaxres.train.optim import make_optimizer, make_schedule
from jaxres.train.state import TrainState, abstract_train_state, create_train_state

# The fixed training subset evaluated at every evaluation (train_eval_examples): the first N of a
# permutation of the training split drawn from this seed, not the run's, so that every run and
# every seed is scored on the same images. `eval_examples` samples the eval split the same way.
TRAIN_EVAL_SEED = 0


def build_model(config, spec: data.DatasetSpec):
    """The registry entry `config.model`, or the class `ResNet`/`VGG` built from
    `config.model_overrides` alone, sized for the dataset's classes and channels."""
    overrides = dict(config.model_overrides.to_dict()) if config.model_overrides else {}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    overrides.setdefault("in_channels", spec.channels)
    overrides.setdefault("dtype", precision.compute_dtype(config.dtype, jax.devices()[0].platform))
    overrides.setdefault("num_classes", spec.num_classes)
    classes = {"ResNet": models.ResNet, "VGG": models.VGG}
    if config.model in classes:
        return classes[config.model](**overrides)
    return models.create_model(config.model, **overrides)


def _fixed_sample(source, size: int, field: str, split: str, zero: str):
    """The first `size` of a TRAIN_EVAL_SEED permutation of `source`, or None for size 0; a
    ValueError naming config `field` when `split` has fewer examples."""
    if not size:
        return None
    if size > len(source):
        raise ValueError(f"{field} {size} exceeds the {len(source)} examples of {split}; use at most that many "
                         f"(0: {zero})")
    return data.SourceSubset(source, data.permuted_indices(len(source), size, TRAIN_EVAL_SEED))


class Run:
    """Everything derived from a config: data sources, model, optimizer, initial state.

    `need_train=False` (evaluation, restore targets) skips the training split and builds the
    state abstractly (ShapeDtypeStruct leaves, no `init` compiled): fill it from a checkpoint.
    """

    def __init__(self, config, *, need_train: bool = True):
        self.config = config
        self.spec = data.dataset_spec(config.dataset)
        self.data_dir = config.data_dir or data.default_data_dir()
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        if config.batch_size < 1 or config.batch_size % self.process_count:
            raise ValueError(f"batch_size {config.batch_size} must be a positive multiple of the "
                             f"{self.process_count} host(s)")
        if config.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {config.num_steps}")
        augment = config.augment or self.spec.augment
        stats = (self.spec.image_size, self.spec.mean, self.spec.std)
        self.train_transform = data.train_transform(augment, *stats)
        self.eval_transform = data.eval_transform(augment, *stats)
        self.train_source = (data.load_source(config.dataset, config.train_split or self.spec.train_split,
                                              self.data_dir, seed=config.seed) if need_train else None)
        self.eval_source = data.load_source(config.dataset, config.eval_split or self.spec.eval_split,
                                            self.data_dir, seed=config.seed)
        self.train_eval_source = self._train_eval_source(config) if need_train else None
        self.eval_sample = self._eval_sample(config) if need_train else None
        num_train = len(self.train_source) if need_train else config.batch_size
        self.steps_per_epoch = max(1, num_train // config.batch_size)
        self.model = build_model(config, self.spec)
        self.schedule = make_schedule(config, self.steps_per_epoch)
        tx = make_optimizer(self.schedule, momentum=config.momentum, nesterov=config.nesterov,
                            weight_decay=config.weight_decay,
                            exclude_bn_and_bias=config.weight_decay_exclude_bn_and_bias,
                            optimizer=config.optimizer, trust_coefficient=config.trust_coefficient)
        parallel = config.parallel
        if parallel == "auto":
            parallel = "single" if jax.device_count() == 1 else "sharded"
        # Donation reuses the state's buffers on accelerators; XLA:CPU ignores it with a warning.
        self.driver = make_driver(parallel, label_smoothing=config.label_smoothing,
                                  donate=jax.default_backend() != "cpu")
        local = self.driver.num_devices // self.process_count
        check_batch_size(config.batch_size // self.process_count, local)
        check_batch_size(config.eval_batch_size, local, name="eval_batch_size")
        shape = (1, self.spec.image_size, self.spec.image_size, self.spec.channels)
        loss_scale = precision.dynamic_loss_scale(config.loss_scale_initial) if config.dtype == "float16" else None
        build_state = create_train_state if need_train else abstract_train_state
        self.state = build_state(self.model, tx, jax.random.PRNGKey(config.seed), shape, loss_scale)

    def _train_eval_source(self, config):
        """The first `train_eval_examples` of a TRAIN_EVAL_SEED permutation of the training split, or None."""
        return _fixed_sample(self.train_source, check_train_eval_examples(config.get("train_eval_examples", 0)),
                             "train_eval_examples", "the training split", "off")

    def _eval_sample(self, config):
        """The first `eval_examples` of a TRAIN_EVAL_SEED permutation of the eval split, or None (all of it)."""
        return _fixed_sample(self.eval_source, check_eval_examples(config.get("eval_examples", 0)),
                             "eval_examples", "the eval split", "the whole split")

    def evaluation_sources(self) -> dict:
        """{metrics split: source} of one evaluation of training: "eval" (the eval split, or its
        `eval_examples` sample) and, with `train_eval_examples`, "train_eval" (the fixed training
        subset, evaluated the same way)."""
        sources = {"eval": self.eval_source if self.eval_sample is None else self.eval_sample}
        if self.train_eval_source is not None:
            sources["train_eval"] = self.train_eval_source
        return sources

    def train_batches(self):
        ds = data.train_dataset(self.train_source, batch_size=self.config.batch_size // self.process_count,
                                seed=self.config.seed, transform=self.train_transform)
        return data.train_iterator(ds, num_threads=self.config.num_data_threads)

    def analysis_model(self):
        """The model as the analysis sees it: units one by one (scan_units only changes how
        training executes them)."""
        return self.model.clone(scan_units=False, remat_units=False)

    def analysis_variables(self, state: TrainState) -> dict:
        """Host copies of `state`'s variables in the per-unit layout the analysis reads."""
        return models.unstack_identical_units(self.model, jax.device_get(state.variables()))

    def probe_batch(self, size: int):
        """(images, labels): the analysis probe batch, a fixed set of `size` training examples
        (the same for every run with this seed and dataset), eval transform."""
        batch = data.probe_batch(self.train_source, transform=self.eval_transform, size=size, seed=self.config.seed)
        return batch["image"], batch["label"]

    def evaluate(self, state: TrainState, source=None) -> dict:
        """Loss and accuracy over every example of `source` (default: the eval split), in eval
        mode (running BatchNorm statistics, eval transform; padded, masked batches); `state` is in
        the driver's device layout."""
        totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        # One host sync at the end: the host prepares the next batch while the devices compute.
        batches = data.eval_batches(self.eval_source if source is None else source,
                                    batch_size=self.config.eval_batch_size,
                                    transform=self.eval_transform, num_threads=self.config.num_data_threads)
        per_batch = [self.driver.eval_step(state, self.driver.put_batch(batch)) for batch in batches]
        for sums in jax.device_get(per_batch):
            for k in totals:
                totals[k] += float(sums[k])
        count = totals["count"]
        return {"loss": totals["loss_sum"] / count, "accuracy": totals["correct"] / count, "count": count}
