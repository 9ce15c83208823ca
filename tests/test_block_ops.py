"""Transformer-block ops (docs/spec_block_ops.md): the reference against independent
formulations, the CPU kernels against the reference (docs/spec.md §4 rule, poisoned outputs,
odd sizes, non-contiguous inputs, every claimed dtype, forward and backward), the public
API's autograd and errors, torch.library.opcheck, and the model with the ops on the CPU
kernels vs the reference backend (one step's loss and gradients; a short training run).
The Triton kernels have their own file (test_block_triton.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vft_kernels as vk
from vft_kernels.reference import block as ref
from vft_kernels.testing import assert_matches_reference, noncontiguous, poison_outputs, stable_seed

cb = pytest.importorskip("vft_kernels.cpp.block", reason="vft_kernels._C (CPU block kernels) is not built",
                         exc_type=ImportError)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _maybe_nc(t, nc):
    return noncontiguous(t) if (nc and t is not None) else t


# (B, T, S, W, P, K of gate, K of scale / shift)
NORM_CASES = [
    (2, 3, 7, 33, 4, 2, 2),
    (1, 1, 5, 5, 0, 2, 1),     # no patch tokens
    (3, 2, 6, 24, 6, 1, 2),    # no register tokens
    (2, 1, 1, 1, 1, 2, 2),     # one token of width 1
    (1, 4, 80, 128, 64, 2, 2),  # the tiny decoder's shape, one sample
]


def _norm_inputs(case, seed=0):
    B, T, S, W, P, Kg, Ks = case
    g = _gen(seed)
    x = torch.randn(B, T, S, W, generator=g) * 2 + 0.5
    h = torch.randn(B, T, S, W, generator=g)
    gate = torch.randn(B, T, Kg, W, generator=g)
    scale = torch.randn(B, T, Ks, W, generator=g) * 0.5
    shift = torch.randn(B, T, Ks, W, generator=g)
    d_res = torch.randn(B, T, S, W, generator=g)
    dy = torch.randn(B, T, S, W, generator=g)
    return x, gate, h, scale, shift, d_res, dy


# ------------------------------------------------------------------------------------
# The reference is what it claims to be


def test_reference_matches_independent_formulas():
    x, gate, h, scale, shift, _, _ = _norm_inputs((2, 3, 7, 9, 4, 2, 2))
    P = 4
    x, gate, h, scale, shift = (t.double() for t in (x, gate, h, scale, shift))
    ln = torch.nn.LayerNorm(9, elementwise_affine=False, eps=EPS).double()
    y = ref.modulated_layer_norm(x, scale, shift, P, EPS)
    for s in range(7):
        k = 0 if s < P else 1
        want = ln(x[:, :, s]) * (1 + scale[:, :, k]) + shift[:, :, k]
        torch.testing.assert_close(y[:, :, s], want)
        torch.testing.assert_close(ref.gated_residual(x, gate, h, P)[:, :, s], x[:, :, s] + gate[:, :, k] * h[:, :, s])
    gu = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(ref.swiglu(gu), F.silu(gu[:, :5]) * gu[:, 5:])
    qkv = torch.randn(2, 5, 3 * 2 * 4, dtype=torch.float64)
    wq, wk = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    q, k, v = ref.qk_rms_norm(qkv, 2, wq, wk, 1e-6)
    rms = torch.nn.RMSNorm(4, eps=1e-6).double()
    with torch.no_grad():
        rms.weight.copy_(wq)
    torch.testing.assert_close(q, rms(qkv[..., :8].reshape(2, 5, 2, 4).transpose(1, 2)))
    torch.testing.assert_close(v, qkv[..., 16:].reshape(2, 5, 2, 4).transpose(1, 2))


def test_reference_backward_matches_autograd():
    x, gate, h, scale, shift, d_res, dy = (t.double() for t in _norm_inputs((2, 2, 6, 7, 3, 2, 1)))
    leaves = [t.clone().requires_grad_() for t in (x, gate, h, scale, shift)]
    x_new, y = ref.gated_residual_norm(*leaves, 3, EPS)
    want = torch.autograd.grad([x_new, y], leaves, [d_res, dy])
    got = ref.block_norm_backward(d_res, dy, x_new.detach(), gate, h, scale, shift, 3, EPS)
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_, w)


# ------------------------------------------------------------------------------------
# CPU kernels vs the reference


def _check_all(names, got, want64, want_lowp, dtype, lens):
    for name, o, a, b, n in zip(names, got, want64, want_lowp, lens):
        if a is None:
            assert o is None, f"{name}: expected None"
            continue
        assert o.dtype == b.dtype, f"{name}: dtype {o.dtype} != {b.dtype}"
        assert_matches_reference(name, o, a, b, dtype, reduction_len=n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", NORM_CASES)
@pytest.mark.parametrize("which", ["fused", "norm", "residual"])
@pytest.mark.parametrize("nc", [False, True])
def test_cpu_block_norm_matches_reference(dtype, case, which, nc):
    x, gate, h, scale, shift, d_res, dy = _norm_inputs(case, seed=stable_seed(which, nc))
    if which == "norm":
        gate = h = d_res = None
    if which == "residual":
        scale = shift = dy = None
    P, S, W = case[4], case[2], case[3]
    fwd = [x, gate, h, scale, shift]
    with poison_outputs():
        got = cb.block_norm_forward(*[_maybe_nc(_cast(t, dtype), nc) for t in fwd], P, EPS)
    want64 = ref.block_norm_forward(*[_cast(t, torch.float64) for t in fwd], P, EPS)
    lowp = ref.block_norm_forward(*[_cast(t, dtype) for t in fwd], P, EPS)
    _check_all(["x_new", "y"], got, want64, lowp, dtype, [1, W])
    # backward, at the norm input the op saves (x_new rounded to dtype, or x)
    xn = _cast(lowp[0], torch.float64) if h is not None else x.double()
    bwd = [d_res, dy, xn, gate, h, scale, shift]
    with poison_outputs():
        got = cb.block_norm_backward(*[_maybe_nc(_cast(t, dtype), nc) for t in bwd], P, EPS)
    want64 = ref.block_norm_backward(*[_cast(t, torch.float64) for t in bwd], P, EPS)
    lowp = ref.block_norm_backward(*[_cast(t, dtype) for t in bwd], P, EPS)
    _check_all(["dx", "dgate", "dh", "dscale", "dshift"], got, want64, lowp, dtype, [W, S, W, S, S])


def test_cpu_block_norm_missing_grads_and_empty():
    x, gate, h, scale, shift, d_res, dy = _norm_inputs((2, 2, 5, 6, 2, 2, 2))
    got = cb.block_norm_backward(None, dy, x, gate, h, scale, shift, 2, EPS)
    want = ref.block_norm_backward(None, dy.double(), x.double(), gate.double(), h.double(), scale.double(),
                                   shift.double(), 2, EPS)
    _check_all(["dx", "dgate", "dh", "dscale", "dshift"], got, want, ref.block_norm_backward(
        None, dy, x, gate, h, scale, shift, 2, EPS), torch.float32, [6, 5, 6, 5, 5])
    got = cb.block_norm_backward(d_res, None, x, gate, h, scale, shift, 2, EPS)
    assert torch.equal(got[3], torch.zeros_like(scale)) and torch.equal(got[4], torch.zeros_like(shift))
    assert torch.equal(got[0], d_res)
    e = torch.empty(2, 0, 5, 6)
    em = torch.empty(2, 0, 2, 6)
    x_new, y = cb.block_norm_forward(e, em, e, em, em, 2, EPS)
    assert x_new.shape == e.shape and y.shape == e.shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 2 * 37), (2, 3, 2 * 512), (1, 2), (4, 2 * 9)])
@pytest.mark.parametrize("nc", [False, True])
def test_cpu_swiglu_matches_reference(dtype, shape, nc):
    g = _gen(1)
    gu = torch.randn(*shape, generator=g) * 3
    dout = torch.randn(*shape[:-1], shape[-1] // 2, generator=g)
    with poison_outputs():
        out = cb.swiglu_forward(_maybe_nc(gu.to(dtype), nc))
        dgu = cb.swiglu_backward(_maybe_nc(dout.to(dtype), nc), _maybe_nc(gu.to(dtype), nc))
    assert_matches_reference("swiglu", out, ref.swiglu_forward(gu.double()), ref.swiglu_forward(gu.to(dtype)), dtype)
    assert_matches_reference("dgate_up", dgu, ref.swiglu_backward(dout.double(), gu.double()),
                             ref.swiglu_backward(dout.to(dtype), gu.to(dtype)), dtype)


def test_cpu_swiglu_wide_range_and_non_finite():
    """The kernel's own exp: accurate over the whole float range, 0 / inf at the ends, NaN kept."""
    a = torch.cat([torch.linspace(-120, 120, 40001), torch.tensor([float("nan"), float("inf"), -float("inf")])])
    gu = torch.stack([a, torch.ones_like(a)], dim=-1).reshape(-1, 2)
    out = cb.swiglu_forward(gu)[:, 0]
    want = ref.swiglu(gu.double())[:, 0]
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and bool(torch.isnan(out[-3]))
    assert out[-2] == float("inf")
    finite = torch.isfinite(want)
    assert_matches_reference("silu wide", out[finite], want[finite], ref.swiglu(gu)[:, 0][finite], torch.float32)


# (B, N, heads, D)
QK_CASES = [(2, 9, 3, 10), (1, 1, 1, 1), (2, 80, 4, 32), (1, 5, 2, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", QK_CASES)
@pytest.mark.parametrize("nc", [False, True])
def test_cpu_qk_norm_matches_reference(dtype, case, nc):
    B, N, H, D = case
    g = _gen(2)
    qkv = torch.randn(B, N, 3 * H * D, generator=g) * 2
    wq, wk = torch.randn(D, generator=g), torch.randn(D, generator=g)
    grads = [torch.randn(B, H, N, D, generator=g) for _ in range(3)]
    with poison_outputs():
        got = cb.qk_norm_forward(_maybe_nc(qkv.to(dtype), nc), H, wq, wk, 1e-6)
    want = ref.qk_norm_forward(qkv.double(), H, wq.double(), wk.double(), 1e-6)
    lowp = ref.qk_norm_forward(qkv.to(dtype), H, wq, wk, 1e-6)
    _check_all(["q", "k", "v"], got, want, lowp, dtype, [D, D, 1])
    with poison_outputs():
        got = cb.qk_norm_backward(*[_maybe_nc(t.to(dtype), nc) for t in grads], qkv.to(dtype), H, wq, wk, 1e-6)
    want = ref.qk_norm_backward(*[t.double() for t in grads], qkv.double(), H, wq.double(), wk.double(), 1e-6)
    lowp = ref.qk_norm_backward(*[t.to(dtype) for t in grads], qkv.to(dtype), H, wq, wk, 1e-6)
    _check_all(["dqkv", "dq_weight", "dk_weight"], got, want, lowp, dtype, [D, B * N * H, B * N * H])


# ------------------------------------------------------------------------------------
# QK-LayerNorm (spec 5.5): the official attention's Fp32LayerNorm on the split heads


def _official_qk_layer_norm(qkv, heads, eps=EPS):
    """What the official FlexTok / VideoFlexTok attention computes from q | k | v: each part
    rearranged "b n (h d) -> b h n d", then Fp32LayerNorm(D, bias=False,
    elementwise_affine=False) on q and k, i.e. F.layer_norm(x.float(), (D,), eps).type_as(x)."""
    B, N, W3 = qkv.shape
    q, k, v = (t.reshape(B, N, heads, -1).transpose(1, 2) for t in qkv.split(W3 // 3, dim=-1))

    def norm(x):
        return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)
    return norm(q), norm(k), v


def _qkv(B, N, H, D, seed):
    """qkv [B, N, 3 H D] with a per-head offset (the centring matters) and spread."""
    g = _gen(seed)
    x = torch.randn(B, N, 3, H, D, generator=g) * (0.5 + torch.rand(1, 1, 3, H, 1, generator=g) * 2)
    x = x + torch.randn(1, 1, 3, H, 1, generator=g) * 3
    return x.reshape(B, N, 3 * H * D)


# (B, N, heads, D)
QK_LN_CASES = [(2, 9, 3, 13), (1, 97, 2, 59), (1, 1, 1, 1), (2, 5, 1, 64)]


def test_reference_qk_layer_norm_is_the_official_formula():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        qkv = _qkv(2, 7, 3, 13, seed=20).to(dtype)
        for got, want in zip(ref.qk_layer_norm(qkv, 3, EPS), _official_qk_layer_norm(qkv, 3)):
            assert got.dtype == dtype and torch.equal(got, want), f"{dtype}: reference != official formula"
    # float64: nn.LayerNorm on the split heads, and the backward's closed form
    qkv = _qkv(2, 7, 3, 13, seed=21).double()
    ln = torch.nn.LayerNorm(13, elementwise_affine=False, eps=EPS).double()
    q, k, v = ref.qk_layer_norm(qkv, 3, EPS)
    torch.testing.assert_close(q, ln(qkv[..., :39].reshape(2, 7, 3, 13).transpose(1, 2)))
    torch.testing.assert_close(k, ln(qkv[..., 39:78].reshape(2, 7, 3, 13).transpose(1, 2)))
    assert torch.equal(v, qkv[..., 78:].reshape(2, 7, 3, 13).transpose(1, 2))
    grads = [torch.randn(2, 3, 7, 13, generator=_gen(22), dtype=torch.float64) for _ in range(3)]
    dqkv, dwq, dwk = ref.qk_norm_backward(*grads, qkv, 3, None, None, EPS, True)
    assert dwq is None and dwk is None

    def closed_form(x, g):  # dx = (g - mean(g) - xhat mean(g xhat)) / sigma
        sigma = (x.var(-1, unbiased=False, keepdim=True) + EPS).sqrt()
        xhat = (x - x.mean(-1, keepdim=True)) / sigma
        return (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) / sigma

    q, k, _ = ref.split_heads(qkv, 3)
    want = torch.stack([closed_form(q, grads[0]), closed_form(k, grads[1]), grads[2]])  # [3, B, H, N, D]
    torch.testing.assert_close(dqkv, want.permute(1, 3, 0, 2, 4).reshape(qkv.shape))


def test_reference_qk_layer_norm_is_the_official_module():
    """The pinned official Fp32LayerNorm itself (../shared/third_party), where present."""
    from benchmarks.bench_integrations import official_on_path
    official_on_path()
    norm_mod = pytest.importorskip("videoflextok.model.layers.norm",
                                   reason="the official videoflextok code (../shared/third_party) is missing")
    norm = norm_mod.Fp32LayerNorm(13, bias=False, elementwise_affine=False)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        qkv = _qkv(2, 7, 3, 13, seed=23).to(dtype)
        B, N, W3 = qkv.shape
        heads = [t.reshape(B, N, 3, 13).transpose(1, 2) for t in qkv.split(W3 // 3, dim=-1)]
        want = (norm(heads[0]), norm(heads[1]), heads[2])
        with vk.use_backend("reference"):
            for got, w in zip(vk.qk_layer_norm(qkv, 3), want):
                assert torch.equal(got, w), f"{dtype}: reference backend != official Fp32LayerNorm"
        with vk.use_backend("cpu"):
            got = vk.qk_layer_norm(qkv, 3)
        r64 = ref.qk_norm_forward(qkv.double(), 3, None, None, EPS, True)
        _check_all(["q", "k", "v"], got, r64, want, dtype, [13, 13, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", QK_LN_CASES)
@pytest.mark.parametrize("nc", [False, True])
def test_cpu_qk_layer_norm_matches_reference(dtype, case, nc):
    B, N, H, D = case
    qkv = _qkv(B, N, H, D, seed=30 + D)
    grads = [torch.randn(B, H, N, D, generator=_gen(40 + D)) for _ in range(3)]
    with poison_outputs():
        got = cb.qk_norm_forward(_maybe_nc(qkv.to(dtype), nc), H, None, None, EPS, True)
    want = ref.qk_norm_forward(qkv.double(), H, None, None, EPS, True)
    lowp = _official_qk_layer_norm(qkv.to(dtype), H)
    for t in got:
        assert t.is_contiguous()
    _check_all(["q", "k", "v"], got, want, lowp, dtype, [D, D, 1])
    with poison_outputs():
        got = cb.qk_norm_backward(*[_maybe_nc(t.to(dtype), nc) for t in grads], _maybe_nc(qkv.to(dtype), nc), H,
                                  None, None, EPS, True)
    want = ref.qk_norm_backward(*[t.double() for t in grads], qkv.double(), H, None, None, EPS, True)
    lowp = ref.qk_norm_backward(*[t.to(dtype) for t in grads], qkv.to(dtype), H, None, None, EPS, True)
    _check_all(["dqkv", "dq_weight", "dk_weight"], got, want, lowp, dtype, [D, 1, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nc", [False, True])
def test_public_qk_layer_norm_autograd_cpu(dtype, nc):
    """vk.qk_layer_norm on the cpu kernels: outputs and d qkv (random upstream gradient)
    against the reference in float64, bounded by the official formula in ``dtype``."""
    B, N, H, D = 2, 97, 2, 59
    qkv = _qkv(B, N, H, D, seed=50)
    grads = [torch.randn(B, H, N, D, generator=_gen(51)) for _ in range(3)]

    def run(backend, dt, fn):
        leaf = qkv.to(dt, copy=True).requires_grad_()
        with vk.use_backend(backend):
            outs = fn(_maybe_nc(leaf, nc))
        return list(outs) + list(torch.autograd.grad(outs, leaf, [g.to(dt) for g in grads]))

    got = run("cpu", dtype, lambda x: vk.qk_layer_norm(x, H))
    for t in got[:3]:
        assert t.is_contiguous() and t.shape == (B, H, N, D)
    want = run("reference", torch.float64, lambda x: vk.qk_layer_norm(x, H))
    lowp = run("reference", dtype, lambda x: _official_qk_layer_norm(x, H))
    for name, o, a, b, n in zip(["q", "k", "v", "dqkv"], got, want, lowp, [D, D, 1, D]):
        assert_matches_reference(f"qk_layer_norm {name}", o, a, b, dtype, reduction_len=n)


# ------------------------------------------------------------------------------------
# Public API: autograd on the cpu backend vs the reference backend, opcheck, errors


def _public_run(backend, dtype, fn, inputs, grads):
    leaves = [t.to(dtype).clone().requires_grad_() for t in inputs]
    with vk.use_backend(backend):
        outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return list(outs) + list(torch.autograd.grad(outs, leaves, [g.to(dtype) for g in grads]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_ops_autograd_cpu_vs_reference(dtype):
    x, gate, h, scale, shift, d_res, dy = _norm_inputs((2, 3, 7, 33, 4, 2, 2), seed=5)
    layout = vk.RegisterLayout(3, 4, 3, "block_causal")
    cases = [
        (lambda x, g, h, s, b: vk.gated_residual_norm(x, g, h, layout, scale=s, shift=b, eps=EPS),
         (x, gate, h, scale, shift), (d_res, dy), 7 * 33),
        (lambda x, s, b: vk.modulated_layer_norm(x, layout, scale=s, shift=b, eps=EPS), (x, scale, shift), (dy,),
         7 * 33),
        (lambda *a: vk.gated_residual(*a, 4), (x, gate, h), (d_res,), 7),
        (vk.swiglu, (torch.randn(3, 5, 18),), (torch.randn(3, 5, 9),), 1),
        (vk.swiglu, (torch.randn(3, 5, 18), torch.randn(7, 9)), (torch.randn(3, 5, 7),), 15),
        (lambda *a: vk.qk_rms_norm(a[0], 2, a[1], a[2]), (torch.randn(2, 5, 3 * 2 * 6), torch.randn(6),
                                                          torch.randn(6)),
         tuple(torch.randn(2, 2, 5, 6) for _ in range(3)), 60),
    ]
    for fn, inputs, grads, n in cases:
        got = _public_run("cpu", dtype, fn, inputs, grads)
        want = _public_run("reference", torch.float64, fn, inputs, grads)
        lowp = _public_run("reference", dtype, fn, inputs, grads)
        for i, (o, a, b) in enumerate(zip(got, want, lowp)):
            assert_matches_reference(f"public output/grad {i}", o, a, b, dtype, reduction_len=n)


def test_swiglu_with_projection_keeps_only_gate_up_for_backward():
    """The fused down projection recomputes the activation: autograd holds gate_up and the
    weight, not the [..., H] activation the unfused pair keeps."""
    gu = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(8, 32, requires_grad=True)

    def saved(backend):
        sizes = []
        with vk.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.append(tuple(t.shape)) or t, lambda t: t):
            vk.swiglu(gu, w)
        return sizes

    assert (4, 32) not in saved("cpu") and (4, 32) in saved("reference")


def test_public_ops_run_the_selected_backend():
    x, gate, h, scale, shift, _, _ = _norm_inputs((1, 2, 5, 8, 2, 2, 2))
    with vk.use_backend("cpu"):
        x_new, y = vk.gated_residual_norm(x.requires_grad_(), gate, h, 2, scale=scale, shift=shift)
    assert "vft::block_norm" in str(x_new.grad_fn.name()) or "block_norm" in type(x_new.grad_fn).__name__
    with vk.use_backend("reference"):
        x_new, y = vk.gated_residual_norm(x, gate, h, 2, scale=scale, shift=shift)
    assert "block_norm" not in type(x_new.grad_fn).__name__


def test_opcheck_block_ops():
    x, gate, h, scale, shift, _, _ = _norm_inputs((1, 2, 5, 8, 2, 2, 1))
    args = [t.requires_grad_() for t in (x, gate, h, scale, shift)]
    with vk.use_backend("cpu"):
        torch.library.opcheck(torch.ops.vft.block_norm, (*args, 2, EPS))
        torch.library.opcheck(torch.ops.vft.block_norm, (args[0], None, None, args[3], args[4], 2, EPS))
        torch.library.opcheck(torch.ops.vft.block_norm, (args[0], args[1], args[2], None, None, 2, EPS))
        torch.library.opcheck(torch.ops.vft.swiglu, (torch.randn(3, 10, requires_grad=True),))
        torch.library.opcheck(torch.ops.vft.swiglu_linear, (torch.randn(2, 3, 10, requires_grad=True),
                                                            torch.randn(4, 5, requires_grad=True)))
        torch.library.opcheck(torch.ops.vft.qk_rms_norm, (torch.randn(2, 3, 24, requires_grad=True), 2,
                                                          torch.randn(4, requires_grad=True),
                                                          torch.randn(4, requires_grad=True), 1e-6))
        torch.library.opcheck(torch.ops.vft.qk_layer_norm, (torch.randn(2, 3, 39, requires_grad=True), 1, 1e-5))


def test_block_ops_bad_input_errors():
    x = torch.randn(2, 3, 7, 8)
    m = torch.randn(2, 3, 2, 8)
    layout = vk.RegisterLayout(3, 4, 3, "block_causal")
    with pytest.raises(ValueError, match=r"x must be \[B, T, S, W\]"):
        vk.modulated_layer_norm(x[0], layout, scale=m, shift=m)
    with pytest.raises(ValueError, match="does not match the layout"):
        vk.modulated_layer_norm(x, vk.RegisterLayout(3, 5, 3, "block_causal"), scale=m, shift=m)
    with pytest.raises(ValueError, match=r"scale must be \[B, T, K, W\]"):
        vk.modulated_layer_norm(x, layout, scale=torch.randn(2, 3, 3, 8), shift=m)
    with pytest.raises(TypeError, match="dtype of x"):
        vk.modulated_layer_norm(x, layout, scale=m.double(), shift=m)
    with pytest.raises(TypeError, match="float tensor"):
        vk.gated_residual(x.long(), m, x, layout)
    with pytest.raises(ValueError, match="h must have the shape of x"):
        vk.gated_residual(x, m, x[:, :, :6], layout)
    with pytest.raises(ValueError, match=r"patches must be in \[0, S = 7\]"):
        vk.gated_residual(x, m, x, 8)
    with pytest.raises(TypeError, match="RegisterLayout or the number of patch tokens"):
        vk.gated_residual(x, m, x, "4")
    with pytest.raises(ValueError, match="eps must be a finite float > 0"):
        vk.gated_residual_norm(x, m, x, layout, scale=m, shift=m, eps=0.0)
    with pytest.raises(ValueError, match="even last dim"):
        vk.swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"proj_weight must be \[O, H\] with H = 3"):
        vk.swiglu(torch.randn(3, 6), torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"qkv must be \[B, N, 3 \* heads \* D\]"):
        vk.qk_rms_norm(torch.randn(2, 5, 20), 3, torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match=r"q_weight must be \[D\] = \[4\]"):
        vk.qk_rms_norm(torch.randn(2, 5, 24), 2, torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="heads must be an int >= 1"):
        vk.qk_rms_norm(torch.randn(2, 5, 24), 0, torch.ones(4), torch.ones(4))
    with pytest.raises(TypeError, match="qk_layer_norm: qkv must be a torch.Tensor, got list"):
        vk.qk_layer_norm([[1.0] * 6], 1)
    with pytest.raises(TypeError, match=r"qk_layer_norm: qkv must be a float tensor .*, got torch.int64"):
        vk.qk_layer_norm(torch.ones(2, 5, 24, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"qk_layer_norm: qkv must be \[B, N, 3 \* heads \* D\] with heads = 3, "
                                         r"got shape \(2, 5, 20\)"):
        vk.qk_layer_norm(torch.randn(2, 5, 20), 3)
    with pytest.raises(ValueError, match=r"qk_layer_norm: qkv must be \[B, N, 3 \* heads \* D\] with heads = 2, "
                                         r"got shape \(5, 24\)"):
        vk.qk_layer_norm(torch.randn(5, 24), 2)
    for heads in (0, 2.0, True, None):
        with pytest.raises(ValueError, match=f"qk_layer_norm: heads must be an int >= 1, got {heads!r}"):
            vk.qk_layer_norm(torch.randn(2, 5, 24), heads)
    for eps in (0.0, -1e-5, float("nan"), float("inf"), "1e-5"):
        with pytest.raises(ValueError, match="qk_layer_norm: eps must be a finite float > 0"):
            vk.qk_layer_norm(torch.randn(2, 5, 24), 2, eps=eps)


def test_cpu_backend_refuses_float64_with_reason():
    x = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    m = torch.randn(1, 1, 2, 4, dtype=torch.float64)
    with vk.use_backend("cpu"), pytest.raises(vk.BackendUnavailableError, match="dtype torch.float64 not supported"):
        vk.modulated_layer_norm(x, 2, scale=m, shift=m)
    with vk.use_backend("cpu"), pytest.raises(vk.BackendUnavailableError, match="dtype torch.float64 not supported"):
        vk.qk_layer_norm(torch.randn(1, 2, 6, dtype=torch.float64), 1)


# ------------------------------------------------------------------------------------
# The model: fused ops (cpu) vs the unfused reference, one step and a short run


def _nonzero_init(model):
    for p in model.parameters():  # zero-initialised layers would hide the blocks' gradients
        if p.abs().max() == 0:
            torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.mark.parametrize("preset_name", ["micro", "tiny"])
def test_model_step_with_fused_ops_matches_reference(preset_name):
    from vft.config import preset, tiny_train_config
    from vft.data import SyntheticVideos
    from vft.model import VideoFlexTok
    from vft.train import draw

    cfg = preset(preset_name)
    torch.manual_seed(0)
    model = _nonzero_init(VideoFlexTok(cfg).train())
    data = SyntheticVideos(cfg.frames, cfg.height, cfg.width, seed=3)
    video = torch.stack([data[i] for i in range(2)])
    inputs = draw(cfg, tiny_train_config(batch_size=2), 2, torch.Generator().manual_seed(1))
    results = {}
    for backend in ("reference", "cpu"):
        with vk.use_backend(backend):
            torch.manual_seed(5)
            loss = model(video, **inputs)
            model.zero_grad()
            loss.backward()
        results[backend] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (l_ref, g_ref), (l_cpu, g_cpu) = results["reference"], results["cpu"]
    assert g_ref.keys() == g_cpu.keys() and len(g_ref) > 20
    # fp32 kernels against an fp32 reference: the same sums in another order
    assert abs(float(l_cpu - l_ref)) <= 1e-5 * abs(float(l_ref))
    for name, g in g_ref.items():
        err = float((g_cpu[name] - g).abs().max())
        assert err <= 1e-4 * float(g.abs().max()) + 1e-7, f"{name}: grad differs by {err:.3g} (max {float(g.abs().max()):.3g})"


def test_micro_training_curves_with_and_without_fused_ops():
    """Liger-style convergence check: 30 steps of the micro preset, same seed, fused (cpu)
    vs unfused (reference); the loss curves and the final weights agree closely."""
    from vft.config import TrainConfig, preset
    from vft.data import SyntheticVideos
    from vft.model import VideoFlexTok
    from vft.train import draw, make_optimizer

    cfg = preset("micro")
    tcfg = TrainConfig(steps=30, batch_size=4, lr=1e-3, warmup_steps=0)
    data = SyntheticVideos(cfg.frames, cfg.height, cfg.width, seed=11)

    def run(backend):
        torch.manual_seed(0)
        model = _nonzero_init(VideoFlexTok(cfg).train())
        opt = make_optimizer(model, tcfg)
        gen = torch.Generator().manual_seed(2)
        losses = []
        with vk.use_backend(backend):
            for step in range(tcfg.steps):
                video = torch.stack([data[step * 4 + i] for i in range(4)])
                inputs = draw(cfg, tcfg, 4, gen)
                torch.manual_seed(100 + step)
                loss = model(video, **inputs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return torch.tensor(losses), torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    l_ref, w_ref = run("reference")
    l_cpu, w_cpu = run("cpu")
    assert l_ref[-5:].mean() < l_ref[:5].mean(), f"micro did not learn: {l_ref.tolist()}"
    rel = ((l_cpu - l_ref).abs() / l_ref.abs()).max()
    assert rel < 1e-3, f"loss curves differ by up to {float(rel):.2e} (relative)"
    moved = (w_ref - _initial_weights(cfg)).abs().max()
    assert float((w_cpu - w_ref).abs().max()) < 1e-3 * float(moved), "final weights differ"


def _initial_weights(cfg):
    from vft.model import VideoFlexTok

    torch.manual_seed(0)
    return torch.cat([p.detach().reshape(-1) for p in _nonzero_init(VideoFlexTok(cfg)).parameters()])
