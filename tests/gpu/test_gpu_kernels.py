"""The kernels on a CUDA device: compiled Triton and the CUDA C++ extension against the
reference (docs/spec.md §4), the way a user runs them.

Run by ``scripts/gpu_check.sh`` (TRITON_INTERPRET=0, VFT_REQUIRE_CUDA=1). In the main CPU
run (``make test``) they skip, saying why: the suite's other tests run Triton under the
interpreter on CPU tensors, and one process cannot do both. With VFT_REQUIRE_CUDA=1 a
missing device or an interpreted Triton is a failure, never a skip.

Inputs are random (never zeros), with odd sizes and non-contiguous views; outputs are
poisoned (tests/conftest.py); the reference runs on CPU in float64 (the bound's truth) and
in the input dtype (the bound's scale).
"""
import os

import pytest
import torch

import vft_kernels as vk
from vft_kernels import dispatch
from vft_kernels.layout import MODES
from vft_kernels.reference import attention as ref_att
from vft_kernels.reference import fsq as ref_fsq
from vft_kernels.testing import assert_fsq_matches, assert_matches_reference, noncontiguous

REQUIRE = os.environ.get("VFT_REQUIRE_CUDA") == "1"
LOWP = (torch.float16, torch.bfloat16)


def _cannot_run():
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 runs Triton on CPU; run scripts/gpu_check.sh (TRITON_INTERPRET=0)"
    return None


@pytest.fixture(scope="module")
def dev():
    why = _cannot_run()
    if why:
        if REQUIRE:
            pytest.fail(f"VFT_REQUIRE_CUDA=1 but the GPU tests cannot run: {why}")
        pytest.skip(why + " (scripts/gpu_check.sh runs these on a CUDA machine)")
    return torch.device("cuda")


def _backend(name, op):
    """Skip (or, under VFT_REQUIRE_CUDA, fail) when ``name`` cannot run ``op`` on CUDA here."""
    reason = dispatch.backend_status(name) or dispatch._REGISTRY[(op, name)].load()
    if reason:
        if REQUIRE:
            pytest.fail(f"backend {name} cannot run {op} on this CUDA machine: {reason}")
        pytest.skip(f"backend {name}: {reason}")
    return name


FSQ_LEVELS = [(8, 8, 8, 5, 5, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5), (17, 8, 33, 5)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("levels", FSQ_LEVELS, ids=lambda lv: "x".join(map(str, lv)))
def test_fsq_forward_backward(dev, backend, dtype, levels):
    _backend(backend, "fsq_forward")
    torch.manual_seed(0)
    z = (torch.randn(3, 1001, len(levels)) * 2).to(dtype)
    zc = noncontiguous(z.to(dev)).requires_grad_()
    g = torch.randn(z.shape).to(dtype)
    with vk.use_backend(backend):
        codes, idx = vk.fsq_quantize(zc, levels, out_dtype=dtype)
        codes.backward(g.to(dev))
    rc, ri = ref_fsq.fsq_forward(z, levels, 1e-3, dtype)
    near = assert_fsq_matches(codes.cpu(), idx.cpu(), rc, ri, z, levels)
    assert near <= max(2, idx.numel() // 100)
    z64 = z.double().requires_grad_()
    ref_fsq.fsq_forward(z64, levels)[0].backward(g.double())
    zl = z.clone().requires_grad_()
    rcl, _ = ref_fsq.fsq_forward(zl, levels, codes_dtype=dtype)
    rcl.backward(g)
    assert_matches_reference("grad_z", zc.grad.cpu(), z64.grad, zl.grad, dtype)
    with vk.use_backend(backend):
        dec = vk.fsq_indices_to_codes(idx, levels)
    assert torch.equal(dec.cpu(), ref_fsq.fsq_decode(idx.cpu(), levels))


def _attention(backend, q, k, v, layout, keep, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    with vk.use_backend(backend):
        out, lse = vk.register_attention(q, k, v, layout, keep=keep, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    return (out.detach(), lse, *grads)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, fp32_precision", [(torch.float32, "ieee"), (torch.float32, "tf32"),
                                                   (torch.float16, "ieee"), (torch.bfloat16, "ieee")])
@pytest.mark.parametrize("D", [16, 64, 80, 128])  # 80: zero-padded to 128; 16: to 32 in full fp32
def test_attention_triton(dev, monkeypatch, mode, dtype, fp32_precision, D):
    _backend("triton", "attention_forward")
    # PyTorch's switch for fp32 CUDA matmuls; the kernels follow it (README).
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", fp32_precision)
    torch.manual_seed(0)
    layout = vk.RegisterLayout(3, 37, 11, mode)
    keep = torch.tensor([11, 0, 5], dtype=torch.int32)
    B, H, N = 3, 2, layout.seq_len
    q, k, v, dout = (torch.randn(B, H, N, D).to(dtype) for _ in range(4))
    got = _attention("triton", *(noncontiguous(t.to(dev)) for t in (q, k, v)), layout, keep.to(dev), dout.to(dev))
    ref64 = _attention("reference", q.double(), k.double(), v.double(), layout, keep, dout.double())
    ref_lowp = _attention("reference", q, k, v, layout, keep, dout)
    for name, g, r64, rl in zip(("out", "lse", "dq", "dk", "dv"), got, ref64, ref_lowp):
        # fp32 with TF32 allowed: TF32 dot products, bounded like a low-precision input;
        # full-precision fp32 must meet the fp32 bound.
        tol_dtype = torch.bfloat16 if (dtype == torch.float32 and fp32_precision == "tf32") else dtype
        assert_matches_reference(f"{name} {layout}", g.cpu(), r64, rl, tol_dtype, reduction_len=N)


def test_attention_triton_backward_is_deterministic(dev):
    _backend("triton", "attention_backward")
    torch.manual_seed(0)
    layout = vk.RegisterLayout(4, 64, 16, "block_causal_last")
    q, k, v, dout = (torch.randn(2, 4, layout.seq_len, 64, device=dev, dtype=torch.bfloat16) for _ in range(4))
    keep = torch.tensor([16, 3], dtype=torch.int32, device=dev)
    first = _attention("triton", q, k, v, layout, keep, dout)
    for _ in range(3):
        again = _attention("triton", q, k, v, layout, keep, dout)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "triton attention is not bitwise repeatable"


def test_attention_has_no_cuda_cpp_kernel_and_says_so(dev):
    q = torch.randn(1, 1, 6, 16, device=dev)
    with pytest.raises(vk.BackendUnavailableError), vk.use_backend("cuda"):
        vk.register_attention(q, q, q, vk.RegisterLayout(1, 4, 2, "full"))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("guidance", ["none", "cfg", "apg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_step(dev, backend, guidance, dtype):
    _backend(backend, "flow_step")
    torch.manual_seed(0)
    shape = (3, 4, 5, 33, 35)  # > 65,536 elements per sample, odd remainders
    x, vc, vu = (torch.randn(shape).to(dtype) for _ in range(3))
    t, tn = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.45, 0.1])
    kw = dict(guidance=guidance, scale=2.5)
    if guidance != "none":
        kw["v_uncond"] = vu
    if guidance == "apg":
        kw.update(apg_eta=0.3, apg_norm_threshold=40.0)

    def run(backend, device, cast):
        args = {k: (cast(v).to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        with vk.use_backend(backend):
            return vk.flow_step(cast(x).to(device), cast(vc).to(device), t.to(device), tn.to(device), **args)

    got = run(backend, dev, lambda a: a)
    ref64 = run("reference", "cpu", lambda a: a.double())
    ref_lowp = run("reference", "cpu", lambda a: a)
    red = 5 * 33 * 35 * 4 if guidance == "apg" else 1
    assert_matches_reference(f"flow {guidance}", got.cpu(), ref64, ref_lowp, dtype, reduction_len=red)
