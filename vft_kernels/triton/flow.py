"""Triton kernels of the flow ODE step (docs/spec.md §3), backend "triton".

Launches per step: one for ``none`` / ``cfg`` / Heun (a single pass over memory); two for
``apg`` — a reduction pass that writes per-(group, chunk) partial sums of
``||d||^2, <d, v_cond>, ||v_cond||^2`` (``d`` = the momentum-updated ``v_cond - v_uncond``)
and an update pass whose programs first fold their group's partials into the APG
coefficients, then write ``x_next``, the momentum state and the prefix frames.

APG in closed form: with ``c = min(1, thr / ||d||)`` (1 when there is no threshold or
``||d|| = 0``) and ``k = <d, v_cond> / ||v_cond||^2`` (0 when ``||v_cond|| = 0``),
``v = v_cond + (scale - 1) * (c d + (eta - 1) c k v_cond)``: the thresholded diff is
``c d`` so its projection is ``c <d, u> u`` and one reduction pass suffices.

Tensors are viewed as ``rows x L`` (rows = groups for APG, samples otherwise), the grid is
``(cdiv(L, BLOCK), rows)`` and offsets are int64. Inputs that are not contiguous are
copied once (the ops layer already hands over contiguous ``out`` and ``momentum``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .aot import Variant

BLOCK = 1024
NPART = 64  # max partial sums per group: the update programs load all of a group's partials
NUM_WARPS = 8  # 4 elements per thread: keeps the APG update (5 streams + prefix indexing) under ~90 registers
MAX_ROWS = 65535  # grid axis 1 limit
MODES = {"none": 0, "cfg": 1, "apg": 2, "heun": 3}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _cast_to(v, ptr):
    """float32 ``v`` in ``ptr``'s element type, rounded to nearest even. bf16 is rounded by
    hand: the interpreter's float32 -> bf16 cast truncates (on GPUs this is a few integer ops
    and the cast below is then exact)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _apg_reduce_kernel(vc_ptr, vu_ptr, m_ptr, part_ptr, L, CHUNK, apg_momentum,
                       HAS_MOM: tl.constexpr, NPART: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums over one chunk of one group: part[g, chunk] = (|d|^2, <d, vc>, |vc|^2)."""
    chunk = tl.program_id(0)
    g = tl.program_id(1)
    base = g.to(tl.int64) * L
    start = chunk.to(tl.int64) * CHUNK
    acc_dd = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dv = tl.zeros([BLOCK], dtype=tl.float32)
    acc_vv = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, CHUNK, BLOCK):
        col = start + i + tl.arange(0, BLOCK)
        mask = col < L
        vc = tl.load(vc_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        d = vc - tl.load(vu_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        if HAS_MOM:
            d = d + apg_momentum * tl.load(m_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        acc_dd += d * d
        acc_dv += d * vc
        acc_vv += vc * vc
    p = part_ptr + (g.to(tl.int64) * NPART + chunk) * 3
    tl.store(p, tl.sum(acc_dd, axis=0))
    tl.store(p + 1, tl.sum(acc_dv, axis=0))
    tl.store(p + 2, tl.sum(acc_vv, axis=0))


@triton.jit
def _flow_update_kernel(out_ptr, x_ptr, a_ptr, b_ptr, m_ptr, prefix_ptr, part_ptr, t_ptr, tn_ptr,
                        L, rows_per_sample, n_part, scale, apg_eta, apg_norm_threshold, apg_momentum,
                        T, inner, prefix_len,
                        MODE: tl.constexpr, HAS_MOM: tl.constexpr, HAS_PREFIX: tl.constexpr,
                        NPART: tl.constexpr, BLOCK: tl.constexpr):
    """out = x + (t_next - t) * v on one block of one row; MODE 0 none (v = a), 1 cfg,
    2 apg (a = v_cond, b = v_uncond), 3 Heun (v = (a + b) / 2)."""
    row = tl.program_id(1)
    sample = row // rows_per_sample
    dt = tl.load(tn_ptr + sample) - tl.load(t_ptr + sample)
    col = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = col < L
    off = row.to(tl.int64) * L + col
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        v = a
    elif MODE == 1:
        b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
        v = b + scale * (a - b)
    elif MODE == 3:
        b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
        v = 0.5 * (a + b)
    else:
        pi = tl.arange(0, NPART)
        pp = part_ptr + (row.to(tl.int64) * NPART + pi) * 3
        pm = pi < n_part
        dd = tl.sum(tl.load(pp, mask=pm, other=0.0), axis=0)
        dv = tl.sum(tl.load(pp + 1, mask=pm, other=0.0), axis=0)
        vv = tl.sum(tl.load(pp + 2, mask=pm, other=0.0), axis=0)
        norm = tl.sqrt(dd)
        # c = min(1, thr / |d|), and 1 without a threshold or for |d| = 0 (0/0 -> 0, docs/spec.md §3)
        # NaN |d| (a NaN / inf velocity) gives NaN, as the reference's clamp does
        r = apg_norm_threshold / norm
        c = tl.where((apg_norm_threshold > 0) & ~(r >= 1.0), r, 1.0)
        k = tl.where(vv > 0, dv / tl.where(vv > 0, vv, 1.0), 0.0)
        alpha = 1.0 + (scale - 1.0) * (apg_eta - 1.0) * c * k
        beta = (scale - 1.0) * c
        # a non-finite value anywhere in the group: NaN for the whole group, as the reference
        # (its projection <d, u> u turns 0 * NaN and inf - inf into NaN everywhere)
        bad = ~((tl.abs(dd) < float("inf")) & (tl.abs(dv) < float("inf")) & (tl.abs(vv) < float("inf")))
        alpha = tl.where(bad, float("nan"), alpha)
        beta = tl.where(bad, float("nan"), beta)
        d = a - tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if HAS_MOM:
            d = d + apg_momentum * tl.load(m_ptr + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(m_ptr + off, _cast_to(d, m_ptr), mask=mask)
        v = alpha * a + beta * d
    res = x + dt * v
    if HAS_PREFIX:
        r = off // inner
        tt = r % T
        in_prefix = tt < prefix_len
        poff = ((r // T) * prefix_len + tt) * inner + off % inner
        pv = tl.load(prefix_ptr + poff, mask=mask & in_prefix, other=0.0).to(tl.float32)
        res = tl.where(in_prefix, pv, res)
    tl.store(out_ptr + off, _cast_to(res, out_ptr), mask=mask)


def _dtype_reason(tensors) -> str | None:
    for name, t in tensors:
        if t is not None and t.dtype not in DTYPES:
            return f"{name} dtype {t.dtype} not supported (float32, float16, bfloat16)"
    return None


def supports_flow_step(out, x, v_cond, v_uncond, t, t_next, guidance, scale, apg_eta, apg_norm_threshold,
                       apg_momentum, momentum, reduce_ndim, prefix, prefix_len):
    reason = _dtype_reason((("x", x), ("momentum", momentum)))
    if reason:
        return reason
    rows = x.numel() // max(math.prod(x.shape[x.dim() - reduce_ndim:]), 1) if guidance == "apg" else x.shape[0]
    if rows > MAX_ROWS:
        return f"{rows} rows (groups or samples) > {MAX_ROWS} (grid limit)"
    return None


def supports_flow_heun_step(out, x, v1, v2, t, t_next):
    reason = _dtype_reason((("x", x),))
    if reason:
        return reason
    if x.shape[0] > MAX_ROWS:
        return f"batch {x.shape[0]} > {MAX_ROWS} (grid limit)"
    return None


def _c(t):
    return None if t is None else t.contiguous()


def _launch_update(mode, out, x, a, b, t, t_next, rows, L, rows_per_sample, momentum=None, part=None, n_part=0,
                   scale=1.0, apg_eta=0.0, apg_norm_threshold=0.0, apg_momentum=0.0, prefix=None, prefix_len=0):
    T = x.shape[2] if prefix_len > 0 else 1
    inner = math.prod(x.shape[3:]) if prefix_len > 0 else 1
    _flow_update_kernel[(triton.cdiv(L, BLOCK), rows)](
        out, x, a, b if b is not None else a, momentum if momentum is not None else x,
        prefix if prefix is not None else x, part if part is not None else t, t, t_next,
        L, rows_per_sample, n_part, float(scale), float(apg_eta), float(apg_norm_threshold), float(apg_momentum),
        T, inner, prefix_len,
        MODE=mode, HAS_MOM=momentum is not None, HAS_PREFIX=prefix_len > 0, NPART=NPART, BLOCK=BLOCK,
        num_warps=NUM_WARPS)


def flow_step(out, x, v_cond, v_uncond, t, t_next, guidance, scale, apg_eta, apg_norm_threshold, apg_momentum,
              momentum, reduce_ndim, prefix, prefix_len):
    """Dispatch contract (see vft_kernels.dispatch): writes ``out`` (contiguous, may alias x);
    updates ``momentum`` (contiguous or None) in place for APG with momentum."""
    if x.numel() == 0:
        return
    x, v_cond, v_uncond, prefix = _c(x), _c(v_cond), _c(v_uncond), _c(prefix)
    t, t_next = t.contiguous(), t_next.contiguous()
    B = x.shape[0]
    if guidance != "apg":
        _launch_update(MODES[guidance], out, x, v_cond, v_uncond, t, t_next, B, x.numel() // B, 1,
                       scale=scale, prefix=prefix, prefix_len=prefix_len)
        return
    L = math.prod(x.shape[x.dim() - reduce_ndim:])
    rows = x.numel() // L
    n_part = min(NPART, triton.cdiv(L, BLOCK))
    chunk = triton.cdiv(triton.cdiv(L, n_part), BLOCK) * BLOCK
    n_part = triton.cdiv(L, chunk)
    mom = momentum if apg_momentum != 0 else None
    part = torch.empty((rows, NPART, 3), dtype=torch.float32, device=x.device)
    _apg_reduce_kernel[(n_part, rows)](v_cond, v_uncond, mom if mom is not None else x, part, L, chunk,
                                       float(apg_momentum), HAS_MOM=mom is not None, NPART=NPART, BLOCK=BLOCK,
                                       num_warps=NUM_WARPS)
    _launch_update(MODES["apg"], out, x, v_cond, v_uncond, t, t_next, rows, L, rows // B, momentum=mom,
                   part=part, n_part=n_part, scale=scale, apg_eta=apg_eta, apg_norm_threshold=apg_norm_threshold,
                   apg_momentum=apg_momentum, prefix=prefix, prefix_len=prefix_len)


def flow_heun_step(out, x, v1, v2, t, t_next):
    """Dispatch contract: out = x + (t_next - t) * (v1 + v2) / 2 in one pass."""
    if x.numel() == 0:
        return
    B = x.shape[0]
    _launch_update(MODES["heun"], out, _c(x), _c(v1), _c(v2), t.contiguous(), t_next.contiguous(), B,
                   x.numel() // B, 1)


_TY = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def aot_variants() -> list[Variant]:
    """The update kernel for every mode (fp32 and bf16 storage, prefix and momentum on for
    APG) and the APG reduction."""
    variants = []
    for dtype in (torch.float32, torch.bfloat16):
        p = _TY[dtype]
        for mode_name, mode in MODES.items():
            apg = mode_name == "apg"
            sig = {"out_ptr": p, "x_ptr": p, "a_ptr": p, "b_ptr": p, "m_ptr": "*fp32", "prefix_ptr": p,
                   "part_ptr": "*fp32", "t_ptr": "*fp32", "tn_ptr": "*fp32", "L": "i64", "rows_per_sample": "i32",
                   "n_part": "i32", "scale": "fp32", "apg_eta": "fp32", "apg_norm_threshold": "fp32",
                   "apg_momentum": "fp32", "T": "i32", "inner": "i64", "prefix_len": "i32",
                   "MODE": "constexpr", "HAS_MOM": "constexpr", "HAS_PREFIX": "constexpr", "NPART": "constexpr",
                   "BLOCK": "constexpr"}
            variants.append(Variant(f"flow_update[{mode_name},{dtype}]".replace("torch.", ""), _flow_update_kernel,
                                    sig, {"MODE": mode, "HAS_MOM": apg, "HAS_PREFIX": apg, "NPART": NPART,
                                          "BLOCK": BLOCK}, num_warps=NUM_WARPS))
        sig = {"vc_ptr": p, "vu_ptr": p, "m_ptr": "*fp32", "part_ptr": "*fp32", "L": "i64", "CHUNK": "i64",
               "apg_momentum": "fp32", "HAS_MOM": "constexpr", "NPART": "constexpr", "BLOCK": "constexpr"}
        variants.append(Variant(f"flow_apg_reduce[{dtype}]".replace("torch.", ""), _apg_reduce_kernel, sig,
                                {"HAS_MOM": True, "NPART": NPART, "BLOCK": BLOCK}, num_warps=NUM_WARPS))
    return variants
