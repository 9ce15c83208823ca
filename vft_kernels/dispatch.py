"""Backend registry and selection.

Every op has up to four implementations ("backends"): ``reference`` (eager PyTorch, any
device), ``triton`` (CUDA; CPU only under ``TRITON_INTERPRET=1``), ``cuda`` and ``cpu``
(the C++ extension ``vft_kernels._C``). Implementations are registered lazily as
``"module:function"`` strings so that importing vft_kernels never imports Triton or
loads ``_C`` until an op needs them.

Selection, per op call: the first backend in ``PRIORITY[device.type]`` that is available
on this machine, has the op, runs on the tensor's device and supports the arguments
(its optional ``check`` function returns ``None``). A forced backend
(``VFT_BACKEND=<name>`` or :func:`use_backend`) is used or fails loudly with its reason;
automatic selection falls back quietly. If nothing fits, the error lists every
backend's reason.

Backend implementation contract (what a kernel module provides), by op key:

* ``fsq_forward(z, levels, eps, codes_dtype) -> (codes, indices)``
* ``fsq_backward(grad_codes, z, levels, eps) -> grad_z``
* ``fsq_decode(indices, levels) -> codes``
* ``attention_forward(q, k, v, layout, keep, scale, cu_seqlens=None) -> (out, lse)``
* ``attention_backward(dout, q, k, v, out, lse, layout, keep, scale, cu_seqlens=None) -> (dq, dk, dv)``
  (``cu_seqlens``: int32 [S + 1] on q's device for packed calls, validated by the op)
* ``flow_step(out, x, v_cond, v_uncond, t, t_next, guidance, scale, apg_eta,
  apg_norm_threshold, apg_momentum, momentum, reduce_ndim, prefix, prefix_len) -> None``
* ``flow_heun_step(out, x, v1, v2, t, t_next) -> None``
* ``block_norm_forward(x, gate, h, scale, shift, patches, eps) -> (x_new | None, y | None)``
* ``block_norm_backward(d_res, dy, xn, gate, h, scale, shift, patches, eps) -> (dx, dgate, dh, dscale, dshift)``
* ``swiglu_forward(gate_up) -> out``; ``swiglu_backward(dout, gate_up) -> dgate_up``
* ``qk_norm_forward(qkv, heads, q_weight, k_weight, eps, centered=False) -> (q, k, v)``;
  ``qk_norm_backward(dq, dk, dv, qkv, heads, q_weight, k_weight, eps, centered=False) -> (dqkv, dq_weight,
  dk_weight)`` (``centered``: QK-LayerNorm, the weights and their gradients are None)
  (block ops: docs/spec_block_ops.md; gate/h or scale/shift may be None)

Arguments arrive validated by ``vft_kernels.ops`` (see each op file for exact shapes);
tensors may have any strides. Outputs are allocated with :func:`new_output` so tests can
poison them.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils import _python_dispatch

BACKENDS = ("reference", "triton", "cuda", "cpu")
PRIORITY = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}
OPS = (
    "fsq_forward",
    "fsq_backward",
    "fsq_decode",
    "attention_forward",
    "attention_backward",
    "flow_step",
    "flow_heun_step",
    "block_norm_forward",
    "block_norm_backward",
    "swiglu_forward",
    "swiglu_backward",
    "qk_norm_forward",
    "qk_norm_backward",
)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the op here, or no backend can."""


@dataclass
class _Entry:
    target: str  # "package.module:function"
    devices: tuple
    check: Optional[str] = None  # "package.module:function" returning None or a reason
    _fn: Optional[Callable] = None
    _check_fn: Optional[Callable] = None
    _error: Optional[str] = None

    def load(self):
        """Import the implementation; returns None on success, else the reason."""
        if self._fn is None and self._error is None:
            try:
                self._fn = _resolve(self.target)
                self._check_fn = _resolve(self.check) if self.check else None
            except (ImportError, AttributeError, OSError, RuntimeError) as e:
                self._error = f"{self.target} could not be loaded ({type(e).__name__}: {e})"
        return self._error


def _resolve(target):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[tuple[str, str], _Entry] = {}


def preload(*ops: str) -> None:
    """Import the kernels of every registered backend of ``ops`` now (a failure is recorded
    as that backend's reason, as on first use). For callers that will run these ops inside
    torch.compile: Dynamo does not trace imports, so a first selection inside a graph would
    break it."""
    for (op, _), entry in list(_REGISTRY.items()):
        if op in ops:
            entry.load()


def register(op: str, backend: str, target: str, devices=("cpu", "cuda"), check: Optional[str] = None):
    """Register ``target`` ("module:function") as ``backend``'s kernel for ``op``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY[(op, backend)] = _Entry(target, tuple(devices), check)


# --------------------------------------------------------------------------------------
# Backend availability on this machine (independent of the op)


def _triton_status() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def _ext_status(kind: str) -> Optional[str]:
    from . import _ext

    if _ext.C is None:
        return f"vft_kernels._C is not built or failed to load ({_ext.load_error})"
    if kind == "cuda" and not _ext.C.build_info().get("with_cuda"):
        return "vft_kernels._C was built without CUDA kernels (" + _ext.C.build_info().get("cuda_reason", "") + ")"
    return None


def backend_status(backend: str) -> Optional[str]:
    """None if ``backend`` can run on this machine at all, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_status()
    if backend in ("cpu", "cuda"):
        return _ext_status(backend)
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def _device_status(backend: str, entry: _Entry, device: torch.device) -> Optional[str]:
    if device.type not in entry.devices:
        return f"runs on {'/'.join(entry.devices)}, not {device.type}"
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "runs on CPU tensors only under TRITON_INTERPRET=1"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    return None


# --------------------------------------------------------------------------------------
# Forcing a backend

_forced = threading.local()


def forced_backend() -> Optional[str]:
    """The backend forced by use_backend() or, failing that, by VFT_BACKEND."""
    name = getattr(_forced, "name", None)
    if name is None:
        name = os.environ.get("VFT_BACKEND") or None
    return name


class use_backend:
    """Force one backend for every op: ``vk.use_backend("cpu")`` sets it until changed,
    ``with vk.use_backend("cpu"): ...`` restores the previous choice on exit.
    ``use_backend(None)`` returns to automatic selection. Forcing a backend that cannot run
    on this machine is an error that says why."""

    def __init__(self, name: Optional[str]):
        if name is not None:
            if name not in BACKENDS:
                raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or None")
            reason = backend_status(name)
            if reason is not None:
                raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
        self._previous = getattr(_forced, "name", None)
        _forced.name = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _forced.name = self._previous
        return False


def capture_state() -> tuple:
    """The calling thread's dispatch state (forced backend, output poisoning), for an op's
    autograd context: autograd may run the backward on another thread (CUDA's device
    threads), where the thread-locals of use_backend / poison_outputs are not set."""
    return getattr(_forced, "name", None), getattr(_poison, "on", None)


@contextlib.contextmanager
def restored_state(state: tuple):
    """Runs a block (an op's backward) under a state from :func:`capture_state`, on any
    thread, restoring that thread's own state afterwards."""
    name, poison = state
    previous = getattr(_forced, "name", None), getattr(_poison, "on", None)
    _forced.name, _poison.on = name, poison
    try:
        yield
    finally:
        _forced.name, _poison.on = previous


# --------------------------------------------------------------------------------------
# Selection


def candidates(op: str, device: torch.device, *args, **kwargs):
    """Yield ``(backend, fn_or_None, reason_or_None)`` in priority order for this call."""
    for backend in PRIORITY.get(device.type, ("reference",)):
        yield (backend,) + _try(op, backend, device, args, kwargs)


def _try(op, backend, device, args, kwargs):
    entry = _REGISTRY.get((op, backend))
    if entry is None:
        return None, f"has no {op} kernel"
    reason = backend_status(backend) or _device_status(backend, entry, device) or entry.load()
    if reason is None and entry._check_fn is not None:
        reason = entry._check_fn(*args, **kwargs)
    if reason is not None:
        return None, reason
    return entry._fn, None


def select(op: str, device: torch.device, *args, **kwargs) -> tuple[str, Callable]:
    """Pick the backend for one call of ``op``; ``args`` are the implementation's arguments."""
    forced = forced_backend()
    if forced is not None:
        if forced not in BACKENDS:
            raise BackendUnavailableError(f"VFT_BACKEND={forced!r} is not a backend; expected one of {BACKENDS}")
        fn, reason = _try(op, forced, device, args, kwargs)
        if fn is None:
            raise BackendUnavailableError(f"forced backend {forced!r} cannot run {op} on {device.type}: {reason}")
        return forced, fn
    reasons = []
    for backend, fn, reason in candidates(op, device, *args, **kwargs):
        if fn is not None:
            return backend, fn
        reasons.append(f"{backend}: {reason}")
    raise BackendUnavailableError(f"no backend can run {op} on {device.type}: " + "; ".join(reasons))


def call(op: str, device: torch.device, *args, **kwargs):
    """Select a backend for ``op`` and run it."""
    return select(op, device, *args, **kwargs)[1](*args, **kwargs)


_SELECTED: dict = {}
_MAX_SELECTED = 256


def select_cached(op: str, key: tuple, device: torch.device, *args) -> tuple[str, Callable]:
    """:func:`select` with the choice memoised: for ops whose backends' ``check`` functions
    depend only on what ``key`` holds (e.g. the dtypes), so a hot loop of small calls pays
    one dictionary lookup instead of the walk over backends. The memo also keys on
    everything else selection reads (the forced backend, ``TRITON_INTERPRET``, the device)."""
    k = (op, key, device, forced_backend(), os.environ.get("TRITON_INTERPRET"))
    try:
        hit = _SELECTED.get(k)
    except TypeError:  # symbolic shapes (torch.export tracing) are not hashable: select afresh
        return select(op, device, *args)
    if hit is None:
        hit = select(op, device, *args)
        if len(_SELECTED) >= _MAX_SELECTED:
            _SELECTED.clear()
        _SELECTED[k] = hit
    return hit


def call_cached(op: str, key: tuple, device: torch.device, *args):
    """:func:`call` with the selection memoised (see :func:`select_cached`)."""
    return select_cached(op, key, device, *args)[1](*args)


def cpu_fast_path() -> bool:
    """True when an eager call of an op on CPU tensors may take a C++ fast path that runs the
    "cpu" backend directly: automatic selection (which picks "cpu" first for the CPU tensors
    a fast path accepts) or "cpu" forced, and no compilation, tracing or dispatch mode in
    force. A fast path still declines (returns None) anything it does not validate itself."""
    if torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None:
        return False
    name = getattr(_forced, "name", None)
    if name is None:
        name = os.environ.get("VFT_BACKEND") or None
    return name is None or name == "cpu"


def forced_backend_problems(backend: str, ops, device) -> list:
    """Why ``backend`` forced for all of ``ops`` on ``device`` would fail: one line per op it
    cannot run there (empty when it can run them all). Lets a program refuse up front, with
    the reason, instead of failing at the first call of a missing op mid-run."""
    device = torch.device(device)
    reason = backend_status(backend)
    if reason is not None:
        return [f"backend {backend!r} is not available: {reason}"]
    problems = []
    for op in ops:
        entry = _REGISTRY.get((op, backend))
        if entry is None:
            have = sorted(b for (o, b) in _REGISTRY if o == op)
            problems.append(f"{op} has no {backend} kernel (it is implemented by: {', '.join(have)})")
            continue
        why = _device_status(backend, entry, device) or entry.load()
        if why:
            problems.append(f"{op} cannot run on {backend} for {device.type} tensors: {why}")
    return problems


def available_backends() -> dict:
    """``{op: {device: [backends in priority order that can run it here]}}``.

    A backend is listed when it is available on this machine, has the op and runs on
    the device; whether it supports particular arguments (dtype, head dim) is decided per
    call."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table = {}
    for op in OPS:
        table[op] = {}
        for dev in devices:
            names = []
            for backend in PRIORITY[dev]:
                entry = _REGISTRY.get((op, backend))
                if entry is None:
                    continue
                d = torch.device(dev)
                if backend_status(backend) or _device_status(backend, entry, d) or entry.load():
                    continue
                names.append(backend)
            table[op][dev] = names
    return table


def explain(op: str, device_type: str) -> list[tuple[str, Optional[str]]]:
    """For ``info``: every backend of the device's priority list with None (usable) or why not."""
    d = torch.device(device_type)
    rows = []
    for backend in PRIORITY[device_type]:
        entry = _REGISTRY.get((op, backend))
        if entry is None:
            rows.append((backend, f"has no {op} kernel"))
            continue
        rows.append((backend, backend_status(backend) or _device_status(backend, entry, d) or entry.load()))
    return rows


# --------------------------------------------------------------------------------------
# Output allocation (poisoned in tests so unwritten elements are caught)

_poison = threading.local()


def poisoning() -> bool:
    flag = getattr(_poison, "on", None)
    if flag is None:
        flag = os.environ.get("VFT_POISON_OUTPUTS") == "1"
    return flag


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """While active, :func:`new_output` fills outputs with NaN (floats) or a sentinel
    (integers) instead of leaving them uninitialised."""
    previous = getattr(_poison, "on", None)
    _poison.on = enabled
    try:
        yield
    finally:
        _poison.on = previous


INT_POISON = -(2**30) + 7  # not a valid FSQ index nor -1


_HUGE_MIN: tuple = (object(), math.inf)  # (the extension module it was read from, its threshold)


def huge_min_bytes() -> float:
    """The size from which ``_C.empty_cpu`` puts CPU outputs on transparent huge pages, read
    from the extension (``_C.huge_pages()["min_bytes"]``, i.e. ``vft::kHugeMinBytes`` in
    csrc/include/vft/alloc.h, which says why 32 MiB); ``inf`` without the extension."""
    global _HUGE_MIN
    from . import _ext

    C = _ext.C
    if _HUGE_MIN[0] is not C:
        _HUGE_MIN = (C, C.huge_pages()["min_bytes"] if C is not None and hasattr(C, "huge_pages") else math.inf)
    return _HUGE_MIN[1]


def empty_output(shape, dtype, device) -> torch.Tensor:
    """``torch.empty``; CPU outputs of at least :func:`huge_min_bytes` come from
    ``_C.empty_cpu`` when the extension is loaded: sizes glibc maps afresh for every call, put
    on transparent huge pages where the OS allows them, so a fresh output faults once per 2 MiB
    instead of once per 4 KiB (``_C.huge_pages()``)."""
    if (torch.device(device).type == "cpu" and not torch.compiler.is_compiling()  # traced: torch.empty
            and math.prod(shape) * dtype.itemsize >= huge_min_bytes()):
        from . import _ext

        return _ext.C.empty_cpu(list(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def new_output(shape, dtype, device) -> torch.Tensor:
    """Allocate a kernel output (see ``empty_output``), poisoned when testing (NaN, or INT_POISON
    for integer outputs) so that elements a kernel leaves unwritten show."""
    out = empty_output(shape, dtype, device)
    if poisoning():
        out.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    return out
