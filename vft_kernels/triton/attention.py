"""Register attention in Triton (docs/spec.md §2): FlashAttention-2-style forward and backward.

Kernels (launched on a grid ``(tiles, H, B)``):

* ``_fwd_kernel``: one program per query tile; online softmax over key tiles; writes
  ``out`` and ``lse`` (float32, natural log, ``-inf`` on dropped rows).
* ``_delta_kernel``: ``delta = rowsum(dout * out)`` (float32) for the backward pass.
* ``_dkdv_kernel``: one program per key tile, looping over query tiles -> dk, dv.
* ``_dq_kernel``: one program per query tile, looping over key tiles -> dq.
  Splitting dq from dk/dv keeps the backward free of atomics, hence deterministic.
* ``_pad_kernel``: packed calls only, fills the padding rows (below).

Packed (varlen) calls, ``cu_seqlens`` int32 ``[S + 1]`` on the device, q ``[1, H, N, D]``,
keep ``[S]``: the same kernels, compiled with ``VARLEN=True``, run on a grid
``(tiles of layout.seq_len, H, S)``. Program ``z = s`` loads ``cu[s]`` and ``cu[s+1]``,
offsets its pointers by ``cu[s]`` rows and runs sample ``s`` as a dense sequence of
``(cu[s+1] - cu[s]) / (P + R)`` blocks (its own ``N`` and ``T``; tiles past its end exit at
once), so the schedule and masks are unchanged and samples never see each other. The
padding rows ``cu[S]:`` get zeros (lse ``-inf``) from ``_pad_kernel``, which reads ``cu[S]``
on the device: no host sync, and new offsets, sample counts or ``N`` recompile nothing
(beyond Triton's usual integer specialisation). Dense launches pass ``cu_ptr=None`` and
``VARLEN=False``: the packed code is compiled out (their PTX equals that of kernels without it).

The tile schedule is analytic (ports of ``RegisterLayout.key_range`` / ``query_range`` /
``classify_tile``, no mask tensor): a query tile sweeps only the keys its last kept query
can see, and a key tile only the queries that can see its first kept key. Inside that
range every kept token is needed, so the sweep walks the stretches of kept tokens (the
``P + keep`` leading tokens of each time block, or the whole range when nothing is
dropped): a tile holding only dropped tokens is never visited. Per tile,
``classify_tile`` decides whether the mask must be computed (partial tiles, tiles that
cross a stretch end or the sequence end) or skipped (fully allowed tiles). The loops hold
no branch around loads and dots, so Triton software-pipelines them. ``keep[b]`` is read
from the device tensor inside the kernels and clamped to ``[0, R]``: changing it neither
syncs nor recompiles.

Compile-time vs run-time parameters: the mask ``MODE`` is a constexpr (three values fixed
by the model; each gets dead-code-free mask arithmetic), and so are the head dim and tile
sizes (they fix register shapes). ``T``, ``P``, ``R`` and ``N`` are run-time ints: they only
enter scalar tile arithmetic and, in partial tiles, one div/mod per row and column, so a
new image/video size or register count reuses the compiled kernel (beyond Triton's usual
specialisation of int arguments equal to 1 or divisible by 16).

Precision: softmax statistics, accumulators and ``delta`` are float32; fp16/bf16 operands
go to the tensor cores as is. fp32 operands follow PyTorch's switch for fp32 CUDA matmuls
(``torch.backends.cuda.matmul.fp32_precision``, or the older ``allow_tf32`` /
``torch.set_float32_matmul_precision``), read at each call: full fp32 products
(``input_precision="ieee"``, CUDA cores) by default, as ``torch.matmul``; TF32 tensor-core
products when the user allows TF32 there. The two are separate compiled variants with their
own tile sizes (see ``_config``). The interpreter multiplies in exact fp32 either way.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..dispatch import new_output

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MODE_IDS = {"full": 0, "block_causal": 1, "block_causal_last": 2}

# Tile classes, as vft_kernels.layout.Tile.
MASKED = tl.constexpr(0)
PARTIAL = tl.constexpr(1)
FULL = tl.constexpr(2)


# --------------------------------------------------------------------------------------
# Analytic tile schedule: scalar ports of RegisterLayout's formulas (-1 stands for None).


@triton.jit
def _kb(kp, t, keep, T, R, PER_BLOCK: tl.constexpr):
    """Registers kept in time block(s) ``t`` (a scalar or a tensor of block indices): with a
    per-block keep, ``keep[b, t]`` read from the sample's row ``kp`` (``t`` clamped to
    [0, T - 1], the value to [0, R]); otherwise the sample's ``keep``."""
    if PER_BLOCK:
        tc = tl.minimum(tl.maximum(t, 0), T - 1)
        kb = tl.minimum(tl.maximum(tl.load(kp + tc), 0), R)
    else:
        kb = keep
    return kb


@triton.jit
def _first_kept(lo, hi, kp, keep, T, S, P, R, PER_BLOCK: tl.constexpr):
    """First kept token in [lo, hi), or -1 (only lo's block matters: P >= 1 keeps every
    block's patches)."""
    kb = _kb(kp, lo // S, keep, T, R, PER_BLOCK)
    x = tl.where(lo % S >= P + kb, (lo // S + 1) * S, lo)
    return tl.where(x < hi, x, -1)


@triton.jit
def _last_kept(lo, hi, kp, keep, T, S, P, R, PER_BLOCK: tl.constexpr):
    """Last kept token in [lo, hi), or -1 (only the block of hi - 1 matters)."""
    x = hi - 1
    kb = _kb(kp, x // S, keep, T, R, PER_BLOCK)
    j = x % S
    x = tl.where(j >= P + kb, x - j + P + kb - 1, x)
    return tl.where(x >= lo, x, -1)


@triton.jit
def _has_dropped(lo, hi, keep, S, P, R):
    """Does [lo, hi) hold a dropped register of a sample keeping ``keep`` registers in every
    block? Called with the sample's smallest keep: exact for a per-sample keep, and for a
    per-block one a superset test (True whenever a register there is dropped), so a tile it
    calls FULL has no dropped token."""
    first = tl.where(lo % S >= P + keep, lo, (lo // S) * S + P + keep)
    return (keep < R) & (first < hi)


@triton.jit
def _classify_tile(q0, q1, k0, k1, kp, keep, T, S, P, R, MODE: tl.constexpr, PER_BLOCK: tl.constexpr):
    """MASKED / PARTIAL / FULL for queries [q0, q1) x keys [k0, k1) (layout.classify_tile;
    with a per-block keep a tile may be called PARTIAL where it is FULL, never the reverse)."""
    i = _last_kept(q0, q1, kp, keep, T, S, P, R, PER_BLOCK)
    k = _first_kept(k0, k1, kp, keep, T, S, P, R, PER_BLOCK)
    masked = (i < 0) | (k < 0)
    # Clamp before dividing: -1 // S differs between the interpreter and the GPU.
    i = tl.maximum(i, 0)
    k = tl.maximum(k, 0)
    ti = i // S
    tk = k // S
    partial = _has_dropped(q0, q1, keep, S, P, R) | _has_dropped(k0, k1, keep, S, P, R)
    tq_min = q0 // S
    tk_max = (k1 - 1) // S
    if MODE == 1:
        masked = masked | (tk > ti)
        partial = partial | (tk_max > tq_min)
    elif MODE == 2:
        jk_first = k % S
        masked = masked | (tk > ti) | ((tk == ti) & (jk_first >= P) & (i % S < jk_first))
        jk_max = (k1 - 1) % S
        same_block_full = (jk_max < P) | (q0 % S >= jk_max)
        partial = partial | (tk_max > tq_min) | ((tk_max == tq_min) & ~same_block_full)
    return tl.where(masked, MASKED, tl.where(partial, PARTIAL, FULL))


@triton.jit
def _key_end(q0, q1, kp, keep, T, S, P, R, MODE: tl.constexpr, PER_BLOCK: tl.constexpr):
    """One past the last key any query in [q0, q1) may see (layout.key_range; 0 if none)."""
    i = _last_kept(q0, q1, kp, keep, T, S, P, R, PER_BLOCK)
    ic = tl.maximum(i, 0)
    t = ic // S
    j = ic % S
    if MODE == 0:
        end = (T - 1) * S + P + _kb(kp, T - 1, keep, T, R, PER_BLOCK)
    elif MODE == 1:
        end = t * S + P + _kb(kp, t, keep, T, R, PER_BLOCK)
    else:
        end = t * S + tl.where(j < P, P, j + 1)
    return tl.where(i < 0, 0, end)


@triton.jit
def _query_range(k0, k1, kp, keep, T, S, P, R, MODE: tl.constexpr, PER_BLOCK: tl.constexpr):
    """[q_lo, q_hi) of the queries that see some key in [k0, k1) (layout.query_range)."""
    k = _first_kept(k0, k1, kp, keep, T, S, P, R, PER_BLOCK)
    kc = tl.maximum(k, 0)
    t = kc // S
    j = kc % S
    q_hi = (T - 1) * S + P + _kb(kp, T - 1, keep, T, R, PER_BLOCK)
    if MODE == 0:
        q_lo = 0 * kc
    elif MODE == 1:
        q_lo = t * S
    else:
        q_lo = t * S + tl.where(j < P, 0, j)
    return tl.where(k < 0, 0, q_lo), tl.where(k < 0, 0, q_hi)


@triton.jit
def _allowed(qi, ki, kp, keep, T, q_stop, k_stop, S, P, R, MODE: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Elementwise mask for partial tiles: layout.allowed, restricted to rows < q_stop and
    columns < k_stop (the sequence end or the end of the stretch being swept). ``qi`` and
    ``ki`` are broadcastable 2-D index tensors ([BQ, 1] and [1, BK], or transposed), so the
    div/mod (and a per-block keep's load) runs once per row and column, not per pair."""
    tq = qi // S
    jq = qi % S
    tk = ki // S
    jk = ki % S
    ok = (jq < P + _kb(kp, tq, keep, T, R, PER_BLOCK)) & (qi < q_stop) & \
        (jk < P + _kb(kp, tk, keep, T, R, PER_BLOCK)) & (ki < k_stop)
    if MODE == 1:
        ok = ok & (tk <= tq)
    elif MODE == 2:
        ok = ok & ((tk < tq) | ((tk == tq) & ((jk < P) | ((jq >= P) & (jk <= jq)))))
    return ok


@triton.jit
def _tile_is_full(q0, q_stop, k0, k_stop, kp, keep, T, S, P, R, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                  MODE: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Can the tile at (q0, k0) skip the mask? Only if _classify_tile says FULL and the tile
    does not cross q_stop / k_stop (rows/columns past them must be masked)."""
    q1 = tl.minimum(q0 + BLOCK_Q, q_stop)
    k1 = tl.minimum(k0 + BLOCK_K, k_stop)
    cls = _classify_tile(q0, q1, k0, k1, kp, keep, T, S, P, R, MODE, PER_BLOCK)
    return (cls == FULL) & (q0 + BLOCK_Q <= q_stop) & (k0 + BLOCK_K <= k_stop)


@triton.jit
def _stretch(i, lo, hi, kp, keep, T, S, P, R, PER_BLOCK: tl.constexpr):
    """Bounds of the i-th stretch of kept tokens in [lo, hi): the kept part (P + its keep
    tokens) of time block lo // S + i, clipped to [lo, hi); with nothing dropped (the
    sample's smallest keep == R) the whole of [lo, hi) is one stretch. Sweeping stretches
    never visits a tile that holds only dropped tokens."""
    dense = keep == R
    blk = lo // S + i
    start = tl.where(dense, lo, tl.maximum(blk * S, lo))
    stop = tl.where(dense, hi, tl.minimum(blk * S + P + _kb(kp, blk, keep, T, R, PER_BLOCK), hi))
    return start, stop


@triton.jit
def _num_stretches(lo, hi, keep, S, R):
    """How many stretches _stretch splits [lo, hi) into (0 when it is empty)."""
    blocks = tl.cdiv(hi, S) - lo // S
    return tl.where(hi <= lo, 0, tl.where(keep == R, 1, blocks))


@triton.jit
def _load_keep(keep_ptr, b, R):
    return tl.minimum(tl.maximum(tl.load(keep_ptr + b), 0), R)


@triton.jit
def _sample_rows(cu_ptr, s, S):
    """Packed calls: (first row as int64, N, T) of sample s, rows [cu[s], cu[s+1])."""
    start = tl.load(cu_ptr + s)
    n = tl.load(cu_ptr + s + 1) - start
    return start.to(tl.int64), n, n // S


# --------------------------------------------------------------------------------------
# Kernels. Inner loops hold no branch around loads or dots (only the mask is conditional),
# so Triton software-pipelines them (cp.async on sm_80+).


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, keep_ptr, kmin_ptr, skeep, cu_ptr,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sob, soh, son, sod, slb, slh,
                N, T, P, R, scale,
                MODE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                VARLEN: tl.constexpr, PER_BLOCK: tl.constexpr = False, PRECISION: tl.constexpr = "tf32"):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    S = P + R
    keep = _load_keep(kmin_ptr, b, R)  # the sample's keep (per-block keeps: their minimum)
    kp = keep_ptr + b * skeep  # per-block keeps: the sample's row
    q0 = pid_m * BLOCK_M
    if VARLEN:  # program z is sample b: its rows of batch 0, its own N and T
        start, N, T = _sample_rows(cu_ptr, b, S)
        if q0 >= N:
            return
        q_ptr += start * sqn
        k_ptr += start * skn
        v_ptr += start * svn
        b = 0
    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m.to(tl.int64)[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + b * skb + h * skh + offs_d[:, None] * skd  # K^T tile [D, BLOCK_N]
    v_base = v_ptr + b * svb + h * svh + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the scores
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    k_end = _key_end(q0, tl.minimum(q0 + BLOCK_M, N), kp, keep, T, S, P, R, MODE, PER_BLOCK)
    for i in range(0, _num_stretches(0, k_end, keep, S, R)):
        k_start, k_stop = _stretch(i, 0, k_end, kp, keep, T, S, P, R, PER_BLOCK)
        for k0 in range(k_start, k_stop, BLOCK_N):
            offs_n = k0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < k_stop
            kt = tl.load(k_base + offs_n.to(tl.int64)[None, :] * skn, mask=col_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * svn, mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale
            if not _tile_is_full(q0, N, k0, k_stop, kp, keep, T, S, P, R, BLOCK_M, BLOCK_N, MODE, PER_BLOCK):
                s = tl.where(_allowed(offs_m[:, None], offs_n[None, :], kp, keep, T, N, k_stop, S, P, R, MODE,
                                      PER_BLOCK), s,
                             float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows with no allowed key yet keep m = -inf; shift them by 0 to avoid inf - inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    # l == 0 exactly for dropped query rows (they saw no key): zero output, lse = -inf. Every
    # kept query sees patch 0, so any other l is positive, or NaN after a NaN / inf score,
    # which then propagates (lse +inf when a score was +inf), as in the reference.
    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    lse = tl.where(dead, float("-inf"), tl.where(m_i == float("inf"), m_i, m_i + tl.log(l_i)))
    if VARLEN:  # reloaded rather than kept live across the loop (spills at 128 registers)
        start = tl.load(cu_ptr + tl.program_id(2)).to(tl.int64)
        out_ptr += start * son
        lse_ptr += start
    tl.store(out_ptr + b * sob + h * soh + offs_m.to(tl.int64)[:, None] * son + offs_d[None, :] * sod,
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + b * slb + h * slh + offs_m, lse, mask=row_ok)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr,
                  sob, soh, son, sod, sgb, sgh, sgn, sgd, slb, slh,
                  N, D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(o_ptr + b * sob + h * soh + rows * son + offs_d[None, :] * sod, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + b * sgb + h * sgh + rows * sgn + offs_d[None, :] * sgd, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + b * slb + h * slh + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, keep_ptr, kmin_ptr, skeep, cu_ptr,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd, slb, slh,
                 sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                 N, T, P, R, scale,
                 MODE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 VARLEN: tl.constexpr, PER_BLOCK: tl.constexpr = False, PRECISION: tl.constexpr = "tf32"):
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    S = P + R
    keep = _load_keep(kmin_ptr, b, R)  # the sample's keep (per-block keeps: their minimum)
    kp = keep_ptr + b * skeep  # per-block keeps: the sample's row
    k0 = pid_n * BLOCK_N
    if VARLEN:
        start, N, T = _sample_rows(cu_ptr, b, S)
        if k0 >= N:
            return
        q_ptr += start * sqn
        k_ptr += start * skn
        v_ptr += start * svn
        do_ptr += start * sgn
        lse_ptr += start
        delta_ptr += start
        dk_ptr += start * sdkn
        dv_ptr += start * sdvn
        b = 0
    offs_n = k0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < N
    cols = offs_n.to(tl.int64)[:, None]
    k = tl.load(k_ptr + b * skb + h * skh + cols * skn + offs_d[None, :] * skd, mask=col_ok[:, None], other=0.0)
    v = tl.load(v_ptr + b * svb + h * svh + cols * svn + offs_d[None, :] * svd, mask=col_ok[:, None], other=0.0)
    qt_base = q_ptr + b * sqb + h * sqh + offs_d[:, None] * sqd  # Q^T tile [D, BLOCK_M]
    do_base = do_ptr + b * sgb + h * sgh + offs_d[None, :] * sgd
    lse_base = lse_ptr + b * slb + h * slh
    delta_base = delta_ptr + b * slb + h * slh

    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    q_lo, q_hi = _query_range(k0, tl.minimum(k0 + BLOCK_N, N), kp, keep, T, S, P, R, MODE, PER_BLOCK)
    for i in range(0, _num_stretches(q_lo, q_hi, keep, S, R)):
        q_start, q_stop = _stretch(i, q_lo, q_hi, kp, keep, T, S, P, R, PER_BLOCK)
        for q0 in range(q_start, q_stop, BLOCK_M):
            offs_m = q0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < q_stop
            qt = tl.load(qt_base + offs_m.to(tl.int64)[None, :] * sqn, mask=row_ok[None, :], other=0.0)
            do = tl.load(do_base + offs_m.to(tl.int64)[:, None] * sgn, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
            # Transposed scores [BLOCK_N, BLOCK_M]: the dk/dv products then need no transpose of P.
            pt = tl.exp(tl.dot(k, qt, input_precision=PRECISION) * scale - lse[None, :])
            if not _tile_is_full(q0, q_stop, k0, N, kp, keep, T, S, P, R, BLOCK_M, BLOCK_N, MODE, PER_BLOCK):
                # Dropped rows have lse = -inf (p = inf there): select, never multiply.
                pt = tl.where(_allowed(offs_m[None, :], offs_n[:, None], kp, keep, T, q_stop, N, S, P, R, MODE,
                                       PER_BLOCK), pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            # Exactly 0 where P is (masked pairs), also for a NaN row (delta NaN); a non-finite q
            # row already makes its allowed dS entries NaN, so it is zeroed as an operand: 0 * NaN
            # on masked pairs must not reach keys it cannot see.
            dst = tl.where(pt == 0.0, 0.0, pt * (dpt - delta[None, :]))
            qt = tl.where(tl.abs(qt) < float("inf"), qt, 0.0)  # (scores done: reuse its registers)
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)

    dk_ptrs = dk_ptr + b * sdkb + h * sdkh + cols * sdkn + offs_d[None, :] * sdkd
    dv_ptrs = dv_ptr + b * sdvb + h * sdvh + cols * sdvn + offs_d[None, :] * sdvd
    tl.store(dk_ptrs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, keep_ptr, kmin_ptr, skeep, cu_ptr,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sgb, sgh, sgn, sgd, slb, slh,
               sdqb, sdqh, sdqn, sdqd,
               N, T, P, R, scale,
               MODE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               VARLEN: tl.constexpr, PER_BLOCK: tl.constexpr = False, PRECISION: tl.constexpr = "tf32"):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    S = P + R
    keep = _load_keep(kmin_ptr, b, R)  # the sample's keep (per-block keeps: their minimum)
    kp = keep_ptr + b * skeep  # per-block keeps: the sample's row
    q0 = pid_m * BLOCK_M
    if VARLEN:
        start, N, T = _sample_rows(cu_ptr, b, S)
        if q0 >= N:
            return
        q_ptr += start * sqn
        k_ptr += start * skn
        v_ptr += start * svn
        do_ptr += start * sgn
        lse_ptr += start
        delta_ptr += start
        dq_ptr += start * sdqn
        b = 0
    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < N
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(q_ptr + b * sqb + h * sqh + rows * sqn + offs_d[None, :] * sqd, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + b * sgb + h * sgh + rows * sgn + offs_d[None, :] * sgd, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + b * slb + h * slh + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + b * slb + h * slh + offs_m, mask=row_ok, other=0.0)
    kt_base = k_ptr + b * skb + h * skh + offs_d[:, None] * skd  # K^T, V^T tiles [D, BLOCK_N]
    vt_base = v_ptr + b * svb + h * svh + offs_d[:, None] * svd

    dq = tl.zeros([BLOCK_M, D], tl.float32)
    k_end = _key_end(q0, tl.minimum(q0 + BLOCK_M, N), kp, keep, T, S, P, R, MODE, PER_BLOCK)
    for i in range(0, _num_stretches(0, k_end, keep, S, R)):
        k_start, k_stop = _stretch(i, 0, k_end, kp, keep, T, S, P, R, PER_BLOCK)
        for k0 in range(k_start, k_stop, BLOCK_N):
            offs_n = k0 + tl.arange(0, BLOCK_N)
            col_ok = offs_n < k_stop
            kt = tl.load(kt_base + offs_n.to(tl.int64)[None, :] * skn, mask=col_ok[None, :], other=0.0)
            vt = tl.load(vt_base + offs_n.to(tl.int64)[None, :] * svn, mask=col_ok[None, :], other=0.0)
            p = tl.exp(tl.dot(q, kt, input_precision=PRECISION) * scale - lse[:, None])
            if not _tile_is_full(q0, N, k0, k_stop, kp, keep, T, S, P, R, BLOCK_M, BLOCK_N, MODE, PER_BLOCK):
                p = tl.where(_allowed(offs_m[:, None], offs_n[None, :], kp, keep, T, N, k_stop, S, P, R, MODE,
                                      PER_BLOCK), p, 0.0)
                # Only partial tiles hold masked pairs: there a non-finite key (which already makes
                # the ds entries of the rows that see it NaN) is zeroed as an operand, so 0 * NaN
                # does not reach rows that cannot see it. (A masked pair gives 0 * (dp - delta):
                # NaN only for a NaN row, whose dq is NaN anyway.)
                kt = tl.where(tl.abs(kt) < float("inf"), kt, 0.0)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)

    tl.store(dq_ptr + b * sdqb + h * sdqh + rows * sdqn + offs_d[None, :] * sdqd,
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _pad_kernel(x_ptr, cu_ptr, num_samples, head_len, row_len, value, BLOCK: tl.constexpr):
    """Packed calls: writes ``value`` to the padding rows ``cu[num_samples]:`` of x, a
    contiguous [1, H, N, row_len] tensor (``head_len = N * row_len``); grid (tiles, H)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first = tl.load(cu_ptr + num_samples) * row_len
    if tl.program_id(0) * BLOCK + BLOCK <= first:
        return
    x = x_ptr + tl.program_id(1).to(tl.int64) * head_len + offs
    tl.store(x, tl.full([BLOCK], value, tl.float32).to(x_ptr.dtype.element_ty),
             mask=(offs >= first) & (offs < head_len))


# --------------------------------------------------------------------------------------
# Host side


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel on GPU; BLOCK_M tiles queries and
# BLOCK_N keys in every kernel. Chosen so that every variant compiles for sm_80 and sm_90
# without register spills and within 100 KB of shared memory (sm_86/sm_89 limit):
# python -m vft_kernels.triton.aot --only attention.
def _config(kernel, D, dtype, precision="tf32"):
    if dtype == torch.float32 and precision == "ieee":
        # Full-precision fp32 dots run on CUDA cores with every operand in registers: small
        # tiles, so that no variant spills.
        return _IEEE_CONFIGS[kernel].get(D, _IEEE_CONFIGS[kernel][None])
    fp32 = dtype == torch.float32
    if kernel == "fwd":
        if fp32:
            return (64, 32, 8, 2) if D == 128 else (64, 64, 8, 2)
        return {16: (128, 64, 4, 3), 128: (64, 64, 8, 2)}.get(D, (128, 64, 8, 3))
    if kernel == "dkdv":
        if fp32:
            return (32, 64, 8, 2) if D <= 32 else (32, 32, 4, 2)
        return {16: (64, 64, 4, 2), 128: (64, 32, 8, 2)}.get(D, (32, 64, 8, 2))
    if fp32:  # dq
        return (32, 32, 4, 2) if D == 128 else (64, 32, 8, 2)
    return {16: (64, 64, 4, 3), 128: (64, 32, 8, 2)}.get(D, (64, 64, 8, 2))


# fp32 "ieee" tiles per kernel: {head dim: config}, None for the other head dims. Head dim
# 16 runs zero-padded to 32 in this precision (IEEE_HEAD_DIMS): no d16 tiling compiled for
# both sm_80 and sm_90 without a (small) spill in dk/dv.
IEEE_HEAD_DIMS = (32, 64, 128)
_IEEE_CONFIGS = {
    "fwd": {128: (32, 32, 8, 2), None: (64, 32, 8, 2)},
    "dkdv": {None: (32, 32, 8, 2)},
    "dq": {None: (32, 32, 8, 2)},
}


def _tf32_allowed() -> bool:
    """Does PyTorch use TF32 for fp32 matmuls on CUDA right now? The new per-backend switch
    (``torch.backends.cuda.matmul.fp32_precision``, then the global
    ``torch.backends.fp32_precision``) wins when set; "none" defers to the legacy
    ``allow_tf32`` flag, which ``torch.set_float32_matmul_precision`` also sets."""
    for p in (getattr(torch.backends.cuda.matmul, "fp32_precision", "none"),
              getattr(torch.backends, "fp32_precision", "none")):
        if p == "tf32":
            return True
        if p == "ieee":
            return False
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch refuses to read the legacy flag after a mix of the two APIs
        return torch.get_float32_matmul_precision() != "highest"


def dot_precision(dtype) -> str:
    """The ``tl.dot`` input precision of a call with operands of ``dtype``: "ieee" for
    float32 unless PyTorch allows TF32 (``_tf32_allowed``), else "tf32" (which fp16 / bf16
    dots ignore)."""
    return "ieee" if dtype == torch.float32 and not _tf32_allowed() else "tf32"


def _blocks(config, q, block_m, block_n):
    """Tile sizes: explicit ones (tests), else 16 x 16 under the interpreter (fastest there,
    and tiles then straddle layout blocks), else the GPU config."""
    if _interpreting() and q.device.type == "cpu":
        config = (16, 16, 1, 1)
    bm, bn, warps, stages = config
    return block_m or bm, block_n or bn, warps, stages


def _supports(q, D):
    if q.device.type == "cpu" and not _interpreting():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device.type} not supported (cuda)"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} not supported (float16, bfloat16, float32)"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return "bfloat16 tl.dot is wrong under TRITON_INTERPRET=1"
    if _padded_dim(D) is None:
        return f"head dim {D} > {HEAD_DIMS[-1]} (the kernels take {HEAD_DIMS}; smaller dims are zero-padded)"
    B, H = q.shape[:2]
    if max(B, H) > 65535:  # grid dims y, z
        return f"batch {B} and heads {H} must each be <= 65535"
    return None


def _supports_packing(cu_seqlens):
    if cu_seqlens is not None and cu_seqlens.numel() - 1 > 65535:  # grid dim z
        return f"packed calls take at most 65535 samples, got {cu_seqlens.numel() - 1}"
    return None


def supports_attention_forward(q, k, v, layout, keep, scale, cu_seqlens=None):
    """None if the Triton kernels can run this call, else why not."""
    return _supports(q, q.shape[-1]) or _supports_packing(cu_seqlens)


def supports_attention_backward(dout, q, k, v, out, lse, layout, keep, scale, cu_seqlens=None):
    """None if the Triton kernels can run this call, else why not."""
    return _supports(q, q.shape[-1]) or _supports_packing(cu_seqlens)


def _launch_shape(layout, B, N, cu_seqlens):
    """(rows, programs along grid z, run-time (N, T, P, R)): N rows of each of the B batch
    elements of a dense call, or of a packed one the S samples with at most layout.seq_len
    rows each (each program reads its own N and T from cu_seqlens; the constant bounds
    passed here keep new N or offsets from changing the kernels' integer specialisation)."""
    rows, programs = (N, B) if cu_seqlens is None else (layout.seq_len, cu_seqlens.numel() - 1)
    return rows, programs, (rows, layout.blocks, layout.patches, layout.registers)


_PAD_BLOCK = 1024


def _fill_padding(cu_seqlens, *fills):
    """Packed calls: writes the rows from cu[-1] on of each (tensor, value) in ``fills``
    (contiguous [1, H, N, ...] outputs) with a small kernel; no host sync."""
    for t, value in fills:
        H, N = t.shape[1], t.shape[2]
        head_len = t[0, 0].numel()
        _pad_kernel[(triton.cdiv(head_len, _PAD_BLOCK), H)](t, cu_seqlens, cu_seqlens.numel() - 1, head_len,
                                                            head_len // N, float(value), BLOCK=_PAD_BLOCK,
                                                            num_warps=4)


def _keep_args(keep):
    """(keep_ptr, kmin_ptr, skeep) kernel arguments and PER_BLOCK for keep int [B] (the
    kernels read keep[b]) or per-block [B, T] (row b at keep_ptr + b * skeep, and the row
    minimum, which decides the dense fast path and bounds the dropped tokens, from kmin)."""
    keep = keep.to(torch.int32)
    if keep.dim() == 1:
        return (keep, keep, 0), False
    keep = keep.contiguous()
    return (keep, keep.amin(dim=1), keep.stride(0)), True


def _padded_dim(D, precision="tf32"):
    """The kernels' head dim that serves D (the smallest of HEAD_DIMS, or for full-precision
    fp32 of IEEE_HEAD_DIMS, >= D), None if D is larger than all of them."""
    return next((d for d in (IEEE_HEAD_DIMS if precision == "ieee" else HEAD_DIMS) if d >= D), None)


def _pad_head(t, Dp):
    """t [..., D] zero-padded to [..., Dp] (contiguous). Zero columns of q and k leave every
    score unchanged; zero columns of v, dout and out give zero output / gradient columns,
    which are sliced off: exact, for O(N D) copies against the O(N^2 D) kernels."""
    return torch.nn.functional.pad(t, (0, Dp - t.shape[-1]))


def attention_forward(q, k, v, layout, keep, scale, cu_seqlens=None, *, block_m=None, block_n=None):
    """q, k, v [B, H, N, D] (fp16/bf16/fp32, any strides), keep int [B] or per-block [B, T]
    on q's device -> (out [B, H, N, D] q.dtype, lse [B, H, N] float32, -inf on dropped rows).
    Packed: q, k, v [1, H, N, D], keep int [S] or [S, layout.blocks], cu_seqlens int32
    [S + 1] (module doc).

    ``block_m``/``block_n`` override the tile sizes (powers of two >= 16; for tests).
    Head dims not in HEAD_DIMS run zero-padded to the next one (the scale is the caller's)."""
    B, H, N, D = q.shape
    precision = dot_precision(q.dtype)
    Dp = _padded_dim(D, precision)
    if Dp != D:
        out, lse = attention_forward(*(_pad_head(t, Dp) for t in (q, k, v)), layout, keep, scale, cu_seqlens,
                                     block_m=block_m, block_n=block_n)
        return out[..., :D].contiguous(), lse
    out = new_output((B, H, N, D), q.dtype, q.device)
    lse = new_output((B, H, N), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    bm, bn, warps, stages = _blocks(_config("fwd", D, q.dtype, precision), q, block_m, block_n)
    keep_args, per_block = _keep_args(keep)
    rows, programs, sizes = _launch_shape(layout, B, N, cu_seqlens)
    _fwd_kernel[(triton.cdiv(rows, bm), H, programs)](
        q, k, v, out, lse, *keep_args, cu_seqlens, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0), lse.stride(1), *sizes, float(scale), MODE=MODE_IDS[layout.mode], D=D, BLOCK_M=bm,
        BLOCK_N=bn, VARLEN=cu_seqlens is not None, PER_BLOCK=per_block, PRECISION=precision, num_warps=warps,
        num_stages=stages)
    if cu_seqlens is not None:
        _fill_padding(cu_seqlens, (out, 0.0), (lse, float("-inf")))
    return out, lse


def attention_backward(dout, q, k, v, out, lse, layout, keep, scale, cu_seqlens=None, *, block_m=None,
                       block_n=None):
    """Gradients of attention_forward: dout, out [B, H, N, D], lse [B, H, N] float32 ->
    (dq, dk, dv) [B, H, N, D] in q's dtype. Deterministic (no atomics). Head dims not in
    HEAD_DIMS run zero-padded, as in attention_forward."""
    B, H, N, D = q.shape
    precision = dot_precision(q.dtype)
    Dp = _padded_dim(D, precision)
    if Dp != D:
        grads = attention_backward(*(_pad_head(t, Dp) for t in (dout, q, k, v, out)), lse, layout, keep, scale,
                                   cu_seqlens, block_m=block_m, block_n=block_n)
        return tuple(g[..., :D].contiguous() for g in grads)
    dq = new_output((B, H, N, D), q.dtype, q.device)
    dk = new_output((B, H, N, D), k.dtype, k.device)
    dv = new_output((B, H, N, D), v.dtype, v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    keep_args, per_block = _keep_args(keep)
    lse = lse.contiguous()
    delta = new_output((B, H, N), torch.float32, q.device)
    bm, bn, warps, stages = _blocks(_config("dq", D, q.dtype, precision), q, block_m, block_n)
    # delta is row-wise: one dense pass over all N rows serves packed calls too.
    _delta_kernel[(triton.cdiv(N, bm), H, B)](out, dout, delta, *out.stride(), *dout.stride(),
                                              delta.stride(0), delta.stride(1), N, D=D, BLOCK_M=bm,
                                              num_warps=4)
    rows, programs, sizes = _launch_shape(layout, B, N, cu_seqlens)
    common = (*keep_args, cu_seqlens, *q.stride(), *k.stride(), *v.stride(), *dout.stride(), lse.stride(0),
              lse.stride(1))
    consts = dict(MODE=MODE_IDS[layout.mode], D=D, VARLEN=cu_seqlens is not None, PER_BLOCK=per_block,
                  PRECISION=precision)
    _dq_kernel[(triton.cdiv(rows, bm), H, programs)](q, k, v, dout, lse, delta, dq, *common, *dq.stride(), *sizes,
                                                     float(scale), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                     num_stages=stages, **consts)
    bm, bn, warps, stages = _blocks(_config("dkdv", D, q.dtype, precision), q, block_m, block_n)
    _dkdv_kernel[(triton.cdiv(rows, bn), H, programs)](q, k, v, dout, lse, delta, dk, dv, *common, *dk.stride(),
                                                       *dv.stride(), *sizes, float(scale), BLOCK_M=bm, BLOCK_N=bn,
                                                       num_warps=warps, num_stages=stages, **consts)
    if cu_seqlens is not None:
        _fill_padding(cu_seqlens, (dq, 0.0), (dk, 0.0), (dv, 0.0))
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# Ahead-of-time compile variants


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_KERNELS = {"fwd": _fwd_kernel, "dkdv": _dkdv_kernel, "dq": _dq_kernel}
_HEAD_DIM_STRIDES = ("sqd", "skd", "svd", "sod", "sgd", "sdkd", "sdvd", "sdqd")


def _variant(name, fn, dtype, constexprs, num_warps, num_stages, sizes=("N", "T", "P", "R", "num_samples", "skeep")):
    """A Variant for a launch on contiguous-row tensors: head-dim strides are 1 (Triton
    specialises them to constants), pointers are 16-byte aligned and the other strides are
    multiples of 16 (D is), as the launcher assumes at run time; ``sizes`` are arbitrary."""
    from .aot import Variant

    t = _TRITON_DTYPE[dtype]
    constexprs = {**constexprs, **{s: 1 for s in _HEAD_DIM_STRIDES if s in fn.arg_names}}
    if constexprs.get("VARLEN") is False:
        constexprs["cu_ptr"] = None  # dense launches pass no offsets
    pointers = {"lse_ptr": "*fp32", "delta_ptr": "*fp32", "keep_ptr": "*i32", "kmin_ptr": "*i32", "cu_ptr": "*i32"}
    signature, divisible = {}, []
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = pointers.get(arg, f"*{t}")
            divisible.append(arg)
        elif arg in ("scale", "value"):
            signature[arg] = "fp32"
        elif arg in sizes:
            signature[arg] = "i32"
        else:  # batch / head / row strides, row lengths (multiples of D)
            signature[arg] = "i32"
            divisible.append(arg)
    return Variant(name, fn, signature, constexprs, num_warps, num_stages, tuple(divisible))


def aot_variants(modes=tuple(MODE_IDS), head_dims=HEAD_DIMS, dtypes=DTYPES, kernels=("delta", "pad", *_KERNELS),
                 varlen=(False, True), precisions=("tf32", "ieee"), per_block=(False, True)):
    """Every kernel variant the host code launches on GPU: mode x head dim x dtype x
    dense/packed (``varlen``) x per-sample/per-block keep for the forward, dq and dk/dv kernels (fp32 once per dot
    precision in ``precisions``), head dim x dtype (x precision) for the delta kernel, and
    for packed calls the padding kernel per output dtype (lse: fp32 rows of length 1)."""
    variants = []
    for dtype in dtypes:
        if "pad" in kernels and True in varlen:
            variants.append(_variant(f"attn_pad_{_TRITON_DTYPE[dtype]}", _pad_kernel, dtype, {"BLOCK": _PAD_BLOCK},
                                     4, 1))
        for precision in (precisions if dtype == torch.float32 else ("tf32",)):
            for D in head_dims:
                if precision == "ieee" and D not in IEEE_HEAD_DIMS:
                    continue  # runs zero-padded
                tag = f"{_TRITON_DTYPE[dtype]}{'_ieee' if precision == 'ieee' else ''}_d{D}"
                if "delta" in kernels:
                    bm = _config("dq", D, dtype, precision)[0]
                    variants.append(_variant(f"attn_delta_{tag}", _delta_kernel, dtype, {"D": D, "BLOCK_M": bm},
                                             4, 1))
                for kernel, fn in _KERNELS.items():
                    if kernel not in kernels:
                        continue
                    bm, bn, warps, stages = _config(kernel, D, dtype, precision)
                    for mode in modes:
                        for packed in varlen:
                            for pb in per_block:
                                constexprs = {"MODE": MODE_IDS[mode], "D": D, "BLOCK_M": bm, "BLOCK_N": bn,
                                              "VARLEN": packed, "PER_BLOCK": pb, "PRECISION": precision}
                                name = f"attn_{kernel}{'_varlen' if packed else ''}{'_pb' if pb else ''}_{mode}_{tag}"
                                variants.append(_variant(name, fn, dtype, constexprs, warps, stages))
    if "pad" in kernels and True in varlen:
        variants.append(_variant("attn_pad_lse", _pad_kernel, torch.float32, {"BLOCK": _PAD_BLOCK, "row_len": 1}, 4, 1,
                                 sizes=("num_samples", "head_len")))
    return variants
