"""Every CPU capability this machine supports (the ISA variants of csrc/include/vft/isa.h)
gives the baseline's results: bitwise where the arithmetic is the same (FSQ codes, indices and
gradients, index decoding, the flow steps, the block ops: every variant is compiled with
-ffp-contract=off and sums in a fixed order), and within the tolerance rule against the
float64 reference where it differs (attention: vector softmax rows and other tile products).
The capability tests run whatever levels the CPU has; the portable baseline always."""
import pytest
import torch

import vft_kernels as vk
from vft_kernels import _ext
from vft_kernels.reference import attention as ref_att
from vft_kernels.testing import assert_matches_reference

pytestmark = pytest.mark.skipif(_ext.C is None, reason=f"vft_kernels._C did not load: {_ext.load_error}")


def _supported():
    return vk.cpu_capabilities()["supported"] if _ext.C is not None else []


def _others():
    return [c for c in _supported() if c != "baseline"]


def _run_all(fn):
    """{capability: fn()} for every supported capability (outputs detached, on the CPU)."""
    out = {}
    for cap in _supported():
        torch.manual_seed(0)
        with vk.use_backend("cpu"), vk.use_cpu_capability(cap):
            assert vk.cpu_capability() == cap
            out[cap] = fn()
    return out


def _assert_bitwise(results):
    base = results["baseline"]
    for cap, got in results.items():
        for i, (g, b) in enumerate(zip(got, base)):
            assert g.dtype == b.dtype and g.shape == b.shape
            # bits, so that NaN == NaN and -0.0 != 0.0
            gb = g.view(torch.int16) if g.element_size() == 2 else g.view(torch.int32) if g.element_size() == 4 else g
            bb = b.view(torch.int16) if b.element_size() == 2 else b.view(torch.int32) if b.element_size() == 4 else b
            assert torch.equal(gb, bb), f"{cap}: output {i} differs from baseline in {int((gb != bb).sum())} elements"


def test_this_machine_has_several_capabilities_or_says_why():
    caps = vk.cpu_capabilities()
    assert caps["supported"][0] == "baseline" and "baseline" in caps["compiled"]
    if not _others():
        pytest.skip(f"this CPU supports only the baseline ({caps['features']})")


def _fsq_inputs(dtype, d, rows=1037):
    z = torch.randn(rows, d) * 3
    z[5, 0] = float("nan")
    z[7, -1] = float("inf")
    z[9, 0] = -float("inf")
    z[11] = 0.0
    return z.to(dtype)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (8, 8, 8, 5, 5, 5), (7, 5, 5, 5, 5), (3,) * 13, (17, 40, 5),
                                    (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fsq_forward_backward_decode_bitwise_equal_across_capabilities(levels, dtype):
    z0 = _fsq_inputs(dtype, len(levels))
    g = torch.randn(z0.shape).to(dtype)

    def run():
        z = z0.clone().requires_grad_()
        codes, idx = vk.fsq_quantize(z, levels, out_dtype=dtype)
        (grad,) = torch.autograd.grad(codes, z, g)
        strided = vk.fsq_quantize(z0.t().contiguous().t(), levels)  # the strided load path
        dec = vk.fsq_indices_to_codes(idx, levels)
        return codes.detach(), idx, grad, strided[0], strided[1], dec

    _assert_bitwise(_run_all(run))


_ALL_BF16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


_FSQ_PATH_LEVELS = [(8, 8, 8, 5, 5, 5), (16, 15, 3), (7, 5, 5, 5, 5), (2, 3, 4, 5, 6, 7, 8, 2, 2, 3), (5,) * 16, (16,) * 8,
                    (999, 999, 999, 3)]


def _fsq_every_dtype(levels, inputs):
    """fn() -> codes and indices of each input, with codes in its dtype and in float32."""
    def run():
        out = []
        for z in inputs:
            for out_dtype in dict.fromkeys((z.dtype, torch.float32)):
                out += list(vk.fsq_quantize(z, levels, out_dtype=out_dtype))
        return out

    return run


@pytest.mark.parametrize("levels", _FSQ_PATH_LEVELS, ids=lambda lv: "x".join(map(str, lv)))
def test_fsq_forward_every_bf16_value_bitwise_equal(levels):
    """The explicit AVX2 / AVX-512 forward paths (16-bit key counting on dense bf16, the
    float element loop, index packing; int64 indices: (16,)*8 counts thresholds,
    (999, 999, 999, 3) takes tanh) give the baseline's bits on every bf16 value in every dim
    (+-0, subnormals, +-inf, NaNs of both signs), as bf16 and as float32."""
    every = torch.stack([_ALL_BF16.roll(1237 * j) for j in range(len(levels))], 1)
    _assert_bitwise(_run_all(_fsq_every_dtype(levels, [every, every.float()])))


@pytest.mark.parametrize("levels", _FSQ_PATH_LEVELS, ids=lambda lv: "x".join(map(str, lv)))
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 31, 33, 1000])
def test_fsq_forward_odd_sizes_and_strides_bitwise_equal(levels, rows):
    """Row counts around the 16- and 32-row blocks (partial blocks take the load/store
    paths), contiguous and strided inputs, bf16 and float32: the baseline's bits."""
    d = len(levels)
    z = _fsq_inputs(torch.bfloat16, d, rows=rows + 12)[:rows]
    wide = torch.randn(rows, 2 * d).to(torch.bfloat16)
    inputs = [z, z.float(), wide[:, ::2], wide[:, ::2].float(), z.t().contiguous().t(), wide[::1, 1::2].float()]
    _assert_bitwise(_run_all(_fsq_every_dtype(levels, inputs)))


@pytest.mark.parametrize("guidance", ["none", "cfg", "apg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flow_steps_bitwise_equal_across_capabilities(guidance, dtype):
    shape = (3, 4, 5, 9, 7)
    x, vc, vu = (torch.randn(shape).to(dtype) for _ in range(3))
    t, tn = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.25, 0.1])

    def run():
        kw = {}
        if guidance == "apg":
            kw = dict(apg_eta=0.3, apg_norm_threshold=2.0, apg_momentum=-0.5, momentum=torch.ones(shape))
        out = vk.flow_step(x, vc, t, tn, v_uncond=None if guidance == "none" else vu, guidance=guidance, scale=2.5,
                           **kw)
        heun = vk.flow_heun_step(x, vc, vu, t, tn)
        return (out, heun) + ((kw["momentum"],) if kw else ())

    _assert_bitwise(_run_all(run))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_ops_bitwise_equal_across_capabilities(dtype):
    lay = vk.RegisterLayout(2, 21, 3, "block_causal_last")
    B, T, S, W = 2, 2, 24, 72
    x0, h0 = (torch.randn(B, T, S, W).to(dtype) for _ in range(2))
    gate0, scale0, shift0 = (torch.randn(B, T, 2, W).to(dtype) for _ in range(3))
    gu0 = torch.randn(5, 7, 2 * 51).to(dtype)
    qkv0 = torch.randn(2, 19, 3 * 3 * 40).to(dtype)
    qw0, kw0 = torch.randn(40), torch.randn(40)

    def run():
        x, h, gate, scale, shift, gu, qkv, qw, kw = (t.clone().requires_grad_() for t in
                                                     (x0, h0, gate0, scale0, shift0, gu0, qkv0, qw0, kw0))
        x_new, y = vk.gated_residual_norm(x, gate, h, lay, scale=scale, shift=shift)
        sw = vk.swiglu(gu)
        q, k, v = vk.qk_rms_norm(qkv, 3, qw, kw)
        outs = (x_new, y, sw, q, k, v)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
        grads = torch.autograd.grad(loss, (x, h, gate, scale, shift, gu, qkv, qw, kw))
        return tuple(o.detach() for o in outs) + grads

    _assert_bitwise(_run_all(run))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["block_causal_last", "full"])
def test_attention_every_capability_within_tolerance(dtype, mode):
    lay = vk.RegisterLayout(3, 50, 14, mode)  # N = 192: full and partial 64-key tiles
    N, scale = lay.seq_len, 40 ** -0.5
    q0, k0, v0, do = (torch.randn(2, 3, N, 40).to(dtype) for _ in range(4))
    keep = torch.tensor([14, 5])

    def grads(fn, dt):
        q, k, v = (t.detach().to(dt).requires_grad_() for t in (q0, k0, v0))
        out, lse = fn(q, k, v)
        return (out.detach(), lse.detach()) + torch.autograd.grad(out, (q, k, v), do.to(dt))

    def run():
        return grads(lambda q, k, v: vk.register_attention(q, k, v, lay, keep=keep, scale=scale, return_lse=True),
                     dtype)

    results = _run_all(run)
    want64 = grads(lambda q, k, v: ref_att.attention_forward(q, k, v, lay, keep, scale), torch.float64)
    want_low = grads(lambda q, k, v: ref_att.attention_forward(q, k, v, lay, keep, scale), dtype)
    for cap, got in results.items():
        for name, g, w64, wl in zip(("out", "lse", "dq", "dk", "dv"), got, want64, want_low):
            assert_matches_reference(f"{cap} {mode} {name}", g, w64, wl, dtype, reduction_len=N)
