"""Every bad input of docs/spec.md raises the right exception with a message naming the
offending value (and, where there is one, the expected value)."""

import math

import warnings

import pytest
import torch

import vft_kernels as vk
from vft_kernels import dispatch


def raises(exc, fn, *needles):
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in message: {msg}"
    return msg


# --------------------------------------------------------------------------------------
# FSQ

def test_fsq_levels():
    z = torch.randn(4, 3)
    raises(ValueError, lambda: vk.fsq_quantize(z, ()), "()")
    raises(ValueError, lambda: vk.fsq_quantize(z, []), "levels")
    raises(ValueError, lambda: vk.fsq_quantize(z, (3, 1, 4)), "1", "(3, 1, 4)")
    raises(ValueError, lambda: vk.fsq_quantize(z, (3, 0, 4)), "0", "(3, 0, 4)")
    raises(ValueError, lambda: vk.fsq_quantize(z, (3, 4)), "3", "(3, 4)")           # len 2 != d = 3
    raises(ValueError, lambda: vk.fsq_quantize(z, (3, 4, 5, 6)), "3", "(3, 4, 5, 6)")
    raises(ValueError, lambda: vk.fsq_quantize(z, (3, 2.5, 4)), "2.5")
    raises(TypeError, lambda: vk.fsq_quantize(z, 5), "int")
    raises(ValueError, lambda: vk.fsq_indices_to_codes(torch.zeros(2, dtype=torch.int32), ()), "()")
    raises(ValueError, lambda: vk.fsq_indices_to_codes(torch.zeros(2, dtype=torch.int32), (5, 1)), "1", "(5, 1)")


def test_fsq_z_type():
    raises(TypeError, lambda: vk.fsq_quantize(torch.ones(4, 3, dtype=torch.int32), (3, 3, 3)), "int32")
    raises(TypeError, lambda: vk.fsq_quantize(torch.ones(4, 3, dtype=torch.int64), (3, 3, 3)), "int64")
    raises(TypeError, lambda: vk.fsq_quantize(torch.ones(4, 3, dtype=torch.bool), (3, 3, 3)), "bool")
    raises(TypeError, lambda: vk.fsq_quantize([[0.1, 0.2]], (3, 3)), "list")
    raises(TypeError, lambda: vk.fsq_quantize(torch.randn(4, 3), (3, 3, 3), out_dtype=torch.int32), "int32")
    raises(TypeError, lambda: vk.fsq_indices_to_codes(torch.zeros(3), (3, 4)), "float32")
    raises(TypeError, lambda: vk.fsq_indices_to_codes([1, 2], (3, 4)), "list")


def test_fsq_eps():
    z = torch.randn(4, 2)
    raises(ValueError, lambda: vk.fsq_quantize(z, (3, 4), eps=-0.1), "-0.1")
    # eps * (L - 1) >= 1 would let +-inf (or large z) round outside [-(L//2), (L-1)//2]
    raises(ValueError, lambda: vk.fsq_quantize(z, (3, 8), eps=0.5), "0.5", "8")
    # at eps * (L - 1) == 1 the saturated value is a tie: L = 3 rounds 1.5 to 2 (out of range)...
    raises(ValueError, lambda: vk.fsq_quantize(torch.full((1, 1), math.inf), (3,), eps=0.5), "0.5", "level 3")
    # ... while L = 5 rounds 2.5 to 2 (in range), so that eps is accepted
    assert vk.fsq_quantize(torch.full((1, 1), math.inf), (5,), eps=0.25)[1].tolist() == [4]
    raises(ValueError, lambda: vk.fsq_quantize(torch.randn(2, 1), (1003,)), "0.001", "1003")
    # L = 2 with eps = 0: shift = atanh(1) = inf, so z = -inf would give NaN instead of a code
    raises(ValueError, lambda: vk.fsq_quantize(z, (2, 4), eps=0.0), "(2, 4)", "eps=0.0")
    assert vk.fsq_quantize(z, (3, 4), eps=0.0)[1].shape == (4,)  # eps = 0 is fine otherwise


@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
def test_fsq_invalid_indices(itype):
    levels = (3, 4)  # 12 codes
    raises(ValueError, lambda: vk.fsq_indices_to_codes(torch.tensor([0, 12, 3], dtype=itype), levels),
           "12", "[0, 12)")
    raises(ValueError, lambda: vk.fsq_indices_to_codes(torch.tensor([[0, 5], [-2, 3]], dtype=itype), levels),
           "-2", "[0, 12)")
    big = 2**31 - 1 if itype == torch.int32 else 2**40
    raises(ValueError, lambda: vk.fsq_indices_to_codes(torch.tensor([big], dtype=itype), levels), str(big))
    # -1 is the NaN-row marker, not an error; validate=False does not inspect the values
    assert torch.isnan(vk.fsq_indices_to_codes(torch.tensor([-1], dtype=itype), levels)).all()
    out = vk.fsq_indices_to_codes(torch.tensor([12, -7], dtype=itype), levels, validate=False)
    assert out.shape == (2, 2)


# --------------------------------------------------------------------------------------
# Attention

def _qkv(B=2, H=1, N=6, D=8, dtype=torch.float32):
    return [torch.randn(B, H, N, D, dtype=dtype) for _ in range(3)]


LAYOUT = vk.RegisterLayout(2, 2, 1)  # N = 6


def test_attention_shapes():
    q, k, v = _qkv()
    raises(ValueError, lambda: vk.register_attention(q[0], k[0], v[0], LAYOUT), "(1, 6, 8)")
    raises(ValueError, lambda: vk.register_attention(q, k[:, :, :5], v, LAYOUT), "(2, 1, 6, 8)", "(2, 1, 5, 8)")
    raises(ValueError, lambda: vk.register_attention(q, k, v[..., :4], LAYOUT), "(2, 1, 6, 8)", "(2, 1, 6, 4)")
    q7, k7, v7 = _qkv(N=7)
    raises(ValueError, lambda: vk.register_attention(q7, k7, v7, LAYOUT), "7", "6")
    raises(TypeError, lambda: vk.register_attention(q, k, v, (2, 2, 1)), "tuple")
    raises(TypeError, lambda: vk.register_attention(q, [1.0], v, LAYOUT), "list")


def test_attention_dtypes_and_devices():
    q, k, v = _qkv()
    raises(ValueError, lambda: vk.register_attention(q, k.half(), v, LAYOUT), "float16", "float32")
    raises(ValueError, lambda: vk.register_attention(q, k, v.double(), LAYOUT), "float64", "float32")
    qi, ki, vi = (t.to(torch.int32) for t in (q, k, v))
    raises(ValueError, lambda: vk.register_attention(qi, ki, vi, LAYOUT), "int32")
    raises(ValueError, lambda: vk.register_attention(q, k.to("meta"), v, LAYOUT), "meta", "cpu")
    raises(ValueError, lambda: vk.register_attention(q, k, v, LAYOUT, keep=torch.tensor([1, 1], device="meta")),
           "meta", "cpu")


def test_attention_head_dim():
    layout = vk.RegisterLayout(1, 1, 0)
    q, k, v = _qkv(B=1, N=1, D=257)
    raises(ValueError, lambda: vk.register_attention(q, k, v, layout), "257", "256")
    q, k, v = _qkv(B=1, N=1, D=256)
    assert vk.register_attention(q, k, v, layout).shape == (1, 1, 1, 256)


def test_attention_keep():
    q, k, v = _qkv()
    raises(ValueError, lambda: vk.register_attention(q, k, v, LAYOUT, keep=torch.tensor([0, 2])), "2", "R=1")
    raises(ValueError, lambda: vk.register_attention(q, k, v, LAYOUT, keep=torch.tensor([-1, 0])), "-1")
    raises(ValueError, lambda: vk.register_attention(q, k, v, LAYOUT, keep=torch.tensor([1, 1, 1])), "(3,)", "2")
    raises(ValueError, lambda: vk.register_attention(q, k, v, LAYOUT, keep=torch.tensor([[1, 1]])), "(1, 2)")
    raises(ValueError, lambda: vk.register_attention(q, k, v, LAYOUT, keep=torch.tensor([1.0, 0.0])), "float32")
    raises(ValueError, lambda: vk.register_attention(q, k, v, LAYOUT, keep=torch.tensor([True, False])), "bool")
    raises(TypeError, lambda: vk.register_attention(q, k, v, LAYOUT, keep=[1, 1]), "list")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_attention_keep_checked_before_narrowing(backend):
    """An int64 keep of 2**32 + 1 must not pass as 1 (issue: narrowed to int32 before the
    range check), on every backend, forward and through the backward op."""
    if backend == "triton":
        pytest.importorskip("triton")  # runs under TRITON_INTERPRET=1 (tests/conftest.py)
    if backend == "cpu":
        pytest.importorskip("vft_kernels.cpp.attention", reason="vft_kernels._C not built")
    q, k, v = _qkv()
    head_dim_ok = torch.randn(2, 1, q.shape[2], 16)
    for keep, bad in ((torch.tensor([2**32 + 1, 0]), 2**32 + 1), (torch.tensor([1, -(2**32) + 1]), -(2**32) + 1)):
        with vk.use_backend(backend):
            raises(ValueError, lambda: vk.register_attention(head_dim_ok, head_dim_ok, head_dim_ok, LAYOUT,
                                                             keep=keep), str(bad))


# --------------------------------------------------------------------------------------
# Flow

def _flow(shape=(2, 3, 4, 5), dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


def test_flow_shapes_dtypes_devices():
    x, vc, vu = _flow()
    raises(ValueError, lambda: vk.flow_step(x, vc[:, :2], 0.5, 0.25), "(2, 3, 4, 5)", "(2, 2, 4, 5)")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, vu[:1], "cfg"), "(2, 3, 4, 5)", "(1, 3, 4, 5)")
    raises(ValueError, lambda: vk.flow_step(x, vc.half(), 0.5, 0.25), "float16", "float32")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, vu.double(), "apg"), "float64", "float32")
    raises(ValueError, lambda: vk.flow_step(x, vc.to("meta"), 0.5, 0.25), "meta", "cpu")
    raises(ValueError, lambda: vk.flow_step(x.int(), vc.int(), 0.5, 0.25), "int32")
    raises(ValueError, lambda: vk.flow_heun_step(x, vc, vu[:, :, :3], 0.5, 0.25), "(2, 3, 3, 5)")
    raises(ValueError, lambda: vk.flow_heun_step(x, vc.bfloat16(), vu, 0.5, 0.25), "bfloat16")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, out=torch.empty(2, 3, 4)), "(2, 3, 4)")
    # fewer than reduce_ndim + 1 dims
    raises(ValueError, lambda: vk.flow_step(x[0], vc[0], 0.5, 0.25), "(3, 4, 5)", "reduce_ndim=3")


def test_flow_times():
    x, vc, vu = _flow()
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.5), "t=0.5", "t_next=0.5")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.25, 0.5), "t=0.25", "t_next=0.5")
    raises(ValueError, lambda: vk.flow_heun_step(x, vc, vu, 0.3, 0.7), "t=0.3", "t_next=0.7")
    t = torch.tensor([0.5, 0.5])
    raises(ValueError, lambda: vk.flow_step(x, vc, t, torch.tensor([0.25, 0.75])), "sample 1", "0.5", "0.75")
    raises(ValueError, lambda: vk.flow_step(x, vc, t, 0.5), "sample 0", "0.5")
    raises(ValueError, lambda: vk.flow_heun_step(x, vc, vu, t, torch.tensor([0.5, 0.0])), "sample 0")
    raises(ValueError, lambda: vk.flow_step(x, vc, torch.tensor([0.5, 0.5, 0.5]), 0.0), "(3,)", "(2,)")
    raises(ValueError, lambda: vk.flow_step(x, vc, torch.tensor([1, 1]), 0.0), "int64")
    raises(TypeError, lambda: vk.flow_step(x, vc, "1.0", 0.0), "str")


def test_flow_guidance_arguments():
    x, vc, vu = _flow()
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, vu, "pag"), "'pag'", "apg")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, None, "apg"), "apg", "v_uncond")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, None, "cfg"), "cfg", "v_uncond")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, vu, "apg", apg_momentum=0.5), "0.5", "momentum")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, vu, "apg", apg_momentum=0.5,
                                            momentum=torch.zeros(2, 3, 4)), "(2, 3, 4)", "(2, 3, 4, 5)")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, vu, "apg", apg_norm_threshold=-1.0), "-1.0")


def test_flow_prefix():
    x, vc, _ = _flow((2, 3, 4, 2, 2))
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, prefix=torch.zeros(2, 3, 1, 2, 2), prefix_len=2),
           "(2, 3, 2, 2, 2)", "(2, 3, 1, 2, 2)")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, prefix=None, prefix_len=1), "(2, 3, 1, 2, 2)", "None")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, prefix=torch.zeros(2, 3, 5, 2, 2), prefix_len=5),
           "prefix_len=5")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, prefix=torch.zeros(2, 3, 1, 2, 2).double(),
                                            prefix_len=1), "float64")
    raises(ValueError, lambda: vk.flow_step(x, vc, 0.5, 0.25, prefix_len=-1), "-1")


# --------------------------------------------------------------------------------------
# Backends

def test_use_backend_unknown():
    raises(ValueError, lambda: vk.use_backend("tpu"), "'tpu'", "reference")


def test_forced_backend_env_unknown(monkeypatch):
    monkeypatch.setenv("VFT_BACKEND", "tpu")
    raises(dispatch.BackendUnavailableError, lambda: vk.fsq_quantize(torch.randn(3, 2), (3, 3)), "'tpu'")


def test_forced_unavailable_backend_names_reason(monkeypatch):
    # cuda cannot run on CPU tensors anywhere: either _C has no CUDA kernels, or the device
    # does not match; the error must carry that reason.
    monkeypatch.setenv("VFT_BACKEND", "cuda")
    msg = raises(dispatch.BackendUnavailableError, lambda: vk.fsq_quantize(torch.randn(3, 2), (3, 3)), "'cuda'")
    reason = msg.split(": ", 1)[1]
    assert len(reason) > 10, msg
    status = dispatch.backend_status("cuda")
    if status is not None:
        assert status in msg
        raises(dispatch.BackendUnavailableError, lambda: vk.use_backend("cuda"), "'cuda'", status)
    else:
        assert "not cpu" in msg


def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    if dispatch.backend_status("triton") is not None:
        pytest.skip(f"triton unavailable: {dispatch.backend_status('triton')}")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with vk.use_backend("triton"):
        raises(dispatch.BackendUnavailableError, lambda: vk.flow_step(*_flow()[:2], 0.5, 0.25),
               "'triton'", "TRITON_INTERPRET=1")


def test_dense_fallback_warns_once_with_reason_and_memory(monkeypatch):
    """An automatic fall back to the dense reference (no kernel for the call) warns once per
    reason, naming it and the memory the dense path takes (always on a GPU; on the CPU from
    DENSE_WARN_BYTES_CPU on, lowered here)."""
    from vft_kernels.ops import attention as ops_attention

    monkeypatch.setattr(ops_attention, "DENSE_WARN_BYTES_CPU", 0)
    monkeypatch.setattr(ops_attention, "_DENSE_WARNED", set())
    q = torch.randn(2, 3, 6, 8, dtype=torch.float64)  # no kernel takes float64
    with pytest.warns(RuntimeWarning, match=r"float64.*dense reference.*GiB for B=2, H=3, N=6"):
        vk.register_attention(q, q, q, LAYOUT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vk.register_attention(q, q, q, LAYOUT)  # once per reason
        with vk.use_backend("reference"):  # a forced reference is what the user asked for
            monkeypatch.setattr(ops_attention, "_DENSE_WARNED", set())
            vk.register_attention(q, q, q, LAYOUT)


# --------------------------------------------------------------------------------------
# Transformer-block ops: scale and shift are keyword-only


def test_modulation_scale_and_shift_are_keyword_only():
    """DiT codebases call modulate(x, shift, scale); the block ops take scale and shift by
    name only, so a positional call in either order fails loudly instead of swapping them."""
    x = torch.randn(2, 1, 5, 8)
    scale, shift, gate = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    with pytest.raises(TypeError, match="positional argument"):
        vk.modulated_layer_norm(x, shift, scale, 3)
    with pytest.raises(TypeError, match="positional argument"):
        vk.gated_residual_norm(x, gate, x, shift, scale, 3)
    with vk.use_backend("reference"):
        y = vk.modulated_layer_norm(x, 3, shift=shift, scale=scale)  # keyword order does not matter
        x_new, y2 = vk.gated_residual_norm(x, gate, x, 3, shift=shift, scale=scale)
    ln = torch.nn.functional.layer_norm(x, (8,), eps=1e-6)
    sel = torch.tensor([0, 0, 0, 1, 1])  # 3 patch tokens (row 0), then registers (row 1)
    torch.testing.assert_close(y, ln * (1 + scale[:, :, sel]) + shift[:, :, sel])
    torch.testing.assert_close(x_new, x + gate[:, :, sel] * x)
    torch.testing.assert_close(y2, torch.nn.functional.layer_norm(x_new, (8,), eps=1e-6) * (1 + scale[:, :, sel])
                               + shift[:, :, sel])
