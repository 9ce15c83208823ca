"""Reference FSQ (docs/spec.md §1) against independent float64 formulations: a hand-made table,
Python `math` on random values, planted exact ties, non-finite rows, the gradient formula,
index dtypes, decoding."""
import math

import pytest
import torch

import vft_kernels as vk
from vft_kernels.reference import fsq as rf

EPS = 1e-3


def spec_q(L, z, eps=EPS):
    """q for one scalar, in float64 with Python math (docs/spec.md §1); also returns `bounded`."""
    half_l = (L - 1) * (1 + eps) / 2
    offset = 0.5 if L % 2 == 0 else 0.0
    bounded = math.tanh(z + math.atanh(offset / half_l)) * half_l - offset
    return round(bounded), bounded  # Python's round() is half-to-even


def spec_index(qs, levels):
    index, basis = 0, 1
    for q, L in zip(qs, levels):
        index += (q + L // 2) * basis
        basis *= L
    return index


# (L, z, q): worked out from the docs/spec.md §1 formula (bounded shown to 3 digits)
HAND_TABLE = [
    (2, 0.0, 0),     # bounded 0.000: L = 2 only flips below z ~ -3.8
    (2, 0.4, 0),     # 0.000
    (2, -5.0, -1),   # -0.917
    (3, 0.0, 0),     # 0.000
    (3, 0.5, 0),     # 0.463
    (3, 0.6, 1),     # 0.538
    (3, -0.6, -1),   # -0.538
    (3, 5.0, 1),     # 1.001
    (4, 0.0, 0),     # 0.000
    (4, 0.2, 0),     # 0.247
    (4, 1.0, 1),     # 0.811
    (4, -0.6, -1),   # -0.873
    (4, -1.5, -2),   # -1.730
    (5, 0.3, 1),     # 0.583
    (5, -0.3, -1),   # -0.583
    (5, 0.8, 1),     # 1.329
    (5, -2.0, -2),   # -1.930
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hand_table(dtype):
    for L, z, q in HAND_TABLE:
        assert spec_q(L, z)[0] == q, (L, z)  # the table itself agrees with the formula
        codes, idx = rf.fsq_forward(torch.tensor([[z]], dtype=dtype), (L,), EPS)
        assert codes.dtype == dtype and idx.dtype == torch.int32
        assert codes.item() == q / (L // 2), (L, z, codes.item())
        assert idx.item() == q + L // 2, (L, z, idx.item())


@pytest.mark.parametrize("levels", [(3, 4), (2, 3, 4, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_against_math(levels, dtype):
    z = torch.randn(97, len(levels), dtype=torch.float64) * 2
    codes, idx = rf.fsq_forward(z.to(dtype), levels, EPS)
    z64 = z.to(dtype).double()
    assert codes.shape == z.shape and idx.shape == (97,)
    checked = 0
    for n in range(z.shape[0]):
        qs, bs = zip(*(spec_q(L, float(z64[n, j])) for j, L in enumerate(levels)))
        if any(abs(b - math.floor(b) - 0.5) < 1e-5 for b in bs):
            continue  # rounding boundary: a float32 tanh may go either way (docs/spec.md §4)
        checked += 1
        expected = torch.tensor([q / (L // 2) for q, L in zip(qs, levels)], dtype=torch.float64).to(dtype)
        assert torch.equal(codes[n], expected), n
        assert idx[n].item() == spec_index(qs, levels), n
        assert all(-(L // 2) <= q <= (L - 1) // 2 for q, L in zip(qs, levels))
    assert checked >= 90


def _exact_tanh_preimages(target: float, dtype, span=400):
    """Values z of `dtype` with torch.tanh(z) == target exactly (scan around atanh(target))."""
    z0 = torch.tensor(math.atanh(target), dtype=dtype)
    itype = torch.int32 if dtype == torch.float32 else torch.int64
    cand = (z0.view(itype) + torch.arange(-span, span, dtype=itype)).view(dtype)
    return cand[torch.tanh(cand) == target]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_ties_round_half_to_even(dtype):
    """eps = 0 and odd L with half_l = (L-1)/2 a power of two: shift = offset = 0 and
    bounded = tanh(z) * half_l is exact, so z with tanh(z) == (k + 0.5) / half_l plants an
    exact tie. The expected q comes from Python's round() (half to even)."""
    planted = set()
    for L in (3, 5, 9, 17):
        half_l = (L - 1) // 2
        for k in range(-half_l, half_l):
            b = k + 0.5
            zs = _exact_tanh_preimages(b / half_l, dtype)
            if zs.numel() == 0:
                continue
            codes, idx = rf.fsq_forward(zs[:, None], (L,), 0.0)
            q = round(b)
            assert q % 2 == 0
            assert torch.all(codes == q / (L // 2)), (L, b, codes)
            assert torch.all(idx == q + L // 2), (L, b, idx)
            planted.add(b)
    # Ties on both sides of zero, rounding both down and up in magnitude.
    for b in (0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5):
        assert b in planted, f"could not plant a tie at {b}; planted {sorted(planted)}"


def test_rounding_is_half_to_even_on_torch_round():
    """The rounding primitive of the reference: torch.round on exact ties."""
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5])
    assert torch.round(ties).tolist() == [round(x) for x in ties.tolist()] == [0, 2, 2, 4, 0, -2, -2, -4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinities_saturate(dtype):
    levels = (2, 3, 4, 5, 8)
    z = torch.tensor([[math.inf] * 5, [-math.inf] * 5, [math.inf, -math.inf, 0.3, -math.inf, math.inf]], dtype=dtype)
    codes, idx = rf.fsq_forward(z, levels, EPS)
    hi = [(L - 1) // 2 for L in levels]
    lo = [-(L // 2) for L in levels]
    mixed = [hi[0], lo[1], spec_q(4, 0.3)[0], lo[3], hi[4]]
    for row, qs in enumerate((hi, lo, mixed)):
        assert codes[row].tolist() == [q / (L // 2) for q, L in zip(qs, levels)]
        assert idx[row].item() == spec_index(qs, levels)
    assert idx[0].item() == math.prod(levels) - 1 and idx[1].item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nan_rows(dtype):
    levels = (3, 4, 5)
    z = torch.tensor([[0.3, math.nan, -0.7],
                      [0.3, 0.1, -0.7],
                      [math.nan, math.nan, math.nan],
                      [math.inf, math.nan, -math.inf]], dtype=dtype)
    codes, idx = rf.fsq_forward(z, levels, EPS)
    assert torch.equal(torch.isnan(codes), torch.isnan(z))
    assert idx[0].item() == -1 and idx[2].item() == -1 and idx[3].item() == -1
    qs = [spec_q(L, float(z[1, j].double())) [0] for j, L in enumerate(levels)]
    assert idx[1].item() == spec_index(qs, levels)
    # finite entries of NaN rows still get their own codes
    assert codes[0, 0].item() == spec_q(3, float(z[0, 0].double()))[0] / 1
    assert codes[3, 0].item() == 1.0 and codes[3, 2].item() == -1.0


@pytest.mark.parametrize("levels", [(3, 4), (2, 5, 8)])
def test_gradient_formula_float64(levels):
    z = (torch.randn(13, len(levels), dtype=torch.float64) * 1.5).requires_grad_()
    g = torch.randn(13, len(levels), dtype=torch.float64)
    expected = torch.empty_like(g)
    for n in range(13):
        for j, L in enumerate(levels):
            half_l = (L - 1) * (1 + EPS) / 2
            shift = math.atanh((0.5 if L % 2 == 0 else 0.0) / half_l)
            expected[n, j] = g[n, j] * half_l * (1 - math.tanh(z[n, j].item() + shift) ** 2) / (L // 2)
    codes, _ = rf.fsq_forward(z, levels, EPS)
    (autograd,) = torch.autograd.grad(codes, z, g)
    torch.testing.assert_close(autograd, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rf.fsq_backward(g, z.detach(), levels, EPS), expected, rtol=1e-12, atol=1e-14)
    with vk.use_backend("reference"):
        codes, idx = vk.fsq_quantize(z, levels)
        assert not idx.requires_grad
        (public,) = torch.autograd.grad(codes, z, g)
    torch.testing.assert_close(public, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_input(dtype):
    levels = (8, 5, 5, 5)
    z = (torch.randn(2, 7, 4) * 2).to(dtype).requires_grad_()
    with vk.use_backend("reference"):
        codes, idx = vk.fsq_quantize(z, levels)
        assert codes.dtype == torch.float32 and idx.dtype == torch.int32
        # float32 arithmetic on the upcast input (docs/spec.md §1: all arithmetic is float32)
        ref_codes, ref_idx = rf.fsq_forward(z.detach().float(), levels)
        assert torch.equal(codes, ref_codes) and torch.equal(idx, ref_idx)
        g = torch.randn(2, 7, 4)
        (grad,) = torch.autograd.grad(codes, z, g)
    assert grad.dtype == dtype
    expected = rf.fsq_backward(g.double(), z.detach().double(), levels)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-6}[dtype]
    torch.testing.assert_close(grad.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_out_dtype(out_dtype):
    z = torch.randn(5, 3, 4)
    with vk.use_backend("reference"):
        codes32, _ = vk.fsq_quantize(z, (8, 5, 5, 5))
        codes, _ = vk.fsq_quantize(z, (8, 5, 5, 5), out_dtype=out_dtype)
        codes_h, _ = vk.fsq_quantize(z.half(), (8, 5, 5, 5), out_dtype=torch.float16)
    assert codes.dtype == out_dtype and codes_h.dtype == torch.float16
    assert torch.equal(codes.float(), codes32)  # q / (L // 2) is exact in every float dtype here
    ref, _ = rf.fsq_forward(z.half().float(), (8, 5, 5, 5))
    assert torch.equal(codes_h.float(), ref)


@pytest.mark.parametrize("levels, dtype", [
    ((2,) * 30, torch.int32),
    ((2,) * 31, torch.int64),
    ((2**16, 2**15 - 1), torch.int32),   # prod = 2**31 - 2**16
    ((2**16, 2**15), torch.int64),       # prod = 2**31 exactly
    ((46340, 46341), torch.int32),       # prod = 2**31 - 41708
])
def test_index_dtype_threshold(levels, dtype):
    eps = 1e-7  # large levels need eps * (L - 1) < 1 for every code to be in range
    d = len(levels)
    z = torch.cat([torch.full((1, d), math.inf), torch.full((1, d), -math.inf),
                   torch.randn(3, d, dtype=torch.float64).float() * 3])
    codes, idx = rf.fsq_forward(z, levels, eps)
    assert idx.dtype == dtype
    assert idx[0].item() == math.prod(levels) - 1 and idx[1].item() == 0
    with vk.use_backend("reference"):
        codes2, idx2 = vk.fsq_quantize(z, levels, eps=eps)
        assert idx2.dtype == dtype and torch.equal(idx2, idx)
        decoded = vk.fsq_indices_to_codes(idx2, levels)
    assert torch.equal(decoded, codes)
    for n in range(2, 5):
        qs, bs = zip(*(spec_q(L, float(z[n, j]), eps) for j, L in enumerate(levels)))
        if all(abs(b - math.floor(b) - 0.5) > 1e-3 for b in bs) and max(levels) < 1000:
            assert idx[n].item() == spec_index(qs, levels)


@pytest.mark.parametrize("levels", [(3, 4), (8, 5, 5, 5), (8, 8, 8, 6, 5), (2, 2, 3)])
def test_decode_round_trip_and_table(levels):
    z = torch.randn(4, 9, len(levels)) * 2
    codes, idx = rf.fsq_forward(z, levels)
    assert torch.equal(rf.fsq_decode(idx, levels), codes)
    with vk.use_backend("reference"):
        assert torch.equal(vk.fsq_indices_to_codes(idx, levels), codes)
        # every index decodes to the digits of its mixed-radix expansion
        n = math.prod(levels)
        all_idx = torch.arange(n, dtype=torch.int64)
        dec = vk.fsq_indices_to_codes(all_idx, levels)
    assert dec.dtype == torch.float32 and dec.shape == (n, len(levels))
    for i in range(0, n, max(1, n // 50)):
        rest, expected = i, []
        for L in levels:
            expected.append((rest % L - L // 2) / (L // 2))
            rest //= L
        assert torch.equal(dec[i], torch.tensor(expected, dtype=torch.float64).float()), i


@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
def test_minus_one_decodes_to_nan(itype):
    levels = (3, 4)
    idx = torch.tensor([[0, -1, 11], [-1, 5, 3]], dtype=itype)
    with vk.use_backend("reference"):
        codes = vk.fsq_indices_to_codes(idx, levels)
        codes_nv = vk.fsq_indices_to_codes(idx, levels, validate=False)
    assert codes.shape == (2, 3, 2)
    assert torch.equal(torch.isnan(codes), (idx == -1)[..., None].expand(2, 3, 2))
    assert codes[0, 0].tolist() == [-1.0, -1.0] and codes[0, 2].tolist() == [1.0, 0.5]
    assert torch.equal(codes.nan_to_num(7.0), codes_nv.nan_to_num(7.0))


def test_noncontiguous_and_empty():
    levels = (8, 5, 5, 5)
    z = torch.randn(6, 4, 8)[..., ::2]
    assert not z.is_contiguous()
    with vk.use_backend("reference"):
        codes, idx = vk.fsq_quantize(z, levels)
        ref_codes, ref_idx = rf.fsq_forward(z.contiguous(), levels)
        assert torch.equal(codes, ref_codes) and torch.equal(idx, ref_idx)
        c0, i0 = vk.fsq_quantize(torch.randn(0, 4), levels)
    assert c0.shape == (0, 4) and i0.shape == (0,) and i0.dtype == torch.int32
