"""Reference transformer-block ops (docs/spec_block_ops.md): adaLN modulated LayerNorm,
gated residual (optionally fused with the next modulated norm), SwiGLU, QK-RMSNorm and
QK-LayerNorm.

Float32 math (float64 for float64 input), results in the input dtype; differentiable
(autograd through plain PyTorch), which is what the ``reference`` backend runs in a model.
The ``*_forward`` / ``*_backward`` functions below them are the backend contract of
``vft_kernels.dispatch`` (what the kernels are tested against)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def select_kind(mod: torch.Tensor, tokens: int, patches: int) -> torch.Tensor:
    """mod [B, T, K, W] (K = 2: patch, register; K = 1: shared) -> [B, T, S, W]: token
    s < patches takes kind 0, the others kind K - 1 (what the fused kernels never build)."""
    if mod.shape[2] == 1:
        return mod.expand(mod.shape[0], mod.shape[1], tokens, mod.shape[3])
    is_reg = (torch.arange(tokens, device=mod.device) >= patches)[:, None]
    return torch.where(is_reg, mod[:, :, 1:2], mod[:, :, 0:1])


def modulated_layer_norm(x, scale, shift, patches: int, eps: float):
    """LN(x) * (1 + scale[sel]) + shift[sel]; LN without affine, statistics in fp32."""
    S, cd = x.shape[2], compute_dtype(x.dtype)
    y = F.layer_norm(x.to(cd), (x.shape[-1],), eps=eps)
    y = y * (1 + select_kind(scale.to(cd), S, patches)) + select_kind(shift.to(cd), S, patches)
    return y.to(x.dtype)


def gated_residual(x, gate, h, patches: int):
    """x + gate[sel] * h."""
    cd = x.dtype if x.dtype == torch.float64 else torch.float32
    out = x.to(cd) + select_kind(gate.to(cd), x.shape[2], patches) * h.to(cd)
    return out.to(x.dtype)


def gated_residual_norm(x, gate, h, scale, shift, patches: int, eps: float):
    """(x_new, y): x_new = gated_residual(x, gate, h), y = modulated_layer_norm(x_new, ...)
    (the norm reads x_new rounded to x's dtype, as the unfused pair does)."""
    x_new = gated_residual(x, gate, h, patches)
    return x_new, modulated_layer_norm(x_new, scale, shift, patches, eps)


def swiglu(gate_up):
    """gate_up [..., 2 H] (gate half first) -> silu(gate) * up [..., H]."""
    cd = compute_dtype(gate_up.dtype)
    gate, up = gate_up.to(cd).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def rms_norm(x, weight, eps: float):
    cd = compute_dtype(x.dtype)
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(cd)
    return y.to(x.dtype)


def layer_norm(x, eps: float):
    """LayerNorm over the last dim without weight or bias, statistics in fp32."""
    return F.layer_norm(x.to(compute_dtype(x.dtype)), (x.shape[-1],), eps=eps).to(x.dtype)


def split_heads(qkv, heads: int):
    """qkv [B, N, 3 W] (q | k | v, each H heads of D = W / H) -> views q, k, v [B, H, N, D]."""
    B, N, W3 = qkv.shape
    return qkv.reshape(B, N, 3, heads, W3 // (3 * heads)).permute(2, 0, 3, 1, 4)


def qk_rms_norm(qkv, heads: int, q_weight, k_weight, eps: float):
    """qkv [B, N, 3 W] -> q, k, v [B, H, N, D], q and k RMS-normalised per head with
    weights [D]."""
    q, k, v = split_heads(qkv, heads)
    return rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), v


def qk_layer_norm(qkv, heads: int, eps: float):
    """qkv [B, N, 3 W] -> q, k, v [B, H, N, D], q and k layer-normalised per head (mean
    centred, no weight or bias: the official models' Fp32LayerNorm(D, bias=False,
    elementwise_affine=False))."""
    q, k, v = split_heads(qkv, heads)
    return layer_norm(q, eps), layer_norm(k, eps), v


def qk_norm(qkv, heads: int, q_weight, k_weight, eps: float, centered: bool):
    """qk_layer_norm when ``centered`` (the weights are then None), else qk_rms_norm."""
    return qk_layer_norm(qkv, heads, eps) if centered else qk_rms_norm(qkv, heads, q_weight, k_weight, eps)


# --------------------------------------------------------------------------------------
# Backend contract (dispatch ops); the backward functions differentiate the forward.


def _grad(outputs, inputs, grads):
    pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
    if not pairs:
        return [None if i is None else torch.zeros_like(i) for i in inputs]
    live = [i for i in inputs if i is not None]
    got = iter(torch.autograd.grad([o for o, _ in pairs], live, [g for _, g in pairs], allow_unused=True))
    out = []
    for i in inputs:
        if i is None:
            out.append(None)
            continue
        g = next(got)
        out.append(torch.zeros_like(i) if g is None else g)
    return out


def kind_sum(t: torch.Tensor, patches: int, kinds: int) -> torch.Tensor:
    """t [B, T, S, W] -> [B, T, kinds, W]: the sum over the patch tokens and over the
    register tokens (kinds = 2), or over all tokens (kinds = 1)."""
    if kinds == 1:
        return t.sum(2, keepdim=True)
    return torch.stack([t[:, :, :patches].sum(2), t[:, :, patches:].sum(2)], dim=2)


def block_norm_forward(x, gate: Optional[torch.Tensor], h: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                       shift: Optional[torch.Tensor], patches: int, eps: float):
    """-> (x_new or None, y or None): x_new = x + gate[sel] h when h is given, y the
    modulated norm of x_new (or of x when h is None) when scale is given."""
    x_new = gated_residual(x, gate, h, patches) if h is not None else None
    y = modulated_layer_norm(x if x_new is None else x_new, scale, shift, patches, eps) if scale is not None else None
    return x_new, y


def block_norm_backward(d_res, dy, xn, gate, h, scale, shift, patches: int, eps: float):
    """Gradients of block_norm_forward, given the norm's input ``xn`` (x_new, or x when
    there is no residual): g = d_res + dLN/dxn . dy is the gradient of x (and of x_new);
    returns (g, dgate, dh, dscale, dshift), None where the input was None. ``d_res`` /
    ``dy`` may be None (no gradient)."""
    cd = compute_dtype(xn.dtype)
    g = torch.zeros(xn.shape, dtype=cd, device=xn.device) if d_res is None else d_res.to(cd)
    dscale = dshift = dgate = dh = None
    if scale is not None:
        with torch.enable_grad():
            leaves = [t.detach().to(cd).requires_grad_() for t in (xn, scale, shift)]
            y = modulated_layer_norm(*leaves, patches, eps)
            if dy is None:
                dy = torch.zeros_like(y)
            dxn, dscale, dshift = torch.autograd.grad(y, leaves, dy.to(cd))
        g = g + dxn
        dscale, dshift = dscale.to(scale.dtype), dshift.to(shift.dtype)
    if h is not None:
        dh = (g * select_kind(gate.to(cd), xn.shape[2], patches)).to(h.dtype)
        dgate = kind_sum(g * h.to(cd), patches, gate.shape[2]).to(gate.dtype)
    return g.to(xn.dtype), dgate, dh, dscale, dshift


def swiglu_forward(gate_up):
    return swiglu(gate_up)


def swiglu_backward(dout, gate_up):
    with torch.enable_grad():
        gu = gate_up.detach().requires_grad_()
        return _grad([swiglu(gu)], [gu], [dout])[0]


def qk_norm_forward(qkv, heads: int, q_weight, k_weight, eps: float, centered: bool = False):
    """-> q, k, v [B, H, N, D] (contiguous copies). ``centered``: QK-LayerNorm (the weights
    are None), else QK-RMSNorm."""
    return tuple(t.contiguous() for t in qk_norm(qkv, heads, q_weight, k_weight, eps, centered))


def qk_norm_backward(dq, dk, dv, qkv, heads: int, q_weight, k_weight, eps: float, centered: bool = False):
    """-> (dqkv [B, N, 3 W], dq_weight [D], dk_weight [D]); the weight gradients are None
    when ``centered``."""
    with torch.enable_grad():
        ins = [None if t is None else t.detach().requires_grad_() for t in (qkv, q_weight, k_weight)]
        outs = qk_norm(ins[0], heads, ins[1], ins[2], eps, centered)
        return tuple(_grad(list(outs), ins, [dq, dk, dv]))
