"""The GPU check fails loudly, never skips, where CUDA is expected but missing (this machine
has no CUDA device; on one with a device these checks do not apply)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA failure path")


def test_gpu_tests_fail_instead_of_skipping_when_cuda_is_required():
    env = dict(os.environ, VFT_REQUIRE_CUDA="1", TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/gpu/test_gpu_kernels.py::test_attention_has_no_cuda_cpp_kernel_and_says_so"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout
    assert "VFT_REQUIRE_CUDA=1 but the GPU tests cannot run" in proc.stdout, proc.stdout[-2000:]
    assert "skipped" not in proc.stdout.splitlines()[-1]


def test_gpu_tests_skip_with_the_reason_in_the_cpu_run():
    env = {k: v for k, v in os.environ.items() if k != "VFT_REQUIRE_CUDA"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/gpu/test_gpu_kernels.py::test_attention_has_no_cuda_cpp_kernel_and_says_so"],
                          cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "1 skipped" in proc.stdout and "scripts/gpu_check.sh" in proc.stdout, proc.stdout


def test_gpu_check_script_fails_loudly_without_cuda(tmp_path):
    report = tmp_path / "report.md"
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(report)], cwd=ROOT,
                          env=dict(os.environ, VFT_GPU_CHECK_SKIP_BUILD="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = report.read_text()
    assert "gpu_check: FAILED: CUDA is expected but not usable here" in proc.stderr
    assert "PROBLEM: torch.cuda.is_available() is False" in text, text
