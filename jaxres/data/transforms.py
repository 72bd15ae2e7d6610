"""The papers' augmentations, as numpy functions on a list of decoded examples.

Input: records `{"image": uint8 (H, W, C), "label": int}`; output: one batch
`{"image": float32 (N, S, S, C) normalized, "label": int32 (N,)}`. Same-sized images (CIFAR,
MNIST) are transformed as one array; ImageNet's varying sizes one image at a time. Random
transforms take a `numpy.random.Generator`, which grain seeds from the pipeline seed and the
batch's index, so every batch's augmentation is reproducible regardless of threading or
resumption.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from jaxres.choices import pick


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 -> float32 `(x / 255 - mean) / std` per channel (any leading shape)."""
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """Zero-pads (N, H, W, C) images symmetrically to (N, size, size, C) (MNIST's 28 -> 32)."""
    h, w = images.shape[1:3]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
    """He et al. 2015, section 4.2: pad `padding` pixels on each side, take a random crop of
    the original size, flip horizontally with probability 1/2; (N, H, W, C) -> same shape.

    Called on normalized images, so the padding is the mean colour, as in fb.resnet.torch,
    the reference implementation of the CIFAR recipe.
    """
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    top = rng.integers(0, 2 * padding + 1, size=n)
    left = rng.integers(0, 2 * padding + 1, size=n)
    flip = rng.random(n) < 0.5
    cols = left[:, None] + np.arange(w)[None, :]
    cols = np.where(flip[:, None], cols[:, ::-1], cols)  # a flip reverses the column order
    rows = top[:, None] + np.arange(h)[None, :]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image  # Pillow: the [train] extra

    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return out[..., None] if channels == 1 else out


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop (Szegedy et al. 2015) as torchvision's RandomResizedCrop: a crop
    of 8%-100% of the area and aspect ratio 3/4-4/3, resized to size x size (bilinear);
    after 10 failed draws, the central crop at the clamped aspect ratio."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return _resize(image[top : top + ch, left : left + cw], size, size)
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return _resize(image[top : top + ch, left : left + cw], size, size)


def resize_center_crop(image: np.ndarray, resize: int, size: int) -> np.ndarray:
    """ImageNet evaluation: shorter side to `resize` (256), then the central size x size (224)."""
    h, w = image.shape[:2]
    scale = resize / min(h, w)
    nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
    image = _resize(image, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top : top + size, left : left + size]


def _stack(records) -> tuple[np.ndarray, np.ndarray]:
    images = [r["image"] for r in records]
    if any(im.shape != images[0].shape for im in images):
        raise ValueError(f"images of different sizes ({images[0].shape}, ...) need the 'imagenet' transforms")
    return np.stack(images), np.asarray([r["label"] for r in records], np.int32)


def _batch(images, labels) -> dict:
    return {"image": np.ascontiguousarray(images, np.float32), "label": labels}


def _train_cifar(records, rng, *, size, mean, std):
    images, labels = _stack(records)
    return _batch(random_crop_flip(normalize(images, mean, std), rng, 4), labels)


def _train_mnist(records, rng, *, size, mean, std):
    # The papers train MNIST-family nets without augmentation; padding to 32 lets CIFAR
    # architectures run unchanged (LeNet-5's 32x32 input, LeCun et al. 1998).
    del rng
    return _eval_mnist(records, size=size, mean=mean, std=std)


def _train_imagenet(records, rng, *, size, mean, std):
    images = []
    for r in records:
        image = random_resized_crop(r["image"], rng, size)
        images.append(image[:, ::-1] if rng.random() < 0.5 else image)
    return _batch(normalize(np.stack(images), mean, std), np.asarray([r["label"] for r in records], np.int32))


def _eval_plain(records, *, size, mean, std):
    images, labels = _stack(records)
    return _batch(normalize(images, mean, std), labels)


def _eval_mnist(records, *, size, mean, std):
    images, labels = _stack(records)
    return _batch(normalize(pad_to(images, size), mean, std), labels)


def _eval_imagenet(records, *, size, mean, std):
    # Simonyan & Zisserman / He et al.: resize the shorter side to 256, centre crop 224.
    images = np.stack([resize_center_crop(r["image"], round(size * 256 / 224), size) for r in records])
    return _batch(normalize(images, mean, std), np.asarray([r["label"] for r in records], np.int32))


TRAIN_TRANSFORMS = {"cifar": _train_cifar, "mnist": _train_mnist, "imagenet": _train_imagenet,
                    "none": lambda records, rng, **kw: _eval_plain(records, **kw)}
EVAL_TRANSFORMS = {"cifar": _eval_plain, "mnist": _eval_mnist, "imagenet": _eval_imagenet, "none": _eval_plain}


def train_transform(augment: str, size: int, mean, std):
    """`fn(records, rng) -> batch`: the training augmentation named `augment`."""
    fn = pick("augmentation", augment, TRAIN_TRANSFORMS)
    return functools.partial(fn, size=size, mean=tuple(mean), std=tuple(std))


def eval_transform(augment: str, size: int, mean, std):
    """`fn(records) -> batch`: the deterministic evaluation transform matching `augment`."""
    fn = pick("augmentation", augment, EVAL_TRANSFORMS)
    return functools.partial(fn, size=size, mean=tuple(mean), std=tuple(std))
