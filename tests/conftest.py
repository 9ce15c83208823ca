"""Test-session setup shared by every test file.

* TRITON_INTERPRET=1 before anything imports triton, so the Triton kernels run on CPU
  tensors (forced with ``use_backend("triton")``; automatic selection on CPU never picks
  them). AOT-compile tests run in a subprocess without it.
* Kernel outputs are poisoned (NaN / sentinel) so unwritten elements fail the checks.
* Triton and Inductor compile caches live in build/ of this checkout, not in the home
  directory, so a run depends on nothing left outside the repo.
"""
import os
import pathlib

_BUILD = pathlib.Path(__file__).resolve().parents[1] / "build"
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", str(_BUILD / "triton_cache"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_BUILD / "inductor_cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

from vft_kernels import dispatch  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_and_seed():
    torch.manual_seed(0)
    with dispatch.poison_outputs(True):
        yield


# The CPU kernel tests run under several CPU capabilities (vft_kernels.use_cpu_capability, the
# ISA variants of csrc/include/vft/isa.h): VFT_TEST_CPU_CAPABILITIES is "all" (every level this
# CPU supports) or a comma list in which "default" is the level chosen at load; by default the
# default level and the portable baseline. tests/test_cpu_variants.py compares every level with
# the baseline on each op, bitwise where the arithmetic is the same.
CPU_KERNEL_TESTS = {"test_fsq_kernels", "test_attention_cpu", "test_flow_kernels", "test_block_ops"}


def _test_capabilities():
    import vft_kernels

    try:
        caps = vft_kernels.cpu_capabilities()
    except RuntimeError:  # no _C: the kernel tests skip themselves
        return [None]
    want = os.environ.get("VFT_TEST_CPU_CAPABILITIES", "default,baseline")
    if want == "all":
        return list(caps["supported"])
    names = [caps["default"] if w.strip() == "default" else w.strip() for w in want.split(",")]
    unknown = [n for n in names if n not in caps["supported"]]
    if unknown:
        raise pytest.UsageError(f"VFT_TEST_CPU_CAPABILITIES={want}: {unknown} not supported here "
                                f"(supported: {caps['supported']})")
    return list(dict.fromkeys(names))


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__.rpartition(".")[2] in CPU_KERNEL_TESTS:
        caps = _test_capabilities()
        metafunc.parametrize("_cpu_capability", caps, indirect=True, ids=[f"cpu={c}" for c in caps])


@pytest.fixture(autouse=True)
def _cpu_capability(request):
    cap = getattr(request, "param", None)
    if cap is None:
        yield None
        return
    import vft_kernels

    with vft_kernels.use_cpu_capability(cap):
        yield cap


def _interpreter_rounds_bf16_to_nearest():
    """Make the Triton interpreter's float32 -> bfloat16 cast round to nearest even.

    Triton 3.8's interpreter narrows float32 to bfloat16 by dropping the low 16 bits
    (round toward zero, 1 ulp off for half the values), while the GPU (cvt.rn.bf16.f32,
    Triton's default ``fp_downcast_rounding``) rounds to nearest even. Tests check kernels
    against the GPU's semantics, so the cast is done with torch's correctly rounded one.
    Only this one conversion changes; the tests assert it (test_interpreter_bf16_rounding).
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:  # no triton: nothing to patch
        return
    builder = interp.InterpreterBuilder
    if getattr(builder, "_vft_bf16_rtne", False):
        return

    def to_bf16(data):
        bits = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
        return bits.view(torch.int16).numpy().view(np.uint16).reshape(np.shape(data))

    def wrap(orig):
        def cast(self, src, dst_type, *rest):  # rest: create_fp_to_fp's rounding mode
            rtz = bool(rest) and rest[0] == interp._ir.ROUNDING_MODE.RTZ
            if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16 and not rtz:
                return interp.TensorHandle(to_bf16(src.data), tl.bfloat16)
            return orig(self, src, dst_type, *rest)
        return cast

    builder.cast_impl = wrap(builder.cast_impl)
    builder.create_fp_to_fp = wrap(builder.create_fp_to_fp)
    builder._vft_bf16_rtne = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_rounds_bf16_to_nearest()


def _token_sensitive(model, seed: int = 0):
    """Leave adaLN-zero's identity start: give the decoder's modulation and head small random
    weights, so a fresh (or briefly trained) model's output depends on its tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "modulation" in name or name.startswith("head"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture
def token_sensitive():
    """``token_sensitive(model)``: see _token_sensitive."""
    return _token_sensitive


@pytest.fixture(autouse=True)
def _vft_blocks_without_per_shape_choice(request, monkeypatch):
    """The integration tests check the numbers of the vft blocks themselves: on tiny models the
    per-shape choice (``blocks._Tuner``) would send some calls to the official blocks. Tests of
    that choice opt back in with ``@pytest.mark.tune_blocks``."""
    if "integrations" in request.node.module.__name__ and request.node.get_closest_marker("tune_blocks") is None:
        try:
            from vft_kernels.integrations import blocks
        except ImportError:
            return
        monkeypatch.setattr(blocks, "TUNE", False)
