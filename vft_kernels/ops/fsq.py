"""FSQ op (docs/spec.md §1): argument checks, torch.library custom ops, autograd, backends."""
from __future__ import annotations

import math
import struct
from typing import Optional, Sequence

import torch

from .. import dispatch
from ..reference import fsq as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The largest codebook whose indices a float32 sum of integer terms gives exactly (2**24, the
# float32 significand). Official FSQ implementations sum their index terms in float32, so
# their tokens agree with vft's exact int32 / int64 indices only up to this size.
MAX_EXACT_CODEBOOK = 2**24

for _op in ("fsq_forward", "fsq_backward", "fsq_decode"):
    dispatch.register(_op, "reference", f"vft_kernels.reference.fsq:{_op}")
    dispatch.register(_op, "triton", f"vft_kernels.triton.fsq:{_op}", check=f"vft_kernels.triton.fsq:supports_{_op}")
    dispatch.register(_op, "cpu", f"vft_kernels.cpp.fsq:{_op}", devices=("cpu",),
                      check=f"vft_kernels.cpp.fsq:supports_{_op}")
    dispatch.register(_op, "cuda", f"vft_kernels.cpp.fsq:{_op}", devices=("cuda",),
                      check=f"vft_kernels.cpp.fsq:supports_{_op}")


def check_levels(levels, d: Optional[int] = None) -> tuple[int, ...]:
    """Validate FSQ levels (and that there is one per feature dim); returns a tuple."""
    if isinstance(levels, torch.Tensor):
        levels = levels.tolist()
    try:
        levels = tuple(levels)
    except TypeError:
        raise TypeError(f"fsq: levels must be a sequence of ints, got {type(levels).__name__}") from None
    if len(levels) == 0:
        raise ValueError("fsq: levels must be a non-empty sequence of ints >= 2, got ()")
    bad = [L for L in levels if not isinstance(L, int) or isinstance(L, bool) or L < 2]
    if bad:
        raise ValueError(f"fsq: every level must be an int >= 2, got {bad[0]!r} in levels={levels}")
    if d is not None and len(levels) != d:
        raise ValueError(f"fsq: expected len(levels) == z.shape[-1] == {d}, got {len(levels)} levels {levels}")
    return levels


# --------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; the backend is chosen when they run)


@torch.library.custom_op("vft::fsq_quantize", mutates_args=())
def _fsq_quantize(z: torch.Tensor, levels: list[int], eps: float,
                  out_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    levels = tuple(levels)
    codes_dtype = out_dtype or ref.compute_dtype(z.dtype)
    return dispatch.call("fsq_forward", z.device, z, levels, eps, codes_dtype)


@_fsq_quantize.register_fake
def _(z, levels, eps, out_dtype):
    codes = z.new_empty(z.shape, dtype=out_dtype or ref.compute_dtype(z.dtype))
    return codes, z.new_empty(z.shape[:-1], dtype=ref.index_dtype(levels))


@torch.library.custom_op("vft::fsq_quantize_backward", mutates_args=())
def _fsq_quantize_backward(grad_codes: torch.Tensor, z: torch.Tensor, levels: list[int],
                           eps: float) -> torch.Tensor:
    return dispatch.call("fsq_backward", z.device, grad_codes, z, tuple(levels), eps)


@_fsq_quantize_backward.register_fake
def _(grad_codes, z, levels, eps):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, levels, eps, _ = inputs
    ctx.save_for_backward(z)
    ctx.levels, ctx.eps = levels, eps
    ctx.dispatch_state = dispatch.capture_state()  # the backward runs under the forward's choice
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_codes, grad_indices):
    (z,) = ctx.saved_tensors
    with dispatch.restored_state(ctx.dispatch_state):
        return _fsq_quantize_backward(grad_codes, z, ctx.levels, ctx.eps), None, None, None


_fsq_quantize.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("vft::fsq_indices_to_codes", mutates_args=())
def _fsq_indices_to_codes(indices: torch.Tensor, levels: list[int], validate: bool) -> torch.Tensor:
    levels = tuple(levels)
    if validate and indices.numel() > 0:
        n = math.prod(levels)
        bad = (indices != -1) & ((indices < 0) | (indices >= n))
        if bool(bad.any()):
            value = int(indices[bad].reshape(-1)[0])
            raise ValueError(f"fsq_indices_to_codes: index {value} is outside the valid range [0, {n}) "
                             f"for levels {levels} (-1 marks a NaN row)")
    return dispatch.call("fsq_decode", indices.device, indices, levels)


@_fsq_indices_to_codes.register_fake
def _(indices, levels, validate):
    return indices.new_empty(tuple(indices.shape) + (len(levels),), dtype=torch.float32)


def _f32(x: float) -> float:
    """Round a Python float to float32 (plain Python, so torch.compile traces it)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def check_saturation(levels: tuple[int, ...], eps: float) -> None:
    """Reject eps for which +-inf (or a large |z|) would round outside [-(L//2), (L-1)//2].

    |bounded| is largest where tanh = +-1: bounded = +-half_l - offset, in float32 exactly as
    reference._constants (whose constants every backend uses) computes it. Roughly eps * (L - 1)
    must stay below 1; at equality the saturated value is an exact tie k + 0.5, which
    half-to-even rounding keeps in range for some L (5, 9, 17, ...) but not others (3, 7, ...),
    so the check rounds the actual float32 values (Python's round is half-to-even too)."""
    for L in levels:
        half_l = _f32(_f32(float(L - 1)) * _f32(1 + eps)) / 2
        offset = 0.5 if L % 2 == 0 else 0.0
        hi, lo = round(_f32(half_l - offset)), round(_f32(-half_l - offset))
        if hi > (L - 1) // 2 or lo < -(L // 2):
            raise ValueError(f"fsq_quantize: eps={eps!r} is too large for level {L} (levels={levels}): saturated inputs would "
                             f"round to q={hi} / {lo}, outside [{-(L // 2)}, {(L - 1) // 2}] "
                             f"(eps * (L - 1) must stay below about 1, i.e. eps < {1 / (L - 1):.3g})")


# --------------------------------------------------------------------------------------
# Eager CPU fast path
#
# An ordinary eager CPU forward (no autograd, no compilation, tracing, dispatch or function
# mode, a plain tensor) runs the cpu backend's kernel directly instead of through the custom
# op: the same kernel, outputs and errors, without the custom op's ~35 us of Python dispatch a
# call. That fixed cost does not shrink with threads: at 256K tokens it was a tenth of a
# 2-thread forward (perf: avx2, 1 thread 1.0 ms kernel + 0.05 ms; 2 threads 0.5 ms + 0.05 ms).
# Anything else, including every call whose arguments the checks below would reject, takes
# the checked path.

_VALID_ARGS: dict = {}  # (levels, eps) that passed fsq_quantize's argument checks
_MAX_VALID_ARGS = 256


def _args_valid(levels: tuple, eps) -> bool:
    """True when ``levels`` (a tuple of ints) and ``eps`` pass fsq_quantize's checks, memoised."""
    key = (levels, eps)
    if key in _VALID_ARGS:
        return True
    try:
        check_levels(levels)
        ok = isinstance(eps, (int, float)) and 0 <= eps < 1 and not (eps == 0 and 2 in levels)
        if ok:
            check_saturation(levels, float(eps))
    except (TypeError, ValueError):
        return False
    if ok:
        if len(_VALID_ARGS) >= _MAX_VALID_ARGS:
            _VALID_ARGS.clear()
        _VALID_ARGS[key] = True
    return ok


def _fast_forward(z, levels, eps, out_dtype):
    """fsq_quantize's result computed by the cpu backend directly, or None (nothing run) when
    the call is not an ordinary eager CPU call the checked path would give to that backend."""
    # (compilation first: under torch.compile this returns before anything else is traced)
    if not (dispatch.cpu_fast_path() and type(z) is torch.Tensor and z.is_cpu):
        return None
    if (torch._C._is_torch_function_mode_enabled() or torch._C._functorch.is_functorch_wrapped_tensor(z)
            or dispatch.PRIORITY["cpu"][0] != "cpu"):
        return None
    if (torch.is_grad_enabled() and z.requires_grad) or z.dim() < 1 or z.shape[-1] != len(levels):
        return None
    if type(levels) not in (tuple, list) or type(eps) not in (float, int):
        return None
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        return None
    levels = tuple(levels)
    if not all(type(L) is int for L in levels) or not _args_valid(levels, eps):
        return None
    args = (z, levels, float(eps), out_dtype or ref.compute_dtype(z.dtype))
    fn, _ = dispatch._try("fsq_forward", "cpu", z.device, args, {})  # None: what select() would not run
    return None if fn is None else fn(*args)


# --------------------------------------------------------------------------------------
# Public API


def fsq_quantize(z: torch.Tensor, levels: Sequence[int], eps: float = 1e-3,
                 out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite scalar quantization of ``z`` [..., d] (fp32/fp16/bf16, any strides).

    Returns ``codes`` [..., d] in [-1, 1] (float32, or ``out_dtype``) and ``indices`` [...]
    (int32, int64 when prod(levels) >= 2**31; -1 for rows containing NaN). ``codes`` is
    differentiable (straight-through rounding); ``indices`` is not."""
    res = _fast_forward(z, levels, eps, out_dtype)
    if res is not None:
        return res
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"fsq_quantize: z must be a torch.Tensor, got {type(z).__name__}")
    if z.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fsq_quantize: z must be a float tensor (float32, float16, bfloat16), got {z.dtype}")
    if z.dim() < 1:
        raise ValueError(f"fsq_quantize: z must have shape [..., d], got a 0-dim tensor")
    levels = check_levels(levels, z.shape[-1])
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"fsq_quantize: out_dtype must be a float dtype or None, got {out_dtype}")
    if not (isinstance(eps, (int, float)) and 0 <= eps < 1):
        raise ValueError(f"fsq_quantize: eps must be a float in [0, 1), got {eps!r}")
    if eps == 0 and 2 in levels:  # shift = atanh(offset / half_l) = atanh(1) = inf: -inf input gives NaN
        raise ValueError(f"fsq_quantize: eps must be > 0 when a level is 2 (levels={levels}), got eps={eps!r}")
    check_saturation(levels, float(eps))
    return _fsq_quantize(z, list(levels), float(eps), out_dtype)


def fsq_indices_to_codes(indices: torch.Tensor, levels: Sequence[int], validate: bool = True) -> torch.Tensor:
    """Decode FSQ ``indices`` [...] (int) into codes [..., d] float32; -1 decodes to NaN.

    With ``validate`` (default) any other index outside [0, prod(levels)) raises ValueError
    (this inspects the values, a host sync on GPU)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"fsq_indices_to_codes: indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"fsq_indices_to_codes: indices must be an integer tensor, got {indices.dtype}")
    levels = check_levels(levels)
    return _fsq_indices_to_codes(indices, list(levels), bool(validate))
