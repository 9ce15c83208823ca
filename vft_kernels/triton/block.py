"""Triton kernels of the transformer-block ops (docs/spec_block_ops.md), backend "triton".

Same contract as ``vft_kernels.reference.block`` (the ``*_forward`` / ``*_backward``
functions): float32 math, results in the input dtype, outputs from
``dispatch.new_output``. Inputs are made contiguous on the host (the modulation tensors
are small; activations normally are contiguous already); offsets are int64.

* block norm forward: a tile of ``BLOCK_R`` tokens x ``BLOCK_W`` (next power of two >= W)
  per program: ``x_new = x + gate[sel] h`` (rounded to x's dtype), then the modulated
  LayerNorm of it (two-pass fp32 statistics). ``sel`` is computed per token from its
  index: token s of a block takes modulation row ``K - 1`` when ``s >= patches``, else 0.
* block norm backward: the same tiles; recomputes mean / rstd from ``xn``, writes ``g``
  (the gradient of x and x_new) and ``dh``, and per-token fp32 products ``dy * xhat`` and
  ``g * h``; ``_kind_sum_kernel`` then sums those (and ``dy``) over the patch / register
  tokens of every block into dscale, dgate (and dshift).
* SwiGLU: tiles of the [rows, H] output, gate and up read from [rows, 2 H];
  the backward recomputes the sigmoid.
* QK-RMSNorm / QK-LayerNorm: a tile of ``BLOCK_R`` (b, h, n) rows x ``DP`` per program, in
  the order of the [B, H, N, D] outputs; q and k normalised (``CENTERED``: the LayerNorm
  statistics of the block norm, no weights; else RMS and the weights), v copied. The
  backward writes dqkv and, for the RMSNorm, per-program partial sums of the weight
  gradients, summed by ``_kind_sum_kernel``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TILE = 2048  # elements per program of the row kernels (BLOCK_R * BLOCK_W when W is small)
EW_BLOCK = 1024  # elements per program of the SwiGLU kernels (a tile of rows x H)
SUM_ROWS = 8  # rows per step of the kind-sum kernel
SUM_COLS = 256  # max columns per program of the kind-sum kernel


# --------------------------------------------------------------------------------------
# Shared pieces


@triton.jit
def _mod_offset(bt, reg, K, W):
    # Start of the modulation row [B, T, K, W] of a token: kind K - 1 for register tokens
    # (reg = 1), kind 0 otherwise; K = 1 is shared by all tokens.
    return (bt * K + reg * (K - 1)) * W


@triton.jit
def _ln_stats(x, mask, W, eps):
    # x [BLOCK_R, BLOCK_W] fp32 (0 where masked) -> (x - mean, 0 where masked), rstd [BLOCK_R]
    wf = tl.cast(W, tl.float32)
    mean = tl.math.div_rn(tl.sum(x, axis=1), wf)
    d = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.math.div_rn(tl.sum(d * d, axis=1), wf)
    rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(var + eps))
    return d, rstd


@triton.jit
def _kind_sum_kernel(src_ptr, dst_ptr, S, W, lo, hi, dst_stride, dst_offset,
                     BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr):
    """dst[bt * dst_stride + dst_offset + w] = sum over s in [lo, hi) of src[bt, s, w]
    (src [BT, S, W] contiguous, any float dtype; fp32 sum; 0 for an empty range)."""
    bt = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    cmask = cols < W
    base = src_ptr + bt * S * W
    acc = tl.zeros([BLOCK_S, BLOCK_W], dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = (s < hi)[:, None] & cmask[None, :]
        acc += tl.load(base + s[:, None].to(tl.int64) * W + cols[None, :], mask=m, other=0.0).to(tl.float32)
    out = tl.sum(acc, axis=0)
    tl.store(dst_ptr + bt * dst_stride + dst_offset + cols, out.to(dst_ptr.dtype.element_ty), mask=cmask)


def _kind_sum(src: torch.Tensor, dst: torch.Tensor, patches: int) -> None:
    """src [BT, S, W] (contiguous) -> dst [BT, K, W] (contiguous, K = dst.shape[1]):
    ``reference.block.kind_sum`` (kind 0: s < patches, kind 1: the others; K = 1: all)."""
    BT, S, W = src.shape
    K = dst.shape[1]
    if dst.numel() == 0:
        return
    if src.numel() == 0:  # no tokens: every sum is empty
        dst.zero_()
        return
    bw = min(triton.next_power_of_2(W), SUM_COLS)
    ranges = [(0, S)] if K == 1 else [(0, patches), (patches, S)]
    for k, (lo, hi) in enumerate(ranges):
        _kind_sum_kernel[(BT, triton.cdiv(W, bw))](src, dst, S, W, lo, hi, K * W, k * W,
                                                   BLOCK_S=SUM_ROWS, BLOCK_W=bw)


def _row_tile(W: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_W, num_warps) for rows of W elements."""
    bw = triton.next_power_of_2(max(W, 1))
    br = max(1, TILE // bw)
    return br, bw, min(16, max(4, br * bw // 256))


def _c(t):
    return None if t is None else t.contiguous()


def supports(*args):
    """None when every tensor argument is float32 / float16 / bfloat16 (dtype only)."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dtype not in KERNEL_DTYPES:
            return f"argument {i} has dtype {a.dtype}; the triton block kernels support float32, float16, bfloat16"
    return None


# --------------------------------------------------------------------------------------
# Block norm: gated residual + modulated LayerNorm


@triton.jit
def _block_norm_fwd_kernel(x_ptr, gate_ptr, h_ptr, scale_ptr, shift_ptr, xnew_ptr, y_ptr,
                           n_rows, S, W, patches, KG, KS, KB, eps,
                           HAS_RES: tl.constexpr, HAS_NORM: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    mask = (rows < n_rows)[:, None] & (cols < W)[None, :]
    bt = rows // S
    reg = (rows % S >= patches).to(tl.int64)
    off = rows[:, None] * W + cols[None, :]
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        gate = tl.load(gate_ptr + _mod_offset(bt, reg, KG, W)[:, None] + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        h = tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32)
        xn = (x + gate * h).to(xnew_ptr.dtype.element_ty)
        tl.store(xnew_ptr + off, xn, mask=mask)
        x = xn.to(tl.float32)  # the norm reads x_new as rounded
    if HAS_NORM:
        d, rstd = _ln_stats(x, mask, W, eps)
        scale = tl.load(scale_ptr + _mod_offset(bt, reg, KS, W)[:, None] + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + _mod_offset(bt, reg, KB, W)[:, None] + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        y = (d * rstd[:, None]) * (1.0 + scale) + shift
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _block_norm_bwd_kernel(dres_ptr, dy_ptr, xn_ptr, gate_ptr, h_ptr, scale_ptr,
                           g_ptr, dh_ptr, pscale_ptr, pgate_ptr,
                           n_rows, S, W, patches, KG, KS, eps,
                           HAS_DRES: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    mask = (rows < n_rows)[:, None] & (cols < W)[None, :]
    bt = rows // S
    reg = (rows % S >= patches).to(tl.int64)
    off = rows[:, None] * W + cols[None, :]
    if HAS_DRES:
        g = tl.load(dres_ptr + off, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    if HAS_NORM:
        x = tl.load(xn_ptr + off, mask=mask, other=0.0).to(tl.float32)
        d, rstd = _ln_stats(x, mask, W, eps)
        xhat = d * rstd[:, None]
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + _mod_offset(bt, reg, KS, W)[:, None] + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        gh = dy * (1.0 + scale)  # gradient of LN(xn); 0 where masked
        wf = tl.cast(W, tl.float32)
        c1 = tl.sum(gh, axis=1) / wf
        c2 = tl.sum(gh * xhat, axis=1) / wf
        g += tl.where(mask, rstd[:, None] * (gh - c1[:, None] - xhat * c2[:, None]), 0.0)
        tl.store(pscale_ptr + off, dy * xhat, mask=mask)
    tl.store(g_ptr + off, g.to(g_ptr.dtype.element_ty), mask=mask)
    if HAS_RES:
        gate = tl.load(gate_ptr + _mod_offset(bt, reg, KG, W)[:, None] + cols[None, :], mask=mask,
                       other=0.0).to(tl.float32)
        h = tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(dh_ptr + off, (g * gate).to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(pgate_ptr + off, g * h, mask=mask)


def block_norm_forward(x, gate, h, scale, shift, patches, eps):
    """-> (x_new or None, y or None); see reference.block.block_norm_forward."""
    has_res, has_norm = h is not None, scale is not None
    x_new = dispatch.new_output(x.shape, x.dtype, x.device) if has_res else None
    y = dispatch.new_output(x.shape, x.dtype, x.device) if has_norm else None
    if x.numel() == 0 or not (has_res or has_norm):
        return x_new, y
    B, T, S, W = x.shape
    x = x.contiguous()
    gate, h, scale, shift = _c(gate), _c(h), _c(scale), _c(shift)
    n_rows = B * T * S
    br, bw, warps = _row_tile(W)
    _block_norm_fwd_kernel[(triton.cdiv(n_rows, br),)](
        x, gate if has_res else x, h if has_res else x, scale if has_norm else x, shift if has_norm else x,
        x_new if has_res else x, y if has_norm else x,
        n_rows, S, W, int(patches), gate.shape[2] if has_res else 1, scale.shape[2] if has_norm else 1,
        shift.shape[2] if has_norm else 1, float(eps),
        HAS_RES=has_res, HAS_NORM=has_norm, BLOCK_R=br, BLOCK_W=bw, num_warps=warps)
    return x_new, y


def block_norm_backward(d_res, dy, xn, gate, h, scale, shift, patches, eps):
    """-> (g, dgate, dh, dscale, dshift); see reference.block.block_norm_backward."""
    has_res, has_scale = h is not None, scale is not None
    has_norm = has_scale and dy is not None
    B, T, S, W = xn.shape
    dev = xn.device
    g = dispatch.new_output(xn.shape, xn.dtype, dev)
    dh = dispatch.new_output(h.shape, h.dtype, dev) if has_res else None
    dgate = dispatch.new_output(gate.shape, gate.dtype, dev) if has_res else None
    dscale = dispatch.new_output(scale.shape, scale.dtype, dev) if has_scale else None
    dshift = dispatch.new_output(shift.shape, shift.dtype, dev) if has_scale else None
    if has_scale and not has_norm:  # no gradient reaches y
        dscale.zero_()
        dshift.zero_()
    n_rows = B * T * S
    if n_rows * W == 0:
        for t in (dgate, dscale, dshift):
            if t is not None:
                t.zero_()
        return g, dgate, dh, dscale, dshift
    d_res, dy, gate, h, scale = _c(d_res), _c(dy), _c(gate), _c(h), _c(scale)
    xn = xn.contiguous() if has_norm else xn
    pscale = torch.empty((B * T, S, W), dtype=torch.float32, device=dev) if has_norm else None
    pgate = torch.empty((B * T, S, W), dtype=torch.float32, device=dev) if has_res else None
    any_ = g  # placeholder pointer for absent inputs (never read)
    br, bw, warps = _row_tile(W)
    _block_norm_bwd_kernel[(triton.cdiv(n_rows, br),)](
        d_res if d_res is not None else any_, dy if has_norm else any_, xn if has_norm else any_,
        gate if has_res else any_, h if has_res else any_, scale if has_norm else any_,
        g, dh if has_res else any_, pscale if has_norm else g, pgate if has_res else g,
        n_rows, S, W, int(patches), gate.shape[2] if has_res else 1, scale.shape[2] if has_scale else 1,
        float(eps), HAS_DRES=d_res is not None, HAS_NORM=has_norm, HAS_RES=has_res,
        BLOCK_R=br, BLOCK_W=bw, num_warps=warps)
    if has_norm:
        _kind_sum(pscale, dscale.view(B * T, scale.shape[2], W), patches)
        _kind_sum(dy.view(B * T, S, W), dshift.view(B * T, shift.shape[2], W), patches)
    if has_res:
        _kind_sum(pgate, dgate.view(B * T, gate.shape[2], W), patches)
    return g, dgate, dh, dscale, dshift


# --------------------------------------------------------------------------------------
# SwiGLU


@triton.jit
def _sigmoid(x):
    return tl.math.div_rn(1.0, 1.0 + tl.exp(-x))


@triton.jit
def _swiglu_tile(n_rows, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    # -> (mask, offset of gate in gate_up [rows, 2 H], offset in [rows, H])
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (cols < H)[None, :]
    return mask, rows[:, None] * (2 * H) + cols[None, :], rows[:, None] * H + cols[None, :]


@triton.jit
def _swiglu_fwd_kernel(gu_ptr, out_ptr, n_rows, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    mask, gi, oi = _swiglu_tile(n_rows, H, BLOCK_R, BLOCK_H)
    a = tl.load(gu_ptr + gi, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(gu_ptr + gi + H, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + oi, (a * _sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dout_ptr, gu_ptr, dgu_ptr, n_rows, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    mask, gi, oi = _swiglu_tile(n_rows, H, BLOCK_R, BLOCK_H)
    a = tl.load(gu_ptr + gi, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(gu_ptr + gi + H, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + oi, mask=mask, other=0.0).to(tl.float32)
    sig = _sigmoid(a)
    silu = a * sig
    da = do * b * (sig * (1.0 + a * (1.0 - sig)))
    tl.store(dgu_ptr + gi, da.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + gi + H, (do * silu).to(dgu_ptr.dtype.element_ty), mask=mask)


def _swiglu_grid(n_rows: int, H: int):
    bh = min(triton.next_power_of_2(max(H, 1)), EW_BLOCK)
    br = max(1, EW_BLOCK // bh)
    return (triton.cdiv(n_rows, br), triton.cdiv(H, bh)), br, bh


def swiglu_forward(gate_up):
    """gate_up [..., 2 H] -> silu(gate) * up [..., H] in gate_up's dtype."""
    H = gate_up.shape[-1] // 2
    out = dispatch.new_output(tuple(gate_up.shape[:-1]) + (H,), gate_up.dtype, gate_up.device)
    if out.numel():
        n_rows = out.numel() // H
        grid, br, bh = _swiglu_grid(n_rows, H)
        _swiglu_fwd_kernel[grid](gate_up.contiguous(), out, n_rows, H, BLOCK_R=br, BLOCK_H=bh)
    return out


def swiglu_backward(dout, gate_up):
    """-> dgate_up [..., 2 H] in gate_up's dtype (the SiLU recomputed from gate_up)."""
    H = gate_up.shape[-1] // 2
    dgu = dispatch.new_output(gate_up.shape, gate_up.dtype, gate_up.device)
    if dgu.numel():
        n_rows = dgu.numel() // (2 * H)
        grid, br, bh = _swiglu_grid(n_rows, H)
        _swiglu_bwd_kernel[grid](dout.contiguous(), gate_up.contiguous(), dgu, n_rows, H, BLOCK_R=br, BLOCK_H=bh)
    return dgu


# --------------------------------------------------------------------------------------
# QK-RMSNorm, QK-LayerNorm (CENTERED)


@triton.jit
def _qk_rows(R, N, H, D, BLOCK_R: tl.constexpr, DP: tl.constexpr):
    # Rows r = (b, h, n) of the [B, H, N, D] outputs -> (mask, q offset in qkv [B, N, 3HD],
    # output offset, column index).
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, DP)
    mask = (r < R)[:, None] & (cols < D)[None, :]
    n = r % N
    bh = r // N
    hh = bh % H
    b = bh // H
    src = ((b * N + n) * 3 * H + hh) * D
    return mask, src[:, None] + cols[None, :], r[:, None] * D + cols[None, :], cols


@triton.jit
def _head_norm_fwd(x, w_ptr, mask, cols, D, eps, CENTERED: tl.constexpr):
    # x [BLOCK_R, DP] fp32 (0 where masked) -> LayerNorm(x) (CENTERED) or RMSNorm(x) * w
    if CENTERED:
        d, rstd = _ln_stats(x, mask, D, eps)
        y = d * rstd[:, None]
    else:
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        ms = tl.sum(x * x, axis=1) / tl.cast(D, tl.float32)
        rs = tl.math.div_rn(1.0, tl.math.sqrt_rn(ms + eps))
        y = x * rs[:, None] * w[None, :]
    return y


@triton.jit
def _qk_fwd_kernel(qkv_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr, R, N, H, D, eps,
                   CENTERED: tl.constexpr, BLOCK_R: tl.constexpr, DP: tl.constexpr):
    mask, src, dst, cols = _qk_rows(R, N, H, D, BLOCK_R, DP)
    HD = H * D
    x = tl.load(qkv_ptr + src, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_ptr + dst, _head_norm_fwd(x, qw_ptr, mask, cols, D, eps, CENTERED).to(q_ptr.dtype.element_ty),
             mask=mask)
    x = tl.load(qkv_ptr + src + HD, mask=mask, other=0.0).to(tl.float32)
    tl.store(k_ptr + dst, _head_norm_fwd(x, kw_ptr, mask, cols, D, eps, CENTERED).to(k_ptr.dtype.element_ty),
             mask=mask)
    v = tl.load(qkv_ptr + src + 2 * HD, mask=mask, other=0.0)
    tl.store(v_ptr + dst, v, mask=mask)


@triton.jit
def _head_norm_bwd(dy_ptr, qkv_ptr, w_ptr, dqkv_ptr, pw_ptr, mask, src, dst, cols, D, eps,
                   HAS_DY: tl.constexpr, CENTERED: tl.constexpr):
    # One of q / k: writes dx into dqkv and (RMSNorm) this program's partial sum of dw into pw.
    cmask = cols < D
    if HAS_DY:
        x = tl.load(qkv_ptr + src, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + dst, mask=mask, other=0.0).to(tl.float32)
        df = tl.cast(D, tl.float32)
        if CENTERED:
            d, rstd = _ln_stats(x, mask, D, eps)
            xhat = d * rstd[:, None]
            c1 = tl.sum(dy, axis=1) / df
            c2 = tl.sum(dy * xhat, axis=1) / df
            dx = rstd[:, None] * (dy - c1[:, None] - xhat * c2[:, None])
        else:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            rs = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.sum(x * x, axis=1) / df + eps))
            dyw = dy * w[None, :]
            c = tl.sum(dyw * x, axis=1) / df
            dx = rs[:, None] * dyw - x * (rs * rs * rs * c)[:, None]
            pw = tl.sum(dy * (x * rs[:, None]), axis=0)
    else:
        dx = tl.zeros(mask.shape, dtype=tl.float32)
        pw = tl.zeros(cols.shape, dtype=tl.float32)
    tl.store(dqkv_ptr + src, dx.to(dqkv_ptr.dtype.element_ty), mask=mask)
    if not CENTERED:
        tl.store(pw_ptr + tl.program_id(0).to(tl.int64) * D + cols, pw, mask=cmask)


@triton.jit
def _qk_bwd_kernel(dq_ptr, dk_ptr, dv_ptr, qkv_ptr, qw_ptr, kw_ptr, dqkv_ptr, pwq_ptr, pwk_ptr,
                   R, N, H, D, eps, HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr,
                   CENTERED: tl.constexpr, BLOCK_R: tl.constexpr, DP: tl.constexpr):
    mask, src, dst, cols = _qk_rows(R, N, H, D, BLOCK_R, DP)
    HD = H * D
    _head_norm_bwd(dq_ptr, qkv_ptr, qw_ptr, dqkv_ptr, pwq_ptr, mask, src, dst, cols, D, eps, HAS_DQ, CENTERED)
    _head_norm_bwd(dk_ptr, qkv_ptr, kw_ptr, dqkv_ptr, pwk_ptr, mask, src + HD, dst, cols, D, eps, HAS_DK, CENTERED)
    if HAS_DV:
        dv = tl.load(dv_ptr + dst, mask=mask, other=0.0).to(tl.float32)
    else:
        dv = tl.zeros(mask.shape, dtype=tl.float32)
    tl.store(dqkv_ptr + src + 2 * HD, dv.to(dqkv_ptr.dtype.element_ty), mask=mask)


def _qk_tile(D: int) -> tuple[int, int, int]:
    """(BLOCK_R, DP, num_warps): the row tiles of the block norm."""
    return _row_tile(D)


def qk_norm_forward(qkv, heads, q_weight, k_weight, eps, centered=False):
    """qkv [B, N, 3 H D] -> q, k, v [B, H, N, D] (contiguous, qkv's dtype); ``centered``:
    QK-LayerNorm (the weights are None), else QK-RMSNorm."""
    B, N, W3 = qkv.shape
    D = W3 // (3 * heads)
    shape = (B, heads, N, D)
    q, k, v = (dispatch.new_output(shape, qkv.dtype, qkv.device) for _ in range(3))
    R = B * heads * N
    if R * D:
        qkv = qkv.contiguous()
        br, dp, warps = _qk_tile(D)
        _qk_fwd_kernel[(triton.cdiv(R, br),)](qkv, qkv if centered else q_weight.contiguous(),
                                              qkv if centered else k_weight.contiguous(),
                                              q, k, v, R, N, heads, D, float(eps), CENTERED=bool(centered),
                                              BLOCK_R=br, DP=dp, num_warps=warps)
    return q, k, v


def qk_norm_backward(dq, dk, dv, qkv, heads, q_weight, k_weight, eps, centered=False):
    """-> (dqkv [B, N, 3 H D] in qkv's dtype, dq_weight, dk_weight [D] in the weights' dtypes;
    None when ``centered``)."""
    B, N, W3 = qkv.shape
    D = W3 // (3 * heads)
    dev = qkv.device
    dqkv = dispatch.new_output(qkv.shape, qkv.dtype, dev)
    dwq = None if centered else dispatch.new_output(q_weight.shape, q_weight.dtype, dev)
    dwk = None if centered else dispatch.new_output(k_weight.shape, k_weight.dtype, dev)
    R = B * heads * N
    if R * D == 0:
        if not centered:
            dwq.zero_()
            dwk.zero_()
        return dqkv, dwq, dwk
    br, dp, warps = _qk_tile(D)
    n_prog = triton.cdiv(R, br)
    qkv = qkv.contiguous()
    if centered:
        qw = kw = pwq = pwk = qkv  # placeholders, never read or written
    else:
        qw, kw = q_weight.contiguous(), k_weight.contiguous()
        pwq = torch.empty((1, n_prog, D), dtype=torch.float32, device=dev)
        pwk = torch.empty((1, n_prog, D), dtype=torch.float32, device=dev)
    dq, dk, dv = _c(dq), _c(dk), _c(dv)
    _qk_bwd_kernel[(n_prog,)](
        dq if dq is not None else qkv, dk if dk is not None else qkv, dv if dv is not None else qkv, qkv,
        qw, kw, dqkv, pwq, pwk, R, N, heads, D, float(eps),
        HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None, CENTERED=bool(centered),
        BLOCK_R=br, DP=dp, num_warps=warps)
    if not centered:
        _kind_sum(pwq, dwq.view(1, 1, D), 0)
        _kind_sum(pwk, dwk.view(1, 1, D), 0)
    return dqkv, dwq, dwk


# --------------------------------------------------------------------------------------
# Ahead-of-time compile variants (python -m vft_kernels.triton.aot)

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_variants():
    """Every kernel in fp32 and bf16 at a model width (W = 768, D = 64) and the widest
    single-row tile (W = 4096)."""
    from .aot import Variant

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        p = "*" + _TY[dtype]
        for W in (768, 4096):
            br, bw, warps = _row_tile(W)
            ints = {"n_rows": "i64", "S": "i32", "W": "i32", "patches": "i32"}
            sig = {"x_ptr": p, "gate_ptr": p, "h_ptr": p, "scale_ptr": p, "shift_ptr": p, "xnew_ptr": p, "y_ptr": p,
                   **ints, "KG": "i32", "KS": "i32", "KB": "i32", "eps": "fp32", "HAS_RES": "constexpr",
                   "HAS_NORM": "constexpr", "BLOCK_R": "constexpr", "BLOCK_W": "constexpr"}
            out.append(Variant(f"block_norm_fwd[W{W},{_TY[dtype]}]", _block_norm_fwd_kernel, sig,
                               {"HAS_RES": True, "HAS_NORM": True, "BLOCK_R": br, "BLOCK_W": bw}, num_warps=warps))
            sig = {"dres_ptr": p, "dy_ptr": p, "xn_ptr": p, "gate_ptr": p, "h_ptr": p, "scale_ptr": p, "g_ptr": p,
                   "dh_ptr": p, "pscale_ptr": "*fp32", "pgate_ptr": "*fp32", **ints, "KG": "i32", "KS": "i32",
                   "eps": "fp32", "HAS_DRES": "constexpr", "HAS_NORM": "constexpr", "HAS_RES": "constexpr",
                   "BLOCK_R": "constexpr", "BLOCK_W": "constexpr"}
            out.append(Variant(f"block_norm_bwd[W{W},{_TY[dtype]}]", _block_norm_bwd_kernel, sig,
                               {"HAS_DRES": True, "HAS_NORM": True, "HAS_RES": True, "BLOCK_R": br, "BLOCK_W": bw},
                               num_warps=warps))
        sig = {"src_ptr": p, "dst_ptr": p, "S": "i32", "W": "i32", "lo": "i32", "hi": "i32", "dst_stride": "i32",
               "dst_offset": "i32", "BLOCK_S": "constexpr", "BLOCK_W": "constexpr"}
        out.append(Variant(f"block_kind_sum[{_TY[dtype]}]", _kind_sum_kernel, sig,
                           {"BLOCK_S": SUM_ROWS, "BLOCK_W": SUM_COLS}))
        _, br, bh = _swiglu_grid(1, 3072)
        tile = {"BLOCK_R": br, "BLOCK_H": bh}
        sig = {"gu_ptr": p, "out_ptr": p, "n_rows": "i64", "H": "i32", "BLOCK_R": "constexpr", "BLOCK_H": "constexpr"}
        out.append(Variant(f"swiglu_fwd[{_TY[dtype]}]", _swiglu_fwd_kernel, sig, tile))
        sig = {"dout_ptr": p, "gu_ptr": p, "dgu_ptr": p, "n_rows": "i64", "H": "i32", "BLOCK_R": "constexpr",
               "BLOCK_H": "constexpr"}
        out.append(Variant(f"swiglu_bwd[{_TY[dtype]}]", _swiglu_bwd_kernel, sig, tile))
        br, dp, warps = _qk_tile(64)
        for centered in (False, True):
            name = "qk_layer_norm" if centered else "qk_norm"
            w = p if centered else "*fp32"  # the layer norm has no weights: qkv stands in
            pw = p if centered else "*fp32"
            sig = {"qkv_ptr": p, "qw_ptr": w, "kw_ptr": w, "q_ptr": p, "k_ptr": p, "v_ptr": p, "R": "i64",
                   "N": "i32", "H": "i32", "D": "i32", "eps": "fp32", "CENTERED": "constexpr", "BLOCK_R": "constexpr",
                   "DP": "constexpr"}
            out.append(Variant(f"{name}_fwd[D64,{_TY[dtype]}]", _qk_fwd_kernel, sig,
                               {"CENTERED": centered, "BLOCK_R": br, "DP": dp}, num_warps=warps))
            sig = {"dq_ptr": p, "dk_ptr": p, "dv_ptr": p, "qkv_ptr": p, "qw_ptr": w, "kw_ptr": w, "dqkv_ptr": p,
                   "pwq_ptr": pw, "pwk_ptr": pw, "R": "i64", "N": "i32", "H": "i32", "D": "i32", "eps": "fp32",
                   "HAS_DQ": "constexpr", "HAS_DK": "constexpr", "HAS_DV": "constexpr", "CENTERED": "constexpr",
                   "BLOCK_R": "constexpr", "DP": "constexpr"}
            out.append(Variant(f"{name}_bwd[D64,{_TY[dtype]}]", _qk_bwd_kernel, sig,
                               {"HAS_DQ": True, "HAS_DK": True, "HAS_DV": True, "CENTERED": centered, "BLOCK_R": br,
                                "DP": dp}, num_warps=warps))
    return out
