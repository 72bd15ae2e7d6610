"""grain input pipelines: a deterministic, checkpointable training stream and a full-split
evaluation pass with padding and a mask.

Training order is a pure function of (seed, step): grain shuffles with an index permutation
reseeded every epoch and seeds each example's augmentation from its index, so the
iterator's state (`get_state()`, a small JSON-able dict) is all a checkpoint needs for a
resumed run to see exactly the batches it would have seen.
"""

from __future__ import annotations

import collections
import functools
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


def host_indices(num_examples: int, shard: grain.sharding.ShardOptions | None) -> grain.MapDataset:
    """The example indices of this host: every `shard_count`-th from `shard_index` (grain's
    `ShardByJaxProcess()` when `shard` is None: this JAX process's share)."""
    shard = shard or grain.sharding.ShardByJaxProcess()
    return grain.MapDataset.range(num_examples)[shard.shard_index::shard.shard_count]


def train_dataset(source, *, batch_size: int, seed: int, transform: Callable,
                  shard: grain.sharding.ShardOptions | None = None) -> grain.MapDataset:
    """An endless random-access dataset of batches `{"image": float32 (B, H, W, C), "label":
    int32 (B,)}` for this host (`shard`, see `host_indices`); `batch_size` is the per-host
    batch. Batch i is a pure function of (source, seed, i): example indices shuffled with a
    permutation reseeded every epoch, read in bulk, then `transform(records, rng)` with a
    generator grain seeds from (seed, i). Consecutive epochs are concatenated, so no example
    is dropped at epoch ends.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    indices = host_indices(len(source), shard)
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


class DevicePrefetch:
    """Batches placed on the devices `size - 1` steps ahead of the step that reads them, so
    that host-to-device copies overlap computation (flax's `prefetch_to_device`, for any
    `put`: one device, pmap's leading axis or a sharded global array).

    `get_state()` is the wrapped iterator's state after the last batch handed out, not after
    the ones waiting here: a checkpoint resumes at the next batch the step would have read.
    """

    def __init__(self, iterator: grain.DatasetIterator, put: Callable[[dict], object], size: int = 2):
        if size < 1:
            raise ValueError(f"device prefetch must be >= 1 batch (1: none ahead; config.device_prefetch), got {size}")
        self.iterator, self.put, self.size = iterator, put, size
        self.queue = collections.deque()
        self.state = None

    def __iter__(self):
        return self

    def __next__(self):
        while len(self.queue) < self.size:
            batch = next(self.iterator)
            self.queue.append((self.put(batch), self.iterator.get_state()))
        batch, self.state = self.queue.popleft()
        return batch

    def get_state(self) -> dict:
        return self.iterator.get_state() if self.state is None else self.state

    def set_state(self, state: dict) -> None:
        self.queue.clear()
        self.state = None
        self.iterator.set_state(state)


def permuted_indices(num_examples: int, size: int, seed: int) -> np.ndarray:
    """The first `size` indices of a permutation of range(`num_examples`) drawn from `seed`
    (numpy PCG64): a fixed, seed-determined subset of a split."""
    return np.random.default_rng(seed).permutation(num_examples)[:size]


class SourceSubset:
    """The examples of `source` at `indices` (in that order), as a random-access source (len,
    [i] and bulk reads) that `eval_batches` and `train_dataset` take like any other."""

    def __init__(self, source, indices):
        self.source = source
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[index])]

    def __getitems__(self, indices) -> list[dict]:
        return read_records(self.source, self.indices[np.asarray(indices, np.int64)])


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
    return transform(read_records(source, permuted_indices(len(source), size, seed)))


def num_eval_batches(num_examples: int, batch_size: int, process_count: int = 1) -> int:
    """Batches every host runs so that all hosts take the same number of steps."""
    return max(1, math.ceil(math.ceil(num_examples / process_count) / batch_size))


def eval_batches(source, *, batch_size: int, transform: Callable,
                 shard: grain.sharding.ShardOptions | None = None, num_threads: int = 2) -> Iterator[dict]:
    """Every example of `source` exactly once, in order, as padded batches with a `mask`.

    Yields `num_eval_batches(len(source), batch_size, shard.shard_count)` batches of
    `{"image": float32 (B, H, W, C), "label": int32 (B,), "mask": float32 (B,)}` for this host
    (`shard`, see `host_indices`). grain's `batch_and_pad` pads the last batch of indices
    with -1; padding rows repeat a real example and have mask 0. Trailing batches of a host
    with fewer examples are fully masked, so that all hosts run the same number of steps.
    """
    shard = shard or grain.sharding.ShardByJaxProcess()
    indices = host_indices(len(source), shard)
    pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size, pad_value=-1)

    def load(batch_indices):
        real = batch_indices >= 0
        batch = transform(read_records(source, np.where(real, batch_indices, 0)))
        return {**batch, "mask": real.astype(np.float32)}

    ds = indices.batch(batch_size, batch_fn=pad)
    total = num_eval_batches(len(source), batch_size, shard.shard_count)
    count = 0
    for batch in ds.map(load).to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2)):
        count += 1
        yield batch
    for _ in range(total - count):  # this host ran out first
        yield load(np.full(batch_size, -1))
