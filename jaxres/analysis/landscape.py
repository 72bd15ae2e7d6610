"""Loss-landscape slices (Li, Xu, Taylor, Studer & Goldstein 2018, arXiv 1712.09913, Fig. 5:
ResNet-56 with and without skip connections), and the linear path from initialization to the
trained weights (Goodfellow, Vinyals & Saxe 2015, arXiv 1412.6544).

- `filter_normalized_direction`: a Gaussian direction d in parameter space, each filter of d
  (one output channel of a conv kernel (H, W, in, out), one output unit of a dense kernel
  (in, out)) rescaled to the norm of the same filter of the trained weights: ||d_f|| = ||w_f||.
  Parameters with fewer than 2 axes (BatchNorm scales and offsets, biases) get 0, as in the
  paper's `--xignore biasbn`; BatchNorm running statistics are not parameters and stay.
- `slice_2d`: L(w + a d1 + b d2) over a grid of (a, b); `linear_path`: L((1 - t) w0 + t w1);
  `landscape_study`: both for one trained net, timed.

Every loss is exact (float32): the mean cross-entropy and the top-1 error on the given images,
not on the whole training split; the images, their number, the grid and the seed are in the
result. BatchNorm policy as in `segments`: "eval" (running statistics, as Li et al.'s code
evaluates) or "batch" (each chunk of `chunk` images normalizes with its own statistics; the net
is then invariant to the scale of every filter followed by BatchNorm). On the linear path with
"eval" the running statistics are interpolated like the parameters (a net between the two has
no statistics of its own).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis.segments import check_bn
from jaxres.analysis.loss import cross_entropies, model_logits

METHOD = "exact mean cross-entropy and top-1 error on these images (float32)"


def check_axis(points, name: str = "grid") -> np.ndarray:
    """Grid coordinates as a float array with at least 2 points, or a ValueError naming the fix."""
    points = np.asarray(points, np.float64).ravel()
    if points.size < 2:
        raise ValueError(f"the {name} has {points.size} point{'s' if points.size != 1 else ''}; a slice needs at "
                         f"least 2 per axis, e.g. --grid -1:1:21 (from -1 to 1 in 21 points)")
    if not np.isfinite(points).all():
        raise ValueError(f"the {name} has non-finite coordinates: {points.tolist()}")
    return points


def parse_axis(text: str, name: str = "grid") -> np.ndarray:
    """'LOW:HIGH:POINTS' (numpy linspace), e.g. '-1:1:21', checked by `check_axis`."""
    parts = str(text).split(":")
    try:
        low, high, points = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise IndexError
    except (ValueError, IndexError):
        raise ValueError(f"{name} must be LOW:HIGH:POINTS, e.g. -1:1:21; got {text!r}") from None
    if points < 2:
        raise ValueError(f"{name} {text!r} has {points} point{'s' if points != 1 else ''}; a slice needs at least 2 "
                         f"per axis, e.g. {low:g}:{high:g}:21")
    return check_axis(np.linspace(low, high, points), name)


def filter_normalized_direction(params, seed: int):
    """A random direction shaped like `params` (numpy, float32), filter-normalized (module
    docstring); numpy's PCG64 with `seed`, leaves drawn in `jax.tree` order."""
    rng = np.random.default_rng(seed)

    def one(w):
        w = np.asarray(w, np.float32)
        d = rng.standard_normal(w.shape).astype(np.float32)
        if w.ndim < 2:
            return np.zeros_like(w)
        axes = tuple(range(w.ndim - 1))  # every axis but the output one
        w_norm = np.sqrt(np.sum(np.square(w, dtype=np.float64), axis=axes, keepdims=True))
        d_norm = np.sqrt(np.sum(np.square(d, dtype=np.float64), axis=axes, keepdims=True))
        return (d * (w_norm / np.maximum(d_norm, 1e-12))).astype(np.float32)

    return jax.tree.map(one, params)


@functools.lru_cache(maxsize=None)
def _loss_and_mistakes(model, bn: str):
    """Jitted `(params, rest, x, labels) -> (summed cross-entropy, mistakes)` of one chunk."""
    logits_of = model_logits(model, bn)

    def evaluate(params, rest, x, labels):
        logits = logits_of(params, rest, x)
        return jnp.sum(cross_entropies(logits, labels)), jnp.sum(jnp.argmax(logits, -1) != labels)

    return jax.jit(evaluate)


def loss_on(model, variables, images, labels, *, bn: str = "eval", chunk: int = 256) -> tuple[float, float]:
    """(mean cross-entropy, top-1 error) of `variables` on all `images` (NHWC), `chunk` at a time
    (the last chunk may be smaller: one more compilation)."""
    evaluate = _loss_and_mistakes(model, bn)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    total, wrong, n = 0.0, 0, images.shape[0]
    for start in range(0, n, chunk):
        x = jnp.asarray(images[start:start + chunk])
        y = jnp.asarray(labels[start:start + chunk], jnp.int32)
        loss, mistakes = evaluate(params, rest, x, y)
        total += float(loss)
        wrong += int(mistakes)
    return total / n, wrong / n


def _check_data(images, labels):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[0] < 1 or labels.shape != images.shape[:1]:
        raise ValueError(f"images must be an NHWC batch with one label each; got {images.shape} and {labels.shape}")
    return images, labels


def slice_2d(model, variables, images, labels, *, alphas, betas, seed: int = 0, bn: str = "eval",
             chunk: int = 256, progress=None) -> dict:
    """The loss over the plane w + a d1 + b d2 (d1, d2 `filter_normalized_direction`s with seeds
    `seed` and `seed + 1`), a in `alphas`, b in `betas`; bad grids raise before any evaluation.

    Returns a JSON-ready dict: `alpha`, `beta`, `loss` and `error` as `[beta][alpha]` lists,
    `center` (loss and error at a = b = 0), `num_images`, `bn`, `directions` (how they were
    made), `method`. `progress(done, total)` is called after every grid point.
    """
    check_bn(bn)
    alphas, betas = check_axis(alphas, "alpha grid"), check_axis(betas, "beta grid")
    images, labels = _check_data(images, labels)
    params = variables["params"]
    d1, d2 = filter_normalized_direction(params, seed), filter_normalized_direction(params, seed + 1)
    shift = jax.jit(lambda p, a, b: jax.tree.map(lambda w, u, v: w + a * u + b * v, p, d1, d2))
    loss = np.full((betas.size, alphas.size), np.nan)
    error = np.full_like(loss, np.nan)
    for i, b in enumerate(betas):
        for j, a in enumerate(alphas):
            moved = {**variables, "params": shift(params, np.float32(a), np.float32(b))}
            loss[i, j], error[i, j] = loss_on(model, moved, images, labels, bn=bn, chunk=chunk)
            if progress is not None:
                progress(i * alphas.size + j + 1, loss.size)
    centre = loss_on(model, variables, images, labels, bn=bn, chunk=chunk)
    return {"alpha": alphas.tolist(), "beta": betas.tolist(), "loss": loss.tolist(), "error": error.tolist(),
            "center": {"loss": centre[0], "error": centre[1]}, "num_images": int(images.shape[0]), "bn": bn,
            "directions": {"normalization": "filter (Li et al. 2018)", "seed": [seed, seed + 1],
                           "left_out": "parameters with < 2 axes (BatchNorm scales/offsets, biases): 0"},
            "method": METHOD}


def linear_path(model, start, end, images, labels, *, ts, bn: str = "eval", chunk: int = 256) -> dict:
    """The loss along (1 - t) `start` + t `end` (variables of the same shapes, e.g. the
    initialization and the trained weights), t in `ts`; with bn="eval" the running statistics
    are interpolated too. Returns `t`, `loss`, `error`, `num_images`, `bn`, `method`."""
    check_bn(bn)
    ts = check_axis(ts, "path grid")
    images, labels = _check_data(images, labels)
    keep = ("params", "batch_stats") if bn == "eval" else ("params",)
    mix = jax.jit(lambda a, b, t: jax.tree.map(lambda u, v: (1 - t) * u + t * v, a, b))
    moving = {k: start[k] for k in keep if k in start}
    target = {k: end[k] for k in keep if k in end}
    losses, errors = [], []
    for t in ts:
        variables = {**end, **mix(moving, target, np.float32(t))}
        loss, error = loss_on(model, variables, images, labels, bn=bn, chunk=chunk)
        losses.append(loss)
        errors.append(error)
    return {"t": ts.tolist(), "loss": losses, "error": errors, "num_images": int(images.shape[0]), "bn": bn,
            "interpolated": list(keep), "method": METHOD}



def landscape_study(model, variables, images, labels, *, grid, path_grid=None, initial_variables=None,
                    seed: int = 0, bn: str = "eval", chunk: int = 256) -> dict:
    """Li et al.'s two views of one trained net on one batch: `slice`, `slice_2d` over `grid` x
    `grid`, and, with `path_grid`, `path`, `linear_path` from `initial_variables` (the net's
    initialization) to `variables`; each with its `wall_time_s`. The grids are checked first."""
    grid = check_axis(grid, "grid")
    if path_grid is not None:
        path_grid = check_axis(path_grid, "path grid")
        if initial_variables is None:
            raise ValueError("a path needs the initial variables (initial_variables=...), or leave path_grid out")
    start = time.perf_counter()
    result = {"slice": slice_2d(model, variables, images, labels, alphas=grid, betas=grid, seed=seed, bn=bn,
                                chunk=chunk)}
    result["slice"]["wall_time_s"] = time.perf_counter() - start
    if path_grid is not None:
        start = time.perf_counter()
        result["path"] = linear_path(model, initial_variables, variables, images, labels, ts=path_grid, bn=bn,
                                     chunk=chunk)
        result["path"]["wall_time_s"] = time.perf_counter() - start
    return result
