"""Register attention on the C++ CPU backend (csrc/cpu/attention.cpp) against the
reference (docs/spec.md §2, tolerance rule §4), FlexAttention, truncated sequences, and
torch.compile (no recompilation when ``keep`` changes)."""
import contextlib
import random
import warnings

import pytest
import torch

import vft_kernels as vk
from vft_kernels.layout import MODES, RegisterLayout
from vft_kernels.reference import attention as ref
from vft_kernels.testing import assert_matches_reference, check_attention_non_finite, noncontiguous, stable_seed

cpp = pytest.importorskip("vft_kernels.cpp.attention", reason="vft_kernels._C attention kernels not built")
from vft_kernels._ext import C  # noqa: E402


NO_CU = torch.empty(0, dtype=torch.int32)  # the kernels' cu_seqlens for dense calls


def _inputs(B, H, N, D, dtype, noncontig=False):
    ts = [torch.randn(B, H, N, D, dtype=torch.float32).to(dtype) for _ in range(4)]
    if noncontig:
        ts[:3] = [noncontiguous(t) for t in ts[:3]]
    return ts  # q, k, v, upstream gradient


def _reference_grads(q, k, v, dout, layout, keep, scale, dtype):
    """(out, lse, dq, dk, dv) of the reference run in ``dtype`` (autograd through it)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = ref.attention_forward(q, k, v, layout, keep, scale)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    return (out, lse) + grads


def _cpu_grads(q, k, v, dout, layout, keep, scale):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with vk.use_backend("cpu"):
        out, lse = vk.register_attention(q, k, v, layout, keep=keep, scale=scale, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out, lse) + grads


def _check_against_reference(layout, keep, D, dtype=torch.float32, H=2, noncontig=False, scale=None):
    B, N = keep.shape[0], layout.seq_len
    q, k, v, dout = _inputs(B, H, N, D, dtype, noncontig)
    scale = D ** -0.5 if scale is None else scale
    got = _cpu_grads(q, k, v, dout, layout, keep, scale)
    want64 = _reference_grads(q, k, v, dout, layout, keep, scale, torch.float64)
    want_lowp = _reference_grads(q, k, v, dout, layout, keep, scale, dtype)
    for name, g, w64, wl in zip(("out", "lse", "dq", "dk", "dv"), got, want64, want_lowp):
        assert g.dtype == (torch.float32 if name == "lse" else dtype), f"{name} dtype {g.dtype}"
        assert_matches_reference(f"{layout} keep={keep.tolist()} D={D} {name}", g, w64, wl, dtype, reduction_len=N)
    # Dropped tokens: exactly zero output and gradients, lse -inf.
    dropped = ~layout.materialize(keep).any(-1)  # [B, N] queries attending nothing
    out, lse, dq, dk, dv = got
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        rows = t.permute(0, 2, 1, 3)[dropped]
        assert torch.equal(rows, torch.zeros_like(rows)), f"{name} not exactly zero on dropped tokens"
    assert bool((lse.permute(0, 2, 1)[dropped] == float("-inf")).all())
    return got


def _keeps(R, B, rng):
    """Per-sample keep mixing 0, 1, R and random values."""
    pool = [0, 1, R] + [rng.randint(0, R) for _ in range(B)]
    return torch.tensor([min(x, R) for x in pool[:B]], dtype=torch.int32)


# (T, P, R) with odd sizes, R = 0, blocks smaller than a 64-token tile (tiles straddle
# several blocks) and larger than one (blocks straddle tiles).
LAYOUTS = [(1, 5, 3), (2, 7, 4), (3, 11, 6), (1, 70, 33), (2, 37, 30), (3, 9, 0), (2, 64, 64), (2, 130, 3)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tpr", LAYOUTS, ids=lambda t: "T%dP%dR%d" % t)
def test_matches_reference_fp32(mode, tpr):
    T, P, R = tpr
    layout = RegisterLayout(T, P, R, mode)
    rng = random.Random(stable_seed(mode, tpr))
    keep = _keeps(R, 4, rng)
    D = rng.choice([16, 32, 40])
    _check_against_reference(layout, keep, D)


def _block_keeps(R, B, T, rng):
    """Per-block keep [B, T] mixing 0, 1, R and random values, different between blocks."""
    return torch.tensor([[rng.choice([0, 1, R, rng.randint(0, R)]) for _ in range(T)] for _ in range(B)],
                        dtype=torch.int32).clamp(max=R)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tpr", [(3, 5, 3), (4, 7, 6), (2, 37, 30), (3, 11, 0), (2, 64, 64), (5, 3, 17), (2, 130, 3)],
                         ids=lambda t: "T%dP%dR%d" % t)
def test_per_block_keep_matches_reference(mode, tpr):
    """keep [B, T]: a different number of registers per time block (per-frame token budgets),
    forward and backward against the reference; blocks smaller and larger than a tile."""
    T, P, R = tpr
    layout = RegisterLayout(T, P, R, mode)
    rng = random.Random(stable_seed("pb", mode, tpr))
    keep = _block_keeps(R, 3, T, rng)
    _check_against_reference(layout, keep, rng.choice([16, 40]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_block_keep_low_precision_noncontiguous(dtype):
    layout = RegisterLayout(3, 20, 12, "block_causal_last")
    keep = torch.tensor([[12, 0, 5], [3, 12, 12], [0, 0, 1]], dtype=torch.int32)
    _check_against_reference(layout, keep, 32, dtype=dtype, noncontig=True)


def test_per_block_keep_equal_values_equal_per_sample_keep():
    """A per-block keep whose blocks agree gives bit for bit the per-sample result."""
    layout = RegisterLayout(3, 19, 9, "block_causal_last")
    q, k, v, dout = _inputs(2, 2, layout.seq_len, 32, torch.float32)
    keep = torch.tensor([4, 9], dtype=torch.int32)
    a = _cpu_grads(q, k, v, dout, layout, keep, 0.2)
    b = _cpu_grads(q, k, v, dout, layout, keep[:, None].expand(2, 3), 0.2)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("D", [16, 32, 64, 128, 40, 1, 256])
def test_head_dims(D):
    layout = RegisterLayout(2, 23, 9, "block_causal_last")
    _check_against_reference(layout, torch.tensor([9, 0, 4], dtype=torch.int32), D, H=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision(dtype, mode):
    layout = RegisterLayout(2, 45, 21, mode)
    _check_against_reference(layout, torch.tensor([21, 1, 0, 13], dtype=torch.int32), 64, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noncontiguous(dtype):
    layout = RegisterLayout(3, 17, 8, "block_causal_last")
    _check_against_reference(layout, torch.tensor([8, 2], dtype=torch.int32), 32, dtype=dtype, noncontig=True,
                             scale=0.3)


def test_batch_size_one_and_many_key_tile_groups():
    # B * H = 1: the backward splits key tiles into several groups (dq summed afterwards).
    layout = RegisterLayout(2, 150, 40, "block_causal")
    _check_against_reference(layout, torch.tensor([25], dtype=torch.int32), 16, H=1)


@pytest.mark.parametrize("scale", [-0.7, 0.0])
def test_unusual_scales(scale):
    """Masked scores stay masked for a negative or zero scale."""
    _check_against_reference(RegisterLayout(2, 20, 9, "block_causal_last"), torch.tensor([9, 3], dtype=torch.int32),
                             16, scale=scale)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return set()


def test_bf16_isa_follows_the_cpu():
    """The bf16 tile products are used wherever the CPU has bf16 matrix instructions
    (AMX-BF16 or AVX-512 BF16): a probe that failed there would silently cost the bf16 speed-up."""
    flags, isa = _cpu_flags(), C.attention_cpu_bf16_isa()
    assert isa in ("", "avx512_bf16", "amx")
    if "amx_bf16" in flags:
        assert isa == "amx"
    elif "avx512_bf16" in flags:
        assert isa == "avx512_bf16"
    elif flags:
        assert isa == ""


@pytest.mark.parametrize("bf16_products", [True, False], ids=["bf16_brgemm", "fp32_products"])
@pytest.mark.parametrize("D", [16, 33, 40, 64, 128, 200])
def test_bf16_forward_paths(bf16_products, D):
    """bf16 forwards run their tile products on bf16 brgemm where the CPU has AMX-BF16 or
    AVX-512 BF16 (operands packed in VNNI layout, P rounded to bf16 as the reference does),
    else in float32; both meet the docs/spec.md §4 bound: head dims padded to 32 and split into
    64-column panels, N not a multiple of the 64-token tile, per-sample and per-block keep,
    non-contiguous inputs."""
    if bf16_products and not C.attention_cpu_bf16_isa():
        pytest.skip("no AMX-BF16 / AVX-512 BF16 on this CPU (the float32 products are tested by the other case)")
    if bf16_products and vk.cpu_capability() not in ("avx512_bf16", "amx"):
        pytest.skip(f"CPU capability {vk.cpu_capability()}: bf16 tile products need avx512_bf16 or amx")
    previous = C.attention_cpu_bf16_brgemm(bf16_products)
    try:
        assert C.attention_cpu_bf16_brgemm(bf16_products) == bf16_products
        layout = RegisterLayout(3, 37, 20, "block_causal_last")  # N = 171
        for keep in (torch.tensor([20, 0, 7], dtype=torch.int32),
                     torch.tensor([[20, 3, 0], [1, 20, 20], [0, 0, 9]], dtype=torch.int32)):
            _check_against_reference(layout, keep, D, dtype=torch.bfloat16, H=2, noncontig=D == 40)
    finally:
        C.attention_cpu_bf16_brgemm(previous)


@pytest.mark.parametrize("path", ["blas", "aten", "tiles"])
def test_fallback_gemm_paths(path):
    """The tile-product fallbacks (BLAS sgemm where torch has no oneDNN brgemm, ATen where
    it exports no sgemm either) and vft's AVX2 tile products (the default at the avx2
    capability; forced here at whatever capability runs, BLAS in the baseline variant) give
    the same results."""
    try:
        previous = C.attention_cpu_gemm_path(path)
    except ValueError as e:
        pytest.skip(str(e))
    try:
        _check_against_reference(RegisterLayout(2, 40, 30, "block_causal_last"),
                                 torch.tensor([30, 0, 7], dtype=torch.int32), 32)
        _check_against_reference(RegisterLayout(1, 70, 9, "full"), torch.tensor([4], dtype=torch.int32), 40, H=1)
    finally:
        C.attention_cpu_gemm_path("best")
    assert previous == C.attention_cpu_gemm_path("best")


@pytest.mark.parametrize("mode", MODES)
def test_truncated_sequence(mode):
    """With keep[b] = K, kept tokens get the result of the same mask on a sequence
    truncated to K registers per block."""
    T, P, R, K, D = 3, 21, 12, 5, 32
    layout = RegisterLayout(T, P, R, mode)
    q, k, v, dout = _inputs(1, 2, layout.seq_len, D, torch.float32)
    keep = torch.tensor([K], dtype=torch.int32)
    out, _, dq, dk, dv = _cpu_grads(q, k, v, dout, layout, keep, 0.2)
    kept = layout.materialize(keep)[0].any(-1)
    short = RegisterLayout(T, P, K, mode)
    out_s, _, dq_s, dk_s, dv_s = _cpu_grads(*(t[:, :, kept] for t in (q, k, v, dout)), short, None, 0.2)
    for name, full, trunc in (("out", out, out_s), ("dq", dq, dq_s), ("dk", dk, dk_s), ("dv", dv, dv_s)):
        torch.testing.assert_close(full[:, :, kept], trunc, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_flex_attention_reference(mode):
    """Second reference: FlexAttention (eager, float64) with layout.mask_mod(keep)."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    layout = RegisterLayout(2, 13, 6, mode)
    keep = torch.tensor([6, 0, 3], dtype=torch.int32)
    B, H, N, D = 3, 2, layout.seq_len, 16
    q, k, v, _ = _inputs(B, H, N, D, torch.float32)
    with vk.use_backend("cpu"):
        out = vk.register_attention(q, k, v, layout, keep=keep, scale=0.25)
    block_mask = fa.create_block_mask(layout.mask_mod(keep), B, None, N, N, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
        flex64 = fa.flex_attention(q.double(), k.double(), v.double(), block_mask=block_mask, scale=0.25)
        flex32 = fa.flex_attention(q, k, v, block_mask=block_mask, scale=0.25)
    assert_matches_reference(f"{layout} vs FlexAttention", out, flex64, flex32, torch.float32, reduction_len=N)


@pytest.mark.parametrize("keeps", [([5, 0], [1, 3], [2, 5]), ([[5, 0], [1, 1]], [[0, 5], [3, 2]], [[2, 2], [5, 5]])],
                         ids=["keep_B", "keep_BT"])
def test_compile_keep_changes_do_not_recompile(keeps):
    from torch._dynamo.testing import CompileCounterWithBackend

    layout = RegisterLayout(2, 9, 5, "block_causal_last")
    B, H, N, D = 2, 2, layout.seq_len, 16
    q, k, v, dout = _inputs(B, H, N, D, torch.float32)
    counter = CompileCounterWithBackend("aot_eager")

    def loss(q, k, v, keep):
        return (vk.register_attention(q, k, v, layout, keep=keep) * dout).sum()

    compiled = torch.compile(loss, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    with vk.use_backend("cpu"):
        for keep in keeps:
            keep = torch.tensor(keep, dtype=torch.int32)
            args = [t.detach().requires_grad_() for t in (q, k, v)]
            got = torch.autograd.grad(compiled(*args, keep), args)
            want = torch.autograd.grad(loss(*args, keep), args)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert counter.frame_count == 1, f"keep changes recompiled: {counter.frame_count} frames"


def test_tile_classification_port_matches_layout():
    """The C++ port (vft/attention_tiles.h) of classify_tile / key_range / query_range
    agrees with vft_kernels/layout.py on random layouts and tiles."""
    rng = random.Random(1)
    for _ in range(60):
        T, P, R = rng.randint(1, 4), rng.randint(1, 40), rng.randint(0, 20)
        mode = rng.choice(MODES)
        layout = RegisterLayout(T, P, R, mode)
        keep = rng.randint(0, R) if rng.random() < 0.4 else [rng.randint(0, R) for _ in range(T)]
        keep_row = torch.tensor([keep] * T if isinstance(keep, int) else keep, dtype=torch.int32)
        N = layout.seq_len
        tiles = []
        for _ in range(40):
            q0 = rng.randrange(N)
            k0 = rng.randrange(N)
            tiles.append((q0, rng.randint(q0 + 1, N), k0, rng.randint(k0 + 1, N)))
        got = C.attention_tiles_cpu(T, P, R, MODES.index(mode), keep_row, torch.tensor(tiles, dtype=torch.int64))
        for (q0, q1, k0, k1), row in zip(tiles, got.tolist()):
            want = [int(layout.classify_tile(q0, q1, k0, k1, keep)), *layout.key_range(q0, q1, keep),
                    *layout.query_range(k0, k1, keep)]
            assert row == want, f"{layout} keep={keep} tile {(q0, q1, k0, k1)}: C++ {row} != layout.py {want}"


def test_keep_out_of_range_is_clamped_by_the_kernel():
    """keep is clamped to [0, R] inside the kernel, so bad values never index out of bounds
    (the op layer rejects them before; this calls the backend directly)."""
    layout = RegisterLayout(2, 6, 4, "full")
    q, k, v, _ = _inputs(2, 1, layout.seq_len, 8, torch.float32)
    bad = cpp.attention_forward(q, k, v, layout, torch.tensor([-3, 99]), 0.5)
    good = cpp.attention_forward(q, k, v, layout, torch.tensor([0, 4]), 0.5)
    for b, g in zip(bad, good):
        assert torch.equal(b, g)
    bad = cpp.attention_forward(q, k, v, layout, torch.tensor([[-3, 99], [7, -1]]), 0.5)
    good = cpp.attention_forward(q, k, v, layout, torch.tensor([[0, 4], [4, 0]]), 0.5)
    for b, g in zip(bad, good):
        assert torch.equal(b, g)


def test_supports_and_bad_arguments():
    layout = RegisterLayout(1, 4, 2, "full")
    q = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    keep = torch.tensor([2])
    assert "float64" in cpp.supports_attention_forward(q, q, q, layout, keep, 1.0)
    q300 = torch.randn(1, 1, 6, 300)
    assert "300" in cpp.supports_attention_backward(q300, q300, q300, q300, q300, None, layout, keep, 1.0)
    # Automatic selection falls back to the reference for float64.
    out = vk.register_attention(q, q, q, layout, keep=keep)
    assert out.dtype == torch.float64
    q32 = q.float()
    out = torch.empty_like(q32)
    with pytest.raises(ValueError, match="lse must have shape \\[1, 1, 6\\], got \\[1, 1, 5\\]"):
        C.attention_forward_cpu(q32, q32, q32, keep.int()[:, None], NO_CU, 1, 4, 2, 0, 1.0, out, torch.empty(1, 1, 5))
    with pytest.raises(ValueError, match=r"keep must be a contiguous int32 \[B = 1, T = 1\] tensor \(per-block"):
        C.attention_forward_cpu(q32, q32, q32, keep.int(), NO_CU, 1, 4, 2, 0, 1.0, out, torch.empty(1, 1, 6))
    with pytest.raises(ValueError, match="layout expects N = 12"):
        C.attention_forward_cpu(q32, q32, q32, keep.int()[:, None], NO_CU, 2, 4, 2, 0, 1.0, out, torch.empty(1, 1, 6))


# ------------------------------------------------------------------------------------
# Packed (varlen) calls


def _packed_case(P, R, blocks, pad, rng, per_block=False):
    """(cu_seqlens, N, keep): keep [S], or with ``per_block`` [S, max(blocks)] (columns past a
    sample's own block count hold values the kernels must ignore)."""
    cu = [0]
    for T in blocks:
        cu.append(cu[-1] + T * (P + R))
    if per_block:
        keep = torch.tensor([[rng.choice([0, 1, R, rng.randint(0, R)]) for _ in range(max(blocks))] for _ in blocks],
                            dtype=torch.int32)
    else:
        keep = torch.tensor([rng.choice([0, 1, R, rng.randint(0, R)]) if R else 0 for _ in blocks], dtype=torch.int32)
    return cu, cu[-1] + pad, keep.clamp(max=R)


# (P, R, blocks per sample, padding rows): an empty sample, samples shorter than a 64-token
# tile (tiles straddle sample boundaries in the packed row), longer than several tiles,
# padding to a multiple of 128 as the official packers do.
PACKED = [(5, 3, [2, 0, 1, 3], 0), (37, 30, [2, 1], 2), (9, 0, [3, 1, 2, 4], 38),
          (64, 64, [1, 2], 128), (1, 0, [70, 5, 130], 51)]


# fp32 and bf16 on every packed layout (bf16 forwards take their own tile products where the
# CPU has bf16 brgemm: keys and values packed per sample); fp16 on one.
PACKED_DTYPES = ([(c, torch.float32) for c in PACKED] + [(c, torch.bfloat16) for c in PACKED]
                 + [(PACKED[1], torch.float16)])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case, dtype", PACKED_DTYPES,
                         ids=lambda x: "P%dR%d-%s-pad%d" % (x[0], x[1], "_".join(map(str, x[2])), x[3])
                         if isinstance(x, tuple) else str(x).replace("torch.", ""))
@pytest.mark.parametrize("per_block", [False, True], ids=["keep_S", "keep_ST"])
def test_packed_matches_reference(mode, case, dtype, per_block):
    P, R, blocks, pad = case
    # str seeds are stable across processes
    rng = random.Random(f"{mode}{case}{dtype}" + (" per-block" if per_block else ""))
    cu, N, keep = _packed_case(P, R, blocks, pad, rng, per_block)
    layout = RegisterLayout(max(blocks), P, R, mode)
    D, H = rng.choice([16, 24, 64]), 2
    q, k, v, dout = _inputs(1, H, N, D, dtype, noncontig=True)
    cu_t = torch.tensor(cu, dtype=torch.int32)

    def ref_run(cdt):
        qq, kk, vv = (t.detach().to(cdt).requires_grad_() for t in (q, k, v))
        out, lse = ref.attention_forward(qq, kk, vv, layout, keep, D ** -0.5, cu_t)
        return (out, lse) + torch.autograd.grad(out, (qq, kk, vv), dout.to(cdt))

    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    with vk.use_backend("cpu"):
        out, lse = vk.register_attention(qq, kk, vv, layout, keep=keep, return_lse=True, cu_seqlens=cu_t)
        got = (out, lse) + torch.autograd.grad(out, (qq, kk, vv), dout)
    want64, want_lowp = ref_run(torch.float64), ref_run(dtype)
    for name, g, w64, wl in zip(("out", "lse", "dq", "dk", "dv"), got, want64, want_lowp):
        assert_matches_reference(f"packed {case} {mode} {name}", g, w64, wl, dtype, reduction_len=N)
    tail = slice(cu[-1], N)
    for name, t in zip(("out", "dq", "dk", "dv"), (got[0],) + got[2:]):
        assert torch.equal(t[:, :, tail], torch.zeros_like(t[:, :, tail])), f"{name}: padding rows not zero"
    assert bool((lse[:, :, tail] == float("-inf")).all())


@pytest.mark.parametrize("dtype, bf16_products", [(torch.float32, False), (torch.bfloat16, True),
                                                   (torch.bfloat16, False)],
                         ids=["fp32", "bf16_brgemm", "bf16_fp32_products"])
@pytest.mark.parametrize("keeps", [[4, 0, 2], [[4, 0, 1], [2, 4, 4], [0, 3, 4]]], ids=["keep_S", "keep_ST"])
def test_packed_equals_separate_dense_calls(keeps, dtype, bf16_products):
    """Each packed sample gives bitwise what a dense call on that sample alone gives (a
    per-block keep's row cut to the sample's own blocks), on either bf16 product path."""
    if bf16_products and not C.attention_cpu_bf16_isa():
        pytest.skip("no AMX-BF16 / AVX-512 BF16 on this CPU (the float32 products are tested by the other cases)")
    P, R, mode = 7, 4, "block_causal_last"
    blocks = [3, 1, 2]
    layout = RegisterLayout(3, P, R, mode)
    cu = [0, 33, 44, 66]
    q, k, v, _ = _inputs(1, 3, 70, 40, dtype)
    previous = C.attention_cpu_bf16_brgemm(bf16_products)
    with vk.use_backend("cpu"), contextlib.ExitStack() as stack:
        stack.callback(C.attention_cpu_bf16_brgemm, previous)
        packed = vk.register_attention(q, k, v, layout, keep=torch.tensor(keeps), cu_seqlens=cu)
        for s, T in enumerate(blocks):
            a, b = cu[s], cu[s + 1]
            own = torch.tensor([keeps[s]]) if isinstance(keeps[s], int) else torch.tensor([keeps[s][:T]])
            alone = vk.register_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], RegisterLayout(T, P, R, mode),
                                          keep=own)
            assert torch.equal(packed[:, :, a:b], alone), f"sample {s}"


def test_packed_bad_arguments_at_the_binding():
    q = torch.randn(1, 1, 16, 8)
    out, lse, keep = torch.empty_like(q), torch.empty(1, 1, 16), torch.tensor([1, 1], dtype=torch.int32)
    for cu, match in (([0, 8, 6], "sample 1 has -2 tokens"), ([0, 5, 10], "multiple of P \\+ R = 4"),
                      ([0, 12, 16], "at most 2 blocks"), ([1, 8, 16], "must be 0")):
        with pytest.raises(ValueError, match=match):
            C.attention_forward_cpu(q, q, q, keep, torch.tensor(cu, dtype=torch.int32), 2, 3, 1, 0, 1.0, out, lse)
    q12 = q[:, :, :12].contiguous()
    with pytest.raises(ValueError, match="exceeds N = 12"):
        C.attention_forward_cpu(q12, q12, q12, keep, torch.tensor([0, 8, 16], dtype=torch.int32), 2, 3, 1, 0, 1.0,
                                torch.empty_like(q12), lse[:, :, :12].contiguous())
    with pytest.raises(ValueError, match="keep must be a contiguous int32 \\[S = 2, T = 2\\]"):
        C.attention_forward_cpu(q, q, q, keep[:1], torch.tensor([0, 8, 16], dtype=torch.int32), 2, 3, 1, 0, 1.0,
                                out, lse)


# ------------------------------------------------------------------------------------
# Non-finite inputs propagate like the reference (issue: NaN rows came out as dropped rows)


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_inputs_propagate_like_the_reference(mode):
    check_attention_non_finite("cpu", mode)
