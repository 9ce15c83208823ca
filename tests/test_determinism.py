"""The backward-determinism claims of register attention, tested as stated.

What is claimed (README.md, docs/spec.md and DESIGN.md claim nothing about it):

* cpu (csrc/cpu/attention.cpp, backward): tasks are handed to threads dynamically, but each
  task owns its dk / dv key tiles and its group's slice of a dq accumulator ``[G, B*H, N,
  D]``; "the groups are summed in a fixed order afterwards (deterministic, no atomics). G > 1
  only when B*H is too small to keep every thread busy" (G grows with the thread count).
  So: bitwise equal gradients from run to run at a given thread count, in both regimes
  (G = 1 and G > 1), dense and packed. Not claimed, and not true: equality across thread
  counts when G changes with them (dq is then summed in another order; it agrees to
  rounding, which the reference comparison below checks for 1 and 2 threads).
* triton (vft_kernels/triton/attention.py): "Splitting dq from dk/dv keeps the backward
  free of atomics, hence deterministic." The interpreter runs programs one after another,
  so it cannot reveal a race: the claim's premise (no atomic operations in the kernels) is
  checked on the source, and repeated interpreter runs must agree bitwise.
"""
import pathlib
import re

import pytest
import torch

import vft_kernels as vk
from vft_kernels import dispatch
from vft_kernels.reference import attention as ref
from vft_kernels.testing import assert_matches_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = 4


def _skip_unless(backend):
    reason = dispatch.backend_status(backend) or dispatch._REGISTRY[("attention_backward", backend)].load()
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable: {reason}")


def _problem(B, H, layout, D, seed, keep):
    g = torch.Generator().manual_seed(seed)
    N = layout.seq_len
    q, k, v, dout = (torch.randn(B, H, N, D, generator=g) for _ in range(4))
    return q, k, v, dout, torch.tensor(keep, dtype=torch.int32)


def _grads(backend, q, k, v, dout, layout, keep, cu_seqlens=None):
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    with vk.use_backend(backend):
        out = vk.register_attention(qq, kk, vv, layout, keep=keep, cu_seqlens=cu_seqlens)
        return (out.detach(),) + torch.autograd.grad(out, (qq, kk, vv), dout)


def _check_reference(name, got, q, k, v, dout, layout, keep, scale):
    def reference(dtype):
        args = [t.to(dtype) for t in (q, k, v)]
        o, lse = ref.attention_forward(*args, layout, keep, scale)
        return (o,) + ref.attention_backward(dout.to(dtype), *args, o, lse, layout, keep, scale)

    for what, x, w64, w32 in zip(("out", "dq", "dk", "dv"), got, reference(torch.float64), reference(torch.float32)):
        assert_matches_reference(f"{name} {what}", x, w64, w32, torch.float32, reduction_len=layout.seq_len)


def _assert_all_bitwise_equal(name, runs):
    first = runs[0]
    for i, other in enumerate(runs[1:], 1):
        for what, a, b in zip(("out", "dq", "dk", "dv"), first, other):
            if not torch.equal(a, b):
                raise AssertionError(f"{name}: run {i} {what} differs from run 0 by up to "
                                     f"{float((a - b).abs().max()):.3e} (backward claimed deterministic)")


# B, H, keep: B*H = 1 gives G = min(key tiles, 2 * threads) > 1 groups of key tiles, B*H = 4
# with 2 threads gives G = 1. The layout has 336 tokens = 6 key tiles of 64.
LAYOUT = vk.RegisterLayout(3, 100, 12, "block_causal_last")
CPU_CASES = {"one_head_G_gt_1": (1, 1, [5]), "four_heads_G_1": (2, 2, [12, 3])}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_attention_backward_is_bitwise_deterministic(case, threads):
    _skip_unless("cpu")
    B, H, keep = CPU_CASES[case]
    q, k, v, dout, keep = _problem(B, H, LAYOUT, 32, seed=11, keep=keep)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [_grads("cpu", q, k, v, dout, LAYOUT, keep) for _ in range(RUNS)]
    finally:
        torch.set_num_threads(previous)
    _assert_all_bitwise_equal(f"cpu {case} threads={threads}", runs)
    _check_reference(f"cpu {case} threads={threads}", runs[0], q, k, v, dout, LAYOUT, keep, 32 ** -0.5)


def test_cpu_packed_attention_backward_is_bitwise_deterministic():
    """Packed samples (cu_seqlens): one task per (sample, head, group), 2 threads, G > 1."""
    _skip_unless("cpu")
    layout = vk.RegisterLayout(3, 60, 4, "block_causal_last")  # 64 tokens per block
    cu = [0, 192, 256, 384]  # 3 + 1 + 2 blocks, then 16 padding rows
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, 1, 400, 16, generator=g) for _ in range(4))
    keep = torch.tensor([4, 1, 2], dtype=torch.int32)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [_grads("cpu", q, k, v, dout, layout, keep, cu_seqlens=cu) for _ in range(RUNS)]
    finally:
        torch.set_num_threads(previous)
    _assert_all_bitwise_equal("cpu packed", runs)
    want = _grads("reference", q.double(), k.double(), v.double(), dout.double(), layout, keep, cu_seqlens=cu)
    for what, a, b in zip(("out", "dq", "dk", "dv"), runs[0], want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=f"cpu packed {what}")
    assert torch.equal(runs[0][1][:, :, 384:], torch.zeros(1, 1, 16, 16))  # padding rows: zero gradient


def test_triton_attention_backward_has_no_atomics_and_repeats_bitwise():
    src = (ROOT / "vft_kernels" / "triton" / "attention.py").read_text()
    atomics = sorted(set(re.findall(r"\btl\.atomic_\w+", src)))
    assert not atomics, f"Triton attention uses {atomics}: the backward is no longer deterministic as documented"
    _skip_unless("triton")
    layout = vk.RegisterLayout(2, 11, 4, "block_causal_last")
    q, k, v, dout, keep = _problem(2, 1, layout, 16, seed=3, keep=[4, 1])
    runs = [_grads("triton", q, k, v, dout, layout, keep) for _ in range(2)]
    _assert_all_bitwise_equal("triton", runs)
    _check_reference("triton", runs[0], q, k, v, dout, layout, keep, 16 ** -0.5)
