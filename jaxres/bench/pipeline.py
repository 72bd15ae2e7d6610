"""The host input pipeline alone (no model): images/s of the training stream.

It is the same stream `jaxres train` reads (jaxres.data: TFDS/synthetic source, the dataset's
paper augmentation, grain's prefetching iterator), so comparing its images/s with a model's
step images/s says whether the accelerator would wait for data.
"""

from __future__ import annotations

import time

from jaxres import data


def bench_pipeline(name: str, *, batch_size: int, steps: int = 20, data_dir: str | None = None,
                   num_threads: int = 2, seed: int = 0) -> dict:
    spec = data.dataset_spec(name)
    source = data.load_source(name, spec.train_split, data_dir, seed=seed)
    transform = data.train_transform(spec.augment, spec.image_size, spec.mean, spec.std)
    stream = data.train_iterator(
        data.train_dataset(source, batch_size=batch_size, seed=seed, transform=transform), num_threads=num_threads
    )
    next(stream)  # start-up (threads, first reads) is not throughput
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(stream)
    seconds = time.perf_counter() - start
    assert batch["image"].shape[0] == batch_size
    return {"pipeline": name, "batch_size": batch_size, "steps": steps, "threads": num_threads,
            "seconds": seconds, "images_per_s": steps * batch_size / seconds}
