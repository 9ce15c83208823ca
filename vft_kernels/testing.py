"""The docs/spec.md §4 tolerance rule and comparison helpers, shared by tests and benchmarks.

A backend's result matches when ``max|out - ref64| <= 2 * max|ref_lowp - ref64| + floor``:
``ref64`` is the reference run in float64 on CPU, ``ref_lowp`` the same reference run in
the input dtype, and ``floor`` is 1e-6 for fp32 and 1e-3 * sqrt(reduction length) for
fp16/bf16 (flash-attention's rule). NaN must appear exactly where ``ref64`` has NaN,
so NaN-poisoned outputs that a kernel failed to write are caught.
"""
from __future__ import annotations

import math
import zlib

import torch

from .dispatch import poison_outputs  # noqa: F401  (re-exported for tests)

LOW_PRECISION = (torch.float16, torch.bfloat16)


def stable_seed(*parts) -> int:
    """A seed in [0, 2**16) derived from ``parts`` (strings, numbers, tuples of them) that is
    the same in every process. Python's ``hash`` of a string is randomised per process, so a
    failure seeded with it cannot be reproduced."""
    return zlib.crc32(repr(parts).encode()) & 0xFFFF


def tolerance_floor(dtype: torch.dtype, reduction_len: int = 1) -> float:
    """Absolute error floor of the tolerance rule for ``dtype``."""
    if dtype in LOW_PRECISION:
        return 1e-3 * math.sqrt(max(reduction_len, 1))
    return 1e-6


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over finite positions of b, in float64 (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    finite = torch.isfinite(b)
    diff = torch.where(finite, (a - b).abs(), 0.0)
    return float(diff.max())


def assert_matches_reference(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor,
                             dtype: torch.dtype, reduction_len: int = 1, factor: float = 2.0) -> None:
    """Assert the docs/spec.md §4 rule for every element of ``out`` (shape, NaN/inf placement
    and error bound)."""
    assert tuple(out.shape) == tuple(ref64.shape), f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    o = out.detach().to("cpu", torch.float64)
    r = ref64.detach().to("cpu", torch.float64)
    nan_out, nan_ref = torch.isnan(o), torch.isnan(r)
    if not torch.equal(nan_out, nan_ref):
        where = (nan_out != nan_ref).nonzero()[0].tolist()
        raise AssertionError(f"{name}: NaN mismatch at {where}: got {o[tuple(where)].item()}, "
                             f"reference {r[tuple(where)].item()} ({int((nan_out & ~nan_ref).sum())} unexpected NaN, "
                             f"{int((nan_ref & ~nan_out).sum())} missing NaN) -- unwritten output?")
    inf_ref = torch.isinf(r)
    if not torch.equal(torch.where(inf_ref, o, 0.0), torch.where(inf_ref, r, 0.0)):
        raise AssertionError(f"{name}: infinities differ from the reference")
    err = max_error(o, r)
    ref_err = max_error(ref_lowp, r)
    bound = factor * ref_err + tolerance_floor(dtype, reduction_len)
    if not err <= bound:
        idx = torch.where(torch.isfinite(r), (o - r).abs(), 0.0).argmax()
        where = list(torch.unravel_index(idx, r.shape))
        raise AssertionError(f"{name} ({dtype}): max error {err:.3e} > bound {bound:.3e} "
                             f"(= {factor} * reference-in-{dtype} error {ref_err:.3e} + floor "
                             f"{tolerance_floor(dtype, reduction_len):.1e}); worst at {[int(w) for w in where]}: "
                             f"got {o[tuple(where)].item():.6g}, reference {r[tuple(where)].item():.6g}")


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous copy of ``t`` (every other element of a wider last dim)."""
    wide = torch.empty(tuple(t.shape[:-1]) + (2 * t.shape[-1],) if t.dim() else (2,), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    assert t.dim() == 0 or t.shape[-1] <= 1 or not view.is_contiguous()
    return view


def fsq_boundary_tokens(z: torch.Tensor, levels, eps: float = 1e-3, margin: float = 1e-5) -> torch.Tensor:
    """Bool [...]: tokens of ``z`` [..., d] where some dim's float64 ``bounded`` value lies
    within ``margin`` of a rounding boundary k + 0.5 (docs/spec.md §4: either neighbour is
    accepted there)."""
    zf = z.detach().to("cpu", torch.float64)
    L = torch.tensor(levels, dtype=torch.float64)
    half_l = (L - 1) * (1 + eps) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0).double()
    bounded = torch.tanh(zf + torch.atanh(offset / half_l)) * half_l - offset
    frac = bounded - torch.floor(bounded)
    return ((frac - 0.5).abs() < margin).any(-1)


def assert_fsq_matches(codes: torch.Tensor, indices: torch.Tensor, ref_codes: torch.Tensor,
                       ref_indices: torch.Tensor, z: torch.Tensor, levels, eps: float = 1e-3) -> int:
    """docs/spec.md §4 FSQ rule: exact equality except at rounding-boundary tokens, where either
    neighbouring code is accepted (and must still be a valid code consistent with its
    index). Returns how many boundary tokens were found."""
    from .reference.fsq import fsq_decode

    assert codes.shape == ref_codes.shape and indices.shape == ref_indices.shape, \
        f"shapes differ: codes {tuple(codes.shape)} vs {tuple(ref_codes.shape)}, " \
        f"indices {tuple(indices.shape)} vs {tuple(ref_indices.shape)}"
    assert indices.dtype == ref_indices.dtype, f"indices dtype {indices.dtype} != reference {ref_indices.dtype}"
    near = fsq_boundary_tokens(z, levels, eps).to(indices.device)
    c, rc = codes.detach().cpu().double(), ref_codes.detach().cpu().double()
    i, ri = indices.cpu(), ref_indices.cpu()
    near = near.cpu()
    same_codes = ((c == rc) | (torch.isnan(c) & torch.isnan(rc))).all(-1)
    bad = ~near & ~(same_codes & (i == ri))
    if bool(bad.any()):
        w = bad.nonzero()[0].tolist()
        raise AssertionError(f"FSQ mismatch at token {w}: codes {c[tuple(w)].tolist()} vs reference "
                             f"{rc[tuple(w)].tolist()}, index {int(i[tuple(w)])} vs {int(ri[tuple(w)])}")
    if bool(near.any()):
        # Boundary tokens: a valid index whose decoded codes equal the returned codes and
        # lie within one step of the reference codes.
        n = math.prod(levels)
        ni, nc, nrc = i[near], c[near], rc[near]
        assert bool(((ni >= 0) & (ni < n)).all()), f"boundary token got invalid index {ni.tolist()}"
        assert torch.equal(fsq_decode(ni, levels).double(), nc), "boundary token: codes do not decode from index"
        step = 1.0 / torch.tensor([L // 2 for L in levels], dtype=torch.float64)
        assert bool(((nc - nrc).abs() <= step + 1e-12).all()), "boundary token: code more than one step away"
    return int(near.sum())


def check_attention_non_finite(backend: str, mode: str, head_dim: int = 16) -> None:
    """Register attention on ``backend`` with NaN / inf in q and k, forward and backward,
    against the reference's NaN placement and values (docs/spec.md §4): a NaN query row is NaN, a
    row that sees a NaN key is NaN, a +inf query gives NaN and lse +inf, a dropped query stays
    exactly 0 with zero gradient, and nothing leaks into tokens that cannot see the NaN."""
    import vft_kernels as vk
    from .layout import RegisterLayout
    from .reference import attention as ref

    layout = RegisterLayout(3, 20, 6, mode)
    keep = torch.tensor([6, 2], dtype=torch.int32)
    N, D, scale = layout.seq_len, head_dim, head_dim ** -0.5
    g = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(2, 2, N, D, generator=g) for _ in range(4))
    q[0, 0, 5] = float("nan")     # a patch query
    q[1, 1, 21] = float("nan")    # a kept register query of sample 1 (register 1, keep 2)
    q[1, 1, 25] = float("nan")    # a dropped register query: stays exactly 0
    k[0, 1, 47] = float("nan")    # a key in block 1: the rows that see it become NaN
    q[0, 1, 70] = float("inf")    # +inf against keys of both signs: NaN row, lse +inf
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    with vk.use_backend(backend):
        out, lse = vk.register_attention(qq, kk, vv, layout, keep=keep, scale=scale, return_lse=True)
        got = (out, lse) + torch.autograd.grad(out, (qq, kk, vv), dout)

    def reference(dtype):
        # The reference backward op, not autograd through the forward (where a dropped NaN
        # query turns its zero gradient into 0 * NaN): dropped rows pass no gradient (docs/spec.md §2).
        args = [t.to(dtype) for t in (q, k, v)]
        o, lse_ = ref.attention_forward(*args, layout, keep, scale)
        return (o, lse_) + ref.attention_backward(dout.to(dtype), *args, o, lse_, layout, keep, scale)

    for name, x, w64, w32 in zip(("out", "lse", "dq", "dk", "dv"), got, reference(torch.float64),
                                 reference(torch.float32)):
        assert_matches_reference(f"{backend} non-finite {mode} {name}", x, w64, w32, torch.float32, reduction_len=N)
    assert torch.isnan(got[0][0, 0, 5]).all() and torch.isnan(got[0][1, 1, 21]).all()
    assert torch.equal(got[0][1, 1, 25], torch.zeros(D)) and torch.equal(got[2][1, 1, 25], torch.zeros(D))
