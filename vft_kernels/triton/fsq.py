"""Triton FSQ kernels (docs/spec.md §1): fused forward, fused backward, indices -> codes.

Each program handles a tile of ``BLOCK_R`` rows x ``DP`` (next power of two >= d) dims of
the [rows, d] view of the input, with int64 offsets and arbitrary (row, dim) strides. The
levels and the per-dim float32 constants (computed by the reference on the host so they
are bit-identical) are compile-time tuples: one compiled kernel per (levels, eps).

* forward: one read of z, one write of codes and of indices;
* backward: recomputes 1 - tanh^2 from z (nothing else saved);
* decode: one read of indices, one write of codes.

tanh and round-half-to-even are written with exp and adds (the interpreter lacks
libdevice); the same formulas as csrc/include/vft/fsq_math.h.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .. import dispatch
from ..reference import fsq as ref

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_DIMS = 16
MAX_LEVEL = 2**22  # the add/subtract rounding trick is exact for |x| < 2**22
TILE = 2048  # elements per program (BLOCK_R * DP)


@triton.jit
def _round_half_even(x):
    # Adding 1.5 * 2**23 pushes the fraction bits out with the FPU's round-to-nearest-even.
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _two_over_exp_plus_one(y):
    # 2 / (exp(y) + 1) for y >= 0; clamped at 40 where it is < 1e-17 (tanh rounds to 1).
    return 2.0 / (tl.exp(tl.minimum(y, 40.0)) + 1.0)


@triton.jit
def _tanh_small(x):
    # tanh for |x| < 0.55: x + x^3 P(x^2), degree-4 least-squares fit (< 1 ulp there).
    t = x * x
    p = -0.006264492403715849
    p = p * t + 0.021064236760139465
    p = p * t - 0.05385032296180725
    p = p * t + 0.13332565128803253
    p = p * t - 0.33333316445350647
    return x + x * t * p


@triton.jit
def _tanh(x):
    # |x| < 0.55: _tanh_small; else 1 - 2/(exp(2|x|)+1) (>= 0.5: no cancellation).
    a = tl.abs(x)
    big = 1.0 - _two_over_exp_plus_one(2.0 * a)
    big = tl.where(x < 0.0, -big, big)
    return tl.where(a < 0.55, _tanh_small(x), big)


@triton.jit
def _sech2(x):
    # 1 - tanh(x)^2 = u (2 - u), u = 1 - tanh|x| = 2/(exp(2|x|)+1): no cancellation anywhere.
    u = _two_over_exp_plus_one(2.0 * tl.abs(x))
    return u * (2.0 - u)


@triton.jit
def _per_dim(cols, VALUES: tl.constexpr, D: tl.constexpr, fill):
    # Broadcast a constexpr tuple onto the column index: out[c] = VALUES[c] (fill if c >= D).
    out = tl.full(cols.shape, fill, tl.float32)
    for j in tl.static_range(D):
        out = tl.where(cols == j, VALUES[j], out)
    return out


@triton.jit
def _basis(cols, LEVELS: tl.constexpr, D: tl.constexpr, IDX64: tl.constexpr):
    # basis_j = prod(levels[:j]) per column (0 for padding columns).
    dt = tl.int64 if IDX64 else tl.int32
    out = tl.zeros(cols.shape, dt)
    b = 1
    for j in tl.static_range(D):
        out = tl.where(cols == j, b, out)
        b = b * LEVELS[j]
    return out


@triton.jit
def _fsq_forward_kernel(z_ptr, codes_ptr, idx_ptr, n_rows, s_row, s_dim,
                        LEVELS: tl.constexpr, HALF_L: tl.constexpr, OFFSET: tl.constexpr,
                        SHIFT: tl.constexpr, HALF_W: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        BLOCK_R: tl.constexpr, IDX64: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, DP)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < D)[None, :]
    z = tl.load(z_ptr + rows[:, None] * s_row + cols[None, :].to(tl.int64) * s_dim, mask=mask, other=0.0)
    x = z.to(tl.float32) + _per_dim(cols, SHIFT, D, 0.0)[None, :]
    half_w = _per_dim(cols, HALF_W, D, 1.0)[None, :]
    b = _tanh(x) * _per_dim(cols, HALF_L, D, 0.0)[None, :] - _per_dim(cols, OFFSET, D, 0.0)[None, :]
    q = _round_half_even(b)
    is_nan = x != x
    codes = tl.where(is_nan, x, tl.math.div_rn(q, half_w))
    tl.store(codes_ptr + rows[:, None] * D + cols[None, :], codes.to(codes_ptr.dtype.element_ty), mask=mask)
    digit = tl.where(is_nan, 0.0, q + half_w)
    basis = _basis(cols, LEVELS, D, IDX64)[None, :]
    idx = tl.sum(digit.to(basis.dtype) * basis, axis=1)
    row_nan = tl.max((is_nan & mask).to(tl.int32), axis=1) > 0
    idx = tl.where(row_nan, -1, idx)
    tl.store(idx_ptr + rows, idx.to(idx_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _fsq_backward_kernel(g_ptr, z_ptr, out_ptr, n_rows, sg_row, sg_dim, sz_row, sz_dim,
                         SHIFT: tl.constexpr, SCALE: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, DP)
    c64 = cols[None, :].to(tl.int64)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    z = tl.load(z_ptr + rows[:, None] * sz_row + c64 * sz_dim, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows[:, None] * sg_row + c64 * sg_dim, mask=mask, other=0.0).to(tl.float32)
    x = z + _per_dim(cols, SHIFT, D, 0.0)[None, :]
    grad = g * _per_dim(cols, SCALE, D, 0.0)[None, :] * _sech2(x)
    grad = tl.where(x != x, x, grad)  # GPU min/max drop NaN: propagate it explicitly
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], grad.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fsq_decode_kernel(idx_ptr, codes_ptr, n_rows, s_idx, LEVELS: tl.constexpr, HALF_W: tl.constexpr,
                       D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, DP)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < D)[None, :]
    v = tl.load(idx_ptr + rows * s_idx, mask=rmask, other=0).to(tl.int64)[:, None]
    basis = _basis(cols, LEVELS, D, True)[None, :]
    basis = tl.where(basis == 0, 1, basis)  # padding columns: avoid dividing by zero
    levels = _per_dim(cols, LEVELS, D, 1.0).to(tl.int64)[None, :]
    # Floor division / modulo (like the reference) whether `//` and `%` truncate (GPU) or
    # floor (interpreter), so unvalidated negative indices still give in-range digits;
    # every program only writes its own rows.
    quot = v // basis
    quot = tl.where(v - quot * basis < 0, quot - 1, quot)
    m = quot % levels
    m = tl.where(m < 0, m + levels, m)
    half_w = _per_dim(cols, HALF_W, D, 1.0)[None, :]
    codes = tl.math.div_rn(m.to(tl.float32) - half_w, half_w)
    codes = tl.where(v == -1, float("nan"), codes)
    tl.store(codes_ptr + rows[:, None] * D + cols[None, :], codes, mask=mask)


# --------------------------------------------------------------------------------------
# Host side


@functools.lru_cache(maxsize=64)
def _constants(levels: tuple, eps: float) -> dict:
    """Per-dim float32 constants from the reference, as Python floats (exact in fp32)."""
    half_l, offset, shift, half_w = ref._constants(levels, eps, torch.float32, torch.device("cpu"))
    return {"HALF_L": tuple(half_l.tolist()), "OFFSET": tuple(offset.tolist()), "SHIFT": tuple(shift.tolist()),
            "HALF_W": tuple(half_w.tolist()), "SCALE": tuple((half_l / half_w).tolist())}


def _tile(d: int) -> tuple[int, int]:
    dp = triton.next_power_of_2(d)
    return dp, TILE // dp


def _reason(levels) -> str | None:
    if len(levels) > MAX_DIMS:
        return f"{len(levels)} FSQ dims > {MAX_DIMS}"
    if max(levels) > MAX_LEVEL:
        return f"level {max(levels)} > {MAX_LEVEL}"
    if math.prod(levels) >= 2**63:
        return f"prod(levels) = {math.prod(levels)} does not fit int64 indices"
    return None


def supports_fsq_forward(z, levels, eps, codes_dtype):
    if z.dtype not in KERNEL_DTYPES:
        return f"dtype {z.dtype} not supported (float32, float16, bfloat16)"
    if codes_dtype not in KERNEL_DTYPES:
        return f"codes dtype {codes_dtype} not supported (float32, float16, bfloat16)"
    return _reason(levels)


def supports_fsq_backward(grad_codes, z, levels, eps):
    if z.dtype not in KERNEL_DTYPES or grad_codes.dtype not in KERNEL_DTYPES:
        return f"dtypes z {z.dtype} / grad {grad_codes.dtype} not supported (float32, float16, bfloat16)"
    return _reason(levels)


def supports_fsq_decode(indices, levels):
    if indices.dtype not in (torch.int32, torch.int64):
        return f"index dtype {indices.dtype} not supported (int32, int64)"
    return _reason(levels)


def fsq_forward(z, levels, eps, codes_dtype):
    """z [..., d] -> codes [..., d] (codes_dtype), indices [...] (int32/int64)."""
    levels = tuple(levels)
    d = len(levels)
    codes = dispatch.new_output(z.shape, codes_dtype, z.device)
    idx_dtype = ref.index_dtype(levels)
    indices = dispatch.new_output(z.shape[:-1], idx_dtype, z.device)
    z2 = z.reshape(-1, d)
    n = z2.shape[0]
    if n:
        c = _constants(levels, float(eps))
        dp, br = _tile(d)
        _fsq_forward_kernel[(triton.cdiv(n, br),)](
            z2, codes, indices, n, z2.stride(0), z2.stride(1), LEVELS=levels, HALF_L=c["HALF_L"],
            OFFSET=c["OFFSET"], SHIFT=c["SHIFT"], HALF_W=c["HALF_W"], D=d, DP=dp, BLOCK_R=br,
            IDX64=idx_dtype == torch.int64)
    return codes, indices


def fsq_backward(grad_codes, z, levels, eps):
    """grad_codes, z [..., d] -> grad_z [..., d] in the dtype of z."""
    levels = tuple(levels)
    d = len(levels)
    out = dispatch.new_output(z.shape, z.dtype, z.device)
    z2, g2 = z.reshape(-1, d), grad_codes.reshape(-1, d)
    n = z2.shape[0]
    if n:
        c = _constants(levels, float(eps))
        dp, br = _tile(d)
        _fsq_backward_kernel[(triton.cdiv(n, br),)](
            g2, z2, out, n, g2.stride(0), g2.stride(1), z2.stride(0), z2.stride(1), SHIFT=c["SHIFT"],
            SCALE=c["SCALE"], D=d, DP=dp, BLOCK_R=br)
    return out


def fsq_decode(indices, levels):
    """indices [...] int32/int64 (valid or -1) -> codes [..., d] float32; -1 -> NaN."""
    levels = tuple(levels)
    d = len(levels)
    codes = dispatch.new_output(tuple(indices.shape) + (d,), torch.float32, indices.device)
    flat = indices.reshape(-1)
    n = flat.shape[0]
    if n:
        dp, br = _tile(d)
        _fsq_decode_kernel[(triton.cdiv(n, br),)](
            flat, codes, n, flat.stride(0), LEVELS=levels, HALF_W=tuple(float(L // 2) for L in levels), D=d,
            DP=dp, BLOCK_R=br)
    return codes


def aot_variants():
    """Kernel variants compiled by ``python -m vft_kernels.triton.aot`` (sm_80 / sm_90)."""
    from .aot import Variant

    out = []
    # (levels, z dtype, codes dtype, kernels): the default preset in fp32 and bf16, an
    # int64-index codebook and the widest tile (d = 16).
    for levels, zt, ct, kernels in (((8, 8, 8, 5, 5, 5), "fp32", "fp32", "fbd"), ((8, 8, 8, 5, 5, 5), "bf16", "bf16", "fb"),
                                    ((8,) * 11, "fp32", "fp32", "fd"), ((5,) * 16, "fp32", "fp32", "fbd")):
        d = len(levels)
        dp, br = _tile(d)
        c = _constants(levels, 1e-3)
        idx64 = math.prod(levels) >= 2**31
        tag = f"{'x'.join(map(str, levels)) if d <= 6 else f'{levels[0]}^{d}'}_{zt}"
        common = {"D": d, "DP": dp, "BLOCK_R": br}
        if "f" in kernels:
            out.append(Variant(
                f"fsq_forward[{tag}]", _fsq_forward_kernel,
                {"z_ptr": f"*{zt}", "codes_ptr": f"*{ct}", "idx_ptr": "*i64" if idx64 else "*i32", "n_rows": "i64",
                 "s_row": "i64", "s_dim": "i64", "LEVELS": "constexpr", "HALF_L": "constexpr", "OFFSET": "constexpr",
                 "SHIFT": "constexpr", "HALF_W": "constexpr", "D": "constexpr", "DP": "constexpr",
                 "BLOCK_R": "constexpr", "IDX64": "constexpr"},
                dict(common, LEVELS=levels, HALF_L=c["HALF_L"], OFFSET=c["OFFSET"], SHIFT=c["SHIFT"],
                     HALF_W=c["HALF_W"], IDX64=idx64)))
        if "b" in kernels:
            out.append(Variant(
                f"fsq_backward[{tag}]", _fsq_backward_kernel,
                {"g_ptr": f"*{ct}", "z_ptr": f"*{zt}", "out_ptr": f"*{zt}", "n_rows": "i64", "sg_row": "i64",
                 "sg_dim": "i64", "sz_row": "i64", "sz_dim": "i64", "SHIFT": "constexpr", "SCALE": "constexpr",
                 "D": "constexpr", "DP": "constexpr", "BLOCK_R": "constexpr"},
                dict(common, SHIFT=c["SHIFT"], SCALE=c["SCALE"])))
        if "d" in kernels:
            out.append(Variant(
                f"fsq_decode[{tag}]", _fsq_decode_kernel,
                {"idx_ptr": "*i64" if idx64 else "*i32", "codes_ptr": "*fp32", "n_rows": "i64", "s_idx": "i64",
                 "LEVELS": "constexpr", "HALF_W": "constexpr", "D": "constexpr", "DP": "constexpr",
                 "BLOCK_R": "constexpr"},
                dict(common, LEVELS=levels, HALF_W=tuple(float(L // 2) for L in levels))))
    return out
