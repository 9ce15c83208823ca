"""Reference FSQ (docs/spec.md §1): finite scalar quantization, literally as specified.

Arithmetic is float32 for fp32/fp16/bf16 input, float64 for float64 input (the float64
run is the ground truth of the tolerance rule, docs/spec.md §4).
"""
import math

import torch


def index_dtype(levels) -> torch.dtype:
    """int32 when every index fits (prod(levels) < 2**31), else int64."""
    return torch.int32 if math.prod(levels) < 2**31 else torch.int64


def basis(levels) -> list[int]:
    """basis_j = prod(levels[:j]); basis_0 = 1."""
    out, acc = [], 1
    for L in levels:
        out.append(acc)
        acc *= L
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _constants(levels, eps, dtype, device):
    L = torch.tensor(levels, dtype=dtype, device=device)
    half_l = (L - 1) * (1 + eps) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0).to(dtype)
    shift = torch.atanh(offset / half_l)
    half_width = torch.floor(L / 2)  # L // 2
    return half_l, offset, shift, half_width


def fsq_forward(z, levels, eps=1e-3, codes_dtype=None):
    """z [..., d] float -> (codes [..., d] codes_dtype (default: compute dtype), indices [...]).

    Differentiable: the rounding is straight-through, so autograd gives
    d codes / d z = half_l * (1 - tanh(z + shift)**2) / (L // 2)."""
    cdt = compute_dtype(z.dtype)
    half_l, offset, shift, half_width = _constants(levels, eps, cdt, z.device)
    bounded = torch.tanh(z.to(cdt) + shift) * half_l - offset
    q = torch.round(bounded)  # round half to even
    codes = (bounded + (q - bounded).detach()) / half_width
    digits = (q.detach() + half_width).to(torch.int64)  # NaN rows are overwritten below
    idx = (digits * torch.tensor(basis(levels), device=z.device)).sum(-1)
    idx = torch.where(torch.isnan(q).any(-1), -1, idx).to(index_dtype(levels))
    return codes.to(codes_dtype or cdt), idx


def fsq_backward(grad_codes, z, levels, eps=1e-3):
    """Gradient of codes w.r.t. z (straight-through rounding), in the dtype of z."""
    cdt = compute_dtype(z.dtype)
    half_l, _, shift, half_width = _constants(levels, eps, cdt, z.device)
    th = torch.tanh(z.to(cdt) + shift)
    return (grad_codes.to(cdt) * half_l * (1 - th * th) / half_width).to(z.dtype)


def fsq_decode(indices, levels):
    """indices [...] (valid or -1) -> codes [..., d] float32; -1 decodes to NaN."""
    idx = indices.to(torch.int64).unsqueeze(-1)
    L = torch.tensor(levels, dtype=torch.int64, device=indices.device)
    b = torch.tensor(basis(levels), dtype=torch.int64, device=indices.device)
    q = torch.div(idx, b, rounding_mode="floor") % L - L // 2
    codes = q.to(torch.float32) / (L // 2).to(torch.float32)
    return torch.where(idx == -1, float("nan"), codes)
