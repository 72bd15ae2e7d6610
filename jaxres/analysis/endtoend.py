"""End-to-end Jacobians and gradients at every unit boundary and layer probe (exact).

For a batch x (N, H, W, C_in) with logits z (N, C), cross-entropy loss L (batch mean) and
h the input of a unit (the image for `stem`):

- `logit_jac`: ||d z_i / d h_i||_F per example i, the per-example block of the Jacobian
  (the headline). With bn="eval" the model is separable over examples and C
  vector-Jacobian products (cotangent e_c on every example, vmapped) give every block at
  once. With bn="batch" batch statistics couple the examples, so the blocks need the
  cotangent e_c on example i only: N*C VJPs (vmapped over (i, c); the probe batch is small),
  about N*C / (C + 1) times the backward work of the C summed rows.
- `logit_jac_summed_rows`: ||sum_j d z_j / d h_i||_F per example i (cotangent e_c on every
  example): the C rows one backward pass of sum_j z_jc gives. Equal to `logit_jac` with
  bn="eval"; with bn="batch" it adds the cross-example terms sum_{j != i} d z_j / d h_i.
- `cross_example_share` (bn="batch" with blocks): 1 - sum_i ||d z_i/d h_i||_F^2 / ||d z/d h||_F^2,
  the share of the whole batch map's squared Frobenius norm (end to end, from h to the
  logits) outside the per-example blocks.
- `gradient_scale`: the gradient scale coefficient of Philipp, Song & Carbonell 2018
  (arXiv 1712.05577), GSC = ||d z_i/d h_i||_qm ||h_i|| / ||z_i|| with the quadratic-mean norm
  ||J||_qm = ||J||_F / sqrt(n_h) (n_h values per example): invariant to rescaling h, so it
  separates gradient explosion from a forward blow-up of the activations (1 for an identity map).
- `loss_grad`: ||dL/dh_i|| per example (the gradient training sees; includes the 1/N of the
  batch mean; with bn="batch" the exact gradient of the batch loss).
- `param_grad`: ||dL/dW|| for every weight ("kernel") of every unit.
- `singular_values`: the C singular values of each example's d z_i / d h_i (descending);
  `singular_values_summed_rows` those of the summed rows (bn="batch" with blocks).

The keys are `jaxres.analysis.quantities`' (`LOGIT_JAC`, ...; the singular values are the
`source` of `LOGIT_JAC_SINGULAR_VALUES*`), which defines each quantity once.

Probes `layerk` are the normalized weight-layer outputs inside each unit (before the
activation or the residual addition), so a plain net and its residual twin line up layer for
layer; they get `logit_jac`, `logit_jac_summed_rows` and `loss_grad`.

Two implementations with the same result: `end_to_end` chains per-unit VJPs (compile cost
independent of depth, see `segments`); `end_to_end_norms_whole` takes one VJP of the whole
model through the 'perturbations' collection (the reference).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxres.analysis import quantities as q
from jaxres.analysis.forward_stats import build_forward
from jaxres.analysis.segments import Segment, SegmentCache, check_bn
from jaxres.models.layers import perturbation_name, probe_name


def _sq_per_example(value, lead: int = 1):
    """Sum of squares over all axes after the first `lead` + 1 (K, N, ...) -> (K, N)."""
    return jnp.sum(jnp.square(value), axis=tuple(range(lead + 1, value.ndim)))


def output_cotangents(logits, labels, per_example_blocks: bool = False):
    """Cotangents at the logits, then dL/dlogits of the mean cross-entropy as the last row.

    Summed rows: (C + 1, N, C), row c = e_c on every example. Per-example blocks:
    (N*C + 1, N, C), row i*C + c = e_c on example i only.
    """
    n, c = logits.shape
    if per_example_blocks:
        rows = jnp.eye(n * c, dtype=logits.dtype).reshape(n * c, n, c)
    else:
        rows = jnp.broadcast_to(jnp.eye(c, dtype=logits.dtype)[:, None, :], (c, n, c))
    loss = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, c, dtype=logits.dtype)) / n
    return jnp.concatenate([rows, loss[None]], axis=0)


def _row_squares(grads, per_example_blocks: bool) -> dict:
    """Squared norms per example of the K cotangent rows (K, N, ...) at a boundary or probe:
    `rows` (K, N); with blocks also `summed` (C, N), the rows summed over the examples
    i before squaring (the summed-row cotangent e_c on every example, by linearity)."""
    out = {"rows": _sq_per_example(grads)}
    if per_example_blocks:
        n = grads.shape[1]
        by_example = grads[:-1].reshape((n, -1) + grads.shape[1:])
        out["summed"] = _sq_per_example(by_example.sum(0))
    return out


def _kernel_norms(grads) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): jnp.sqrt(jnp.sum(jnp.square(g)))
        for path, g in leaves
        if str(getattr(path[-1], "key", "")) == "kernel"
    }


def _backward_builder(per_example_blocks: bool):
    def build(fn, _):
        """Segment op: (cvars, pert, h, cot (K, N, ...)) -> (cot at h, {probe: row squares},
        {kernel path: ||dL/dW||} for the last (loss) cotangent row)."""

        def backward(cvars, pert, h, cot):
            _, vjp = jax.vjp(lambda p, x: fn(cvars, p, x), pert, h)

            def one(c):
                grad_pert, grad_h = vjp(c)
                return grad_h, grad_pert["inner"]

            cot_in, probe_grads = jax.vmap(one)(cot)
            probes = {k: _row_squares(v, per_example_blocks) for k, v in probe_grads.items()}
            if "params" not in cvars:
                return cot_in, probes, {}
            rest = {k: v for k, v in cvars.items() if k != "params"}
            _, vjp_params = jax.vjp(lambda params: fn({**rest, "params": params}, pert, h), cvars["params"])
            return cot_in, probes, _kernel_norms(vjp_params(cot[-1])[0])

        return backward

    return build


def _summarize(squares: dict, num_classes: int, per_example_blocks: bool) -> dict:
    """Row squares (see `_row_squares`) -> per-example norms (numpy float64)."""
    sq = np.asarray(squares["rows"], np.float64)
    out = {q.LOSS_GRAD.key: np.sqrt(sq[-1])}
    if not per_example_blocks:
        out[q.LOGIT_JAC_SUMMED_ROWS.key] = np.sqrt(sq[:num_classes].sum(0))
        return out
    n = sq.shape[1]
    blocks = sq[:-1].reshape(n, num_classes, n)  # [i, c, j]: ||d z_ic / d h_j||^2
    diagonal = blocks[np.arange(n), :, np.arange(n)].sum(-1)  # (N,): ||d z_i / d h_i||_F^2
    out[q.LOGIT_JAC.key] = np.sqrt(diagonal)
    out[q.LOGIT_JAC_SUMMED_ROWS.key] = np.sqrt(np.asarray(squares["summed"], np.float64).sum(0))
    total = blocks.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        out[q.CROSS_EXAMPLE_SHARE.key] = float(1.0 - diagonal.sum() / total)
    return out


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


def block_rows(cot, num_classes: int):
    """(C, N, ...) rows d z_ic / d h_i of the per-example blocks, from the N*C block cotangents
    (N*C + 1, N, ...) pulled back to h (the loss row is dropped)."""
    n = cot.shape[1]
    by_example = cot[:-1].reshape((n, num_classes) + cot.shape[1:])  # [i, c, j, ...]
    diagonal = by_example[jnp.arange(n), :, jnp.arange(n)]  # (N, C, ...)
    return jnp.swapaxes(diagonal, 0, 1)


def summed_rows(cot, num_classes: int, per_example_blocks: bool):
    """(C, N, ...) rows d (sum_j z_jc) / d h of the pulled-back cotangents."""
    if not per_example_blocks:
        return cot[:num_classes]
    n = cot.shape[1]
    return cot[:-1].reshape((n, num_classes) + cot.shape[1:]).sum(0)


def gradient_scale(logit_jac, h, logits) -> np.ndarray:
    """Philipp et al.'s gradient scale coefficient per example (see the module docstring)."""
    h = np.asarray(h, np.float64).reshape(h.shape[0], -1)
    z = np.linalg.norm(np.asarray(logits, np.float64), axis=1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.asarray(logit_jac) / math.sqrt(h.shape[1]) * np.linalg.norm(h, axis=1) / z


def check_labels(labels, n: int, num_classes: int):
    labels = jnp.asarray(labels)
    if labels.shape != (n,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be {n} integers (one per example), got shape {labels.shape} {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got min {int(labels.min())} max {int(labels.max())}")
    return labels


@dataclasses.dataclass
class EndToEnd:
    """The result of `end_to_end` (numpy unless stated).

    units: `{unit: {"input": {...}, "probes": {probe: {...}}, "forward": {probe: std},
    "param_grad": {kernel path: float}}}` (keys as in the module docstring, per-example arrays
    (N,)); logits (N, C); loss: float; activations: the input of every unit, then the logits
    (device arrays, NHWC); pre_activations: per unit, h + last layer probe for shape-keeping
    units, else None; input_grads: (C, N, H, W, C_in), d z_ic / d x_i (the per-example
    blocks' rows; None for a batch map measured without blocks); input_grads_summed_rows:
    d (sum_j z_jc) / d x_i, the same shape.
    """

    units: dict
    logits: np.ndarray
    loss: float
    activations: list
    pre_activations: list
    input_grads: np.ndarray
    input_grads_summed_rows: np.ndarray

    def as_dict(self, *, input_grads: bool = False, activations: bool = False) -> dict:
        out = {"units": self.units, "logits": self.logits, "loss": self.loss}
        if input_grads:
            out["input_grads"] = self.input_grads
        if activations:
            out["activations"] = self.activations
            out["pre_activations"] = self.pre_activations
        return out


def end_to_end(segments: list[Segment], x, labels, *, per_example_blocks: bool = True) -> EndToEnd:
    """Exact end-to-end norms at every unit input and layer probe, by chained per-unit VJPs.

    segments: the model's units (`SegmentCache.segments`, traced for x's shape and a
    BatchNorm policy); x: (N, H, W, C_in) float; labels: (N,) int. For a separable map
    (bn="eval") the C summed rows are the per-example blocks. For a batch map (bn="batch")
    `per_example_blocks` takes the N*C block cotangents; without it only the summed rows are
    measured and `logit_jac`, `singular_values` and `gradient_scale` are left out.
    """
    blocks = per_example_blocks and segments[0].bn == "batch"
    separable = segments[0].bn == "eval"
    hs, forward, pres = [x], {}, []
    for seg in segments:
        out, stats, pre = seg.op("forward", build_forward)(seg.cvars, hs[-1])
        hs.append(out)
        pres.append(pre)
        forward[seg.name] = {k: float(v) for k, v in stats.items()}
    logits = hs[-1]
    n, c = logits.shape
    labels = check_labels(labels, n, c)
    cot = output_cotangents(logits, labels, blocks)
    kind = "backward_blocks" if blocks else "backward"
    build = _backward_builder(blocks)
    units = {}
    for index in reversed(range(len(segments))):
        seg = segments[index]
        cot_in, probe_sq, param = seg.op(kind, build)(seg.cvars, seg.pert, hs[index], cot)
        summed = summed_rows(cot_in, c, blocks)
        entry = _summarize(_row_squares(cot_in, blocks), c, blocks)
        if blocks:
            entry[q.LOGIT_JAC_SINGULAR_VALUES.source] = logit_singular_values(block_rows(cot_in, c))
            entry[q.LOGIT_JAC_SINGULAR_VALUES_SUMMED_ROWS.source] = logit_singular_values(summed)
        elif separable:
            entry[q.LOGIT_JAC.key] = entry[q.LOGIT_JAC_SUMMED_ROWS.key]
            entry[q.LOGIT_JAC_SINGULAR_VALUES.source] = logit_singular_values(summed)
        if q.LOGIT_JAC.key in entry:
            entry[q.GRADIENT_SCALE.key] = gradient_scale(entry[q.LOGIT_JAC.key], hs[index], logits)
        probes = {}
        for k, v in probe_sq.items():
            probes[k] = _summarize(v, c, blocks)
            if separable:
                probes[k][q.LOGIT_JAC.key] = probes[k][q.LOGIT_JAC_SUMMED_ROWS.key]
        units[seg.name] = {"input": entry, q.PROBES.key: probes, q.FORWARD_STD.source: forward[seg.name],
                           q.PARAM_GRAD.key: {k: float(v) for k, v in param.items()}}
        cot = cot_in
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    order = [s.name for s in segments]
    grads_summed = np.asarray(summed_rows(cot, c, blocks))
    return EndToEnd(
        units={name: units[name] for name in order}, logits=np.asarray(logits), loss=float(loss),
        activations=hs, pre_activations=pres,
        input_grads=np.asarray(block_rows(cot, c)) if blocks else grads_summed if separable else None,
        input_grads_summed_rows=grads_summed,
    )


def end_to_end_norms(model, variables, x, labels, *, bn: str = "eval", cache: SegmentCache | None = None,
                     per_example_blocks: bool = True, return_input_grads: bool = False,
                     return_activations: bool = False) -> dict:
    """`end_to_end` on `model` (through its unit interface) as a dict.

    Returns `{"units": ..., "logits": (N, C), "loss": float}` (see `EndToEnd`); with
    `return_input_grads` also `"input_grads"` (C, N, H, W, C_in), d z_ic / d x_i; with
    `return_activations` `"activations"` and `"pre_activations"`. With bn="batch",
    `per_example_blocks=False` skips the N*C block VJPs: only the summed rows
    (`logit_jac_summed_rows`) and the loss gradients are measured (the training monitor's
    choice, for probe batches of 32 and more).
    """
    check_bn(bn)
    cache = SegmentCache() if cache is None else cache
    segments = cache.segments(model, variables, x.shape, bn, x.dtype)
    result = end_to_end(segments, x, labels, per_example_blocks=per_example_blocks)
    return result.as_dict(input_grads=return_input_grads, activations=return_activations)


def end_to_end_norms_whole(model, variables, x, labels, *, bn: str = "eval", per_example_blocks: bool = True) -> dict:
    """The same norms from ONE vmapped VJP of the whole model w.r.t. zero 'perturbations'.

    Returns `{"units": {unit: {"input": ..., "probes": ...}}}` like `end_to_end_norms` (no
    forward statistics, parameter gradients, singular values or gradient scales); compiles
    the whole model once.
    """
    train = check_bn(bn)
    blocks = per_example_blocks and train
    rngs = {"dropout": jax.random.key(0)} if train else None
    mutable = ["batch_stats"] if train and "batch_stats" in variables else False

    def apply(pert, inputs):
        out = model.apply({**variables, "perturbations": pert}, inputs, train, probes=True, mutable=mutable,
                          rngs=rngs)
        return out[0] if mutable else out

    shapes = jax.eval_shape(
        lambda v, inputs: model.apply(v, inputs, train, probes=True, mutable=["perturbations"] + (mutable or []),
                                      rngs=rngs)[1],
        variables, x,
    )["perturbations"]
    pert = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    @jax.jit
    def pullback_squares(pert, inputs, labels):
        logits, vjp = jax.vjp(apply, pert, inputs)
        cot = output_cotangents(logits, labels, blocks)
        grad_pert, grad_x = jax.vmap(vjp)(cot)
        squares = functools.partial(_row_squares, per_example_blocks=blocks)
        return jax.tree.map(squares, grad_pert), squares(grad_x), logits

    probe_sq, x_sq, logits = pullback_squares(pert, x, jnp.asarray(labels))
    c = logits.shape[-1]
    names = model.unit_names()
    units = {}

    def summary(squares):
        entry = _summarize(squares, c, blocks)
        if not train:
            entry[q.LOGIT_JAC.key] = entry[q.LOGIT_JAC_SUMMED_ROWS.key]
        return entry

    for index, name in enumerate(names):
        sq_in = x_sq if index == 0 else probe_sq[perturbation_name(f"out_{names[index - 1]}")]
        units[name] = {
            "input": summary(sq_in),
            q.PROBES.key: {probe_name(k): summary(v) for k, v in probe_sq.get(name, {}).items()},
        }
    return {"units": units, "logits": np.asarray(logits)}
