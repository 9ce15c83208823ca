"""Flow ODE step ops (docs/spec.md §3): argument checks, torch.library custom ops, backends.

Inference ops: when any input requires grad, the differentiable reference runs instead
of a kernel."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch.utils import _python_dispatch

from .. import dispatch
from ..reference import flow as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GUIDANCE = ("none", "cfg", "apg")

dispatch.register("flow_step", "reference", "vft_kernels.reference.flow:flow_step_out")
dispatch.register("flow_heun_step", "reference", "vft_kernels.reference.flow:flow_heun_step_out")
for _op in ("flow_step", "flow_heun_step"):
    dispatch.register(_op, "triton", f"vft_kernels.triton.flow:{_op}", check=f"vft_kernels.triton.flow:supports_{_op}")
    dispatch.register(_op, "cpu", f"vft_kernels.cpp.flow:{_op}", devices=("cpu",),
                      check=f"vft_kernels.cpp.flow:supports_{_op}")
    dispatch.register(_op, "cuda", f"vft_kernels.cpp.flow:{_op}", devices=("cuda",),
                      check=f"vft_kernels.cpp.flow:supports_{_op}")

Time = Union[float, torch.Tensor]


_UNRESOLVED = object()
# The C++ fast paths of eager CPU flow steps (_C.flow_step_fast, _C.flow_heun_step_fast),
# resolved on the first call: importing vft_kernels must not load _C (see dispatch.py).
# Tests may replace them (None: no fast path).
_FAST = _UNRESOLVED
_FAST_HEUN = _UNRESOLVED


def _fast_entry():
    """``_C.flow_step_fast``, or None without _C. Loads _C the first time (both entries)."""
    global _FAST, _FAST_HEUN
    if _FAST is _UNRESOLVED or _FAST_HEUN is _UNRESOLVED:
        from .._ext import C

        if _FAST is _UNRESOLVED:
            _FAST = getattr(C, "flow_step_fast", None) if C is not None else None
        if _FAST_HEUN is _UNRESOLVED:
            _FAST_HEUN = getattr(C, "flow_heun_step_fast", None) if C is not None else None
    return _FAST


def _fast_heun_entry():
    """``_C.flow_heun_step_fast``, or None without _C."""
    _fast_entry()
    return _FAST_HEUN


def _run_fast(fast, x, out, *args):
    """Runs a C++ fast path (``fast(x, *args, out)``) for an eager CPU call; its result, or
    None when it declined (having run nothing) and the checked path must take over."""
    dst = out
    if dst is None and dispatch.poisoning() and isinstance(x, torch.Tensor):
        dst = dispatch.new_output(x.shape, x.dtype, x.device)  # tests: unwritten elements show
    try:
        return fast(x, *args, dst)
    except TypeError:  # an argument of the wrong type: the checked path says which
        return None


def _check_tensor(name, t, like):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flow_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"flow_step: {name} must have x's shape {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        raise ValueError(f"flow_step: {name} must have x's dtype {like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"flow_step: {name} must be on x's device {like.device}, got {t.device}")


def _check_x(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"flow_step: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"flow_step: x must be float32, float16 or bfloat16, got {x.dtype}")


_TIMES: dict = {}
_MAX_TIMES = 512


def _float_times(value: float, B: int, device: torch.device, like: torch.Tensor) -> torch.Tensor:
    """A float32 [B] tensor filled with ``value``, memoised (a sampler asks for the same
    few dozen times every call; the kernels only read them). Only plain eager tensors are
    memoised: never while compiling, exporting or under any other tracing mode (``like``,
    the step's x, is then a fake / proxy tensor or a mode is active)."""
    if (type(B) is not int or type(like) is not torch.Tensor or torch.compiler.is_compiling()
            or _python_dispatch._get_current_dispatch_mode() is not None):
        return torch.full((B,), value, dtype=torch.float32, device=device)
    key = (value, B, device)
    out = _TIMES.get(key)
    if out is None:
        if len(_TIMES) >= _MAX_TIMES:
            _TIMES.clear()
        out = _TIMES[key] = torch.full((B,), value, dtype=torch.float32, device=device)
    return out


def _time_tensors(t: Time, t_next: Time, x: torch.Tensor):
    """Validate t, t_next (floats or [B] float tensors); return float32 [B] tensors on x's device."""
    B = x.shape[0]
    out = []
    for name, value in (("t", t), ("t_next", t_next)):
        if isinstance(value, torch.Tensor):
            if not value.dtype.is_floating_point:
                raise ValueError(f"flow_step: {name} must be a float or a float tensor [B], got dtype {value.dtype}")
            if tuple(value.shape) != (B,):
                raise ValueError(f"flow_step: {name} must be a float or a tensor of shape [B] = ({B},), "
                                 f"got {tuple(value.shape)}")
            if value.device != x.device:
                raise ValueError(f"flow_step: {name} must be on x's device {x.device}, got {value.device}")
            out.append(value.to(torch.float32))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(_float_times(float(value), B, x.device, x))
        else:
            raise TypeError(f"flow_step: {name} must be a float or a float tensor [B], got {type(value).__name__}")
    if not isinstance(t, torch.Tensor) and not isinstance(t_next, torch.Tensor) and not t_next < t:
        raise ValueError(f"flow_step: sampling runs from t=1 to t=0, so t_next must be < t; got t={t}, t_next={t_next}")
    return out


def _check_time_values(t, t_next):
    # Tensor times: checked where it costs no sync (CPU), or outside CUDA-graph capture.
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    bad = ~(t_next < t)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"flow_step: t_next must be < t for every sample; sample {i} has "
                         f"t={float(t[i])}, t_next={float(t_next[i])}")


def _contiguous_out(out: torch.Tensor):
    return out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)


def _run_flow_step(out, x, v_cond, v_uncond, t, t_next, guidance, scale, apg_eta, apg_norm_threshold,
                   apg_momentum, momentum, reduce_ndim, prefix, prefix_len):
    dst = _contiguous_out(out)
    mom = momentum if momentum is None or momentum.is_contiguous() else momentum.contiguous()
    # The backends' checks read only these: dtypes, and the row count (shape, guidance, reduce_ndim).
    key = (x.dtype, None if mom is None else mom.dtype, x.shape, guidance, reduce_ndim)
    dispatch.call_cached("flow_step", key, x.device, dst, x, v_cond,
                         v_uncond, t, t_next, guidance, scale, apg_eta, apg_norm_threshold, apg_momentum, mom,
                         reduce_ndim, prefix, prefix_len)
    if dst is not out:
        out.copy_(dst)
    if mom is not momentum:
        momentum.copy_(mom)


@torch.library.custom_op("vft::flow_step", mutates_args=("out", "momentum"))
def _flow_step(out: torch.Tensor, x: torch.Tensor, v_cond: torch.Tensor, v_uncond: Optional[torch.Tensor],
               t: torch.Tensor, t_next: torch.Tensor, guidance: str, scale: float, apg_eta: float,
               apg_norm_threshold: float, apg_momentum: float, momentum: Optional[torch.Tensor],
               reduce_ndim: int, prefix: Optional[torch.Tensor], prefix_len: int) -> None:
    _check_time_values(t, t_next)
    _run_flow_step(out, x, v_cond, v_uncond, t, t_next, guidance, scale, apg_eta, apg_norm_threshold,
                   apg_momentum, momentum, reduce_ndim, prefix, prefix_len)


@_flow_step.register_fake
def _(out, x, v_cond, v_uncond, t, t_next, guidance, scale, apg_eta, apg_norm_threshold, apg_momentum,
      momentum, reduce_ndim, prefix, prefix_len):
    return None


def _run_flow_heun_step(out, x, v1, v2, t, t_next):
    dst = _contiguous_out(out)
    dispatch.call_cached("flow_heun_step", (x.dtype, x.shape), x.device, dst, x, v1, v2, t, t_next)
    if dst is not out:
        out.copy_(dst)


@torch.library.custom_op("vft::flow_heun_step", mutates_args=("out",))
def _flow_heun_step(out: torch.Tensor, x: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, t: torch.Tensor,
                    t_next: torch.Tensor) -> None:
    _check_time_values(t, t_next)
    _run_flow_heun_step(out, x, v1, v2, t, t_next)


@_flow_heun_step.register_fake
def _(out, x, v1, v2, t, t_next):
    return None


def _user_times(t, t_next):
    """Float times were checked in _time_tensors; tensors need a value check."""
    return isinstance(t, torch.Tensor) or isinstance(t_next, torch.Tensor)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_out(out, x):
    if out is None:
        return dispatch.new_output(x.shape, x.dtype, x.device)
    _check_tensor("out", out, x)
    return out


def flow_step(x: torch.Tensor, v_cond: torch.Tensor, t: Time, t_next: Time, v_uncond: Optional[torch.Tensor] = None,
              guidance: str = "none", scale: float = 1.0, apg_eta: float = 0.0, apg_norm_threshold: float = 0.0,
              apg_momentum: float = 0.0, momentum: Optional[torch.Tensor] = None, reduce_ndim: int = 3,
              prefix: Optional[torch.Tensor] = None, prefix_len: int = 0,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One Euler step of the flow ODE with fused guidance (docs/spec.md §3).

    x, v_cond, v_uncond: [B, ...] with at least reduce_ndim + 1 dims, same shape/dtype/device.
    t, t_next: floats or float tensors [B], t_next < t (sampling runs from 1 to 0).
    guidance: "none" (v = v_cond), "cfg" (v = v_uncond + scale (v_cond - v_uncond)) or
    "apg" (adaptive projected guidance; groups are all but the last reduce_ndim dims).
    momentum: APG state (shape of x, zeros before the first step), updated in place;
    required when apg_momentum != 0. prefix: [B, C, prefix_len, ...] clean frames that
    replace the first prefix_len entries of dim 2 of the result. out: optional output
    (may be x itself for an in-place step). Returns x_next in x's dtype."""
    fast = _FAST if _FAST is not _UNRESOLVED else _fast_entry()
    if fast is not None and dispatch.cpu_fast_path():
        # Ordinary eager CPU calls: validated and run by one C++ call; it returns None,
        # having run nothing, for whatever needs the checks below (and their errors).
        res = _run_fast(fast, x, out, v_cond, t, t_next, v_uncond, guidance, scale, apg_eta, apg_norm_threshold,
                        apg_momentum, momentum, reduce_ndim, prefix, prefix_len)
        if res is not None:
            return res
    _check_x(x)
    if guidance not in GUIDANCE:
        raise ValueError(f"flow_step: guidance must be one of {GUIDANCE}, got {guidance!r}")
    _check_tensor("v_cond", v_cond, x)
    if guidance != "none":
        if v_uncond is None:
            raise ValueError(f"flow_step: guidance={guidance!r} needs v_uncond, got None")
        _check_tensor("v_uncond", v_uncond, x)
    if not isinstance(reduce_ndim, int) or reduce_ndim < 1 or x.dim() < reduce_ndim + 1:
        raise ValueError(f"flow_step: x must have at least reduce_ndim + 1 dims; got reduce_ndim={reduce_ndim!r} "
                         f"and x of shape {tuple(x.shape)}")
    if guidance == "apg" and apg_momentum != 0:
        if momentum is None:
            raise ValueError(f"flow_step: apg_momentum={apg_momentum} needs a momentum state tensor "
                             f"(zeros shaped like x {tuple(x.shape)}), got None")
        if not isinstance(momentum, torch.Tensor) or momentum.shape != x.shape or momentum.device != x.device \
                or not momentum.dtype.is_floating_point:
            got = (f"{tuple(momentum.shape)} {momentum.dtype} on {momentum.device}"
                   if isinstance(momentum, torch.Tensor) else type(momentum).__name__)
            raise ValueError(f"flow_step: momentum must be a float tensor of x's shape {tuple(x.shape)} on "
                             f"{x.device}, got {got}")
    if apg_norm_threshold < 0:
        raise ValueError(f"flow_step: apg_norm_threshold must be >= 0, got {apg_norm_threshold}")
    if not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"flow_step: prefix_len must be an int >= 0, got {prefix_len!r}")
    if prefix_len > 0:
        if x.dim() < 3 or prefix_len > x.shape[2]:
            raise ValueError(f"flow_step: prefix_len={prefix_len} must be <= x.shape[2] (time) for x of shape "
                             f"{tuple(x.shape)}")
        want = tuple(x.shape[:2]) + (prefix_len,) + tuple(x.shape[3:])
        if not isinstance(prefix, torch.Tensor) or tuple(prefix.shape) != want:
            got = tuple(prefix.shape) if isinstance(prefix, torch.Tensor) else prefix
            raise ValueError(f"flow_step: prefix must have shape {want} for prefix_len={prefix_len}, got {got}")
        if prefix.dtype != x.dtype or prefix.device != x.device:
            raise ValueError(f"flow_step: prefix must be {x.dtype} on {x.device}, got {prefix.dtype} on {prefix.device}")
    else:
        prefix = None
    t_, tn_ = _time_tensors(t, t_next, x)
    mom = momentum if guidance == "apg" and apg_momentum != 0 else None
    if _needs_grad(x, v_cond, v_uncond, prefix, t_, tn_):
        res = ref.flow_step(x, v_cond, t, t_next, v_uncond, guidance, scale, apg_eta, apg_norm_threshold,
                            apg_momentum, mom, reduce_ndim, prefix, prefix_len)
        return res if out is None else out.copy_(res)
    dst = _check_out(out, x)
    args = (dst, x, v_cond, v_uncond if guidance != "none" else None, t_, tn_, guidance, float(scale), float(apg_eta),
            float(apg_norm_threshold), float(apg_momentum), mom, reduce_ndim, prefix, prefix_len)
    if torch.compiler.is_compiling():
        _flow_step(*args)
    else:  # eager: skip the custom-op machinery (tens of microseconds per call)
        if _user_times(t, t_next):
            _check_time_values(t_, tn_)
        _run_flow_step(*args)
    return dst


class _LoopStepper:
    """The guided Euler step of one sampling loop (``vft_kernels.flow_sample``) without the
    per-call cost of :func:`flow_step`: the loop validates its options once, makes its own
    times (a decreasing grid, so no per-step value check) and its own contiguous buffers, so
    each step only checks the velocities it is given (shape, dtype, device, autograd) and
    calls the backend selected at the first step. Anything unusual (a velocity that
    requires grad, a non-contiguous one) goes through :func:`flow_step`."""

    def __init__(self, opts: dict):
        self.opts, self.fn = opts, None
        self.mom = opts.get("momentum") if opts["guidance"] == "apg" and opts["apg_momentum"] != 0 else None
        self.guided = opts["guidance"] != "none"
        o = opts
        self.tail = (o["guidance"], float(o["scale"]), float(o["apg_eta"]), float(o["apg_norm_threshold"]),
                     float(o["apg_momentum"]), self.mom, o["reduce_ndim"], o["prefix"] if o["prefix_len"] else None,
                     o["prefix_len"])

    def __call__(self, x, v_cond, t, t_next, v_uncond, out):
        if self.fn is None or torch.compiler.is_compiling():  # first step: every check, pick the backend
            flow_step(x, v_cond, t, t_next, v_uncond, **self.opts, out=out)
            if not torch.compiler.is_compiling():
                vu = v_uncond if self.guided else None
                self.fn = dispatch.select("flow_step", x.device, out, x, v_cond, vu, t, t_next, *self.tail)[1]
            return out
        _check_tensor("v_cond", v_cond, x)
        if self.guided:
            _check_tensor("v_uncond", v_uncond, x)
        vu = v_uncond if self.guided else None
        if not (v_cond.is_contiguous() and (vu is None or vu.is_contiguous())) or _needs_grad(v_cond, vu):
            return flow_step(x, v_cond, t, t_next, v_uncond, **self.opts, out=out)
        self.fn(out, x, v_cond, vu, t, t_next, *self.tail)
        return out


def flow_heun_step(x: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor, t: Time, t_next: Time,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Heun (second-order) update: x + (t_next - t) * (v1 + v2) / 2, with v1 the (guided)
    velocity at (x, t) and v2 at (x + (t_next - t) v1, t_next)."""
    fast = _FAST_HEUN if _FAST_HEUN is not _UNRESOLVED else _fast_heun_entry()
    if fast is not None and dispatch.cpu_fast_path():  # as in flow_step
        res = _run_fast(fast, x, out, v1, v2, t, t_next)
        if res is not None:
            return res
    _check_x(x)
    _check_tensor("v1", v1, x)
    _check_tensor("v2", v2, x)
    t_, tn_ = _time_tensors(t, t_next, x)
    if _needs_grad(x, v1, v2, t_, tn_):
        res = ref.flow_heun_step(x, v1, v2, t, t_next)
        return res if out is None else out.copy_(res)
    dst = _check_out(out, x)
    if torch.compiler.is_compiling():
        _flow_heun_step(dst, x, v1, v2, t_, tn_)
    else:  # eager: skip the custom-op machinery (tens of microseconds per call)
        if _user_times(t, t_next):
            _check_time_values(t_, tn_)
        _run_flow_heun_step(dst, x, v1, v2, t_, tn_)
    return dst
