"""Host wrappers of the C++ register attention kernels (csrc/cpu/attention.cpp, backend "cpu").

Backend contract (vft_kernels/dispatch.py): ``attention_forward(q, k, v, layout, keep,
scale) -> (out, lse)`` and ``attention_backward(dout, q, k, v, out, lse, layout, keep,
scale) -> (dq, dk, dv)``, arguments validated by vft_kernels/ops/attention.py.
"""
from __future__ import annotations

import torch

from .._ext import C as _C
from .._ext import load_error as _load_error
from ..dispatch import new_output
from ..layout import MODES

if _C is None:
    raise ImportError(f"vft_kernels._C is not available ({_load_error})")
_forward_cpu = _C.attention_forward_cpu  # AttributeError -> backend reported unavailable
_backward_cpu = _C.attention_backward_cpu

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


def _supports(q: torch.Tensor):
    if q.device.type != "cpu":
        return f"runs on cpu tensors, not {q.device.type}"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} not supported (float32, bfloat16, float16)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None


def _keep_i32(keep: torch.Tensor, layout) -> torch.Tensor:
    """The kernels' keep: contiguous int32 [samples, T] per-block keeps (a per-sample keep
    [samples] repeated over the blocks: samples * T ints)."""
    keep = keep.to(torch.int32)
    if keep.dim() == 1:
        keep = keep[:, None].expand(keep.shape[0], layout.blocks)
    return keep.contiguous()


_DENSE = torch.empty(0, dtype=torch.int32)


def _cu_i32(cu_seqlens) -> torch.Tensor:
    """The kernels' cu_seqlens argument: an empty tensor for dense calls."""
    return _DENSE if cu_seqlens is None else cu_seqlens.to(torch.int32).contiguous()


def supports_attention_forward(q, k, v, layout, keep, scale, cu_seqlens=None):
    return _supports(q)


def supports_attention_backward(dout, q, k, v, out, lse, layout, keep, scale, cu_seqlens=None):
    return _supports(q)


def attention_forward(q, k, v, layout, keep, scale, cu_seqlens=None):
    """q, k, v [B, H, N, D] (float32/bfloat16/float16, any strides), keep int [B] or [B, T] ->
    (out [B, H, N, D] q.dtype, lse [B, H, N] float32, -inf on dropped rows). Packed calls:
    B = 1, keep [S] or [S, T], cu_seqlens int [S + 1]; padding rows give 0 / -inf."""
    B, H, N, D = q.shape
    out = new_output((B, H, N, D), q.dtype, q.device)
    lse = new_output((B, H, N), torch.float32, q.device)
    _forward_cpu(q, k, v, _keep_i32(keep, layout), _cu_i32(cu_seqlens), layout.blocks, layout.patches, layout.registers,
                 MODES.index(layout.mode), float(scale), out, lse)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, layout, keep, scale, cu_seqlens=None):
    """dout, q, k, v, out [B, H, N, D], lse float32 [B, H, N] from attention_forward ->
    (dq, dk, dv) [B, H, N, D] in q.dtype; zero for dropped tokens."""
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(q.shape, q.dtype, q.device)
    dv = new_output(q.shape, q.dtype, q.device)
    _backward_cpu(dout, q, k, v, out, lse.float(), _keep_i32(keep, layout), _cu_i32(cu_seqlens), layout.blocks, layout.patches,
                  layout.registers, MODES.index(layout.mode), float(scale), dq, dk, dv)
    return dq, dk, dv
