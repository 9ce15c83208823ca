"""Host wrappers of the C++ block-op kernels (csrc/cpu/block.cpp, backend ``cpu``).

Backend contract: vft_kernels/dispatch.py (``block_norm_*``, ``swiglu_*``, ``qk_norm_*``),
arguments validated by vft_kernels/ops/block.py. The kernels take contiguous tensors; a
non-contiguous input is copied here (outputs are always fresh and contiguous)."""
from __future__ import annotations

import torch

from .._ext import C as _C
from .._ext import load_error as _load_error
from ..dispatch import new_output

if _C is None:
    raise ImportError(f"vft_kernels._C is not available ({_load_error})")
_norm_fwd, _norm_bwd = _C.block_norm_forward_cpu, _C.block_norm_backward_cpu  # AttributeError -> unavailable
_swiglu_fwd, _swiglu_bwd = _C.swiglu_forward_cpu, _C.swiglu_backward_cpu
_qk_fwd, _qk_bwd = _C.qk_norm_forward_cpu, _C.qk_norm_backward_cpu

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(*args):
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu":
                return f"runs on cpu tensors, not {a.device.type}"
            if a.dtype not in DTYPES:
                return f"dtype {a.dtype} not supported (float32, bfloat16, float16)"
    return None


def _frames(t, S=None):
    """[B, T, S, W] -> contiguous [B T, S, W]; None stays None."""
    if t is None:
        return None
    return t.reshape(t.shape[0] * t.shape[1], t.shape[2], t.shape[3]).contiguous()


def block_norm_forward(x, gate, h, scale, shift, patches, eps):
    B, T, S, W = x.shape
    x_new = new_output(x.shape, x.dtype, x.device) if h is not None else None
    y = new_output(x.shape, x.dtype, x.device) if scale is not None else None
    _norm_fwd(_frames(x), _frames(gate), _frames(h), _frames(scale), _frames(shift), int(patches), float(eps),
              _frames(x_new), _frames(y))
    return x_new, y


def _like(t):
    return None if t is None else new_output(t.shape, t.dtype, t.device)


def block_norm_backward(d_res, dy, xn, gate, h, scale, shift, patches, eps):
    g = new_output(xn.shape, xn.dtype, xn.device)
    dgate, dh, dscale, dshift = _like(gate), _like(h), _like(scale), _like(shift)
    _norm_bwd(_frames(d_res), _frames(dy) if scale is not None else None, _frames(xn), _frames(gate), _frames(h),
              _frames(scale), int(patches), float(eps), _frames(g), _frames(dgate), _frames(dh), _frames(dscale),
              _frames(dshift))
    return g, dgate, dh, dscale, dshift


def swiglu_forward(gate_up):
    H = gate_up.shape[-1] // 2
    out = new_output(tuple(gate_up.shape[:-1]) + (H,), gate_up.dtype, gate_up.device)
    _swiglu_fwd(gate_up.reshape(-1, 2 * H).contiguous(), out.view(-1, H))
    return out


def swiglu_backward(dout, gate_up):
    H = gate_up.shape[-1] // 2
    dgu = new_output(gate_up.shape, gate_up.dtype, gate_up.device)
    _swiglu_bwd(dout.reshape(-1, H).contiguous(), gate_up.reshape(-1, 2 * H).contiguous(), dgu.view(-1, 2 * H))
    return dgu


def _weights(q_weight, k_weight):
    """float32 [2, D] (q, k) for the RMSNorm; None for the centred LayerNorm (no weights)."""
    if q_weight is None:
        return None
    return torch.stack([q_weight.detach().float(), k_weight.detach().float()]).contiguous()


def qk_norm_forward(qkv, heads, q_weight, k_weight, eps, centered=False):
    B, N, W3 = qkv.shape
    shape = (B, heads, N, W3 // (3 * heads))
    q, k, v = (new_output(shape, qkv.dtype, qkv.device) for _ in range(3))
    _qk_fwd(qkv.contiguous(), int(heads), _weights(q_weight, k_weight), float(eps), bool(centered), q, k, v)
    return q, k, v


def qk_norm_backward(dq, dk, dv, qkv, heads, q_weight, k_weight, eps, centered=False):
    dqkv = new_output(qkv.shape, qkv.dtype, qkv.device)
    partial = _qk_bwd(dq.contiguous(), dk.contiguous(), dv.contiguous(), qkv.contiguous(), int(heads),
                      _weights(q_weight, k_weight), float(eps), bool(centered), dqkv)
    if centered:
        return dqkv, None, None
    dw = partial.sum(0)
    return dqkv, dw[0].to(q_weight.dtype, copy=True), dw[1].to(k_weight.dtype, copy=True)
