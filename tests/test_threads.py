"""One threading model for the CPU kernels: every parallel loop goes through
at::parallel_for, so torch.set_num_threads governs FSQ, flow and attention alike, and
exceptions raised in a worker propagate instead of aborting the process (a throw inside a
raw OpenMP region terminates). Sizes here cross the kernels' parallel thresholds."""
import pathlib
import re

import pytest
import torch

import vft_kernels as vk

pytest.importorskip("vft_kernels.cpp.fsq", reason="vft_kernels._C not built")

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cpu"


def test_no_raw_openmp_parallel_regions():
    offenders = [f"{p.name}:{i + 1}" for p in sorted(CSRC.glob("*.cpp"))
                 for i, line in enumerate(p.read_text().splitlines())
                 if re.match(r"\s*#\s*pragma\s+omp\s+parallel", line)]
    assert not offenders, f"raw OpenMP parallel regions (use at::parallel_for): {offenders}"


def _run_all():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(300_001, 6, generator=g, requires_grad=True)
    levels = (8, 8, 8, 5, 5, 5)
    codes, idx = vk.fsq_quantize(z, levels)
    (gz,) = torch.autograd.grad(codes, z, torch.randn(codes.shape, generator=g))
    dec = vk.fsq_indices_to_codes(idx, levels)
    x = torch.randn(2, 4, 5, 64, 64, generator=g)  # 163,840 elements: parallel elementwise and APG paths
    vc, vu = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    cfg = vk.flow_step(x, vc, 0.8, 0.7, vu, guidance="cfg", scale=2.0)
    apg = vk.flow_step(x, vc, 0.8, 0.7, vu, guidance="apg", scale=3.0, apg_momentum=-0.5,
                       momentum=torch.zeros_like(x), apg_norm_threshold=2.5)
    return codes, idx, gz, dec, cfg, apg


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_the_thread_count(threads):
    previous = torch.get_num_threads()
    try:
        with vk.use_backend("cpu"):
            torch.set_num_threads(threads)
            got = _run_all()
            torch.set_num_threads(1)
            single = _run_all()
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(got, single):
        assert torch.equal(a, b)
    with vk.use_backend("reference"):
        ref = _run_all()
    assert torch.equal(got[1], ref[1]) and torch.equal(got[3], ref[3])  # indices, decoded codes: exact
    torch.testing.assert_close(got[4], ref[4], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[5], ref[5], rtol=1e-4, atol=1e-5)
