"""Input pipelines: TFDS/synthetic sources, the papers' augmentations, grain pipelines and
the offline IDX importer. Training and evaluation never need TensorFlow."""

from jaxres.data.pipeline import (
    DevicePrefetch,
    SourceSubset,
    eval_batches,
    host_indices,
    num_eval_batches,
    permuted_indices,
    probe_batch,
    train_dataset,
    train_iterator,
)
from jaxres.data.sources import DATASETS, DatasetSpec, dataset_spec, default_data_dir, load_source
from jaxres.data.transforms import eval_transform, train_transform

__all__ = [
    "DATASETS", "DatasetSpec", "DevicePrefetch", "dataset_spec", "default_data_dir", "eval_batches", "eval_transform",
    "host_indices", "load_source", "num_eval_batches", "permuted_indices", "probe_batch", "SourceSubset",
    "train_dataset", "train_iterator", "train_transform",
]
