"""The `synthetic` dataset: deterministic, learnable images for smoke runs and tests.

Each class has a fixed random colour pattern; an example is its class pattern plus
independent noise, stored as uint8. A small network separates the classes within a few
hundred steps, so a smoke run shows a falling loss without any download.
"""

from __future__ import annotations

import numpy as np

# Odd sizes on purpose: evaluation must pad and mask the last batch (see pipeline.eval_batches).
SPLIT_SIZES = {"train": 2048, "test": 257}


class SyntheticSource:
    """Random-access source of `{"image": uint8 (size, size, channels), "label": int}`."""

    def __init__(self, split: str, size: int, channels: int, num_classes: int, *, seed: int = 0):
        if split not in SPLIT_SIZES:
            raise ValueError(f"synthetic dataset has no split {split!r} (it has {', '.join(SPLIT_SIZES)})")
        self.split, self.size, self.channels, self.num_classes = split, size, channels, num_classes
        # The patterns depend on the seed only, so train and test share them.
        self.patterns = np.random.default_rng(seed).uniform(64, 192, (num_classes, size, size, channels))
        self.seed = seed + (1 if split == "train" else 2) * 1_000_003

    def __len__(self) -> int:
        return SPLIT_SIZES[self.split]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"synthetic {self.split} index {index} out of range [0, {len(self)})")
        rng = np.random.default_rng((self.seed, index))
        label = int(rng.integers(self.num_classes))
        noise = rng.normal(0.0, 48.0, self.patterns.shape[1:])
        image = np.clip(self.patterns[label] + noise, 0, 255).astype(np.uint8)
        return {"image": image, "label": label}
