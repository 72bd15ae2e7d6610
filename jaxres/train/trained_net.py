"""`TrainedNet(path)`: a finished training run rebuilt for the analyses from what it stored.

PATH is a `jaxres train` workdir (its latest checkpoint, or a step directory in it) or a jaxres
weights file that records its training config (`jaxres inspect export` writes one). The model,
dataset, seed and schedule come from that config, the variables from the checkpoint (read and
checked by `jaxres.analysis.restore`), the images from the config's dataset.

    net = TrainedNet("experiments/results/twins/weights/cifar_resnet20.safetensors")
    net.lesion(images=500)                     # Veit et al.'s lesions on 500 test images
    images, labels = net.images("eval", 500)   # or any analysis on the model and its variables
    lesion_study(net.model, net.variables, images, labels)

Its methods `lesion`, `landscape`, `sharpness`, `spectrum` and `paths` run the analyses of `jaxres
inspect` (and `jaxres experiment twins`), each on the images it is defined on, and return the
JSON-ready dict; `write_result` writes one as ANALYSIS.json.

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
from jaxres.analysis.landscape import landscape_study
from jaxres.analysis.lesion import lesion_study
from jaxres.analysis.monitor import json_safe
from jaxres.analysis.paths import path_study
from jaxres.analysis.restore import check_variables, is_weights_file, restore_variables, stored_config
from jaxres.analysis.sharpness import sharpness_study
from jaxres.analysis.spectrum import spectrum_study
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


def result_path(directory, analysis: str) -> Path:
    """Where `TrainedNet.write_result` puts the result of `analysis` under `directory` (the one
    place that spells the file's name: readers ask here)."""
    return Path(directory) / f"{analysis}.json"


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

    # -- the analyses of issue 22, each on the images it is defined on -------------------------
    def lesion(self, *, images: int = 2000, bn: str = "eval", units=None, ks=None, draws: int = 5, seed: int = 0,
               batch_size: int = 250) -> dict:
        """Test error with units removed (`lesion.lesion_study`) on `images` test images (the
        first of a seed-`seed` permutation of the eval split)."""
        x, labels = self.images("eval", images, seed)
        return lesion_study(self.model, self.variables, x, labels, bn=bn, units=units, ks=ks, draws=draws, seed=seed,
                            batch_size=batch_size)

    def landscape(self, *, grid, path_grid=None, images: int = 500, bn: str = "eval", seed: int = 0,
                  batch_size: int = 250) -> dict:
        """The loss on a filter-normalized 2-D slice around the trained weights and, with
        `path_grid`, on the straight path from the initialization (`landscape.landscape_study`),
        on `images` training images (the first of a seed-`seed` permutation)."""
        x, labels = self.images("train", images, seed)
        result = landscape_study(self.model, self.variables, x, labels, grid=grid, path_grid=path_grid,
                                 initial_variables=self.initial_variables() if path_grid is not None else None,
                                 seed=seed, bn=bn, chunk=batch_size)
        return {"analysis": "landscape", "images": f"training split, first of a permutation (seed {seed}), eval "
                "transform", **result}

    def sharpness(self, *, init: bool = False, bn: str = "batch", tol: float = 1e-3, max_iter: int = 100,
                  seed: int = 0) -> dict:
        """The top Hessian eigenvalue on the training monitor's probe batch against the
        stability thresholds of the learning rate at the trained step (and, with `init`, at the
        initialization and step 0): `sharpness.sharpness_study`."""
        x, labels = self.probe_batch()
        rate = self.learning_rate(self.step) if self.step is not None else None
        points = {"trained": (self.variables, self.step, rate)}
        if init:
            points["initialization"] = (self.initial_variables(), 0, self.learning_rate(0))
        result = sharpness_study(self.model, x, labels, points, momentum=self.config.momentum, bn=bn, tol=tol,
                                 max_iter=max_iter, seed=seed)
        return {"analysis": "sharpness", "images": f"the training monitor's probe batch ({len(labels)} training "
                f"examples, seed {self.config.seed})", **result}

    def spectrum(self, *, init: bool = False, images: int = 2, units=None, bn: str = "eval", num_matvecs: int = 64,
                 num_probes: int = 8, seed: int = 0) -> dict:
        """Singular-value densities of Jacobians (`spectrum.spectrum_study`) on `images` test
        images, of the trained weights and, with `init`, of the initialization."""
        x, _ = self.images("eval", images, seed)
        variants = {"trained": self.variables, **({"initialization": self.initial_variables()} if init else {})}
        result = spectrum_study(self.model, variants, x, starts=units, bn=bn, num_matvecs=num_matvecs,
                                num_probes=num_probes, seed=seed)
        return {"analysis": "spectrum", "images": f"{images} test images (seed {seed}), eval transform", **result}

    def paths(self, *, images: int = 64, split: str = "eval", bn: str = "eval", draws: int = 1, batch_size: int = 16,
              chunk: int = 8, seed: int = 0) -> dict:
        """A residual net's per-example loss gradient split exactly by path length, beside Veit
        et al.'s sampled estimate (`paths.path_study`), on `images` images of `split` ("eval":
        test, or "train"; the first of a seed-`seed` permutation); a ValueError for a plain net."""
        x, labels = self.images(split, images, seed)
        result = path_study(self.model, self.variables, x, labels, bn=bn, draws=draws, seed=seed,
                            batch_size=batch_size, chunk=chunk, model_name=self.config.model)
        name = {"eval": "test", "train": "training"}[split]
        return {"images": f"{images} {name} images (the first of a seed-{seed} permutation), eval transform",
                **result}

    def write_result(self, directory, analysis: str, result: dict, *, arguments: dict, seconds: float) -> Path:
        """Writes DIRECTORY/ANALYSIS.json, whole (an error leaves no partial file): `result` with
        this net's checkpoint, model and dataset, the `arguments` that made it, its wall time and
        the load average; returns the file's path."""
        record = {**result, "checkpoint": self.path, "model": self.config.model, "dataset": self.config.dataset,
                  "arguments": arguments, "wall_time_s": seconds, "load_average": list(os.getloadavg()),
                  "cpu_count": os.cpu_count()}
        path = result_path(directory, analysis)
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
