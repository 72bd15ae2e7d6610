"""End-to-end Jacobians and gradients at every unit boundary and layer probe (exact).

For a batch x (N, H, W, 3) with logits z (N, C) and cross-entropy loss L (batch mean):

- `logit_jac`: ||d z_i / d h_i||_F per example i, from C vector-Jacobian products (one per
  class, vmapped), never one backward pass per unit: the cotangent of class c is e_c on every
  example, and the C results are summed in squares. With bn="eval" the model is separable
  over examples, so this is exactly the per-example Jacobian's Frobenius norm. With
  bn="batch" example i's row also collects the cross-example terms sum_j d z_jc / d h_i.
- `loss_grad`: ||dL/dh_i|| per example (the gradient training sees; includes the 1/N of the
  batch mean).
- `param_grad`: ||dL/dW|| for every weight ("kernel") of every unit.

Boundary `unit` means the *input* of that unit (the input of `stem` is the image). Probes
`layerk` are the normalized weight-layer outputs inside each unit (before the activation or
the residual addition), so a plain net and its residual twin line up layer for layer.

Two implementations with the same result: `end_to_end_norms` chains per-unit VJPs
(compile cost independent of depth, see `segments`), `end_to_end_norms_whole` takes one VJP
of the whole model through the 'perturbations' collection (the reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis.forward_stats import build_forward
from jaxres.analysis.segments import SegmentCache, check_bn


def _sq_per_example(value, lead: int = 1):
    """Sum of squares over all axes after the first `lead` + 1 (C, N, ...) -> (C, N)."""
    return jnp.sum(jnp.square(value.astype(jnp.float32)), axis=tuple(range(lead + 1, value.ndim)))


def output_cotangents(logits, labels):
    """(C + 1, N, C): e_c on every example for each class c, then dL/dlogits of the mean CE."""
    n, c = logits.shape
    classes = jnp.broadcast_to(jnp.eye(c, dtype=logits.dtype)[:, None, :], (c, n, c))
    loss = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, c, dtype=logits.dtype)) / n
    return jnp.concatenate([classes, loss[None]], axis=0)


def _kernel_norms(grads) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): jnp.sqrt(jnp.sum(jnp.square(g)))
        for path, g in leaves
        if str(getattr(path[-1], "key", "")) == "kernel"
    }


def _build_backward(fn, _):
    """Segment op: (cvars, pert, h, cot (K, N, ...)) -> (cot at h, {probe: (K, N) squares},
    {kernel path: ||dL/dW||} for the last cotangent row, the loss)."""

    def backward(cvars, pert, h, cot):
        _, vjp = jax.vjp(lambda p, x: fn(cvars, p, x), pert, h)

        def one(c):
            grad_pert, grad_h = vjp(c)
            return grad_h, {k: _sq_per_example(v, 0) for k, v in grad_pert["inner"].items()}

        cot_in, probes = jax.vmap(one)(cot)
        if "params" not in cvars:
            return cot_in, probes, {}
        rest = {k: v for k, v in cvars.items() if k != "params"}
        _, vjp_params = jax.vjp(lambda params: fn({**rest, "params": params}, pert, h), cvars["params"])
        return cot_in, probes, _kernel_norms(vjp_params(cot[-1])[0])

    return backward


def _summarize(sq, num_classes):
    """(C + 1, N) squares -> per-example logit-Jacobian and loss-gradient norms."""
    return {
        "logit_jac": np.sqrt(np.asarray(sq[:num_classes]).sum(0)),
        "loss_grad": np.sqrt(np.asarray(sq[num_classes])),
    }


def logit_singular_values(rows) -> np.ndarray:
    """(N, C) descending singular values of each example's d logits / d h (C x n), exact:
    `rows` (C, N, ...) are its C rows (the class VJPs), so the squared singular values are the
    eigenvalues of the C x C Gram matrix of the rows (float64 LAPACK). An example whose rows
    are not finite (a diverged model) gets NaNs, where LAPACK would fail to converge."""
    r = np.asarray(rows, np.float64).reshape(rows.shape[0], rows.shape[1], -1)
    with np.errstate(over="ignore", invalid="ignore"):
        gram = np.einsum("cnk,dnk->ncd", r, r)
    finite = np.isfinite(gram).all(axis=(1, 2))
    out = np.full(gram.shape[:2], np.nan)
    out[finite] = np.sqrt(np.maximum(np.linalg.eigvalsh(gram[finite])[:, ::-1], 0.0))
    return out


def check_labels(labels, n: int, num_classes: int):
    labels = jnp.asarray(labels)
    if labels.shape != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be {n} integers (one per example), got shape {labels.shape} {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got min {int(labels.min())} max {int(labels.max())}")
    return labels


def end_to_end_norms(model, variables, x, labels, *, bn: str = "eval", cache: SegmentCache | None = None,
                     return_input_grads: bool = False, return_activations: bool = False) -> dict:
    """Exact end-to-end norms at every unit input and layer probe, by chained per-unit VJPs.

    x: (N, H, W, C_in) float; labels: (N,) int. Returns
    `{"units": {unit: {"input": {"logit_jac": (N,), "loss_grad": (N,), "singular_values": (N, C)},
                       "probes": {probe: {...same}}, "forward": {probe: std},
                       "param_grad": {kernel path: float}}},
      "logits": (N, C), "loss": float}` with numpy arrays; with `return_input_grads` also
    `"input_grads"`: (C, N, H, W, C_in), d z_c / d x for every class c (shattered gradients);
    with `return_activations`, `"activations"`: the input of every unit, then the logits, and
    `"pre_activations"`: per unit, h + last layer probe for shape-keeping units, else None,
    and `"segments"`: the model's `Segment`s (so callers need not trace the units again).
    """
    check_bn(bn)
    cache = SegmentCache() if cache is None else cache
    segments = cache.segments(model, variables, x.shape, bn, x.dtype)
    hs, forward, pres = [x], {}, []
    for seg in segments:
        out, stats, pre = seg.op("forward", build_forward)(seg.cvars, hs[-1])
        hs.append(out)
        pres.append(pre)
        forward[seg.name] = {k: float(v) for k, v in stats.items()}
    logits = hs[-1]
    n, c = logits.shape
    labels = check_labels(labels, n, c)
    cot = output_cotangents(logits, labels)
    units = {}
    for index in reversed(range(len(segments))):
        seg = segments[index]
        cot_in, probe_sq, param = seg.op("backward", _build_backward)(seg.cvars, seg.pert, hs[index], cot)
        units[seg.name] = {
            "input": {**_summarize(_sq_per_example(cot_in), c), "singular_values": logit_singular_values(cot_in[:c])},
            "probes": {k: _summarize(v, c) for k, v in probe_sq.items()},
            "forward": forward[seg.name],
            "param_grad": {k: float(v) for k, v in param.items()},
        }
        cot = cot_in
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    order = [s.name for s in segments]
    result = {"units": {name: units[name] for name in order}, "logits": np.asarray(logits), "loss": float(loss)}
    if return_input_grads:
        result["input_grads"] = np.asarray(cot[:c])
    if return_activations:
        result["activations"] = hs
        result["pre_activations"] = pres
        result["segments"] = segments
    return result


def end_to_end_norms_whole(model, variables, x, labels, *, bn: str = "eval") -> dict:
    """The same norms from ONE vmapped VJP of the whole model w.r.t. zero 'perturbations'.

    Returns `{"units": {unit: {"input": ..., "probes": ...}}}` like `end_to_end_norms` (no
    forward statistics or parameter gradients); compiles the whole model once.
    """
    train = check_bn(bn)
    rngs = {"dropout": jax.random.key(0)} if train else None
    mutable = ["batch_stats"] if train and "batch_stats" in variables else False

    def apply(pert, inputs):
        out = model.apply({**variables, "perturbations": pert}, inputs, train, mutable=mutable, rngs=rngs)
        return out[0] if mutable else out

    shapes = jax.eval_shape(
        lambda v, inputs: model.apply(v, inputs, train, mutable=["perturbations"] + (mutable or []), rngs=rngs)[1],
        variables, x,
    )["perturbations"]
    pert = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    @jax.jit
    def run(pert, inputs, labels):
        logits, vjp = jax.vjp(apply, pert, inputs)
        cot = output_cotangents(logits, labels)
        grad_pert, grad_x = jax.vmap(vjp)(cot)
        return jax.tree.map(_sq_per_example, grad_pert), _sq_per_example(grad_x), logits

    probe_sq, x_sq, logits = run(pert, x, jnp.asarray(labels))
    c = logits.shape[-1]
    names = model.unit_names()
    units = {}
    for index, name in enumerate(names):
        sq_in = x_sq if index == 0 else probe_sq[f"out_{names[index - 1]}"]
        units[name] = {
            "input": _summarize(sq_in, c),
            "probes": {k: _summarize(v, c) for k, v in probe_sq.get(name, {}).items()},
        }
    return {"units": units, "logits": np.asarray(logits)}
