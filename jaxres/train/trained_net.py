"""`TrainedNet(path)`: a finished training run rebuilt for the analyses from what it stored.

PATH is a `jaxres train` workdir (its latest checkpoint, or a step directory in it) or a jaxres
weights file that records its training config (`jaxres inspect export` writes one). The model,
dataset, seed and schedule come from that config, the variables from the checkpoint (read and
checked by `jaxres.analysis.restore`), the images from the config's dataset.

    net = TrainedNet("experiments/results/twins/weights/cifar_resnet20.safetensors")
    images, labels = net.images("eval", 500)
    lesion_study(net.model, net.variables, images, labels)

It lives with training, not in `jaxres.analysis`, because it rebuilds the net as `Run` builds it
(`build_model`, the optimizer's schedule, `create_train_state`'s draw of the initialization),
and the analysis floor sits below training's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxres import data
from jaxres.analysis.monitor import json_safe
from jaxres.analysis.restore import check_variables, is_weights_file, restore_variables, stored_config
from jaxres.train import config as config_lib
from jaxres.train.optim import make_schedule
from jaxres.train.run import build_model
from jaxres.files import write_text_atomic
from jaxres.workdir import find_checkpoint, is_workdir_layout


def trained_step(path) -> int | None:
    """The step of a workdir's checkpoint, or the step count a weights file's config records;
    None if unknown (a plain orbax checkpoint)."""
    if is_weights_file(path):
        return int(stored_config(path).get("num_steps", 0)) or None
    if is_workdir_layout(path):
        workdir, _, step = find_checkpoint(path)
        with workdir:
            return step
    return None


class TrainedNet:
    """A trained net as the analyses see it: `model` (units one by one), `variables` (checked
    against the model), the training `config` (an ml_collections ConfigDict), its dataset
    `spec`, `step` (see `trained_step`) and `input_shape` (1, H, W, C), NHWC.

    `data_dir` replaces the config's data directory (the data moved)."""

    def __init__(self, path, data_dir: str = ""):
        stored = stored_config(path)
        if "dataset" not in stored:
            raise ValueError(f"{path} records no training config (model, dataset, seed); pass a `jaxres train` workdir, "
                             f"or a weights file exported from one with `jaxres inspect export`")
        self.path = str(path)
        self.config = config_lib.from_json(stored)
        if data_dir:
            self.config.data_dir = data_dir
        self.spec = data.dataset_spec(self.config.dataset)
        self.train_model = build_model(self.config, self.spec)
        self.model = self.train_model.clone(scan_units=False, remat_units=False)
        self.input_shape = (1, self.spec.image_size, self.spec.image_size, self.spec.channels)
        self.variables = check_variables(self.model, restore_variables(path), jnp.zeros(self.input_shape),
                                         self.config.model)
        self.step = trained_step(path)

    def initial_variables(self) -> dict:
        """The variables training started from: `create_train_state`'s draw from the config's seed."""
        init_rng, _ = jax.random.split(jax.random.PRNGKey(self.config.seed))
        variables = jax.jit(lambda key: self.train_model.init(key, jnp.zeros(self.input_shape), False))(init_rng)
        return check_variables(self.model, variables, jnp.zeros(self.input_shape), self.config.model)

    def images(self, split: str, count: int, seed: int = 0):
        """(images float32 NHWC, labels int32): `count` examples of `split` ("train" or "eval":
        the config's splits), the first of a seed-`seed` permutation, eval transform."""
        name, source = self._source(split)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(source):
            raise ValueError(f"--images must lie in 1..{len(source)} (the {name} split), got {count!r}")
        batch = data.probe_batch(source, transform=self._transform(), size=count, seed=seed)
        return batch["image"], batch["label"]

    def probe_batch(self):
        """The training monitor's probe batch (`Run.probe_batch`): the same images as its records."""
        _, source = self._source("train")
        batch = data.probe_batch(source, transform=self._transform(), size=self.config.analysis_batch_size,
                                 seed=self.config.seed)
        return batch["image"], batch["label"]

    def learning_rate(self, step: int) -> float:
        """The config's learning rate at `step` (the optimizer's schedule, as `Run` makes it)."""
        _, source = self._source("train")
        return float(make_schedule(self.config, max(1, len(source) // self.config.batch_size))(step))

    def write_result(self, directory, analysis: str, result: dict, *, arguments: dict, seconds: float) -> Path:
        """Writes DIRECTORY/ANALYSIS.json, whole (an error leaves no partial file): `result` with
        this net's checkpoint, model and dataset, the `arguments` that made it, its wall time and
        the load average; returns the file's path."""
        record = {**result, "checkpoint": self.path, "model": self.config.model, "dataset": self.config.dataset,
                  "arguments": arguments, "wall_time_s": seconds, "load_average": list(os.getloadavg()),
                  "cpu_count": os.cpu_count()}
        path = Path(directory) / f"{analysis}.json"
        write_text_atomic(path, json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")
        return path

    def _transform(self):
        return data.eval_transform(self.config.augment or self.spec.augment, self.spec.image_size,
                                   self.spec.mean, self.spec.std)

    def _source(self, split: str):
        """(name, the random-access source) of `split` ("train" or "eval": the config's splits)."""
        name = {"train": self.config.train_split or self.spec.train_split,
                "eval": self.config.eval_split or self.spec.eval_split}[split]
        return name, data.load_source(self.config.dataset, name, self.config.data_dir or None)
