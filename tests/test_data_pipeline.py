"""Input pipeline: the papers' augmentations, deterministic and resumable training order,
per-host sharding, and evaluation that counts every example once."""

import grain
import jax
import numpy as np
import pytest

from jaxres.data import DevicePrefetch, eval_batches, num_eval_batches, train_dataset, train_iterator, transforms


class IndexSource:
    """Example i is a 4x4x3 image filled with i % 256 and label i: order is readable."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((4, 4, 3), i % 256, np.uint8), "label": int(i)}


def labels_only(records, rng=None):
    return {"label": np.asarray([r["label"] for r in records], np.int32)}


def test_normalize_is_per_channel_mean_std():
    image = np.array([[[0, 255, 51]]], np.uint8)[None]  # (1, 1, 1, 3)
    out = transforms.normalize(image, (0.5, 0.5, 0.2), (0.5, 0.25, 0.1))
    # (0 - .5) / .5 = -1; (1 - .5) / .25 = 2; (.2 - .2) / .1 = 0
    np.testing.assert_allclose(out.ravel(), [-1.0, 2.0, 0.0], atol=1e-6)
    assert out.dtype == np.float32


def test_random_crop_flip_takes_windows_of_the_padded_image():
    # He et al. 2015 4.2: pad 4, random 32x32 crop, flip; each output must equal one of the
    # 9 x 9 x 2 windows of its padded image (brute-force check).
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
    out = transforms.random_crop_flip(images, np.random.default_rng(1), 4)
    assert out.shape == images.shape
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets, flips = set(), 0
    for n in range(16):
        found = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                 if np.array_equal(out[n], (lambda w: w[:, ::-1] if f else w)(padded[n, t:t + 32, l:l + 32]))]
        assert found, f"example {n} is not a crop of its padded image"
        offsets.add(found[0][:2])
        flips += found[0][2]
    assert len(offsets) > 4 and 0 < flips < 16  # really random, both flip outcomes occur


def test_mnist_transform_pads_28_to_32_and_normalizes():
    records = [{"image": np.full((28, 28, 1), 255, np.uint8), "label": 3}]
    batch = transforms.eval_transform("mnist", 32, (0.5,), (0.5,))(records)
    assert batch["image"].shape == (1, 32, 32, 1) and batch["label"].tolist() == [3]
    assert batch["image"][0, 2:30, 2:30].min() == 1.0  # (1 - .5) / .5
    assert batch["image"][0, :2].max() == -1.0  # zero padding, normalized: (0 - .5) / .5


def test_imagenet_transforms_give_224_crops():
    rng = np.random.default_rng(0)
    records = [{"image": rng.integers(0, 255, (300, 400, 3), np.uint8), "label": 1},
               {"image": rng.integers(0, 255, (257, 256, 3), np.uint8), "label": 2}]
    stats = (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train = transforms.train_transform("imagenet", *stats)(records, np.random.default_rng(0))
    evals = transforms.eval_transform("imagenet", *stats)(records)
    assert train["image"].shape == evals["image"].shape == (2, 224, 224, 3)


def test_centre_crop_keeps_the_middle():
    image = np.zeros((256, 320, 3), np.uint8)
    image[16:240, 48:272] = 200  # the central 224 x 224 after no resize (short side is 256)
    out = transforms.resize_center_crop(image, 256, 224)
    assert out.shape == (224, 224, 3) and out.min() == 200


def test_training_order_is_a_function_of_seed_and_step():
    ds = train_dataset(IndexSource(100), batch_size=10, seed=7, transform=labels_only)
    first = [b["label"].tolist() for b in (ds[i] for i in range(20))]
    again = [b["label"].tolist() for b in (ds[i] for i in range(20))]
    assert first == again
    # Each epoch (10 batches) is a permutation of all 100 examples, and the two differ.
    assert sorted(sum(first[:10], [])) == list(range(100)) == sorted(sum(first[10:], []))
    assert sum(first[:10], []) != sum(first[10:], [])
    other = train_dataset(IndexSource(100), batch_size=10, seed=8, transform=labels_only)
    assert [other[i]["label"].tolist() for i in range(10)] != first[:10]


def test_iterator_state_resumes_the_exact_stream():
    ds = train_dataset(IndexSource(50), batch_size=8, seed=0, transform=labels_only)
    it = train_iterator(ds)
    for _ in range(9):  # crosses an epoch boundary (6 batches per epoch)
        next(it)
    state = it.get_state()
    expected = [next(it)["label"].tolist() for _ in range(5)]
    resumed = train_iterator(ds)
    resumed.set_state(state)
    assert [next(resumed)["label"].tolist() for _ in range(5)] == expected


def test_hosts_read_disjoint_shards():
    seen = []
    for host in range(3):
        ds = train_dataset(IndexSource(30), batch_size=10, seed=0, transform=labels_only,
                           shard=grain.sharding.ShardOptions(host, 3))
        seen.append(set(ds[0]["label"].tolist()))
    assert set.union(*seen) == set(range(30)) and sum(map(len, seen)) == 30


def test_eval_counts_every_example_of_an_odd_split_once():
    batches = list(eval_batches(IndexSource(257), batch_size=100, transform=labels_only))
    assert len(batches) == 3 == num_eval_batches(257, 100)
    real = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
    assert real.tolist() == list(range(257))
    assert [b["mask"].sum() for b in batches] == [100, 100, 57]
    assert all(b["label"].shape == (100,) for b in batches)


def test_eval_hosts_run_equal_batch_counts_and_cover_the_split():
    per_host = [list(eval_batches(IndexSource(201), batch_size=50, transform=labels_only,
                                  shard=grain.sharding.ShardOptions(h, 2))) for h in range(2)]
    assert len(per_host[0]) == len(per_host[1]) == 3  # ceil(ceil(201 / 2) / 50)
    real = sorted(np.concatenate([b["label"][b["mask"] == 1] for bs in per_host for b in bs]).tolist())
    assert real == list(range(201))


def test_batch_larger_than_split_is_rejected():
    with pytest.raises(ValueError, match="batch size 64 exceeds"):
        train_dataset(IndexSource(10), batch_size=64, seed=0, transform=labels_only)


def test_eval_padding_rows_are_masked_copies_of_a_real_example():
    last = list(eval_batches(IndexSource(6), batch_size=4, transform=labels_only))[-1]
    assert last["label"].tolist() == [4, 5, 0, 0] and last["mask"].tolist() == [1, 1, 0, 0]
    assert last["mask"].dtype == np.float32


def test_a_shard_outside_the_hosts_is_refused():
    with pytest.raises(ValueError, match="shard_index must be in \\[0, shard_count - 1\\]"):
        grain.sharding.ShardOptions(3, 3)


def test_device_prefetch_reads_ahead_but_checkpoints_the_batches_the_step_took():
    ds = train_dataset(IndexSource(40), batch_size=4, seed=0, transform=labels_only)
    plain = train_iterator(ds)
    expected = [next(plain)["label"].tolist() for _ in range(6)]
    prefetched = DevicePrefetch(train_iterator(ds), jax.device_put, size=3)
    taken = [next(prefetched) for _ in range(3)]
    assert all(isinstance(b["label"], jax.Array) for b in taken)  # already on the device
    assert [b["label"].tolist() for b in taken] == expected[:3]
    assert prefetched.iterator.get_state() == {"next_index": 5}  # two batches ahead
    state = prefetched.get_state()
    assert state == {"next_index": 3}
    resumed = DevicePrefetch(train_iterator(ds), jax.device_put)
    resumed.set_state(state)
    assert [next(resumed)["label"].tolist() for _ in range(3)] == expected[3:]
