"""Transformer-block ops (docs/spec_block_ops.md): argument checks, torch.library custom
ops, autograd, backends.

* ``modulated_layer_norm(x, layout, *, scale, shift)``: LN(x) (1 + scale[sel]) + shift[sel]
* ``gated_residual(x, gate, h, layout)``: x + gate[sel] h
* ``gated_residual_norm(x, gate, h, layout, *, scale, shift)``: both, in one pass
* ``swiglu(gate_up, proj_weight=None)``: silu(gate) up (optionally @ proj_weight.T)
* ``qk_rms_norm(qkv, heads, q_weight, k_weight)``: split + per-head RMSNorm of q and k
* ``qk_layer_norm(qkv, heads)``: split + per-head LayerNorm (no weight or bias) of q and k

``x`` is ``[B, T, S, W]``: ``T`` blocks (latent frames) of ``S = P + R`` tokens; the
modulation tensors are ``[B, T, K, W]`` with ``K = 2`` (patch tokens ``s < P`` take kind 0,
register tokens kind 1) or ``K = 1`` (shared). ``sel`` is never materialised.

``scale`` and ``shift`` are keyword-only: DiT codebases write ``modulate(x, shift, scale)``,
the reverse of the order in the formula, so a positional call could swap them silently.

When the selected backend is ``reference`` the ops run the reference composition under
plain autograd (what an unfused model does, the baseline of every comparison); kernel
backends run as custom ops whose backward recomputes the normalisation statistics and
the SiLU instead of storing them (less activation memory)."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .. import dispatch
from ..layout import RegisterLayout
from ..reference import block as ref

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_OPS = ("block_norm_forward", "block_norm_backward", "swiglu_forward", "swiglu_backward", "qk_norm_forward",
        "qk_norm_backward")

for _op in _OPS:
    dispatch.register(_op, "reference", f"vft_kernels.reference.block:{_op}")
    dispatch.register(_op, "triton", f"vft_kernels.triton.block:{_op}", check="vft_kernels.triton.block:supports")
    dispatch.register(_op, "cpu", f"vft_kernels.cpp.block:{_op}", devices=("cpu",),
                      check="vft_kernels.cpp.block:supports")

LayoutArg = Union[RegisterLayout, int]


# --------------------------------------------------------------------------------------
# Argument checks


def _check_float(name: str, op: str, t, like: Optional[torch.Tensor] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a float tensor (float32, float16, bfloat16, float64), got {t.dtype}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of x ({like.dtype}), got {t.dtype}")
        if t.device != like.device:
            raise ValueError(f"{op}: {name} must be on x's device ({like.device}), got {t.device}")


def _check_x(op: str, x) -> None:
    _check_float("x", op, x)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [B, T, S, W] (T blocks of S = P + R tokens), got shape {tuple(x.shape)}")


def _patches(op: str, x: torch.Tensor, layout: LayoutArg) -> int:
    """The number of patch tokens per block, checked against x [B, T, S, W]."""
    B, T, S, W = x.shape
    if isinstance(layout, RegisterLayout):
        if (T, S) != (layout.blocks, layout.patches + layout.registers):
            raise ValueError(f"{op}: x [B, T, S, W] = {tuple(x.shape)} does not match the layout: expected T = blocks = "
                             f"{layout.blocks} and S = patches + registers = {layout.patches + layout.registers}")
        return layout.patches
    if isinstance(layout, bool) or not isinstance(layout, int):
        raise TypeError(f"{op}: layout must be a RegisterLayout or the number of patch tokens per block (int), "
                        f"got {type(layout).__name__}")
    if not 0 <= layout <= S:
        raise ValueError(f"{op}: patches must be in [0, S = {S}], got {layout}")
    return layout


def _check_mod(op: str, name: str, t, x: torch.Tensor) -> None:
    _check_float(name, op, t, x)
    B, T, _, W = x.shape
    if t.dim() != 4 or tuple(t.shape[:2]) != (B, T) or t.shape[2] not in (1, 2) or t.shape[3] != W:
        raise ValueError(f"{op}: {name} must be [B, T, K, W] = [{B}, {T}, 1 or 2, {W}] (K = 2: patch and register "
                         f"values, K = 1: shared), got shape {tuple(t.shape)}")


def _check_eps(op: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or eps != eps or eps == float("inf"):
        raise ValueError(f"{op}: eps must be a finite float > 0, got {eps!r}")
    return float(eps)


def _check_h(op: str, h, x: torch.Tensor) -> None:
    _check_float("h", op, h, x)
    if h.shape != x.shape:
        raise ValueError(f"{op}: h must have the shape of x {tuple(x.shape)}, got {tuple(h.shape)}")


# --------------------------------------------------------------------------------------
# Backend selection: the reference backend runs the plain composition under autograd.


def _key(*tensors) -> tuple:
    return tuple(None if t is None else (t.dtype, t.dim()) for t in tensors)


def _use_reference(op: str, device, args, tensors) -> bool:
    return dispatch.select_cached(op, _key(*tensors), device, *args)[0] == "reference"


def _call(op: str, device, *args):
    tensors = [a for a in args if isinstance(a, torch.Tensor) or a is None]
    return dispatch.select_cached(op, _key(*tensors), device, *args)[1](*args)


# --------------------------------------------------------------------------------------
# Custom ops: block norm (modulated LN, gated residual, both)


def _none_if_empty(t: Optional[torch.Tensor], present: bool) -> Optional[torch.Tensor]:
    return t if present else None


@torch.library.custom_op("vft::block_norm", mutates_args=())
def _block_norm(x: torch.Tensor, gate: Optional[torch.Tensor], h: Optional[torch.Tensor],
                scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], patches: int,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (x_new, y); an output that is not computed is an empty tensor."""
    x_new, y = _call("block_norm_forward", x.device, x, gate, h, scale, shift, patches, eps)
    empty = x.new_empty(0)
    return (empty if x_new is None else x_new), (empty if y is None else y)


@_block_norm.register_fake
def _(x, gate, h, scale, shift, patches, eps):
    return (x.new_empty(x.shape if h is not None else (0,)), x.new_empty(x.shape if scale is not None else (0,)))


@torch.library.custom_op("vft::block_norm_backward", mutates_args=())
def _block_norm_backward(d_res: Optional[torch.Tensor], dy: Optional[torch.Tensor], xn: torch.Tensor,
                         gate: Optional[torch.Tensor], h: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                         shift: Optional[torch.Tensor], patches: int, eps: float) -> list[torch.Tensor]:
    grads = _call("block_norm_backward", xn.device, d_res, dy, xn, gate, h, scale, shift, patches, eps)
    return [xn.new_empty(0) if g is None else g for g in grads]


@_block_norm_backward.register_fake
def _(d_res, dy, xn, gate, h, scale, shift, patches, eps):
    def like(t):
        return xn.new_empty(0) if t is None else torch.empty_like(t)
    return [torch.empty_like(xn), like(gate), like(h), like(scale), like(shift)]


def _block_norm_setup(ctx, inputs, output):
    x, gate, h, scale, shift, patches, eps = inputs
    x_new, _ = output
    ctx.has_h, ctx.has_scale = h is not None, scale is not None
    xn = x_new if h is not None else x
    ctx.save_for_backward(xn if scale is not None else None, gate, h, scale, shift)
    ctx.x_shape = tuple(x.shape)
    ctx.patches, ctx.eps = patches, eps
    ctx.dispatch_state = dispatch.capture_state()


def _block_norm_bwd(ctx, d_xnew, dy):
    xn, gate, h, scale, shift = ctx.saved_tensors
    d_res = d_xnew if ctx.has_h else None
    if not ctx.has_scale:
        dy = None
        xn = d_res  # only its shape, dtype and device are read
    with dispatch.restored_state(ctx.dispatch_state):
        g, dgate, dh, dscale, dshift = _block_norm_backward(d_res, dy, xn, gate, h, scale, shift, ctx.patches,
                                                            ctx.eps)
    return (g, _none_if_empty(dgate, ctx.has_h), _none_if_empty(dh, ctx.has_h), _none_if_empty(dscale, ctx.has_scale),
            _none_if_empty(dshift, ctx.has_scale), None, None)


_block_norm.register_autograd(_block_norm_bwd, setup_context=_block_norm_setup)


# --------------------------------------------------------------------------------------
# Custom ops: SwiGLU, QK-RMSNorm


@torch.library.custom_op("vft::swiglu", mutates_args=())
def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    return _call("swiglu_forward", gate_up.device, gate_up)


@_swiglu.register_fake
def _(gate_up):
    return gate_up.new_empty(tuple(gate_up.shape[:-1]) + (gate_up.shape[-1] // 2,))


@torch.library.custom_op("vft::swiglu_backward", mutates_args=())
def _swiglu_backward(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    return _call("swiglu_backward", gate_up.device, dout, gate_up)


@_swiglu_backward.register_fake
def _(dout, gate_up):
    return torch.empty_like(gate_up)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.dispatch_state = dispatch.capture_state()


def _swiglu_bwd(ctx, dout):
    (gate_up,) = ctx.saved_tensors
    with dispatch.restored_state(ctx.dispatch_state):
        return _swiglu_backward(dout, gate_up)


_swiglu.register_autograd(_swiglu_bwd, setup_context=_swiglu_setup)


@torch.library.custom_op("vft::swiglu_linear", mutates_args=())
def _swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.matmul(_call("swiglu_forward", gate_up.device, gate_up), weight.t())


@_swiglu_linear.register_fake
def _(gate_up, weight):
    return gate_up.new_empty(tuple(gate_up.shape[:-1]) + (weight.shape[0],))


def _swiglu_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # not the activation: the backward recomputes it
    ctx.dispatch_state = dispatch.capture_state()


def _swiglu_linear_bwd(ctx, dout):
    gate_up, weight = ctx.saved_tensors
    with dispatch.restored_state(ctx.dispatch_state):
        act = _swiglu(gate_up)
        out_features, hidden = weight.shape
        d_weight = torch.matmul(dout.reshape(-1, out_features).t(), act.reshape(-1, hidden))
        return _swiglu_backward(torch.matmul(dout, weight), gate_up), d_weight


_swiglu_linear.register_autograd(_swiglu_linear_bwd, setup_context=_swiglu_linear_setup)


@torch.library.custom_op("vft::qk_rms_norm", mutates_args=())
def _qk_rms_norm(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_call("qk_norm_forward", qkv.device, qkv, heads, q_weight, k_weight, eps))


@_qk_rms_norm.register_fake
def _qk_rms_norm_fake(qkv, heads, q_weight, k_weight, eps):
    B, N, W3 = qkv.shape
    shape = (B, heads, N, W3 // (3 * heads))
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


@torch.library.custom_op("vft::qk_rms_norm_backward", mutates_args=())
def _qk_rms_norm_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor, heads: int,
                          q_weight: torch.Tensor, k_weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_call("qk_norm_backward", qkv.device, dq, dk, dv, qkv, heads, q_weight, k_weight, eps))


@_qk_rms_norm_backward.register_fake
def _(dq, dk, dv, qkv, heads, q_weight, k_weight, eps):
    return torch.empty_like(qkv), torch.empty_like(q_weight), torch.empty_like(k_weight)


def _qk_setup(ctx, inputs, output):
    qkv, heads, q_weight, k_weight, eps = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight)
    ctx.heads, ctx.eps = heads, eps
    ctx.dispatch_state = dispatch.capture_state()


def _qk_bwd(ctx, dq, dk, dv):
    qkv, q_weight, k_weight = ctx.saved_tensors
    with dispatch.restored_state(ctx.dispatch_state):
        dqkv, dwq, dwk = _qk_rms_norm_backward(dq, dk, dv, qkv, ctx.heads, q_weight, k_weight, ctx.eps)
    return dqkv, None, dwq, dwk, None


_qk_rms_norm.register_autograd(_qk_bwd, setup_context=_qk_setup)


@torch.library.custom_op("vft::qk_layer_norm", mutates_args=())
def _qk_layer_norm(qkv: torch.Tensor, heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_call("qk_norm_forward", qkv.device, qkv, heads, None, None, eps, True))


@_qk_layer_norm.register_fake
def _(qkv, heads, eps):
    return _qk_rms_norm_fake(qkv, heads, None, None, eps)


@torch.library.custom_op("vft::qk_layer_norm_backward", mutates_args=())
def _qk_layer_norm_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor, heads: int,
                            eps: float) -> torch.Tensor:
    return _call("qk_norm_backward", qkv.device, dq, dk, dv, qkv, heads, None, None, eps, True)[0]


@_qk_layer_norm_backward.register_fake
def _(dq, dk, dv, qkv, heads, eps):
    return torch.empty_like(qkv)


def _qk_ln_setup(ctx, inputs, output):
    qkv, heads, eps = inputs
    ctx.save_for_backward(qkv)
    ctx.heads, ctx.eps = heads, eps
    ctx.dispatch_state = dispatch.capture_state()


def _qk_ln_bwd(ctx, dq, dk, dv):
    (qkv,) = ctx.saved_tensors
    with dispatch.restored_state(ctx.dispatch_state):
        return _qk_layer_norm_backward(dq, dk, dv, qkv, ctx.heads, ctx.eps), None, None


_qk_layer_norm.register_autograd(_qk_ln_bwd, setup_context=_qk_ln_setup)


# --------------------------------------------------------------------------------------
# Public API


def modulated_layer_norm(x: torch.Tensor, layout: LayoutArg, *, scale: torch.Tensor, shift: torch.Tensor,
                         eps: float = 1e-6) -> torch.Tensor:
    """adaLN: ``LayerNorm(x) * (1 + scale[sel]) + shift[sel]`` (no LN affine, fp32 statistics).

    ``scale`` and ``shift`` are keyword-only (DiT's ``modulate(x, shift, scale)`` takes them in
    the other order): ``modulated_layer_norm(x, layout, scale=scale, shift=shift)``.

    x [B, T, S, W]; scale, shift [B, T, K, W] (K = 2: patch / register values, K = 1: shared);
    layout: the RegisterLayout of x (or the patch count P): token s of a block takes kind
    0 when s < P. Returns y [B, T, S, W] in x's dtype; differentiable in x, scale, shift."""
    op = "modulated_layer_norm"
    _check_x(op, x)
    patches = _patches(op, x, layout)
    _check_mod(op, "scale", scale, x)
    _check_mod(op, "shift", shift, x)
    eps = _check_eps(op, eps)
    args = (x, None, None, scale, shift, patches, eps)
    if _use_reference("block_norm_forward", x.device, args, (x, None, None, scale, shift)):
        return ref.modulated_layer_norm(x, scale, shift, patches, eps)
    return _block_norm(*args)[1]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, layout: LayoutArg) -> torch.Tensor:
    """``x + gate[sel] * h`` (adaLN-zero's gated residual); x, h [B, T, S, W], gate [B, T, K, W]."""
    op = "gated_residual"
    _check_x(op, x)
    patches = _patches(op, x, layout)
    _check_mod(op, "gate", gate, x)
    _check_h(op, h, x)
    args = (x, gate, h, None, None, patches, 1e-6)
    if _use_reference("block_norm_forward", x.device, args, (x, gate, h, None, None)):
        return ref.gated_residual(x, gate, h, patches)
    return _block_norm(*args)[0]


def gated_residual_norm(x: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, layout: LayoutArg, *,
                        scale: torch.Tensor, shift: torch.Tensor,
                        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated residual fused with the next modulated LayerNorm, in one pass:
    ``x_new = x + gate[sel] * h`` and ``y = modulated_layer_norm(x_new, layout, scale=scale,
    shift=shift)`` (the norm reads x_new rounded to x's dtype). Returns (x_new, y).
    ``scale`` and ``shift`` are keyword-only, as in :func:`modulated_layer_norm`."""
    op = "gated_residual_norm"
    _check_x(op, x)
    patches = _patches(op, x, layout)
    _check_mod(op, "gate", gate, x)
    _check_h(op, h, x)
    _check_mod(op, "scale", scale, x)
    _check_mod(op, "shift", shift, x)
    eps = _check_eps(op, eps)
    args = (x, gate, h, scale, shift, patches, eps)
    if _use_reference("block_norm_forward", x.device, args, (x, gate, h, scale, shift)):
        return ref.gated_residual_norm(x, gate, h, scale, shift, patches, eps)
    x_new, y = _block_norm(*args)
    return x_new, y


def swiglu(gate_up: torch.Tensor, proj_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` [..., 2 H] (the fused gate/up
    projection's output) -> [..., H] in its dtype. The kernels' backward recomputes the
    SiLU from gate_up instead of storing it.

    With ``proj_weight`` [O, H] (the MLP's bias-free down projection) the result is
    ``swiglu(gate_up) @ proj_weight.T`` [..., O], and the backward recomputes the activation
    for the weight gradient instead of keeping the [..., H] tensor alive (activation memory:
    gate_up only, where the unfused pair keeps gate_up and the activation)."""
    op = "swiglu"
    _check_float("gate_up", op, gate_up)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"{op}: gate_up must be [..., 2 H] with an even last dim, got shape {tuple(gate_up.shape)}")
    if proj_weight is not None:
        _check_float("proj_weight", op, proj_weight)
        if proj_weight.dim() != 2 or proj_weight.shape[1] != gate_up.shape[-1] // 2:
            raise ValueError(f"{op}: proj_weight must be [O, H] with H = {gate_up.shape[-1] // 2}, got shape "
                             f"{tuple(proj_weight.shape)}")
        if proj_weight.device != gate_up.device:
            raise ValueError(f"{op}: proj_weight must be on gate_up's device ({gate_up.device}), got {proj_weight.device}")
        proj_weight = proj_weight.to(gate_up.dtype)  # autocast: the projection runs in the activations' dtype
    if _use_reference("swiglu_forward", gate_up.device, (gate_up,), (gate_up,)):
        act = ref.swiglu(gate_up)
        return act if proj_weight is None else torch.nn.functional.linear(act, proj_weight)
    return _swiglu(gate_up) if proj_weight is None else _swiglu_linear(gate_up, proj_weight)


def _check_qkv(op: str, qkv, heads) -> int:
    """The head dim D of qkv [B, N, 3 * heads * D]."""
    _check_float("qkv", op, qkv)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{op}: heads must be an int >= 1, got {heads!r}")
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"{op}: qkv must be [B, N, 3 * heads * D] with heads = {heads}, got shape {tuple(qkv.shape)}")
    return qkv.shape[-1] // (3 * heads)


def qk_rms_norm(qkv: torch.Tensor, heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor,
                eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused projection ``qkv`` [B, N, 3 W] (q | k | v, each H heads of D = W / H)
    into q, k, v [B, H, N, D] (the attention layout), with q and k RMS-normalised per head
    and scaled by ``q_weight`` / ``k_weight`` [D] (float, any dtype; fp32 statistics)."""
    op = "qk_rms_norm"
    D = _check_qkv(op, qkv, heads)
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        _check_float(name, op, w)
        if w.shape != (D,):
            raise ValueError(f"{op}: {name} must be [D] = [{D}], got shape {tuple(w.shape)}")
        if w.device != qkv.device:
            raise ValueError(f"{op}: {name} must be on qkv's device ({qkv.device}), got {w.device}")
    eps = _check_eps(op, eps)
    args = (qkv, heads, q_weight, k_weight, eps)
    if _use_reference("qk_norm_forward", qkv.device, args, (qkv, q_weight, k_weight)):
        return ref.qk_rms_norm(qkv, heads, q_weight, k_weight, eps)
    return _qk_rms_norm(*args)


def qk_layer_norm(qkv: torch.Tensor, heads: int, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused projection ``qkv`` [B, N, 3 W] (q | k | v, each H heads of D = W / H)
    into q, k, v [B, H, N, D] (the attention layout, contiguous, qkv's dtype), with q and k
    layer-normalised per head vector: ``(x - mean) / sqrt(var + eps)``, biased variance, no
    weight or bias, statistics and normalisation in float32 (float64 for float64 input).
    This is the official FlexTok / VideoFlexTok attention's QK norm,
    ``Fp32LayerNorm(D, bias=False, elementwise_affine=False)`` on the split heads. v is
    only split. Differentiable in qkv; the kernels' backward recomputes the statistics."""
    op = "qk_layer_norm"
    _check_qkv(op, qkv, heads)
    eps = _check_eps(op, eps)
    args = (qkv, heads, None, None, eps, True)
    if _use_reference("qk_norm_forward", qkv.device, args, (qkv, None, None)):
        return tuple(t.contiguous() for t in ref.qk_layer_norm(qkv, heads, eps))
    return _qk_layer_norm(qkv, heads, eps)
