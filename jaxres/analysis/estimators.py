"""Stochastic estimates of ||J||_F^2 with 95% confidence intervals, for units too big for exact.

- Hutchinson (1989) / Girard: E ||J z||^2 = ||J||_F^2 for Rademacher z; k probes give k
  i.i.d. samples; the interval is mean +- t_{0.975, k-1} s / sqrt(k) (Student t, so it is
  approximate: the samples are not Gaussian, and coverage is ~95% for moderate k).
- Hutch++ (Meyer, Musco, Musco & Woodruff 2021, arXiv 2010.09649): a third of the budget
  sketches the top of J^T J (Q = orth(J^T J S)), whose trace ||J Q||_F^2 is taken exactly;
  Hutchinson runs on the rest, deflated by Q. Variance drops sharply when the spectrum is
  dominated by a few directions; the interval covers the Hutchinson part only (the sketch
  part is exact given Q).

Per example (bn="eval", `per_example=True`) each example gets its own estimate from the
same k JVPs on the batch. For a batch map (`per_example=False`) each probe is supported on one
random example j (scaled by sqrt(N)), so the same samples also estimate the share of the
diagonal (same-example) blocks, hence of the cross-example terms of batch statistics.
"""

from __future__ import annotations

import numpy as np
import scipy.stats

from jaxres.analysis.unit_jacobian import jacobian_products


def confidence_interval(samples, axis: int = 0, level: float = 0.95) -> dict:
    """Mean, standard error and Student-t interval of i.i.d. `samples` along `axis`."""
    samples = np.asarray(samples, np.float64)
    k = samples.shape[axis]
    if k < 2:
        raise ValueError(f"a confidence interval needs at least 2 probes, got {k}")
    mean = samples.mean(axis)
    sem = samples.std(axis, ddof=1) / np.sqrt(k)
    half = scipy.stats.t.ppf(0.5 + level / 2, k - 1) * sem
    return {"estimate": mean, "std_err": sem, "ci_low": mean - half, "ci_high": mean + half}


def binomial_interval(count: int, n: int, level: float = 0.95) -> dict:
    """Wilson's score interval (1927) for a rate seen `count` times in `n` independent trials,
    e.g. the test error of a net from its mistakes on n test images: the rate on these images is
    exact; the interval is for the rate on the distribution they are drawn from."""
    if n < 1 or not 0 <= count <= n:
        raise ValueError(f"a binomial interval needs 0 <= count <= n and n >= 1, got count={count}, n={n}")
    z = scipy.stats.norm.ppf(0.5 + level / 2)
    rate = count / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return {"estimate": float(rate), "ci_low": float(max(0.0, centre - half)), "ci_high": float(min(1.0, centre + half))}


def _check_probes(num_probes, minimum=2):
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < minimum:
        raise ValueError(f"num_probes must be an integer >= {minimum}, got {num_probes!r}")


def frobenius_sq_hutchinson(f, h, *, params=None, num_probes: int = 16, per_example: bool = True, seed: int = 0):
    """Hutchinson estimate of ||J||_F^2 with a 95% interval (numpy arrays).

    per_example: `{"estimate", "std_err", "ci_low", "ci_high"}` each (N,). Batch map: the same
    keys for the whole J, plus `diagonal` (the same for its same-example blocks).
    """
    _check_probes(num_probes)
    samples = _hutchinson(f, params, h, per_example, num_probes, seed)
    if per_example:
        return {**confidence_interval(samples), "num_probes": num_probes}
    total, diagonal = samples
    return {**confidence_interval(total), "diagonal": confidence_interval(diagonal), "num_probes": num_probes}


def _hutchinson(f, params, h, per_example, k, seed):
    rng = np.random.default_rng(seed)
    n = h.shape[0]
    samples, diagonal = [], []
    for _ in range(k):
        z = rng.choice([-1.0, 1.0], size=h.shape)
        if per_example:
            sq, _ = jacobian_products(f, h, z, params=params)
            samples.append(np.asarray(sq, np.float64))
            continue
        j = rng.integers(n)  # a probe supported on one example, scaled to stay unbiased
        mask = np.zeros((n,) + (1,) * (h.ndim - 1))
        mask[j] = np.sqrt(n)
        sq = np.asarray(jacobian_products(f, h, z * mask, params=params)[0], np.float64)
        samples.append(sq.sum())
        diagonal.append(sq[j])
    return np.stack(samples) if per_example else (np.array(samples), np.array(diagonal))


def frobenius_sq_hutchpp(f, h, *, params=None, num_probes: int = 24, seed: int = 0):
    """Hutch++ estimate of ||J_i||_F^2 per example (bn="eval" maps), with a 95% interval.

    `num_probes` matrix-vector products in all (k/3 sketch J^T J products, k/3 exact JVPs,
    k/3 Hutchinson JVPs on the deflated remainder).
    """
    _check_probes(num_probes, minimum=6)
    exact_part, samples = _hutchpp(f, params, h, num_probes // 3, seed)
    ci = confidence_interval(samples)
    exact_part = np.asarray(exact_part, np.float64)
    return {
        "estimate": exact_part + ci["estimate"],
        "std_err": ci["std_err"],
        "ci_low": exact_part + ci["ci_low"],
        "ci_high": exact_part + ci["ci_high"],
        "num_probes": 3 * (num_probes // 3),
    }


def _hutchpp(f, params, h, s, seed):
    rng = np.random.default_rng(seed)
    n, m = h.shape[0], h.size // h.shape[0]

    def sq_norms(v):  # (N, m) -> ||J_i v_i||^2 per example
        return np.asarray(jacobian_products(f, h, v.reshape(h.shape), params=params)[0], np.float64)

    sketch = [np.asarray(jacobian_products(f, h, rng.choice([-1.0, 1.0], size=h.shape), params=params)[1],
                         np.float64).reshape(n, m) for _ in range(s)]
    q, _ = np.linalg.qr(np.stack(sketch, -1))  # (N, m, s): orthonormal basis of J^T J S per example
    exact_part = sum(sq_norms(q[:, :, i]) for i in range(q.shape[-1]))
    samples = []
    for _ in range(s):
        z = rng.choice([-1.0, 1.0], size=(n, m))
        z = z - np.einsum("nms,ns->nm", q, np.einsum("nms,nm->ns", q, z))
        samples.append(sq_norms(z))
    return exact_part, np.stack(samples)
