"""Host wrappers of the C++ FSQ kernels (csrc/cpu/fsq.cpp, csrc/cuda/fsq.cu).

Serves backends ``cpu`` (CPU tensors -> ``*_cpu``) and ``cuda`` (CUDA tensors -> ``*_cuda``)
with the dispatch contract of ``vft_kernels.dispatch``. Importing fails (ImportError /
AttributeError) when ``_C`` lacks the CPU kernels, so the dispatcher reports the backend
unavailable.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import dispatch
from .._ext import C
from ..reference import fsq as ref

if C is None:
    raise ImportError("vft_kernels._C is not available")

_KERNELS = {
    "cpu": (C.fsq_forward_cpu, C.fsq_backward_cpu, C.fsq_decode_cpu),
    "cuda": tuple(getattr(C, f"fsq_{k}_cuda", None) for k in ("forward", "backward", "decode")),
}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIMS = 16
MAX_THRESHOLD_LEVEL = 16  # csrc/cpu/fsq.cpp kMaxThresholds + 1


@functools.lru_cache(maxsize=64)
def _consts(levels: tuple, eps: float) -> torch.Tensor:
    """[d, 4] float32 CPU: half_l, offset, shift, L // 2 per dim, computed by the reference
    so the kernels use bit-identical constants."""
    half_l, offset, shift, half_w = ref._constants(levels, eps, torch.float32, torch.device("cpu"))
    return torch.stack([half_l, offset, shift, half_w], dim=1).contiguous()


@functools.lru_cache(maxsize=64)
def _thresholds(levels: tuple, eps: float) -> torch.Tensor:
    """[d, max(levels) - 1] float32 CPU rounding thresholds of the CPU forward kernel, or an
    empty tensor (tanh path) when a level exceeds MAX_THRESHOLD_LEVEL.

    Row j, entry i: the smallest float32 x = z + shift that rounds above q_lo = i - L // 2,
    i.e. where tanh(x) half_l - offset passes the boundary q_lo + 0.5: x > atanh((q_lo + 0.5 +
    offset) / half_l), computed in float64 from the float32 constants the reference uses. An
    exactly representable threshold (0, or +-inf at a saturated tie) is an exact tie, which
    counts only when rounding half to even goes up (q_lo odd). Unused entries are NaN."""
    if max(levels) > MAX_THRESHOLD_LEVEL:
        return torch.empty(0, 0)
    half_l, offset, _, _ = ref._constants(levels, eps, torch.float32, torch.device("cpu"))
    n = max(levels) - 1
    exact, tie_up = torch.full((len(levels), n), math.nan, dtype=torch.float64), torch.zeros(len(levels), n, dtype=torch.bool)
    for j, L in enumerate(levels):
        for i in range(L - 1):
            q_lo = i - L // 2
            v = (q_lo + 0.5 + float(offset[j])) / float(half_l[j])
            exact[j, i] = math.copysign(math.inf, v) if abs(v) >= 1 else math.atanh(v)
            tie_up[j, i] = q_lo % 2 == 1
    f = exact.to(torch.float32)
    up = torch.nextafter(f, torch.tensor(math.inf))
    ties = f.double() == exact  # exactly representable: 0 or +-inf
    thr = torch.where(f.double() > exact, f, up)  # smallest float32 > exact
    never = torch.tensor(math.nan)  # x > +inf: no float32
    thr = torch.where(ties, torch.where(tie_up, f, torch.where(exact == math.inf, never, up)), thr)
    return thr.contiguous()


def _kernel(device: torch.device, which: int):
    fn = _KERNELS.get(device.type, (None,) * 3)[which]
    if fn is None:
        raise RuntimeError(f"vft_kernels._C has no FSQ {device.type} kernels")
    return fn


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """[..., d] -> [rows, d], a view whenever the strides allow one (kernels take strides)."""
    return t.reshape(-1, d)


def _common_reason(device: torch.device, levels) -> str | None:
    if _KERNELS.get(device.type, (None,))[0] is None:
        return f"no {device.type} FSQ kernels in vft_kernels._C"
    if len(levels) > MAX_DIMS:
        return f"{len(levels)} FSQ dims > {MAX_DIMS}"
    if math.prod(levels) >= 2**63:
        return f"prod(levels) = {math.prod(levels)} does not fit int64 indices"
    return None


def supports_fsq_forward(z, levels, eps, codes_dtype):
    if z.dtype not in KERNEL_DTYPES:
        return f"dtype {z.dtype} not supported (float32, float16, bfloat16)"
    if codes_dtype not in KERNEL_DTYPES:
        return f"codes dtype {codes_dtype} not supported (float32, float16, bfloat16)"
    return _common_reason(z.device, levels)


def supports_fsq_backward(grad_codes, z, levels, eps):
    if z.dtype not in KERNEL_DTYPES or grad_codes.dtype not in KERNEL_DTYPES:
        return f"dtypes z {z.dtype} / grad {grad_codes.dtype} not supported (float32, float16, bfloat16)"
    return _common_reason(z.device, levels)


def supports_fsq_decode(indices, levels):
    if indices.dtype not in (torch.int32, torch.int64):
        return f"index dtype {indices.dtype} not supported (int32, int64)"
    return _common_reason(indices.device, levels)


def fsq_forward(z, levels, eps, codes_dtype):
    """z [..., d] -> codes [..., d] (codes_dtype), indices [...] (int32/int64)."""
    levels = tuple(levels)
    codes = dispatch.new_output(z.shape, codes_dtype, z.device)
    indices = dispatch.new_output(z.shape[:-1], ref.index_dtype(levels), z.device)
    return fsq_forward_into(z, levels, eps, codes, indices)


def fsq_forward_into(z, levels, eps, codes, indices):
    """fsq_forward into given contiguous outputs (the benchmark's warm-output row)."""
    d = len(levels)
    if z.numel():
        args = (_rows(z, d), codes.view(-1, d), indices.view(-1), _consts(tuple(levels), float(eps)), list(levels))
        if z.device.type == "cpu":
            args += (_thresholds(tuple(levels), float(eps)),)
        _kernel(z.device, 0)(*args)
    return codes, indices


def fsq_backward(grad_codes, z, levels, eps):
    """grad_codes, z [..., d] -> grad_z [..., d] in the dtype of z."""
    levels = tuple(levels)
    d = len(levels)
    grad_z = dispatch.new_output(z.shape, z.dtype, z.device)
    if z.numel():
        _kernel(z.device, 1)(_rows(grad_codes, d), _rows(z, d), grad_z.view(-1, d), _consts(levels, float(eps)))
    return grad_z


def fsq_decode(indices, levels):
    """indices [...] int32/int64 (valid or -1) -> codes [..., d] float32; -1 -> NaN."""
    levels = tuple(levels)
    d = len(levels)
    codes = dispatch.new_output(tuple(indices.shape) + (d,), torch.float32, indices.device)
    if indices.numel():
        _kernel(indices.device, 2)(indices.reshape(-1), codes.view(-1, d), list(levels))
    return codes
