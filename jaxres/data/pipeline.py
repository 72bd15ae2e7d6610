"""grain input pipelines: a deterministic, checkpointable training stream and a full-split
evaluation pass with padding and a mask.

Training order is a pure function of (seed, step): grain shuffles with an index permutation
reseeded every epoch and seeds each example's augmentation from its index, so the
iterator's state (`get_state()`, a small JSON-able dict) is all a checkpoint needs for a
resumed run to see exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import grain
import numpy as np


def read_records(source, indices) -> list[dict]:
    """The records at `indices`, in one bulk read when the source supports it (TFDS's
    array_record source decodes a list of records about 5x faster than one at a time)."""
    indices = [int(i) for i in indices]
    bulk = getattr(source, "__getitems__", None)
    if bulk is not None:
        try:
            return list(bulk(indices))
        except TypeError:  # tfds.testing.mock_data's sources break __getitems__ (tfds 4.9.10)
            pass
    return [source[i] for i in indices]


def shard(ds: grain.MapDataset, process_index: int, process_count: int) -> grain.MapDataset:
    """This host's share of `ds` (every `process_count`-th example): per-host input sharding."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    return ds if process_count == 1 else ds[process_index::process_count]


def train_dataset(source, *, batch_size: int, seed: int, transform: Callable,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """An endless random-access dataset of batches `{"image": float32 (B, H, W, C), "label":
    int32 (B,)}` for this host; `batch_size` is the per-host batch. Batch i is a pure
    function of (source, seed, i): example indices shuffled with a permutation reseeded every
    epoch, read in bulk, then `transform(records, rng)` with a generator grain seeds from
    (seed, i). Consecutive epochs are concatenated, so no example is dropped at epoch ends.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    indices = shard(grain.MapDataset.range(len(source)), process_index, process_count)
    if len(indices) < batch_size:
        raise ValueError(f"per-host batch size {batch_size} exceeds this host's {len(indices)} training examples")

    def load(batch_indices, rng):
        return transform(read_records(source, batch_indices), rng)

    indices = indices.seed(seed).shuffle().repeat(None).batch(batch_size, drop_remainder=True)
    return indices.random_map(load)


def train_iterator(ds: grain.MapDataset, *, num_threads: int = 2, prefetch: int = 4) -> grain.DatasetIterator:
    """A prefetching iterator with `get_state()` / `set_state(state)` for checkpoints."""
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(read))


def probe_batch(source, *, transform: Callable, size: int, seed: int) -> dict:
    """A fixed batch of `size` examples of `source` for measuring a model during training
    (`jaxres.analysis.monitor`): the first `size` indices of a permutation of the split drawn
    from `seed` (numpy PCG64), read and passed through `transform(records)` - the evaluation
    transform, no augmentation - so every run with the same dataset and seed sees the same
    `{"image": float32 (size, H, W, C), "label": int32 (size,)}`, in permutation order.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"probe batch size must be a positive integer, got {size!r}")
    if len(source) < size:
        raise ValueError(f"probe batch of {size} examples needs a split with at least {size}; this one has "
                         f"{len(source)}: use a smaller probe batch (analysis_batch_size)")
    indices = np.random.default_rng(seed).permutation(len(source))[:size]
    return transform(read_records(source, indices))


def pad_batch(batch: dict, batch_size: int) -> dict:
    """Pads every array of `batch` with zeros to `batch_size` rows and adds `mask`
    (float32 (batch_size,), 1 for real examples): evaluation counts each example once."""
    n = len(batch["label"])
    out = {k: np.concatenate([v, np.zeros((batch_size - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
    out["mask"] = (np.arange(batch_size) < n).astype(np.float32)
    return out


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Batches every host runs so that all hosts take the same number of steps."""
    return max(1, math.ceil(math.ceil(num_examples / process_count) / batch_size))


def eval_batches(source, *, batch_size: int, transform: Callable, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 2) -> Iterator[dict]:
    """Every example of `source` exactly once, in order, as padded batches with a `mask`.

    Yields `num_eval_batches(len(source), batch_size, process_count)` batches of
    `{"image": float32 (B, H, W, C), "label": int32 (B,), "mask": float32 (B,)}`; trailing
    batches of a host with fewer examples are fully masked.
    """
    indices = shard(grain.MapDataset.range(len(source)), process_index, process_count)

    def load(batch_indices):
        return pad_batch(transform(read_records(source, batch_indices)), batch_size)

    ds = indices.batch(batch_size, drop_remainder=False).map(load)
    total = num_eval_batches(len(source), batch_size, process_count)
    count = 0
    for batch in ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)):
        count += 1
        yield batch
    if count < total:  # this host ran out first: fully masked batches keep hosts in step
        one = transform([source[0]])
        empty = pad_batch({k: v[:0] for k, v in one.items()}, batch_size)
        for _ in range(total - count):
            yield empty
