"""FSQ kernels (cpu natively, triton under TRITON_INTERPRET=1) against the reference,
per docs/spec.md §1 and the §4 tolerance / exactness rules."""
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import vft_kernels as vk
from vft_kernels import dispatch
from vft_kernels.reference import fsq as ref
from vft_kernels.testing import assert_fsq_matches, assert_matches_reference, noncontiguous


def _available(backend):
    """The backend can run here and its FSQ module imports (else the tests skip, saying so)."""
    return dispatch.backend_status(backend) is None and dispatch._REGISTRY[("fsq_forward", backend)].load() is None


# numpy (the Triton interpreter) warns on the inf - inf of saturated / NaN rows.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered")

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not _available(b), reason=f"backend {b} unavailable"))
            for b in ("cpu", "triton")]
_rng = random.Random(20241123)
RANDOM_LEVELS = tuple(_rng.randint(2, 16) for _ in range(_rng.randint(3, 7)))
# The CPU kernel counts rounding thresholds for levels <= 16 and evaluates tanh (the CUDA
# kernel's math) above: LARGE_LEVELS takes the tanh path.
LARGE_LEVELS = (17, 8, 33, 5)
PRESETS = [(8, 8, 8, 5, 5, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5), (8, 8, 8, 6, 5), RANDOM_LEVELS, LARGE_LEVELS]


def quantize(backend, z, levels, **kw):
    with vk.use_backend(backend):
        return vk.fsq_quantize(z, levels, **kw)


def decode(backend, indices, levels, **kw):
    with vk.use_backend(backend):
        return vk.fsq_indices_to_codes(indices, levels, **kw)


def check_forward(backend, z, levels, eps=1e-3, out_dtype=None):
    codes, idx = quantize(backend, z, levels, eps=eps, out_dtype=out_dtype)
    rc, ri = ref.fsq_forward(z, levels, eps, out_dtype)
    assert codes.dtype == rc.dtype and idx.dtype == ri.dtype
    near = assert_fsq_matches(codes, idx, rc, ri, z, levels, eps)
    # The boundary excuse must stay rare, or "exact" would mean nothing.
    assert near <= max(2, idx.numel() // 100), f"{near} of {idx.numel()} tokens at a rounding boundary"
    return codes, idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("levels", PRESETS, ids=lambda lv: "x".join(map(str, lv)))
def test_forward_presets(backend, levels):
    z = torch.randn(3, 67, len(levels)) * 2.0
    z[0, :2] = math.inf  # saturated tokens: the outermost codes
    z[1, :2] = -math.inf
    codes, idx = check_forward(backend, z, levels)
    assert bool((idx >= 0).all()) and bool((idx < math.prod(levels)).all())
    # Round trip: indices -> codes gives the same codes bit for bit.
    assert torch.equal(decode(backend, idx, levels), codes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", range(1, 14))
def test_forward_every_dim_count(backend, d):
    """Every dim count with int32 indices (5**13 < 2**31): the CPU kernel sums each row's
    index contributions with register permutes (its own code per dim count), and with
    gathers in blocks that hold a NaN; full and partial blocks, with and without NaN."""
    levels = tuple(5 + (j % 4) for j in range(d)) if d < 9 else (5,) * d
    z = torch.randn(45, d) * 2.0
    z[33, d // 2] = math.nan  # the third block takes the NaN path, the others not
    codes, idx = check_forward(backend, z, levels)
    assert idx.dtype == torch.int32 and int(idx[33]) == -1 and bool((idx[:32] >= 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("levels", [(8, 5, 7, 6), (24, 5, 7, 17)], ids=["small", "large"])
def test_forward_dense_sweep(backend, levels):
    # Every regime of the kernels' tanh (polynomial, exp branch, saturation) or thresholds
    # on a dense grid, all tokens exact except rounding-boundary ones.
    n = 2**20 if backend == "cpu" else 2**14
    z = torch.linspace(-9.0, 9.0, n)[torch.randperm(n)].reshape(-1, 4)
    check_forward(backend, z, levels)
    check_backward(backend, z[:4096], levels)


@pytest.mark.skipif(not _available("cpu"), reason="backend cpu unavailable")
def test_cpu_tanh_path_on_small_levels(monkeypatch):
    # The tanh path (the CUDA kernel's arithmetic) on the presets too, forced by lowering
    # the threshold path's limit; the same z through both paths may differ only on
    # boundary tokens, which check_forward excuses (and counts).
    from vft_kernels.cpp import fsq as cpp_fsq

    monkeypatch.setattr(cpp_fsq, "MAX_THRESHOLD_LEVEL", 1)
    cpp_fsq._thresholds.cache_clear()
    try:
        assert cpp_fsq._thresholds((8, 5), 1e-3).numel() == 0
        z = torch.linspace(-9.0, 9.0, 2**18)[torch.randperm(2**18)].reshape(-1, 4)
        check_forward("cpu", z, (8, 5, 7, 6))
        for levels in PRESETS:
            z = torch.randn(3, 67, len(levels)) * 2.0
            z[0, 0] = math.nan
            z[1, :] = math.inf
            check_forward("cpu", z, levels)
    finally:
        monkeypatch.undo()
        cpp_fsq._thresholds.cache_clear()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("same_dtype_codes", [False, True])
def test_forward_low_precision(backend, dtype, same_dtype_codes):
    levels = (8, 8, 8, 5, 5, 5)
    z = (torch.randn(129, 6) * 2).to(dtype)
    check_forward(backend, z, levels, out_dtype=dtype if same_dtype_codes else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("levels", [(8, 7, 5, 3), (33, 7, 3)], ids=["thresholds", "tanh"])  # k / 3 rounds in bf16
def test_bfloat16_blocks_with_special_values(backend, levels):
    """bf16 in and out: full dense blocks (the cpu kernel's bit-level bf16 loads and
    round-to-nearest-even stores) and a partial last block, with NaN, +-inf and zeros inside
    the full blocks; forward and backward."""
    z = (torch.randn(67, len(levels)) * 3).to(torch.bfloat16)  # 4 full blocks of 16 rows + 3
    z[5, 0], z[17, 1], z[33, -1], z[40] = math.nan, math.inf, -math.inf, 0.0
    check_forward(backend, z, levels, out_dtype=torch.bfloat16)
    finite = z[torch.isfinite(z.float()).all(-1)]
    check_backward(backend, finite, levels, out_dtype=torch.bfloat16)


ALL_BF16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


@pytest.mark.skipif(not _available("cpu"), reason="backend cpu unavailable")
@pytest.mark.parametrize("levels,eps", [((8, 8, 8, 5, 5, 5), 1e-3), ((8, 8, 8, 5, 5, 5), 0.0), ((8, 5, 5, 5), 0.1),
                                        ((7, 5, 5, 5, 5), 1e-3), ((16, 15, 3), 0.0), ((3,), 1e-3),
                                        ((2, 3, 4, 5, 6, 7, 8, 2, 2, 3), 1e-3), ((16, 16, 16, 16), 1e-3),
                                        ((16, 16, 16, 16, 5), 1e-3)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"eps{v}")
def test_cpu_bf16_every_value(levels, eps):
    """The cpu kernel's bf16 -> bf16 forward compares 16-bit keys of the bf16 bits against
    per-dim key thresholds (32 rows per block; at most 64 (dim, digit) codes, so the last
    level set takes the float path) and looks codes up in a table. Every one of the 65,536
    bf16 values in every dim (+-0, subnormals, +-inf, both NaN signs), plus a partial last
    block: bit-identical to the float32 kernel on the same values (NaN codes NaN, index -1),
    and exact against the reference."""
    d = len(levels)
    z = torch.stack([ALL_BF16.roll(1237 * j) for j in range(d)], 1)
    z = torch.cat([z, z[-37:]])  # one full 32-row block and 5 rows after the last full one
    codes, idx = quantize("cpu", z, levels, eps=eps, out_dtype=torch.bfloat16)
    fc, fi = quantize("cpu", z.float(), levels, eps=eps)
    nan = z.float().isnan().any(-1)
    assert torch.equal(idx, fi) and bool((idx[nan] == -1).all()) and bool((idx[~nan] >= 0).all())
    assert torch.equal(codes.isnan(), fc.isnan()) and torch.equal(codes.isnan(), z.isnan())
    ok = ~codes.isnan()
    assert torch.equal(codes[ok].view(torch.int16), fc.to(torch.bfloat16)[ok].view(torch.int16))
    check_forward("cpu", z, levels, eps=eps, out_dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_forward_eps(backend, eps):
    # eps = 0 with even levels makes shift = atanh(1) = inf: every finite z saturates.
    check_forward(backend, torch.randn(41, 4) * 3, (8, 5, 4, 7), eps=eps)


def grads(backend, z, g, levels, out_dtype=None):
    zz = z.detach().clone().requires_grad_()
    with vk.use_backend(backend):
        codes, _ = vk.fsq_quantize(zz, levels, out_dtype=out_dtype)
    codes.backward(g.to(codes.dtype))
    return zz.grad


def check_backward(backend, z, levels, g=None, out_dtype=None):
    g = torch.randn(z.shape) if g is None else g
    out = grads(backend, z, g, levels, out_dtype)
    assert out.dtype == z.dtype
    z64 = z.detach().double().requires_grad_()
    ref.fsq_forward(z64, levels)[0].backward(g.double())
    zl = z.detach().clone().requires_grad_()
    rc, _ = ref.fsq_forward(zl, levels, codes_dtype=out_dtype)
    rc.backward(g.to(rc.dtype))
    assert_matches_reference("grad_z", out, z64.grad, zl.grad, z.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("levels", PRESETS[:3] + [RANDOM_LEVELS], ids=lambda lv: "x".join(map(str, lv)))
def test_backward(backend, dtype, levels):
    z = (torch.randn(2, 53, len(levels)) * 2).to(dtype)
    check_backward(backend, z, levels, out_dtype=dtype if dtype != torch.float32 else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_broadcast_grad(backend):
    # codes.sum().backward() hands the kernel an expanded (all-stride-0) gradient.
    z = torch.randn(37, 5) * 2
    zz = z.clone().requires_grad_()
    with vk.use_backend(backend):
        vk.fsq_quantize(zz, (7, 5, 5, 5, 5))[0].sum().backward()
    check_backward(backend, z, (7, 5, 5, 5, 5), g=torch.ones(()).expand(37, 5))
    z64 = z.double().requires_grad_()
    ref.fsq_forward(z64, (7, 5, 5, 5, 5))[0].sum().backward()
    assert_matches_reference("grad_z", zz.grad, z64.grad, z64.grad.float(), torch.float32)


# Exact ties of round(bounded): z = +-inf gives bounded = +-half_l exactly (tanh(+-inf) is
# exactly +-1), a tie when half_l = k + 0.5; z = -shift gives tanh(0) = 0, bounded = -0.5
# for even levels. Expected q: half to even (floor(x + 0.5) or half-away would differ).
# Saturated ties need eps * (L - 1) == 1; fsq_quantize accepts them only where the even
# neighbour is in range (L = 3 would round 1.5 to 2: rejected, see test_api_errors).
TIES = [  # (levels, eps, z row, expected q row)
    ((5,), 0.25, [math.inf], [2.0]),  # 2.5
    ((5,), 0.25, [-math.inf], [-2.0]),  # -2.5
    ((9,), 0.125, [math.inf], [4.0]),  # 4.5
    ((17,), 0.0625, [-math.inf], [-8.0]),  # -8.5
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tie", TIES, ids=lambda t: f"L{t[0][0]}_{t[2][0]}")
def test_exact_ties_saturated(backend, tie):
    levels, eps, row, q = tie
    z = torch.tensor([row], dtype=torch.float32)
    codes, idx = quantize(backend, z, levels, eps=eps)
    half_w = torch.tensor([L // 2 for L in levels], dtype=torch.float32)
    assert torch.equal(codes[0], torch.tensor(q) / half_w), f"got codes {codes[0].tolist()} for ties, want q={q}"
    rc, ri = ref.fsq_forward(z, levels, eps)
    assert torch.equal(codes, rc) and torch.equal(idx, ri)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_ties_minus_half(backend):
    levels = (8, 6, 4, 2)
    _, _, shift, _ = ref._constants(levels, 1e-3, torch.float32, "cpu")
    z = (-shift).reshape(1, 4)  # bounded = tanh(0) * half_l - 0.5 = -0.5 exactly -> q = 0
    codes, idx = quantize(backend, z, levels)
    assert torch.equal(codes, torch.zeros(1, 4)), codes
    assert int(idx[0]) == sum((L // 2) * b for L, b in zip(levels, ref.basis(levels)))


try:
    import triton
    import triton.language as tl

    from vft_kernels.triton.fsq import _round_half_even

    @triton.jit
    def _round_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(o_ptr + offs, _round_half_even(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)
except ImportError:
    _round_kernel = None


@pytest.mark.skipif(_round_kernel is None, reason="triton is not installed")
def test_triton_round_half_even_helper():
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 0.49999997, 2.5000002, -7.5, 4194303.5, 0.0, 1.0])
    out = torch.full_like(x, float("nan"))
    _round_kernel[(1,)](x, out, x.numel(), BLOCK=16)
    assert torch.equal(out, torch.round(x)), out


@pytest.mark.skipif(_round_kernel is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="checks the interpreter's cast (conftest patches it to the GPU's rounding)")
def test_interpreter_bf16_rounding():
    # float32 -> bfloat16 in a kernel rounds to nearest even, as on the GPU (the stock
    # interpreter truncates: 2.07786 -> 2.0625 instead of 2.078125). Ties, negatives,
    # carries into the exponent, inf and NaN included.
    import triton
    import triton.language as tl

    @triton.jit
    def _narrow(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(o_ptr + offs, tl.load(x_ptr + offs, mask=offs < n).to(tl.bfloat16), mask=offs < n)

    x = torch.tensor([2.07786, -2.07786, 1.00390625, 1.01171875, 255.9, -0.0, 3e38, math.inf, -math.inf,
                      math.nan, 1e-40, 0.1])
    out = torch.full(x.shape, float("nan"), dtype=torch.bfloat16)
    _narrow[(1,)](x, out, x.numel(), BLOCK=16)
    want = x.to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16)[~torch.isnan(x)], want.view(torch.int16)[~torch.isnan(x)]), (out, want)
    assert bool(torch.isnan(out[torch.isnan(x)]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows(backend):
    levels = (8, 8, 8, 5, 5, 5)
    z = torch.randn(9, 6) * 2
    z[0, 1] = math.inf
    z[1, :] = -math.inf
    z[2, 3] = math.nan
    z[3, :] = math.nan
    z[4, 0], z[4, 5] = math.inf, math.nan
    codes, idx = check_forward(backend, z, levels)
    assert idx[[2, 3, 4]].tolist() == [-1, -1, -1]
    assert bool((idx[[0, 1, 5, 6, 7, 8]] >= 0).all())
    assert torch.equal(torch.isnan(codes), torch.isnan(z))
    # Decoding the NaN rows' -1 gives NaN codes.
    assert bool(torch.isnan(decode(backend, idx[[2, 3]], levels)).all())
    g = torch.randn(9, 6)
    check_backward(backend, z, levels, g=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_size_one(backend):
    levels = (8, 5, 5, 5)
    base = torch.randn(23, 4) * 2
    check_forward(backend, noncontiguous(base), levels)
    check_forward(backend, base.t().contiguous().t(), levels)  # dim stride 23, row stride 1
    check_backward(backend, noncontiguous(base), levels, g=noncontiguous(torch.randn(23, 4)))
    check_forward(backend, torch.randn(1, 4), levels)
    check_forward(backend, torch.randn(1, 1, 1, 4), levels)
    check_forward(backend, torch.randn(17, 1) * 2, (5,))
    check_backward(backend, torch.randn(1, 1, 4), levels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    for shape in ((0, 6), (2, 0, 6)):
        z = torch.randn(shape)
        codes, idx = quantize(backend, z, (8, 8, 8, 5, 5, 5))
        assert codes.shape == shape and idx.shape == shape[:-1] and idx.dtype == torch.int32
        assert decode(backend, idx, (8, 8, 8, 5, 5, 5)).shape == shape
        zz = z.clone().requires_grad_()
        with vk.use_backend(backend):
            vk.fsq_quantize(zz, (8, 8, 8, 5, 5, 5))[0].sum().backward()
        assert zz.grad.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_codebook_int64(backend):
    levels = (8,) * 11  # 2**33 codes: int64 indices
    z = torch.randn(45, 11) * 2
    z[7, 4] = math.nan
    codes, idx = check_forward(backend, z, levels)
    assert idx.dtype == torch.int64 and int(idx.max()) >= 2**31 and int(idx[7]) == -1
    assert torch.equal(decode(backend, idx[idx >= 0], levels), codes[idx >= 0])
    check_backward(backend, z, levels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("levels", [(8, 8, 8, 5, 5, 5), (7, 5, 5, 5, 5), (8,) * 11, RANDOM_LEVELS],
                         ids=lambda lv: "x".join(map(str, lv)))
def test_decode_round_trip(backend, levels):
    n = math.prod(levels)
    idx = torch.randint(0, n, (5, 31), dtype=ref.index_dtype(levels))
    idx[0, 0], idx[1, 3], idx[4, 30] = -1, 0, n - 1
    out = decode(backend, idx, levels)
    want = ref.fsq_decode(idx, levels)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(want))
    strided = noncontiguous(idx.unsqueeze(-1)).squeeze(-1)
    assert not strided.is_contiguous()
    assert torch.equal(decode(backend, strided, levels).nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_indices(backend):
    levels = (8, 5, 5, 5)
    for bad in (1000, -2, 2**31 - 1):
        idx = torch.tensor([3, bad, 7], dtype=torch.int32)
        with pytest.raises(ValueError, match=rf"index {bad} is outside the valid range \[0, 1000\)"):
            decode(backend, idx, levels)
    # Unvalidated: no out-of-bounds access, each row decodes on its own (floor semantics
    # like the reference, so the garbage is at least the reference's garbage).
    idx = torch.tensor([[1000, -2, -(2**40), 2**40, -1, 5]], dtype=torch.int64)
    out = decode(backend, idx, levels, validate=False)
    want = ref.fsq_decode(idx, levels)
    assert torch.equal(out.nan_to_num(), want.nan_to_num()) and torch.equal(out.isnan(), want.isnan())


def _mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.mark.skipif(not _available("cpu"), reason="backend cpu unavailable")
@pytest.mark.skipif(_mem_available_gib() < 12, reason="needs ~5 GiB for a >2**31-element output")
def test_cpu_int64_offsets():
    # > 2**31 output elements: 2**27 + 3 rows x 16 dims of fp16 codes (4 GiB) from a
    # stride-0 (expanded) input that costs no memory. Every row is the same token, so the
    # rows past element 2**31 must equal row 0.
    levels = (3,) * 16
    rows = 2**27 + 3
    row = torch.randn(16) * 2
    z = row.expand(rows, 16)
    with dispatch.poison_outputs(False), vk.use_backend("cpu"):
        codes, idx = vk.fsq_quantize(z, levels, out_dtype=torch.float16)
    rc, ri = ref.fsq_forward(row.reshape(1, 16), levels, codes_dtype=torch.float16)
    tail = codes[-3:]
    assert (rows - 1) * 16 > 2**31  # the last rows start past int32 element offsets
    assert torch.equal(tail, rc.expand(3, 16)) and torch.equal(idx[-3:], ri.expand(3))
    assert torch.equal(codes[:: 2**20], rc.expand(codes[:: 2**20].shape[0], 16))
    del codes, idx


def test_aot_compiles_fsq_kernels():
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "vft_kernels.triton.aot", "--only", "fsq"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "0 failures" in res.stdout and "fsq_forward" in res.stdout, res.stdout


# --------------------------------------------------------------------------------------
# The eager CPU fast path of fsq_quantize (ops/fsq.py _fast_forward)


@pytest.fixture
def fast_calls(monkeypatch):
    """Runs of fsq_quantize's eager CPU fast path: True when it ran the kernel, False when it
    declined (the checked path, through the custom op, took over)."""
    from vft_kernels.ops import fsq as fsq_ops

    if not _available("cpu"):
        pytest.skip("backend cpu unavailable")
    real, calls = fsq_ops._fast_forward, []

    def spy(*args):
        res = real(*args)
        calls.append(res is not None)
        return res

    monkeypatch.setattr(fsq_ops, "_fast_forward", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("levels", [(8, 8, 8, 5, 5, 5), LARGE_LEVELS, (500,) * 4], ids=["presets", "tanh", "int64"])
@pytest.mark.parametrize("mode", ["no_grad", "grad enabled", "forced cpu", "list levels"])
def test_fast_path_runs_ordinary_calls_exactly_like_the_checked_path(fast_calls, dtype, out_dtype, levels, mode):
    """Ordinary eager CPU calls skip the custom op and give bit for bit what the custom op's
    cpu backend gives (same kernel), every element of the poisoned outputs written."""
    from vft_kernels.ops import fsq as fsq_ops

    z = (torch.randn(3, 37, len(levels)) * 2).to(dtype)
    z[0, 0, 0] = math.nan
    z[1, 2] = -math.inf
    with vk.use_backend("cpu"):
        want = fsq_ops._fsq_quantize(z, list(levels), 1e-3, out_dtype)
    assert fast_calls == []
    if mode == "no_grad":
        with torch.no_grad():
            got = vk.fsq_quantize(z, levels, out_dtype=out_dtype)
    elif mode == "forced cpu":
        with vk.use_backend("cpu"):
            got = vk.fsq_quantize(z, levels, out_dtype=out_dtype)
    else:
        got = vk.fsq_quantize(z, list(levels) if mode == "list levels" else levels, out_dtype=out_dtype)
    assert fast_calls == [True]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and not g.requires_grad
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_fast_path_declines_what_it_does_not_check(fast_calls):
    """Autograd, float64, tensor or numpy-like levels, subclasses, a forced backend other than cpu and
    more dims than the kernel takes go to the checked path; results are still right."""
    z = torch.randn(5, 4) * 2
    levels = (8, 5, 5, 5)
    want = ref.fsq_forward(z, levels)
    cases = {
        "grad": lambda: vk.fsq_quantize(z.clone().requires_grad_(), levels),
        "float64": lambda: vk.fsq_quantize(z.double(), levels),
        "tensor levels": lambda: vk.fsq_quantize(z, torch.tensor(levels)),
        "subclass": lambda: vk.fsq_quantize(torch.nn.Parameter(z, requires_grad=False), levels),
        "levels of a subclass of int": lambda: vk.fsq_quantize(z, tuple(type("I", (int,), {})(L) for L in levels)),
    }
    for name, run in cases.items():
        fast_calls.clear()
        codes, idx = run()
        assert fast_calls == [False], name
        torch.testing.assert_close(codes.detach().to(want[0].dtype), want[0], msg=name)
        torch.testing.assert_close(idx, want[1], msg=name)
    fast_calls.clear()
    with vk.use_backend("reference"):
        vk.fsq_quantize(z, levels)
    assert fast_calls == [False]  # declined: the forced backend runs
    fast_calls.clear()
    many = tuple([3] * 17)  # more dims than the cpu kernel takes: the reference
    zz = torch.randn(4, 17)
    torch.testing.assert_close(vk.fsq_quantize(zz, many)[1], ref.fsq_forward(zz, many)[1])
    assert fast_calls == [False]
    zz = z.clone().requires_grad_()  # autograd still works through the checked path
    vk.fsq_quantize(zz, levels)[0].sum().backward()
    assert zz.grad is not None and zz.grad.shape == z.shape


@pytest.mark.parametrize("case", ["level 1", "float level", "bool level", "eps too large", "eps 0 with level 2",
                                  "negative eps", "dims", "int z", "out_dtype", "not a tensor", "0-dim"])
def test_fast_path_leaves_bad_calls_to_the_checked_errors(fast_calls, case):
    """Bad calls get fsq_quantize's errors: the fast path declines them, running nothing (also
    after the same levels passed once with a valid eps)."""
    z = torch.randn(5, 3)
    vk.fsq_quantize(z, (8, 5, 2))  # memoises these levels as valid with eps 1e-3
    args = {"level 1": (z, (8, 5, 1)), "float level": (z, (8, 5, 2.0)), "bool level": (z, (8, 5, True)),
            "eps too large": (z, (8, 5, 2), 0.6), "eps 0 with level 2": (z, (8, 5, 2), 0.0),
            "negative eps": (z, (8, 5, 2), -1e-3), "dims": (z, (8, 5)), "int z": (z.int(), (8, 5, 2)),
            "out_dtype": (z, (8, 5, 2), 1e-3, torch.int32), "not a tensor": (z.tolist(), (8, 5, 2)),
            "0-dim": (torch.tensor(1.0), (8,))}[case]
    with pytest.raises((TypeError, ValueError)):
        vk.fsq_quantize(*args)
    assert True not in fast_calls[1:]
