"""Exact quantities of a unit's Jacobian J = d h_out / d h_in, never materialized unless asked.

Every function takes a batched map `f: (N, ...) -> (N, ...)` (NHWC activations) and the
point `h`, with `per_example`:
- True (bn="eval"): f is separable over the batch, so J is block diagonal and each example i
  has its own J_i: results have a leading axis N. A basis tangent is applied to all N
  examples at once (one JVP gives column p of every J_i).
- False (bn="batch"): J is the Jacobian of the whole batch map, (N*n_out) x (N*n_in); the
  Frobenius norm is also split into its diagonal (same-example) blocks and the rest.

Exact Frobenius: sum of squared JVPs over the input basis (or VJPs over the output basis,
whichever side is smaller), `chunk_size` basis vectors at a time inside one compiled loop,
so memory is O(chunk_size * N * n) and a 32x32x16 unit never materializes its 1 GiB J.
Spectral norm: Lanczos on J^T J with full reorthogonalization; stops when the Ritz residual
|beta_k s_k| <= tol * theta for every problem (then some eigenvalue of J^T J lies within tol
relative of theta, so sigma_max is known to ~tol/2); power iteration as the fallback.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_CHUNK_BYTES = 2 << 30  # tangents + outputs of one chunk
MAX_SVD_ELEMENTS = 1 << 26  # a materialized Jacobian for the exact spectrum (256 MiB float32)


@functools.lru_cache(maxsize=None)
def _ignore_params(f):
    return lambda params, h: f(h)


def bind(f, params):
    """`(g, params)` with `g(params, h)`: jitted code is cached per `g`, so callers that pass a
    stable `f(params, h)` with `params` (e.g. unit variables) share compiled code; `params=None`
    means `f(h)`."""
    return (_ignore_params(f), ()) if params is None else (f, params)


def _sizes(f, h, params=None):
    out = jax.eval_shape(*bind(f, params), h)
    return out, math.prod(h.shape[1:]), math.prod(out.shape[1:])


def check_chunk(chunk_size, n_batch: int, n_max: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    need = 2 * chunk_size * n_batch * n_max * 4
    if need > MAX_CHUNK_BYTES:
        fit = max(1, MAX_CHUNK_BYTES // (2 * n_batch * n_max * 4))
        raise ValueError(
            f"chunk_size={chunk_size} needs {need / 2**30:.1f} GiB for one chunk of basis vectors "
            f"(batch {n_batch} x {n_max} values); use chunk_size <= {fit} or method='estimate'"
        )
    return chunk_size


def choose_side(side: str, n_in: int, n_out: int) -> str:
    if side not in ("auto", "jvp", "vjp"):
        raise ValueError(f"side must be 'auto', 'jvp' or 'vjp', got {side!r}")
    return ("jvp" if n_in <= n_out else "vjp") if side == "auto" else side


def frobenius_sq_exact(f, h, *, params=None, per_example: bool = True, chunk_size: int = 128, side: str = "auto"):
    """Exact ||J||_F^2: (N,) per example, or `(total, diagonal_blocks)` scalars for a batch map.

    float32 accumulation; equals `jax.jacrev` materialization to ~1e-5 relative.
    """
    out, n_in, n_out = _sizes(f, h, params)
    n = h.shape[0]
    side = choose_side(side, n_in, n_out)
    basis_len = (n_in if side == "jvp" else n_out) * (1 if per_example else n)
    chunk_size = min(check_chunk(chunk_size, n, max(n_in, n_out)), basis_len)
    return _frobenius_sq(*bind(f, params), h, per_example, chunk_size, side, basis_len)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _frobenius_sq(f, params, h, per_example, chunk, side, basis_len):
    out, lin = jax.linearize(functools.partial(f, params), h)
    n = h.shape[0]
    if side == "jvp":
        apply, src_shape = lin, h.shape
    else:
        transpose = jax.linear_transpose(lin, h)
        apply, src_shape = (lambda c: transpose(c)[0]), out.shape
    per = math.prod(src_shape[1:])
    steps = -(-basis_len // chunk)

    def body(step, acc):
        idx = step * chunk + jnp.arange(chunk)  # indices past the end give zero vectors
        if per_example:
            basis = jax.nn.one_hot(idx, per, dtype=h.dtype).reshape((chunk, 1) + src_shape[1:])
            basis = jnp.broadcast_to(basis, (chunk,) + src_shape)
        else:
            basis = jax.nn.one_hot(idx, n * per, dtype=h.dtype).reshape((chunk,) + src_shape)
        image = jax.vmap(apply)(basis)
        sq = jnp.sum(jnp.square(image), axis=tuple(range(2, image.ndim)))  # (chunk, N)
        if per_example:
            return acc + sq.sum(0)
        own = jnp.take_along_axis(sq, jnp.clip(idx // per, 0, n - 1)[:, None], 1)[:, 0]
        return acc + jnp.stack([sq.sum(), own.sum()])

    init = jnp.zeros((n,) if per_example else (2,), jnp.float32)
    acc = jax.lax.fori_loop(0, steps, body, init)
    return acc if per_example else (acc[0], acc[1])


def jacobian_matrix(f, h, *, params=None, per_example: bool = True, max_elements: int = MAX_SVD_ELEMENTS):
    """The materialized Jacobian: (N, n_out, n_in) per example, or (N*n_out, N*n_in)."""
    out, n_in, n_out = _sizes(f, h, params)
    n = h.shape[0]
    size = (n * n_out * n_in) if per_example else (n * n_out) * (n * n_in)
    if size > max_elements:
        raise ValueError(
            f"the Jacobian has {size:,} entries ({n_out} x {n_in} per example, batch {n}), more than "
            f"max_elements={max_elements:,}; the exact spectrum needs it materialized: use a smaller "
            f"input or batch, or method='estimate' for norms"
        )
    return _jacobian_matrix(*bind(f, params), h, per_example)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jacobian_matrix(f, params, h, per_example):
    _, lin = jax.linearize(functools.partial(f, params), h)
    n = h.shape[0]
    n_in = math.prod(h.shape[1:])
    if per_example:
        basis = jnp.broadcast_to(jnp.eye(n_in, dtype=h.dtype).reshape((n_in, 1) + h.shape[1:]), (n_in,) + h.shape)
        cols = jax.vmap(lin)(basis)  # (n_in, N, ...)
        return cols.reshape(n_in, n, -1).transpose(1, 2, 0)
    basis = jnp.eye(n * n_in, dtype=h.dtype).reshape((n * n_in,) + h.shape)
    return jax.vmap(lin)(basis).reshape(n * n_in, -1).T


def singular_values_exact(f, h, *, params=None, per_example: bool = True, max_elements: int = MAX_SVD_ELEMENTS):
    """All singular values by exact SVD (descending): (N, min(n_out, n_in)) or one vector."""
    return jnp.linalg.svd(jacobian_matrix(f, h, params=params, per_example=per_example, max_elements=max_elements),
                          compute_uv=False)


def jacobian_products(f, h, v, *, params=None):
    """`(sq, g)`: sq (N,) = per-example squared norms of J v (over the output of example i),
    g = J^T J v (shape of h). One JVP + one VJP, compiled once per `f` and shapes; every
    iterative routine (Lanczos, power iteration, Hutchinson, Hutch++) is a host loop over it,
    so a unit costs one compilation whatever the routine or its iteration count.
    """
    return _products(*bind(f, params), h, jnp.asarray(v, h.dtype).reshape(h.shape))


@functools.partial(jax.jit, static_argnums=(0,))
def _products(f, params, h, v):
    _, lin = jax.linearize(functools.partial(f, params), h)
    jv = lin(v)
    (g,) = jax.linear_transpose(lin, h)(jv)
    return jnp.sum(jnp.square(jv).reshape(jv.shape[0], -1), axis=1), g


def _groups(h, per_example):
    return (h.shape[0], h.size // h.shape[0]) if per_example else (1, h.size)


def _normalize(v):
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0), norm[..., 0]


def _gram(f, params, h, per_example):
    groups, m = _groups(h, per_example)
    return (lambda v: np.asarray(jacobian_products(f, h, v, params=params)[1], np.float64).reshape(groups, m)), groups, m


def spectral_norm_lanczos(f, h, *, params=None, per_example: bool = True, tol: float = 1e-3, max_iter: int = 64,
                          seed: int = 0):
    """sigma_max(J) by Lanczos on J^T J: `{"sigma", "residual", "iterations", "converged"}`.

    sigma: (N,) per example or (1,) for a batch map; residual: |beta_k s_k| / theta, the
    relative Ritz residual at stop; iterations: Lanczos steps (one JVP + one VJP each).
    Vectors are kept in float64 on the host with full reorthogonalization (Parlett: twice).
    """
    _check_tol(tol, max_iter)
    matvec, groups, m = _gram(f, params, h, per_example)
    return lanczos_top(matvec, groups, m, tol=tol, max_iter=max_iter, seed=seed)


def lanczos_top(matvec, groups: int, m: int, *, tol: float, max_iter: int, seed: int = 0) -> dict:
    """Largest eigenvalue of `groups` independent PSD operators A_g = J_g^T J_g of size m,
    by Lanczos run on all of them at once: `matvec(V)` maps (groups, m) float64 to the
    (groups, m) products A_g v_g. Returns sigma = sqrt(theta) per group, the relative Ritz
    residual, the number of steps and a per-group `converged` flag (see
    `spectral_norm_lanczos`). Every step is one call of `matvec`, whatever `groups` is, so
    many units of the same computation share each compiled call (`unit_groups`)."""
    result = lanczos_largest(matvec, groups, m, tol=tol, max_iter=max_iter, seed=seed)
    return {"sigma": np.sqrt(np.maximum(result["theta"], 0.0)), "residual": result["residual"],
            "iterations": result["iterations"], "converged": result["converged"]}


def lanczos_largest(matvec, groups: int, m: int, *, tol: float, max_iter: int, seed: int = 0) -> dict:
    """Largest (algebraic) eigenvalue theta of `groups` independent symmetric operators of size m
    (a Hessian, or J^T J for `lanczos_top`), by Lanczos with full reorthogonalization (twice, in
    float64 on the host) run on all of them at once; `matvec` as in `lanczos_top`. Stops when the
    relative Ritz residual |beta_k s_k| / |theta| <= tol for every group (some eigenvalue lies
    within tol |theta| of theta) or the Krylov space is exhausted. theta never exceeds the
    largest eigenvalue (interlacing), and Lanczos finds the extremes first."""
    _check_tol(tol, max_iter)
    steps = min(max_iter, m)
    v, _ = _normalize(np.random.default_rng(seed).standard_normal((groups, m)))
    basis, alpha, beta = [v], [], []
    theta, resid = np.zeros(groups), np.full(groups, np.inf)
    done = np.zeros(groups, bool)
    k = 0
    while k < steps and not done.all():
        w = matvec(basis[-1])
        alpha.append(np.sum(w * basis[-1], -1))
        stack = np.stack(basis)  # (k+1, G, m)
        for _ in range(2):
            w = w - np.einsum("kg,kgm->gm", np.einsum("kgm,gm->kg", stack, w), stack)
        w, b = _normalize(w)
        beta.append(b)
        basis.append(w)
        k += 1
        a, bb = np.stack(alpha, 1), np.stack(beta, 1)  # (G, k)
        t = np.zeros((groups, k, k))  # the tridiagonal Lanczos matrices, all groups at once
        t[:, np.arange(k), np.arange(k)] = a
        t[:, np.arange(k - 1), np.arange(1, k)] = bb[:, :-1]
        t[:, np.arange(1, k), np.arange(k - 1)] = bb[:, :-1]
        evals, evecs = np.linalg.eigh(t)
        theta = evals[:, -1]
        scale = np.maximum(np.abs(theta), 1e-300)
        resid = np.abs(bb[:, -1] * evecs[:, -1, -1]) / scale
        # an exhausted Krylov space (beta ~ 0) means the Ritz value is exact
        done = (resid <= tol) | (bb[:, -1] <= 1e-6 * np.sqrt(scale))
    return {"theta": theta, "residual": resid, "iterations": k, "converged": done}


def _check_tol(tol, max_iter):
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a relative tolerance in (0, 1), got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")


def spectral_norm_power(f, h, *, params=None, per_example: bool = True, tol: float = 1e-3, max_iter: int = 500,
                        seed: int = 0):
    """sigma_max(J) by power iteration on J^T J; residual ||A v - theta v|| / theta at stop."""
    _check_tol(tol, max_iter)
    matvec, groups, m = _gram(f, params, h, per_example)
    v, _ = _normalize(np.random.default_rng(seed).standard_normal((groups, m)))
    theta = np.zeros(groups)
    resid = np.full(groups, np.inf)
    done = np.zeros(groups, bool)
    k = 0
    while k < max_iter and not done.all():
        w = matvec(v)
        theta = np.sum(w * v, -1)
        resid = np.linalg.norm(w - theta[:, None] * v, axis=-1) / np.maximum(theta, 1e-300)
        v, _ = _normalize(w)
        done = (resid <= tol) | (theta <= 0)
        k += 1
    return {"sigma": np.sqrt(np.maximum(theta, 0.0)), "residual": resid, "iterations": k, "converged": done}
