"""Triton register attention (vft_kernels/triton/attention.py) against the reference.

Runs the kernels under TRITON_INTERPRET=1 (set by conftest.py) on tiny shapes with 16-wide
tiles, so tiles straddle layout blocks and the sequence edge. bf16 is covered only by the
ahead-of-time compile test (the interpreter's bf16 tl.dot is wrong)."""
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import vft_kernels as vk
from vft_kernels import RegisterLayout
from vft_kernels.dispatch import BackendUnavailableError
from vft_kernels.layout import MODES
from vft_kernels.reference import attention as reference
from vft_kernels.testing import assert_matches_reference, check_attention_non_finite, noncontiguous
from vft_kernels.triton import attention as tri

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _attention(backend, q, k, v, layout, keep, dout, cu_seqlens=None):
    """(out, lse, dq, dk, dv) through the public op and autograd on ``backend``."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    with vk.use_backend(backend):
        out, lse = vk.register_attention(q, k, v, layout, keep=keep, return_lse=True, cu_seqlens=cu_seqlens)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out.detach(), lse, *grads)


def _dropped(layout, keep):
    """Bool [B, N]: tokens dropped by ``keep`` ([B] or per-block [B, T])."""
    n = torch.arange(layout.seq_len)
    per_token = keep.long()[:, None] if keep.dim() == 1 else keep.long()[:, n // layout.block_size]
    return (n % layout.block_size)[None, :] >= layout.patches + per_token


def check_against_reference(layout, keep, H, D, dtype, make_input=lambda t: t):
    """Forward (out, lse) and dq/dk/dv of the Triton backend against the float64 reference
    (docs/spec.md §4, reduction length N), plus exact zeros on dropped tokens."""
    keep = torch.tensor(keep, dtype=torch.int32)
    B, N = keep.shape[0], layout.seq_len
    q, k, v, dout = (torch.randn(B, H, N, D).to(dtype) for _ in range(4))
    got = _attention("triton", make_input(q), make_input(k), make_input(v), layout, keep, make_input(dout))
    ref64 = _attention("reference", q.double(), k.double(), v.double(), layout, keep, dout.double())
    ref_lowp = _attention("reference", q, k, v, layout, keep, dout)
    for name, g, r64, rl in zip(("out", "lse", "dq", "dk", "dv"), got, ref64, ref_lowp):
        assert g.dtype == (torch.float32 if name == "lse" else dtype), f"{name} dtype {g.dtype}"
        assert_matches_reference(f"{name} {layout} keep={keep.tolist()}", g, r64, rl, dtype, reduction_len=N)
    dropped = _dropped(layout, keep)[:, None, :].expand(B, H, N)
    out, lse, dq, dk, dv = got
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(t[dropped], torch.zeros_like(t[dropped])), f"{name} not exactly zero on dropped tokens"
    assert bool((lse[dropped] == float("-inf")).all()), "lse must be -inf on dropped rows"
    assert bool(torch.isfinite(lse[~dropped]).all())


# (T, P, R, keep per sample): odd sizes, R = 0, P = 1, keep mixing 0, 1, R and others.
LAYOUTS = [
    (1, 9, 7, [7, 0]),
    (1, 5, 0, [0]),
    (2, 7, 5, [5, 1, 0, 3]),
    (2, 1, 6, [6, 2]),
    (3, 4, 3, [0, 3]),
    (3, 6, 5, [1, 4]),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,P,R,keep", LAYOUTS)
def test_fp32_d16(mode, T, P, R, keep):
    check_against_reference(RegisterLayout(T, P, R, mode), keep, H=2, D=16, dtype=torch.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,P,R,keep", [(2, 7, 5, [5, 2]), (3, 3, 4, [1, 4])])
def test_fp16(mode, T, P, R, keep):
    check_against_reference(RegisterLayout(T, P, R, mode), keep, H=2, D=16, dtype=torch.float16)


@pytest.mark.parametrize("D,dtype", [(32, torch.float32), (64, torch.float32), (32, torch.float16),
                                     (64, torch.float16), (8, torch.float32), (24, torch.float16),
                                     (80, torch.float32)])  # the last three run zero-padded
def test_head_dims(D, dtype):
    check_against_reference(RegisterLayout(2, 6, 5, "block_causal_last"), [5, 2], H=1, D=D, dtype=dtype)


def test_size_one_dims():
    check_against_reference(RegisterLayout(1, 1, 1, "block_causal_last"), [1], H=1, D=16, dtype=torch.float32)
    check_against_reference(RegisterLayout(1, 1, 1, "full"), [0], H=1, D=16, dtype=torch.float32)


# (T, P, R, per-block keep [B, T]): blocks of 5-13 tokens under 16-wide tiles (a tile holds
# blocks with different keeps), keeps mixing 0, 1, R and others, one sample with equal keeps.
PER_BLOCK = [
    (3, 4, 3, [[3, 0, 2], [0, 3, 1]]),
    (4, 2, 5, [[5, 5, 5, 5], [1, 0, 4, 2]]),
    (2, 7, 6, [[0, 6], [6, 0], [2, 5]]),
    (3, 1, 4, [[4, 1, 0], [0, 2, 4]]),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,P,R,keep", PER_BLOCK)
def test_per_block_keep_fp32(mode, T, P, R, keep):
    check_against_reference(RegisterLayout(T, P, R, mode), keep, H=2, D=16, dtype=torch.float32)


def test_per_block_keep_fp16_noncontiguous():
    check_against_reference(RegisterLayout(3, 4, 3, "block_causal_last"), [[3, 0, 2], [1, 3, 3]], H=2, D=32,
                            dtype=torch.float16, make_input=noncontiguous)


def test_random_keep():
    layout = RegisterLayout(2, 5, 9, "block_causal_last")
    keep = torch.randint(0, 10, (2,)).tolist()
    check_against_reference(layout, keep, H=2, D=16, dtype=torch.float32)


def test_noncontiguous_inputs():
    # Every other element of a wider last dim, and a [B, N, H, D] buffer seen as [B, H, N, D].
    layout = RegisterLayout(2, 5, 3, "block_causal")
    check_against_reference(layout, [3, 1], H=2, D=16, dtype=torch.float32, make_input=noncontiguous)
    check_against_reference(layout, [2, 0], H=2, D=16, dtype=torch.float16,
                            make_input=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2))


@pytest.mark.parametrize("mode", MODES)
def test_tile_sizes(mode):
    """Rectangular tiles (both ways) also match the reference (docs/spec.md §4)."""
    layout = RegisterLayout(3, 5, 6, mode)
    keep = torch.tensor([6, 2], dtype=torch.int32)
    N = layout.seq_len
    q, k, v, dout = (torch.randn(2, 1, N, 16) for _ in range(4))

    def run_reference(*inputs):
        out, lse = reference.attention_forward(*inputs[1:], layout, keep, 0.25)
        return (out, lse, *reference.attention_backward(*inputs, out, lse, layout, keep, 0.25))

    ref64 = run_reference(*(t.double() for t in (dout, q, k, v)))
    ref32 = run_reference(dout, q, k, v)
    for bm, bn in ((32, 16), (16, 32)):
        out, lse = tri.attention_forward(q, k, v, layout, keep, 0.25, block_m=bm, block_n=bn)
        grads = tri.attention_backward(dout, q, k, v, out, lse, layout, keep, 0.25, block_m=bm, block_n=bn)
        for name, g, r64, r32 in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref64, ref32):
            assert_matches_reference(f"{name} {bm}x{bn}", g, r64, r32, torch.float32, reduction_len=N)


@pytest.mark.parametrize("mode", MODES)
def test_truncated_sequence(mode):
    """Kept tokens of a sample with keep = K match the sequence truncated to K registers."""
    T, P, R, K = 3, 5, 6, 2
    layout, short = RegisterLayout(T, P, R, mode), RegisterLayout(T, P, K, mode)
    H, D = 2, 16
    q, k, v, dout = (torch.randn(1, H, layout.seq_len, D) for _ in range(4))
    kept = (~_dropped(layout, torch.tensor([K])))[0].nonzero()[:, 0]
    full = _attention("triton", q, k, v, layout, torch.tensor([K], dtype=torch.int32), dout)
    cut = _attention("triton", *(t[:, :, kept] for t in (q, k, v)), short,
                     torch.tensor([K], dtype=torch.int32), dout[:, :, kept])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), full, cut):
        torch.testing.assert_close(a[:, :, kept], b, rtol=1e-5, atol=1e-6, msg=name)


def test_keep_is_clamped():
    """The kernels clamp keep to [0, R] (GPU callers skip the host-side range check)."""
    layout = RegisterLayout(2, 4, 3, "block_causal_last")
    q, k, v = (torch.randn(2, 1, layout.seq_len, 16) for _ in range(3))
    wild = tri.attention_forward(q, k, v, layout, torch.tensor([-5, 99], dtype=torch.int32), 0.3)
    tame = tri.attention_forward(q, k, v, layout, torch.tensor([0, 3], dtype=torch.int32), 0.3)
    for a, b in zip(wild, tame):
        assert torch.equal(a, b)


def test_keep_change_does_not_recompile():
    """keep is a device tensor read by the kernels: new values reuse the compiled graph."""
    from torch._dynamo.testing import CompileCounter

    layout = RegisterLayout(1, 5, 4, "block_causal_last")
    q = torch.randn(2, 1, layout.seq_len, 16)
    counter = CompileCounter()
    attend = torch.compile(lambda q, keep: vk.register_attention(q, q, q, layout, keep=keep), backend=counter,
                           fullgraph=True)
    torch._dynamo.reset()
    with vk.use_backend("triton"):
        for keep in ([4, 0], [1, 3], [2, 2]):
            keep = torch.tensor(keep, dtype=torch.int32)
            out = attend(q, keep)
            torch.testing.assert_close(out, reference.attention_forward(q, q, q, layout, keep, 0.25)[0])
    assert counter.frame_count == 1


# --------------------------------------------------------------------------------------
# Packed (varlen) calls: q, k, v [1, H, N, D], sample s = tokens [cu[s], cu[s+1]).

# (T, P, R, cu_seqlens, N, keep per sample): samples of 2, 0, 3 and 1 blocks (of 7 tokens, so
# 16-wide tiles run past sample ends) then 5 padding rows; an empty first sample and no
# padding. keep mixes 0, R and others.
PACKINGS = [
    (3, 5, 2, [0, 14, 14, 35, 42], 47, [2, 1, 0, 1]),
    (2, 3, 4, [0, 0, 14, 21], 21, [3, 4, 0]),
]


def _packed_zero_rows(layout, cu, keep, N):
    """Bool [N]: rows of a packed call that must be exactly zero (lse -inf): dropped
    registers and padding (keep [S] or per-block [S, layout.blocks])."""
    zero = torch.ones(N, dtype=torch.bool)
    for s, a, b, lay in reference.varlen_samples(layout, cu):
        zero[a:b] = _dropped(lay, keep[s:s + 1] if keep.dim() == 1 else keep[s:s + 1, :lay.blocks])[0]
    return zero


def _check_packed_results(name, got, ref64, ref_lowp, layout, cu, keep, dtype):
    """(out, lse, dq, dk, dv) of a packed call against the reference (docs/spec.md §4, reduction
    length = the longest sample), plus exact zeros / -inf on dropped and padding rows."""
    for what, g, r64, rl in zip(("out", "lse", "dq", "dk", "dv"), got, ref64, ref_lowp):
        assert g.dtype == (torch.float32 if what == "lse" else dtype), f"{what} dtype {g.dtype}"
        assert_matches_reference(f"{what} {name} {layout} cu={cu.tolist()} keep={keep.tolist()}", g, r64, rl, dtype,
                                 reduction_len=layout.seq_len)
    zero = _packed_zero_rows(layout, cu, keep, got[0].shape[2])
    out, lse, dq, dk, dv = got
    for what, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(t[:, :, zero], torch.zeros_like(t[:, :, zero])), f"{what}: dropped/padding rows not zero"
    assert bool((lse[:, :, zero] == float("-inf")).all()), "lse must be -inf on dropped and padding rows"
    assert bool(torch.isfinite(lse[:, :, ~zero]).all())


def check_packed(layout, cu, N, keep, H, D, dtype, make_input=lambda t: t, block_m=16, block_n=16):
    """Packed forward and backward of the Triton kernels (explicit tile sizes) against the
    float64 reference with the same cu_seqlens."""
    cu = torch.tensor(cu, dtype=torch.int32)
    keep = torch.tensor(keep, dtype=torch.int32)
    q, k, v, dout = (torch.randn(1, H, N, D).to(dtype) for _ in range(4))
    scale = 0.3

    def run_reference(dout, q, k, v):
        out, lse = reference.attention_forward(q, k, v, layout, keep, scale, cu)
        return (out, lse, *reference.attention_backward(dout, q, k, v, out, lse, layout, keep, scale, cu))

    ref64 = run_reference(*(t.double() for t in (dout, q, k, v)))
    ref_lowp = run_reference(dout, q, k, v)
    qi, ki, vi, doi = (make_input(t) for t in (q, k, v, dout))
    out, lse = tri.attention_forward(qi, ki, vi, layout, keep, scale, cu, block_m=block_m, block_n=block_n)
    grads = tri.attention_backward(doi, qi, ki, vi, out, lse, layout, keep, scale, cu, block_m=block_m,
                                   block_n=block_n)
    _check_packed_results(f"{block_m}x{block_n}", (out, lse, *grads), ref64, ref_lowp, layout, cu, keep, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T,P,R,cu,N,keep", PACKINGS)
def test_packed_fp32(mode, T, P, R, cu, N, keep):
    check_packed(RegisterLayout(T, P, R, mode), cu, N, keep, H=2, D=16, dtype=torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_packed_fp16(mode):
    # R = 0 (nothing to drop), a 32-wide head dim, samples of 1, 0, 3 and 2 blocks of 9 tokens.
    check_packed(RegisterLayout(3, 9, 0, mode), [0, 9, 9, 36, 54], 60, [0, 0, 0, 0], H=2, D=32,
                 dtype=torch.float16)
    check_packed(RegisterLayout(3, 5, 2, mode), *PACKINGS[0][3:], H=1, D=16, dtype=torch.float16)


@pytest.mark.parametrize("mode", MODES)
def test_packed_tile_sizes(mode):
    """Rectangular tiles (both ways), so query and key tiles end at different places in
    and past each sample."""
    for bm, bn in ((32, 16), (16, 32)):
        check_packed(RegisterLayout(3, 5, 2, mode), *PACKINGS[0][3:], H=1, D=16, dtype=torch.float32, block_m=bm,
                     block_n=bn)


@pytest.mark.parametrize("mode", MODES)
def test_packed_per_block_keep(mode):
    """keep [S, layout.blocks] in a packed call; columns past a sample's own block count
    (here 99 / -5, which the kernels would clamp) are ignored."""
    T, P, R, cu, N, _ = PACKINGS[0]  # samples of 2, 0, 3 and 1 blocks
    keep = [[2, 0, 99], [1, -5, 99], [0, 2, 1], [1, 99, 99]]
    check_packed(RegisterLayout(T, P, R, mode), cu, N, keep, H=2, D=16, dtype=torch.float32)


def test_packed_noncontiguous_inputs():
    layout = RegisterLayout(3, 5, 2, "block_causal_last")
    check_packed(layout, *PACKINGS[0][3:], H=2, D=16, dtype=torch.float32, make_input=noncontiguous)
    check_packed(layout, *PACKINGS[0][3:], H=2, D=16, dtype=torch.float16,
                 make_input=lambda t: t.transpose(1, 2).contiguous().transpose(1, 2))


def test_packed_public_api():
    """vk.register_attention(..., cu_seqlens=...) on the forced Triton backend, through
    autograd, against the reference backend (offsets as a list and as a device tensor)."""
    T, P, R, cu, N, keep = PACKINGS[0]
    layout = RegisterLayout(T, P, R, "block_causal_last")
    keep = torch.tensor(keep, dtype=torch.int32)
    q, k, v, dout = (torch.randn(1, 2, N, 16) for _ in range(4))
    ref64 = _attention("reference", q.double(), k.double(), v.double(), layout, keep, dout.double(), cu)
    ref32 = _attention("reference", q, k, v, layout, keep, dout, cu)
    for offsets in (cu, torch.tensor(cu, dtype=torch.int32)):
        got = _attention("triton", q, k, v, layout, keep, dout, offsets)
        _check_packed_results("public", got, ref64, ref32, layout, torch.tensor(cu), keep, torch.float32)


@triton.jit
def _schedule_kernel(out_ptr, kp, keep, N, T, P, R, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                     MODE: tl.constexpr, PER_BLOCK: tl.constexpr):
    """Writes, per (query tile, key tile): class, mask-free flag, key end of the query tile
    and query range of the key tile, computed by the kernels' schedule helpers."""
    qi = tl.program_id(0)
    ki = tl.program_id(1)
    S = P + R
    q0 = qi * BLOCK_Q
    k0 = ki * BLOCK_K
    q1 = tl.minimum(q0 + BLOCK_Q, N)
    k1 = tl.minimum(k0 + BLOCK_K, N)
    base = out_ptr + (qi * tl.num_programs(1) + ki) * 5
    tl.store(base, tri._classify_tile(q0, q1, k0, k1, kp, keep, T, S, P, R, MODE, PER_BLOCK))
    tl.store(base + 1, tri._tile_is_full(q0, N, k0, N, kp, keep, T, S, P, R, BLOCK_Q, BLOCK_K, MODE,
                                         PER_BLOCK).to(tl.int32))
    tl.store(base + 2, tri._key_end(q0, q1, kp, keep, T, S, P, R, MODE, PER_BLOCK))
    q_lo, q_hi = tri._query_range(k0, k1, kp, keep, T, S, P, R, MODE, PER_BLOCK)
    tl.store(base + 3, q_lo)
    tl.store(base + 4, q_hi)


@triton.jit
def _stretch_kernel(out_ptr, kp, keep, N, T, P, R, PER_BLOCK: tl.constexpr):
    """For [lo, hi) = program ids: writes the number of stretches, then their bounds."""
    lo = tl.program_id(0)
    hi = tl.program_id(1)
    S = P + R
    base = out_ptr + (lo * (N + 1) + hi) * (2 * N + 1)
    n = tri._num_stretches(lo, hi, keep, S, R)
    tl.store(base, n)
    for i in range(0, n):
        start, stop = tri._stretch(i, lo, hi, kp, keep, T, S, P, R, PER_BLOCK)
        tl.store(base + 1 + 2 * i, start)
        tl.store(base + 2 + 2 * i, stop)


@pytest.mark.parametrize("mode", MODES)
def test_schedule_matches_layout(mode):
    """The kernels' tile schedule equals RegisterLayout's analytic formulas (which
    test_layout checks against the dense mask), agrees with the dense mask on every tile,
    and the mask is skipped only on fully allowed tiles inside the sequence."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        T, P, R = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 4), (1, 9), (0, 9)))
        layout = RegisterLayout(T, P, R, mode)
        N, bq, bk = layout.seq_len, 16, 16
        nq, nk = triton.cdiv(N, bq), triton.cdiv(N, bk)
        per_block = [int(x) for x in torch.randint(0, R + 1, (T,), generator=gen)]
        for keep in sorted({0, R, int(torch.randint(0, R + 1, (1,), generator=gen))}) + [per_block]:
            pb = isinstance(keep, list)
            got = torch.full((nq, nk, 5), -7, dtype=torch.int32)
            kp = torch.tensor(keep if pb else [keep], dtype=torch.int32)
            _schedule_kernel[(nq, nk)](got, kp, min(keep) if pb else keep, N, T, P, R, BLOCK_Q=bq, BLOCK_K=bk,
                                       MODE=tri.MODE_IDS[mode], PER_BLOCK=pb)
            dense = layout.materialize(torch.tensor([keep]))[0]
            for qi in range(nq):
                for ki in range(nk):
                    q0, k0 = qi * bq, ki * bk
                    q1, k1 = min(q0 + bq, N), min(k0 + bk, N)
                    cls = int(layout.classify_tile(q0, q1, k0, k1, keep))
                    inside = q0 + bq <= N and k0 + bk <= N
                    want = [cls, int(cls == 2 and inside), layout.key_range(q0, q1, keep)[1],
                            *layout.query_range(k0, k1, keep)]
                    where = f"{layout} keep={keep} tile q[{q0},{q1}) k[{k0},{k1})"
                    row = got[qi, ki].tolist()
                    if pb and want[0] == 2 and row[0] == 1:
                        # A per-block keep's dropped-token test uses the sample's smallest keep
                        # (a superset): a FULL tile may be masked needlessly, never the reverse.
                        want[:2] = [1, 0]
                    assert row == want, where
                    block = dense[q0:q1, k0:k1]
                    assert cls == (0 if not block.any() else 2 if block.all() else 1), where


def test_stretches_cover_kept_tokens():
    """_stretch splits any [lo, hi) into disjoint ranges holding exactly its kept tokens
    (one range when nothing is dropped), so the sweeps never see a fully dropped tile; also
    for per-block keeps."""
    for T, P, R in ((3, 2, 2), (2, 3, 0)):
        layout = RegisterLayout(T, P, R)
        N = layout.seq_len
        for keep in [*range(R + 1), *([[2, 0, 1], [0, 2, 2]] if R == 2 else [])]:
            pb = isinstance(keep, list)
            got = torch.full((N + 1, N + 1, 2 * N + 1), -7, dtype=torch.int32)
            kp = torch.tensor(keep if pb else [keep], dtype=torch.int32)
            _stretch_kernel[(N + 1, N + 1)](got, kp, min(keep) if pb else keep, N, T, P, R, PER_BLOCK=pb)
            kept = ~_dropped(layout, torch.tensor([keep]))[0]
            for lo in range(N + 1):
                for hi in range(lo, N + 1):
                    n = int(got[lo, hi, 0])
                    bounds = got[lo, hi, 1:1 + 2 * n].view(-1, 2).tolist()
                    cover = torch.zeros(N, dtype=torch.int32)
                    for start, stop in bounds:
                        cover[start:stop] += 1
                    want = torch.zeros(N, dtype=torch.int32)
                    want[lo:hi] = kept[lo:hi].int()
                    where = f"{layout} keep={keep} [{lo}, {hi}): {bounds}"
                    assert torch.equal(cover, want), where
                    assert (min(keep) if pb else keep) < R or n == int(hi > lo), where


def test_supports_reasons():
    layout = RegisterLayout(1, 3, 1, "full")
    keep = torch.ones(1, dtype=torch.int32)

    def reason(D, dtype):
        q = torch.randn(1, 1, 4, D).to(dtype)
        return tri.supports_attention_forward(q, q, q, layout, keep, 1.0)

    assert reason(16, torch.float32) is None and reason(128, torch.float16) is None
    assert reason(59, torch.float32) is None  # zero-padded to 64
    assert reason(129, torch.float32) == "head dim 129 > 128 (the kernels take (16, 32, 64, 128); smaller dims " \
        "are zero-padded)"
    assert "float64" in reason(16, torch.float64)
    assert "bfloat16" in reason(16, torch.bfloat16)
    q = torch.randn(1, 1, 4, 160)
    assert "head dim 160" in tri.supports_attention_backward(q, q, q, q, q, q[..., 0], layout, keep, 1.0)
    p = torch.randn(1, 1, 8, 16)
    packed = torch.tensor([0, 4, 8], dtype=torch.int32)
    assert tri.supports_attention_forward(p, p, p, layout, keep.repeat(2), 1.0, packed) is None
    assert tri.supports_attention_backward(p, p, p, p, p, p[..., 0], layout, keep.repeat(2), 1.0, packed) is None
    many = torch.zeros(65537, dtype=torch.int32)  # 65536 samples: more than grid dim z allows
    assert "65536" in tri.supports_attention_forward(p, p, p, layout, keep, 1.0, many)
    with vk.use_backend("triton"), pytest.raises(BackendUnavailableError, match="head dim 160"):
        vk.register_attention(q, q, q, layout, keep=keep)


AOT_SCRIPT = """
import torch
from vft_kernels.triton import aot, attention
vs = attention.aot_variants(modes=("block_causal_last",), head_dims=(64, 128), per_block=(False,))
vs += attention.aot_variants(modes=("full", "block_causal"), head_dims=(16, 32), dtypes=(torch.float16,),
                             kernels=("fwd", "dkdv", "dq"), per_block=(False,))
vs += attention.aot_variants(modes=("block_causal_last",), head_dims=(64,), dtypes=(torch.bfloat16, torch.float32),
                             kernels=("fwd", "dkdv", "dq"), varlen=(False,), precisions=("tf32",),
                             per_block=(True,))
rows = [aot.compile_variant(v, a) for v in vs for a in (80, 90)]
for r in rows:
    print("ROW", r["kernel"], r["arch"], r.get("regs"), r.get("spill_stores"), r.get("shared"),
          r.get("mma"), r.get("wgmma"), r.get("error", ""))
for f in aot.failures(rows):
    print("FAIL", f)
"""


def test_aot_compile_sm80_sm90():
    """A representative subset of the kernel variants (every kernel and mode, dense and
    packed, per-sample and per-block keep, all three dtypes, the two largest and two
    smallest head dims) compiles for sm_80 and sm_90
    without spills; fp16 and bf16 dots use tensor cores (mma on sm_80; wgmma or mma on
    sm_90). The full set: ``python -m vft_kernels.triton.aot --only attention``."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("ROW")]
    fails = [line for line in res.stdout.splitlines() if line.startswith("FAIL")]
    assert rows and not fails, "\n".join(fails)
    for kernel, arch, *_, mma, wgmma in rows:
        if "delta" in kernel or "pad" in kernel or "fp32" in kernel:
            continue
        assert mma == "True" or wgmma == "True", f"{kernel} {arch}: no tensor-core instruction in the PTX"
        if arch == "sm_80":
            assert mma == "True", f"{kernel} sm_80: no mma.sync"


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_inputs_propagate_like_the_reference(mode):
    """NaN / inf in q or k propagate as in the reference (they used to come out as dropped,
    all-zero rows with lse = -inf); dropped queries stay exactly 0."""
    check_attention_non_finite("triton", mode)


PRECISION_SCRIPT = """
import torch
from vft_kernels.triton.attention import dot_precision
m = torch.backends.cuda.matmul
{setup}
print("RESULT", dot_precision(torch.float32), dot_precision(torch.float16), dot_precision(torch.bfloat16))
"""


@pytest.mark.parametrize("setup, fp32", [
    ("", "ieee"),  # torch's default: full-precision fp32 matmuls
    ("m.fp32_precision = 'tf32'", "tf32"),
    ("m.fp32_precision = 'tf32'; m.fp32_precision = 'ieee'", "ieee"),
    ("torch.set_float32_matmul_precision('high')", "tf32"),
    ("torch.set_float32_matmul_precision('medium')", "tf32"),
    ("torch.set_float32_matmul_precision('high'); torch.set_float32_matmul_precision('highest')", "ieee"),
    ("m.allow_tf32 = True", "tf32"),
    ("m.allow_tf32 = True; m.fp32_precision = 'ieee'", "ieee"),  # a mix of the old and new switches
    ("torch.backends.fp32_precision = 'tf32'", "tf32"),
])
def test_fp32_dot_precision_follows_torch(setup, fp32):
    """fp32 attention uses full-precision dots unless PyTorch allows TF32 for fp32 CUDA
    matmuls, through any of its switches (each case in a fresh process: the switches are
    global); fp16 / bf16 operands are unaffected."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", PRECISION_SCRIPT.format(setup=setup)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")][0]
    assert line.split()[1:] == [fp32, "tf32", "tf32"]


class _LaunchSpy:
    """Wraps a Triton kernel: records the constexprs of each launch, then runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({k: kwargs.get(k) for k in ("D", "PRECISION", "BLOCK_M", "BLOCK_N")})
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("allow_tf32", [False, True])
@pytest.mark.parametrize("D", [16, 64])
def test_launches_use_the_precision_torch_asks_for(monkeypatch, allow_tf32, D):
    """The forward, dq and dk/dv launches get PRECISION from dot_precision, with the fp32
    "ieee" tiles; fp32 head dim 16 runs zero-padded to 32 in full precision (and natively
    with TF32); the results match the reference either way."""
    monkeypatch.setattr(tri, "_tf32_allowed", lambda: allow_tf32)
    spies = {name: _LaunchSpy(getattr(tri, name)) for name in ("_fwd_kernel", "_dq_kernel", "_dkdv_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(tri, name, spy)
    layout = RegisterLayout(2, 8, 4, "block_causal_last")
    check_against_reference(layout, [4, 1], 2, D, torch.float32)
    precision = "tf32" if allow_tf32 else "ieee"
    served = 32 if (D == 16 and not allow_tf32) else D
    for name, spy in spies.items():
        assert spy.launches, f"{name} was not launched"
        for launch in spy.launches:
            assert launch["PRECISION"] == precision and launch["D"] == served, (name, launch)
    # fp16 operands: always "tf32" (tl.dot ignores it for them), never padded.
    for spy in spies.values():
        spy.launches.clear()
    check_against_reference(layout, [4, 1], 2, D, torch.float16)
    assert all(launch["PRECISION"] == "tf32" and launch["D"] == D for spy in spies.values()
               for launch in spy.launches)
    # The GPU tiles of each precision (the interpreter runs 16 x 16 tiles).
    assert tri._config("dq", 64, torch.float32, "ieee") == tri._IEEE_CONFIGS["dq"][None]
    assert tri._config("dq", 64, torch.float32, "tf32") != tri._config("dq", 64, torch.float32, "ieee")
    assert tri._config("fwd", 64, torch.float16, "ieee") == tri._config("fwd", 64, torch.float16, "tf32")


def test_aot_spill_rule():
    """Spills fail the AOT check, except a few bytes in a full-precision fp32 variant that
    uses few registers (ptxas's placement there, not register pressure)."""
    from vft_kernels.triton import aot

    def row(kernel, regs, spill):
        return {"kernel": kernel, "arch": "sm_90", "regs": regs, "spill_stores": spill, "spill_loads": spill}

    ok = [row("attn_fwd_full_fp32_ieee_d128", 80, 8), row("attn_fwd_full_fp16_d64", 168, 0)]
    bad = [row("attn_fwd_full_fp32_ieee_d128", 200, 8), row("attn_fwd_full_fp32_ieee_d128", 80, 32),
           row("attn_fwd_full_fp32_d128", 80, 4), row("attn_dq_full_fp16_d64", 96, 4),
           {"kernel": "attn_dq_full_fp32_ieee_d64", "arch": "sm_80", "error": "boom"}]
    assert aot.failures(ok) == []
    assert len(aot.failures(bad)) == len(bad)
