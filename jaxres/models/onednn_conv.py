"""oneDNN's convolutions on CPU, through XLA's FFI: an optional extra, `pip install 'jaxres[onednn]'`.

`conv(x, kernel, strides, padding)` is a float32 NHWC/HWIO 2-D convolution run by oneDNN (the
library PyTorch's CPU convolutions use), with derivatives of every order: it and its two
transposes (backward data, backward weights) are three bilinear JAX primitives whose transposes
are each other, as `lax.conv_general_dilated`'s are. `jaxres.models.conv` routes plain CPU
convolutions here when `enabled()`; everything else stays XLA's.

The extra installs oneDNN's CPU build with GNU OpenMP threading from PyPI (`onednn-cpu-gomp`
and its headers, `onednn-devel-cpu-gomp`, 2023.2.0 = oneDNN 3.2: the newest `onednn` wheel is a
SYCL build that needs Intel's SYCL/OpenCL runtimes). On first use `onednn_conv.cc` is compiled
with g++ (or $CXX) against those headers and JAX's FFI headers into the cache directory
($XDG_CACHE_HOME or ~/.cache, then jaxres/onednn/; a few seconds), keyed by the source, jaxlib
and oneDNN: later processes load it. Without the extra or a compiler, `available()` is False,
`unavailable_reason()` says why, and the convolutions are XLA's.

Switch: JAXRES_ONEDNN=0 turns the path off (read when a function is traced, so it applies to
functions jitted after it is set). Numerics: oneDNN's summation order, not XLA's: values agree
to float32 rounding (relative differences ~1e-6), not bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import warnings

import jax
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

SWITCH = "JAXRES_ONEDNN"
LIBRARY_DIST, HEADERS_DIST = "onednn-cpu-gomp", "onednn-devel-cpu-gomp"
SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
TARGETS = {"forward": "JaxresOnednnConvForward", "backward_data": "JaxresOnednnConvBackwardData",
           "backward_weights": "JaxresOnednnConvBackwardWeights"}


# --- finding oneDNN, building and loading the handlers -------------------------------------------------------

class Unavailable(RuntimeError):
    """Why the oneDNN path cannot be used here (the message says how to get it)."""


def _dist_file(dist: str, suffix: str) -> pathlib.Path:
    """The installed file of distribution `dist` whose path ends with `suffix`."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise Unavailable(f"{dist} is not installed; `pip install 'jaxres[onednn]'` installs oneDNN") from None
    for f in files:
        if ("/" + str(f).replace("\\", "/")).endswith("/" + suffix):
            return pathlib.Path(f.locate()).resolve()
    raise Unavailable(f"{dist} is installed but has no {suffix}; reinstall it (`pip install 'jaxres[onednn]'`)")


def cache_dir() -> pathlib.Path:
    """Where the compiled handlers live: $XDG_CACHE_HOME/jaxres/onednn (default ~/.cache/...)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "jaxres" / "onednn"


def _build() -> pathlib.Path:
    """The handlers' shared library, compiled into `cache_dir()` unless already there."""
    header = _dist_file(HEADERS_DIST, "include/oneapi/dnnl/dnnl.hpp")
    library = _dist_file(LIBRARY_DIST, "libdnnl.so.3")
    include, lib_dir = header.parent.parent.parent, library.parent
    if sys.platform != "linux":  # (the wheels are Linux-only; a copy installed by other means)
        raise Unavailable(f"the oneDNN path is built for Linux; this is {sys.platform}")
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256()  # the FFI headers are jaxlib's
    for part in (SOURCE.read_bytes(), importlib.metadata.version("jaxlib").encode(), str(include).encode(),
                 str(library).encode(), compiler.encode(), str(library.stat().st_size).encode()):
        key.update(part)
    target = cache_dir() / f"libjaxres_onednn_conv-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed: processes building at once each get a whole file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}",
               f"-I{jax.ffi.include_dir()}", str(SOURCE), f"-L{lib_dir}", "-l:libdnnl.so.3",
               f"-Wl,-rpath,{lib_dir}", "-o", partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as err:
        os.unlink(partial)
        raise Unavailable(f"cannot run the C++ compiler {compiler!r} ({err}); install g++ or set $CXX") from None
    if done.returncode != 0:
        os.unlink(partial)
        raise Unavailable(f"compiling {SOURCE.name} failed ({' '.join(command)}):\n{done.stderr[-2000:]}")
    os.replace(partial, target)
    return target


_lock = threading.Lock()
_state: dict = {}


def _load() -> str | None:
    """Builds and registers the handlers once per process; None, or the reason they are unavailable."""
    with _lock:
        if "reason" not in _state:
            try:
                lib = ctypes.CDLL(str(_build()))
                for target in TARGETS.values():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
                _state["lib"], _state["reason"] = lib, None
            except (Unavailable, OSError) as err:
                _state["reason"] = str(err)
                if not isinstance(err, Unavailable) or "is not installed" not in str(err):
                    # The extra is there but does not work: say so once, not silently run slower.
                    warnings.warn(f"jaxres: oneDNN convolutions unavailable, using XLA's: {err}", RuntimeWarning,
                                  stacklevel=3)
        return _state["reason"]


def unavailable_reason() -> str | None:
    """None when the oneDNN path can run here, else why not (builds it on the first call)."""
    return _load()


def available() -> bool:
    """Whether oneDNN's convolutions can run here (the extra installed and built)."""
    return _load() is None


def switched_off() -> bool:
    """Whether $JAXRES_ONEDNN turns the path off ("0", "false", "off", "no")."""
    return os.environ.get(SWITCH, "").strip().lower() in ("0", "false", "off", "no")


def enabled() -> bool:
    """Whether `jaxres.models.conv` sends CPU convolutions here: available and not switched off."""
    return not switched_off() and available()


# --- the three primitives ----------------------------------------------------------------------------------

def _out_hw(in_hw, kernel_hw, strides, padding):
    return tuple((size + lo + hi - k) // s + 1 for size, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, padding))


def _primitive(name: str) -> Primitive:
    p = Primitive(f"onednn_conv_{name}")

    @functools.cache
    def jitted(params):
        return jax.jit(functools.partial(p.bind, **dict(params)))

    # Outside jit a bind runs through jit, where the lowering below applies.
    p.def_impl(lambda a, b, **params: jitted(tuple(sorted(params.items())))(a, b))

    def lowering(ctx, a, b, *, strides, padding, **_):
        (pt, pb), (pl, pr) = padding
        return jax.ffi.ffi_lowering(TARGETS[name])(
            ctx, a, b, sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pt), pb=np.int64(pb),
            pl=np.int64(pl), pr=np.int64(pr))

    mlir.register_lowering(p, lowering, platform="cpu")
    return p


forward_p = _primitive("forward")  # (x, kernel) -> y
backward_data_p = _primitive("backward_data")  # (dy, kernel) -> dx; params + input_hw
backward_weights_p = _primitive("backward_weights")  # (x, dy) -> dkernel; params + kernel_hw


@forward_p.def_abstract_eval
def _forward_shape(x, kernel, *, strides, padding):
    hw = _out_hw(x.shape[1:3], kernel.shape[:2], strides, padding)
    return jax.core.ShapedArray((x.shape[0], *hw, kernel.shape[3]), x.dtype)


@backward_data_p.def_abstract_eval
def _backward_data_shape(dy, kernel, *, strides, padding, input_hw):
    return jax.core.ShapedArray((dy.shape[0], *input_hw, kernel.shape[2]), dy.dtype)


@backward_weights_p.def_abstract_eval
def _backward_weights_shape(x, dy, *, strides, padding, kernel_hw):
    return jax.core.ShapedArray((*kernel_hw, x.shape[3], dy.shape[3]), x.dtype)


def _shape(v):
    return v.aval.shape


# Each is bilinear; the transpose in one argument is another of the three (as for lax.conv):
#   <conv(x, k), c> = <x, backward_data(c, k)> = <k, backward_weights(x, c)>.
ad.defbilinear(
    forward_p,
    lambda c, x, k, *, strides, padding: backward_data_p.bind(c, k, strides=strides, padding=padding,
                                                               input_hw=tuple(_shape(x)[1:3])),
    lambda c, x, k, *, strides, padding: backward_weights_p.bind(x, c, strides=strides, padding=padding,
                                                                  kernel_hw=tuple(_shape(k)[:2])))
ad.defbilinear(
    backward_data_p,
    lambda c, dy, k, *, strides, padding, input_hw: forward_p.bind(c, k, strides=strides, padding=padding),
    lambda c, dy, k, *, strides, padding, input_hw: backward_weights_p.bind(
        c, dy, strides=strides, padding=padding, kernel_hw=tuple(_shape(k)[:2])))
ad.defbilinear(
    backward_weights_p,
    lambda c, x, dy, *, strides, padding, kernel_hw: backward_data_p.bind(
        dy, c, strides=strides, padding=padding, input_hw=tuple(_shape(x)[1:3])),
    lambda c, x, dy, *, strides, padding, kernel_hw: forward_p.bind(x, c, strides=strides, padding=padding))


def _batch_rule(p, args, dims, **params):
    """vmap: a batched image argument with an unbatched kernel folds into the batch (one call);
    anything else (a batched kernel, or both arguments of backward_weights) maps sequentially."""
    (a, b), (da, db) = args, dims
    if p is not backward_weights_p and db is None:  # (None: not mapped)
        a = jax.numpy.moveaxis(a, da, 0)
        out = p.bind(a.reshape(-1, *a.shape[2:]), b, **params)
        return out.reshape(a.shape[0], -1, *out.shape[1:]), 0
    mapped = [None if d is None else jax.numpy.moveaxis(v, d, 0) for v, d in zip(args, dims)]

    def one(slices):
        it = iter(slices)
        return p.bind(*(v if m is None else next(it) for v, m in zip(args, mapped)), **params)

    return lax.map(one, [m for m in mapped if m is not None]), 0


for _p in (forward_p, backward_data_p, backward_weights_p):
    batching.primitive_batchers[_p] = functools.partial(_batch_rule, _p)


def conv(x, kernel, strides, padding):
    """oneDNN's convolution of NHWC float32 `x` with HWIO float32 `kernel`; `strides` (sh, sw),
    `padding` ((top, bottom), (left, right)), non-negative. Differentiable to any order. Call
    only where `enabled()` and on CPU (`jaxres.models.conv.conv_general_dilated` checks both)."""
    return forward_p.bind(x, kernel, strides=tuple(int(s) for s in strides),
                          padding=tuple((int(lo), int(hi)) for lo, hi in padding))
