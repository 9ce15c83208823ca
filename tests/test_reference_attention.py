"""Reference register attention (docs/spec.md §2) against a dense-mask softmax written out here
in float64 and against FlexAttention; the reference's textbook backward against autograd."""
import math
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, create_mask, flex_attention

import vft_kernels as vk
from vft_kernels.reference import attention as ra

MODES = ("full", "block_causal", "block_causal_last")
SHAPES = [(1, 3, 2), (3, 3, 2), (1, 5, 3), (3, 1, 1), (3, 5, 0), (1, 1, 0)]  # (T, P, R)
FLEX_SHAPES = [(3, 3, 2), (1, 5, 3), (3, 5, 0)]  # eager FlexAttention on CPU is slow: a subset


def spec_mask(T, P, R, mode, keep):
    """bool [B, N, N] straight from the words of docs/spec.md §2 (independent of layout.py)."""
    S = P + R
    N = T * S
    out = torch.zeros(len(keep), N, N, dtype=torch.bool)
    for b, K in enumerate(keep):
        for i in range(N):
            for k in range(N):
                ti, ji, tk, jk = i // S, i % S, k // S, k % S
                dropped = (ji >= P and ji - P >= K) or (jk >= P and jk - P >= K)
                if dropped:
                    continue
                if mode == "full":
                    ok = True
                elif mode == "block_causal":
                    ok = tk <= ti
                elif tk < ti:
                    ok = True
                elif tk == ti:
                    ok = jk < P or (ji >= P and jk - P <= ji - P)
                else:
                    ok = False
                out[b, i, k] = ok
    return out


def dense_attention(q, k, v, mask, scale):
    """float64 softmax attention with a dense mask [B, N, N]; rows with no key -> 0, lse -inf."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    m = mask[:, None]
    s = s.masked_fill(~m, -math.inf)
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, 0.0)
    e = torch.exp(s - mx)
    denom = e.sum(-1, keepdim=True)
    live = denom > 0
    p = e / torch.where(live, denom, 1.0)
    out = p @ v.double()
    lse = torch.where(live, torch.log(torch.where(live, denom, 1.0)) + mx, -math.inf).squeeze(-1)
    return out, lse


def keeps_for(R, B=3):
    return [0, R, R // 2][:B] if R > 0 else [0] * B


def make_qkv(B, H, N, D, dtype=torch.float64, requires_grad=False):
    return [torch.randn(B, H, N, D, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, P, R", SHAPES)
def test_forward_against_dense_and_flex(T, P, R, mode):
    layout = vk.RegisterLayout(T, P, R, mode)
    keep_list = keeps_for(R)
    keep = torch.tensor(keep_list, dtype=torch.int32)
    N, B, H, D = layout.seq_len, 3, 2, 7
    mask = spec_mask(T, P, R, mode, keep_list)
    assert torch.equal(layout.materialize(keep), mask)
    flex_mask = create_mask(layout.mask_mod(keep), B, None, N, N, device="cpu")
    assert torch.equal(flex_mask[:, 0], mask)

    q, k, v = make_qkv(B, H, N, D)
    scale = 0.37
    want, want_lse = dense_attention(q, k, v, mask, scale)
    out, lse = ra.attention_forward(q, k, v, layout, keep, scale)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)

    # dropped query rows: output exactly zero, lse -inf
    dropped_q = ~mask.any(-1)  # [B, N]
    assert torch.all(out.permute(0, 2, 1, 3)[dropped_q] == 0)
    assert torch.all(lse.permute(0, 2, 1)[dropped_q] == -math.inf)
    assert bool(torch.isfinite(lse.permute(0, 2, 1)[~dropped_q]).all())

    live = torch.isfinite(want_lse)
    if (T, P, R) in FLEX_SHAPES:
        # FlexAttention (eager on CPU) with a block mask from the same mask_mod
        block_mask = create_block_mask(layout.mask_mod(keep), B, None, N, N, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex_out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale,
                                           return_aux=AuxRequest(lse=True))
        torch.testing.assert_close(out, flex_out, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[live], aux.lse[live], rtol=1e-10, atol=1e-10)

    # the public op on the reference backend, default scale, float32
    q32, k32, v32 = (t.float() for t in (q, k, v))
    with vk.use_backend("reference"):
        out32, lse32 = vk.register_attention(q32, k32, v32, layout, keep=keep, return_lse=True)
    want32, want_lse32 = dense_attention(q32, k32, v32, mask, 1 / math.sqrt(D))
    assert out32.dtype == torch.float32 and lse32.dtype == torch.float32 and lse32.shape == (B, H, N)
    torch.testing.assert_close(out32.double(), want32, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isinf(lse32), torch.isinf(want_lse32))
    torch.testing.assert_close(lse32.double()[live], want_lse32[live], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_keep_equals_truncated_sequence(mode):
    """docs/spec.md §2: with keep[b] = K the kept tokens see exactly the mask of R = K."""
    T, P, R, D = 3, 3, 4, 5
    layout = vk.RegisterLayout(T, P, R, mode)
    q, k, v = make_qkv(1, 2, layout.seq_len, D)
    for K in range(R + 1):
        out = ra.attention_forward(q, k, v, layout, torch.tensor([K]), 0.5)[0]
        kept = [n for n in range(layout.seq_len) if n % (P + R) < P + K]
        small = vk.RegisterLayout(T, P, K, mode)
        out_small = ra.attention_forward(q[:, :, kept], k[:, :, kept], v[:, :, kept], small, torch.tensor([K]), 0.5)[0]
        torch.testing.assert_close(out[:, :, kept], out_small, rtol=1e-12, atol=1e-12)
        dropped = [n for n in range(layout.seq_len) if n not in kept]
        assert torch.all(out[:, :, dropped] == 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T, P, R", [(1, 3, 2), (3, 3, 1), (3, 1, 3), (3, 5, 0)])
def test_backward_against_autograd(T, P, R, mode):
    layout = vk.RegisterLayout(T, P, R, mode)
    keep_list = keeps_for(R)
    keep = torch.tensor(keep_list)
    B, H, N, D = 3, 2, layout.seq_len, 6
    mask = spec_mask(T, P, R, mode, keep_list)
    q, k, v = make_qkv(B, H, N, D, requires_grad=True)
    dout = torch.randn(B, H, N, D, dtype=torch.float64)
    want, _ = dense_attention(q, k, v, mask, 0.4)
    want_grads = torch.autograd.grad(want, (q, k, v), dout)

    out, lse = ra.attention_forward(q.detach(), k.detach(), v.detach(), layout, keep, 0.4)
    grads = ra.attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, layout, keep, 0.4)
    for name, g, w in zip("qkv", grads, want_grads):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m: f"d{name}: {m}")

    # dropped tokens pass and receive no gradient
    dropped_q = ~mask.any(-1)              # [B, N] query rows with nothing to attend to
    dropped_k = ~mask.any(-2)              # [B, N] keys nobody attends to
    for g in grads[:1]:
        assert torch.all(g.permute(0, 2, 1, 3)[dropped_q] == 0)
    for g in grads[1:]:
        assert torch.all(g.permute(0, 2, 1, 3)[dropped_k] == 0)

    # autograd through the reference forward and the public op's backward
    ref_grads = torch.autograd.grad(ra.attention_forward(q, k, v, layout, keep, 0.4)[0], (q, k, v), dout)
    with vk.use_backend("reference"):
        pub = vk.register_attention(q, k, v, layout, keep=keep, scale=0.4)
        pub_grads = torch.autograd.grad(pub, (q, k, v), dout)
    for g1, g2, w in zip(ref_grads, pub_grads, want_grads):
        torch.testing.assert_close(g1, w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g2, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output_dtype(dtype):
    layout = vk.RegisterLayout(3, 3, 2)
    keep = torch.tensor([1, 2])
    q, k, v = (t.to(dtype) for t in make_qkv(2, 1, layout.seq_len, 16))
    with vk.use_backend("reference"):
        out, lse = vk.register_attention(q, k, v, layout, keep=keep, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want, _ = dense_attention(q, k, v, spec_mask(3, 3, 2, "block_causal_last", [1, 2]), 0.25)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


def test_noncontiguous_inputs_and_default_keep():
    layout = vk.RegisterLayout(3, 3, 2, "block_causal")
    N = layout.seq_len
    q, k, v = (torch.randn(2, N, 3, 8, dtype=torch.float64).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    with vk.use_backend("reference"):
        out = vk.register_attention(q, k, v, layout)
    want, _ = dense_attention(q, k, v, spec_mask(3, 3, 2, "block_causal", [2, 2]), 1 / math.sqrt(8))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------
# Packed (varlen) calls: cu_seqlens


def packed_mask(lengths_blocks, P, R, mode, keep, N):
    """bool [1, N, N]: block-diagonal of each sample's spec_mask; padding rows/cols False."""
    S = P + R
    mask = torch.zeros(1, N, N, dtype=torch.bool)
    start = 0
    for T, K in zip(lengths_blocks, keep):
        n = T * S
        if n:
            mask[0, start:start + n, start:start + n] = spec_mask(T, P, R, mode, [K])[0]
        start += n
    return mask


PACKED = [  # (P, R, blocks per sample, padding rows)
    (3, 2, [2, 0, 1, 3], 5),
    (5, 0, [1, 2], 0),
    (1, 1, [3, 1, 2], 7),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("P, R, blocks, pad", PACKED)
def test_packed_forward_and_backward_against_dense(P, R, blocks, pad, mode):
    S = P + R
    cu = [0]
    for T in blocks:
        cu.append(cu[-1] + T * S)
    N = cu[-1] + pad
    keep = [min(R, x) for x in (0, R, 1, R)[:len(blocks)]]
    layout = vk.RegisterLayout(max(blocks), P, R, mode)
    q, k, v = make_qkv(1, 2, N, 4, requires_grad=True)
    dout = torch.randn(1, 2, N, 4, dtype=torch.float64)
    mask = packed_mask(blocks, P, R, mode, keep, N)
    want, want_lse = dense_attention(q, k, v, mask, 0.6)
    out, lse = ra.attention_forward(q, k, v, layout, torch.tensor(keep), 0.6, torch.tensor(cu, dtype=torch.int32))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, want_lse.to(lse.dtype), rtol=1e-10, atol=1e-12)
    assert torch.equal(out[:, :, cu[-1]:], torch.zeros_like(out[:, :, cu[-1]:]))
    assert bool((lse[:, :, cu[-1]:] == -math.inf).all())
    # Backward: the reference's textbook formula against autograd through the dense form.
    want_grads = torch.autograd.grad(want, (q, k, v), dout)
    got = ra.attention_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, layout,
                                torch.tensor(keep), 0.6, torch.tensor(cu, dtype=torch.int32))
    for name, g, w in zip("qkv", got, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=f"d{name}")
    # Public API (automatic backend), cu_seqlens as a list.
    api = vk.register_attention(q.float(), k.float(), v.float(), layout, keep=torch.tensor(keep), scale=0.6,
                                cu_seqlens=cu)
    torch.testing.assert_close(api.double(), want, rtol=2e-5, atol=2e-5)


def test_packed_argument_errors():
    layout = vk.RegisterLayout(2, 3, 1, "block_causal_last")
    q = torch.randn(1, 2, 20, 8)
    cases = [
        (dict(cu_seqlens=[4, 8]), "cu_seqlens\\[0\\] must be 0"),
        (dict(cu_seqlens=[0, 8, 4]), "non-decreasing"),
        (dict(cu_seqlens=[0, 6]), "not a multiple of the block size P \\+ R = 4"),
        (dict(cu_seqlens=[0, 12]), "3 time blocks, more than layout.blocks = 2"),
        (dict(cu_seqlens=[0, 8, 16, 24]), "exceeds the sequence length N = 20"),
        (dict(cu_seqlens=[0]), "at least 2 offsets"),
        (dict(cu_seqlens=torch.tensor([0.0, 8.0])), "1-D integer tensor"),
        (dict(cu_seqlens="08"), None),
        (dict(cu_seqlens=[0, 8, 16], keep=torch.tensor([1])), "keep must have shape \\[S\\]"),
    ]
    for kwargs, match in cases:
        err = TypeError if match is None else ValueError
        with pytest.raises(err, match=match or "cu_seqlens must be"):
            vk.register_attention(q, q, q, layout, **kwargs)
    with pytest.raises(ValueError, match="\\[1, H, N, D\\], got B = 2"):
        q2 = torch.randn(2, 2, 20, 8)
        vk.register_attention(q2, q2, q2, layout, cu_seqlens=[0, 8])


def test_packed_offsets_are_checked_before_narrowing():
    """int64 offsets that would wrap into range as int32 (2**32 + 8 -> 8) are refused, as a
    tensor (checked inside the op) and as a list (checked on the host)."""
    layout = vk.RegisterLayout(2, 3, 1, "block_causal_last")
    q = torch.randn(1, 2, 20, 8)
    for bad in ([0, 2**32 + 8], [0, 8, 2**32 + 16], [0, -(2**32) + 8]):
        for cu in (bad, torch.tensor(bad, dtype=torch.int64)):
            with pytest.raises(ValueError, match="register_attention: (cu_seqlens|sample)"):
                vk.register_attention(q, q, q, layout, cu_seqlens=cu)
    # The same offsets in range still run, and a tensor and a list give the same result.
    a = vk.register_attention(q, q, q, layout, cu_seqlens=torch.tensor([0, 8, 16], dtype=torch.int64))
    b = vk.register_attention(q, q, q, layout, cu_seqlens=[0, 8, 16])
    assert torch.equal(a, b)


def test_default_keep_and_list_offsets_need_no_host_read(monkeypatch):
    """keep=None is valid by construction and list offsets are checked as Python ints: the call
    reads no tensor back to the host (no .tolist() / .item(): a device sync on a GPU)."""
    layout = vk.RegisterLayout(2, 3, 1, "block_causal_last")
    q = torch.randn(1, 2, 20, 8)
    reads = []
    for name in ("tolist", "item"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, spy)
    for _ in range(3):
        vk.register_attention(q, q, q, layout, cu_seqlens=[0, 8, 16])
        vk.register_attention(q[:, :, :8], q[:, :, :8], q[:, :, :8], layout)
    assert reads == [], f"host reads per call: {reads}"
    # The spy sees reads where there are some: an explicit keep tensor is checked.
    vk.register_attention(q[:, :, :8], q[:, :, :8], q[:, :, :8], layout, keep=torch.tensor([1]))
    assert reads, "the spy saw no read of an explicit keep: it cannot tell"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_reference_rounds_p_and_ds_like_the_kernels(dtype):
    # docs/spec.md §4's bound scales with the low-precision reference's error, so that reference
    # must take the kernels' rounding steps: P in v's dtype before P V, P in dO's dtype
    # before P^T dO, dS in q/k's dtype before dS K and dS^T Q.
    torch.manual_seed(0)
    layout = vk.RegisterLayout(1, 13, 0, "full")
    q, k, v, do = (torch.randn(1, 2, 13, 16).to(dtype) for _ in range(4))
    keep = torch.zeros(1, dtype=torch.int32)
    out, lse = ra.attention_forward(q, k, v, layout, keep, 0.25)
    s = q.float() @ k.float().transpose(-1, -2) * 0.25
    p = torch.softmax(s, -1)
    assert torch.equal(out, (p.to(dtype).float() @ v.float()).to(dtype))
    assert not torch.equal(out, (p @ v.float()).to(dtype)), "no rounding step taken: the check cannot tell"
    dq, dk, dv = ra.attention_backward(do, q, k, v, out, lse, layout, keep, 0.25)
    assert torch.equal(dv, (p.to(dtype).float().transpose(-1, -2) @ do.float()).to(dtype))
    ds = p * (do.float() @ v.float().transpose(-1, -2) - (do.float() * out.float()).sum(-1, keepdim=True))
    assert torch.equal(dq, (ds.to(dtype).float() @ k.float() * 0.25).to(dtype))
    assert torch.equal(dk, (ds.to(dtype).float().transpose(-1, -2) @ q.float() * 0.25).to(dtype))


@pytest.mark.parametrize("mode", MODES)
def test_per_block_keep(mode):
    """keep [B, T]: block t of sample b keeps keep[b, t] registers (spec-style mask from
    layout.materialize, which test_layout checks against the spec's words per block); a
    per-block keep with equal values is the per-sample keep."""
    layout = vk.RegisterLayout(3, 4, 3, mode)
    keep = torch.tensor([[3, 0, 2], [1, 3, 0]], dtype=torch.int32)
    q, k, v = make_qkv(2, 2, layout.seq_len, 5)
    want, want_lse = dense_attention(q, k, v, layout.materialize(keep), 0.4)
    out, lse = ra.attention_forward(q, k, v, layout, keep, 0.4)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    same = ra.attention_forward(q, k, v, layout, torch.tensor([[2, 2, 2], [0, 0, 0]]), 0.4)[0]
    torch.testing.assert_close(same, ra.attention_forward(q, k, v, layout, torch.tensor([2, 0]), 0.4)[0],
                               rtol=0, atol=0)


def test_per_block_keep_errors():
    layout = vk.RegisterLayout(3, 4, 3, "block_causal_last")
    q = torch.randn(2, 1, layout.seq_len, 8)
    with pytest.raises(ValueError, match=r"keep must have shape \[B\] = \(2,\) or \[B, T\] = \(2, 3\) \(per time "
                                         r"block\), got \(2, 4\)"):
        vk.register_attention(q, q, q, layout, keep=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"keep values must be in \[0, R=3\], got 4"):
        vk.register_attention(q, q, q, layout, keep=torch.tensor([[3, 4, 0], [0, 0, 0]]))
    packed = torch.randn(1, 1, 28, 8)
    with pytest.raises(ValueError, match=r"\[S, T\] = \(2, 3\)"):
        vk.register_attention(packed, packed, packed, layout, keep=torch.zeros(2, 2, dtype=torch.int32),
                              cu_seqlens=[0, 7, 28])
