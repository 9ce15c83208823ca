"""Kernel outputs on the CPU (csrc/cpu/alloc.cpp, dispatch.new_output): ordinary tensors,
from 32 MiB in their own 2 MiB-aligned mapping advised for transparent huge pages where the
OS allows."""
import os
import subprocess
import sys

import pytest
import torch

import vft_kernels as vk
from vft_kernels import _ext, dispatch
from vft_kernels.reference import fsq as ref

pytestmark = pytest.mark.skipif(_ext.C is None, reason=f"vft_kernels._C not loaded: {_ext.load_error}")
MIB = 1 << 20


def _thp_mode():
    try:
        words = open("/sys/kernel/mm/transparent_hugepage/enabled").read().split()
    except OSError:
        return "unavailable"
    return next((w[1:-1] for w in words if w.startswith("[")), "unavailable")


def _vm_flags(ptr: int) -> list[str]:
    """The VmFlags of the mapping in /proc/self/smaps that holds address ptr."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {ptr:#x}")


def test_huge_pages_info_follows_the_os():
    info = _ext.C.huge_pages()
    mode = "disabled" if os.environ.get("VFT_HUGE_PAGES") == "0" else _thp_mode()
    assert info["mode"] == mode and info["min_bytes"] == 32 * MIB == dispatch.huge_min_bytes()
    assert info["used"] == (mode in ("madvise", "always"))


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((), torch.int32), ((0, 7), torch.bfloat16),
                                         ((1025, 1024), torch.float32), ((5, 1024, 1024), torch.int64),
                                         ((8 * 1024 + 1, 1024), torch.float32)])
def test_empty_cpu_is_an_ordinary_tensor(shape, dtype):
    t = _ext.C.empty_cpu(list(shape), dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    t.fill_(7)
    assert bool((t == 7).all())
    t.resize_(2 * t.numel() + 1)  # its storage grows like any CPU tensor's
    t.fill_(1)
    assert bool((t == 1).all())
    assert torch.equal(t.clone(), t)


def test_large_outputs_are_2mib_aligned_and_advised_for_huge_pages():
    if not _ext.C.huge_pages()["used"]:
        pytest.skip(f"huge pages not used here (mode {_ext.C.huge_pages()['mode']})")
    t = _ext.C.empty_cpu([33 * MIB // 4 + 3], torch.float32)  # 33 MiB + 12 bytes: 16 whole huge pages
    assert t.data_ptr() % (2 * MIB) == 0
    assert "hg" in _vm_flags(t.data_ptr()) and "hg" in _vm_flags(t.data_ptr() + 32 * MIB - 1)  # MADV_HUGEPAGE
    assert "hg" not in _vm_flags(t.data_ptr() + 32 * MIB)  # the tail past the whole pages is not advised
    t.fill_(1)
    assert bool((t == 1).all())
    small = _ext.C.empty_cpu([31 * MIB // 4], torch.float32)  # under 32 MiB: torch's allocator
    assert small.numel() == 31 * MIB // 4


def test_empty_cpu_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sizes must be >= 0"):
        _ext.C.empty_cpu([4, -1], torch.float32)
    with pytest.raises(TypeError):
        _ext.C.empty_cpu([4], "float32")


def test_kernel_outputs_use_it_and_stay_exact():
    """A large FSQ forward + backward and flow step on the cpu backend: outputs from
    empty_cpu (aligned where huge pages are used), equal to the reference, poisoned or not."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1_500_000, 6, generator=g) * 2  # codes 36 MB, indices 6 MB
    levels = (8, 8, 8, 5, 5, 5)
    want_codes, want_idx = ref.fsq_forward(z, levels)
    for poison in (False, True):
        with dispatch.poison_outputs(poison), vk.use_backend("cpu"):
            zz = z.clone().requires_grad_()
            codes, idx = vk.fsq_quantize(zz, levels)
            codes.backward(torch.ones_like(codes))
        assert torch.equal(codes, want_codes) and torch.equal(idx.long(), want_idx.long())
        assert torch.isfinite(zz.grad).all()
        if _ext.C.huge_pages()["used"]:
            assert codes.data_ptr() % (2 * MIB) == 0 and zz.grad.data_ptr() % (2 * MIB) == 0
    x = torch.randn(2, 16, 16, 128, 128, generator=g)  # 33.5 MB
    v = torch.randn(x.shape, generator=g)
    out = vk.flow_step(x, v, 0.5, 0.4)  # the C++ fast path allocates its own output
    assert torch.allclose(out, x - 0.1 * v, rtol=0, atol=1e-6)
    if _ext.C.huge_pages()["used"]:
        assert out.data_ptr() % (2 * MIB) == 0


def test_vft_huge_pages_0_turns_it_off():
    code = ("import torch, vft_kernels._C as C; i = C.huge_pages(); t = C.empty_cpu([9 << 20], torch.float32); "
            "t.fill_(1); print(i['mode'], i['used'], int((t == 1).sum()))")
    env = dict(os.environ, VFT_HUGE_PAGES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["disabled", "False", str(9 << 20)]
