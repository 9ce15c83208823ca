"""torch.compile(fullgraph=True) over every public op matches eager; changing `keep`
between calls does not recompile. aot_eager traces the custom ops, their fake kernels
and autograd (and functionalizes the in-place flow ops) without compiling code; one case
goes through inductor."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import vft_kernels as vk


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn, backend="aot_eager"):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, backend=counter, fullgraph=True), counter


def test_fsq_quantize_forward_backward():
    levels = (8, 5, 5, 5)

    def f(z):
        codes, idx = vk.fsq_quantize(z, levels)
        return codes * 2, idx

    cf, counter = compiled(f)
    z = (torch.randn(3, 5, 4) * 2).requires_grad_()
    z2 = z.detach().clone().requires_grad_()
    g = torch.randn(3, 5, 4)
    codes, idx = cf(z)
    codes_e, idx_e = f(z2)
    assert torch.equal(codes, codes_e) and torch.equal(idx, idx_e) and idx.dtype == torch.int32
    codes.backward(g)
    codes_e.backward(g)
    assert torch.equal(z.grad, z2.grad)
    assert counter.frame_count == 1


def test_fsq_inductor_and_decode():
    levels = (7, 5, 5, 5, 5)
    cf, _ = compiled(lambda z: vk.fsq_quantize(z, levels, out_dtype=torch.float16), backend="inductor")
    z = torch.randn(4, 3, 5)
    codes, idx = cf(z)
    codes_e, idx_e = vk.fsq_quantize(z, levels, out_dtype=torch.float16)
    assert codes.dtype == torch.float16 and torch.equal(codes, codes_e) and torch.equal(idx, idx_e)
    dec, _ = compiled(lambda i: vk.fsq_indices_to_codes(i, levels))
    assert torch.equal(dec(idx), vk.fsq_indices_to_codes(idx_e, levels))
    nv, _ = compiled(lambda i: vk.fsq_indices_to_codes(i, levels, validate=False))
    assert torch.equal(nv(idx), vk.fsq_indices_to_codes(idx_e, levels))


@pytest.mark.parametrize("mode", ["full", "block_causal", "block_causal_last"])
def test_register_attention_forward_backward_no_recompile(mode):
    layout = vk.RegisterLayout(3, 3, 2, mode)
    B, H, N, D = 3, 2, layout.seq_len, 8

    def f(q, k, v, keep):
        out, lse = vk.register_attention(q, k, v, layout, keep=keep, return_lse=True)
        return out, lse

    cf, counter = compiled(f)
    for keep_list in ([0, 2, 1], [2, 2, 2], [1, 0, 0]):
        keep = torch.tensor(keep_list, dtype=torch.int32)
        q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
        out, lse = cf(q, k, v, keep)
        qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out_e, lse_e = f(qe, ke, ve, keep)
        assert torch.equal(out, out_e) and torch.equal(lse, lse_e)
        dout = torch.randn_like(out)
        out.backward(dout)
        out_e.backward(dout)
        for a, b in ((q, qe), (k, ke), (v, ve)):
            assert torch.equal(a.grad, b.grad)
    assert counter.frame_count == 1, f"recompiled {counter.frame_count - 1} times when keep changed"


def test_flow_step_variants():
    shape = (2, 3, 4, 5)
    x, vc, vu = (torch.randn(*shape) for _ in range(3))
    for guidance in ("none", "cfg", "apg"):
        def f(x, vc, vu, guidance=guidance):
            return vk.flow_step(x, vc, 0.75, 0.5, vu, guidance, scale=2.0, apg_eta=0.5, apg_norm_threshold=1.0)

        cf, counter = compiled(f)
        assert torch.equal(cf(x, vc, vu), f(x, vc, vu))
        assert counter.frame_count == 1


def test_flow_step_apg_momentum_in_place():
    shape = (2, 3, 2, 3, 2)
    buf_c, buf_e = torch.zeros(shape), torch.zeros(shape)

    def f(x, vc, vu, t, tn, buf):
        return vk.flow_step(x, vc, t, tn, vu, "apg", scale=3.0, apg_momentum=-0.5, momentum=buf)

    cf, counter = compiled(f)
    x_c = x_e = torch.randn(shape)
    for t, tn in ((1.0, 0.7), (0.7, 0.4), (0.4, 0.0)):
        vc, vu = torch.randn(shape), torch.randn(shape)
        tt, tnt = torch.tensor([t, t]), torch.tensor([tn, tn])
        x_c = cf(x_c, vc, vu, tt, tnt, buf_c)
        x_e = f(x_e, vc, vu, tt, tnt, buf_e)
        assert torch.equal(x_c, x_e)
        assert torch.equal(buf_c, buf_e)  # the state was updated in place under compile too
    assert float(buf_c.abs().sum()) > 0
    assert counter.frame_count == 1


def test_bad_keep_raises_under_compile():
    layout = vk.RegisterLayout(2, 2, 1)
    q = torch.randn(2, 1, layout.seq_len, 4)
    cf, _ = compiled(lambda q, keep: vk.register_attention(q, q, q, layout, keep=keep))
    cf(q, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="got 2"):
        cf(q, torch.tensor([1, 2]))


def test_flow_heun_and_prefix():
    shape = (2, 3, 4, 2, 2)
    x, v1, v2 = (torch.randn(*shape) for _ in range(3))
    prefix = torch.randn(2, 3, 1, 2, 2)
    heun, _ = compiled(lambda x, a, b: vk.flow_heun_step(x, a, b, 0.5, 0.25))
    assert torch.equal(heun(x, v1, v2), vk.flow_heun_step(x, v1, v2, 0.5, 0.25))
    pre, _ = compiled(lambda x, a, p: vk.flow_step(x, a, 0.5, 0.25, prefix=p, prefix_len=1))
    got = pre(x, v1, prefix)
    assert torch.equal(got, vk.flow_step(x, v1, 0.5, 0.25, prefix=prefix, prefix_len=1))
    assert torch.equal(got[:, :, :1], prefix)


# --------------------------------------------------------------------------------------
# torch.library.opcheck: schema, fake kernels (shapes/dtypes vs the real op), autograd
# registration and AOT dispatch of every custom op, float32 and float64.

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_fsq(dtype):
    z = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.vft.fsq_quantize, (z, [8, 5, 5, 5], 1e-3, None))
    torch.library.opcheck(torch.ops.vft.fsq_quantize, (z, [8, 5, 5, 5], 1e-3, torch.float16))
    torch.library.opcheck(torch.ops.vft.fsq_quantize_backward, (torch.randn(3, 4), z.detach(), [8, 5, 5, 5], 1e-3))
    idx = torch.tensor([[0, 5, 11], [999, 3, 7]], dtype=torch.int32)  # no -1: opcheck compares NaN != NaN
    torch.library.opcheck(torch.ops.vft.fsq_indices_to_codes, (idx, [8, 5, 5, 5], True))


@pytest.mark.parametrize("keep", [[0, 1], [[0, 1], [1, 0]]], ids=["keep_B", "keep_BT"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_attention(dtype, keep):
    layout = vk.RegisterLayout(2, 3, 1)
    q, k, v = (torch.randn(2, 1, layout.seq_len, 4, dtype=dtype, requires_grad=True) for _ in range(3))
    keep = torch.tensor(keep, dtype=torch.int32)
    args = (2, 3, 1, "block_causal_last", keep, 0.5)
    torch.library.opcheck(torch.ops.vft.register_attention, (q, k, v) + args)
    out, lse = torch.ops.vft.register_attention(q.detach(), k.detach(), v.detach(), *args)
    torch.library.opcheck(torch.ops.vft.register_attention_backward,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse) + args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_flow(dtype):
    shape = (2, 3, 2, 2)
    x, vc, vu, out, mom = (torch.randn(*shape, dtype=dtype) for _ in range(5))
    t, tn = torch.tensor([0.5, 0.75]), torch.tensor([0.25, 0.5])
    torch.library.opcheck(torch.ops.vft.flow_step,
                          (out, x, vc, vu, t, tn, "apg", 2.0, 0.5, 1.0, 0.5, mom, 3, None, 0))
    torch.library.opcheck(torch.ops.vft.flow_step,
                          (out, x, vc, None, t, tn, "none", 1.0, 0.0, 0.0, 0.0, None, 2, x[:, :, :1].clone(), 1))
    torch.library.opcheck(torch.ops.vft.flow_heun_step, (out, x, vc, vu, t, tn))


def test_packed_register_attention_no_recompile_and_opcheck():
    """Packed calls under torch.compile: new offsets (same sample count) and new keep values
    reuse the graph; offsets are validated inside the op, also when compiled."""
    layout = vk.RegisterLayout(3, 3, 2, "block_causal_last")
    N = 40

    def f(q, k, v, keep, cu):
        return vk.register_attention(q, k, v, layout, keep=keep, cu_seqlens=cu)

    cf, counter = compiled(f)
    for cu_list, keep_list in (([0, 15, 20, 30], [2, 0, 1]), ([0, 5, 20, 35], [1, 2, 2]), ([0, 0, 10, 25], [0, 1, 2])):
        cu = torch.tensor(cu_list, dtype=torch.int32)
        keep = torch.tensor(keep_list, dtype=torch.int32)
        q, k, v = (torch.randn(1, 2, N, 8, requires_grad=True) for _ in range(3))
        out = cf(q, k, v, keep, cu)
        assert torch.equal(out, f(q, k, v, keep, cu))
        out.sum().backward()
    assert counter.frame_count == 1, f"recompiled {counter.frame_count - 1} times when cu_seqlens changed"
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        cf(q, k, v, keep, torch.tensor([0, 7, 20, 35], dtype=torch.int32))
    cu = torch.tensor([0, 15, 20, 30], dtype=torch.int32)
    args = (3, 3, 2, "block_causal_last", torch.tensor([2, 0, 1], dtype=torch.int32), 0.5, cu, False)
    q, k, v = (torch.randn(1, 1, N, 4, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.vft.register_attention, (q, k, v) + args)
