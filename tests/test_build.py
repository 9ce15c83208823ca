"""The compiled extension vft_kernels._C (build metadata) and the package without it."""
import os
import platform
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import vft_kernels as vk
from vft_kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_C_imports_and_build_info_is_sane():
    assert _ext.C is not None, f"vft_kernels._C did not load: {_ext.load_error}"
    from vft_kernels import _C

    info = _C.build_info()
    assert info["torch"] == torch.__version__
    assert info["version"] == vk.__version__
    assert info["torch_headers"] == torch.__version__.split("+")[0]
    assert re.match(r"(gcc|clang) \d+\.\d+", info["compiler"]), info["compiler"]
    assert isinstance(info["cxx_flags"], list) and all(isinstance(f, str) for f in info["cxx_flags"])
    assert "-O3" in info["cxx_flags"]
    assert isinstance(info["with_cuda"], bool) and isinstance(info["cuda_reason"], str) and info["cuda_reason"]
    if info["with_cuda"]:
        assert info["cuda_archs"] and all(re.fullmatch(r"\d+\.\d+(\+PTX)?a?", a) for a in info["cuda_archs"])
        assert info["cuda_compiler"]
        assert any(f.endswith(".cu") for f in info["sources"])
    else:
        assert info["cuda_archs"] == [] and info["cuda_compiler"] is None
        assert not any(f.endswith(".cu") for f in info["sources"])
    assert "csrc/bindings.cpp" in info["sources"]



def test_default_build_is_portable():
    # No -march=native unless VFT_CPU_ARCH asks: the baseline is x86-64-v2 on x86-64, and the
    # faster variants are chosen at run time (test_cpu_capability.py checks their objects).
    info = _ext.C.build_info() if _ext.C is not None else pytest.skip(f"_C did not load: {_ext.load_error}")
    flags = " ".join(f for v in info["cpu_variants"].values() for f in v)
    if info["cpu_arch"] == "native":
        pytest.skip("built with VFT_CPU_ARCH=native (not portable, on purpose)")
    assert "-march=native" not in flags
    if platform.machine() in ("x86_64", "AMD64"):
        assert info["cpu_arch"] == "x86-64-v2" and "-march=x86-64-v2" in info["cxx_flags"]
        assert set(info["cpu_variants"]) >= {"baseline"}
        for v in info["cpu_variants"]:
            assert any(f"-DVFT_ISA_NS=isa_{v}" == f for f in info["cpu_variants"][v])


def _run(code, **env_extra):
    env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
    env.pop("VFT_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=180)


WORKS_WITHOUT_C = """
    import torch, vft_kernels as vk
    from vft_kernels import _ext, info
    assert _ext.C is None, _ext.C
    print("LOAD_ERROR:", _ext.load_error)
    z = torch.randn(4, 3)
    codes, idx = vk.fsq_quantize(z, (3, 4, 5))
    assert torch.equal(vk.fsq_indices_to_codes(idx, (3, 4, 5)), codes)
    layout = vk.RegisterLayout(2, 3, 1)
    q = torch.randn(1, 2, layout.seq_len, 8)
    assert vk.register_attention(q, q, q, layout).shape == q.shape
    x = torch.randn(2, 3, 2, 2)
    assert torch.allclose(vk.flow_step(x, x, 1.0, 0.5), x * 0.5)
    table = vk.available_backends()
    assert all(table[op]["cpu"] == ["reference"] for op in table), table
    print(info.report())
    try:
        vk.use_backend("cpu")
    except vk.BackendUnavailableError as e:
        print("FORCED:", e)
"""


@pytest.mark.parametrize("how", ["env", "sys.modules"])
def test_package_works_without_C(how):
    if how == "env":
        res = _run(WORKS_WITHOUT_C, VFT_DISABLE_EXT="1")
        why = "VFT_DISABLE_EXT=1"
    else:
        res = _run("import sys; sys.modules['vft_kernels._C'] = None\n" + textwrap.dedent(WORKS_WITHOUT_C))
        why = "vft_kernels._C"
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "LOAD_ERROR:" in out and why in out.split("LOAD_ERROR:")[1].splitlines()[0]
    assert re.search(r"_C\s+not loaded: .*" + re.escape(why), out), out  # info says why
    assert "FORCED:" in out and why in out.split("FORCED:")[1], out



def test_import_does_not_load_C_until_an_op_needs_it():
    # dispatch.py's promise: importing the package (and vft on top of it) loads no
    # backend; the first op call that wants a kernel loads _C.
    code = """
        import sys, torch
        import vft_kernels as vk, vft
        print("AFTER_IMPORT:", "vft_kernels._C" in sys.modules)
        x = torch.randn(2, 3, 4, 4)
        y = vk.flow_step(x, torch.randn_like(x), 1.0, 0.5)
        print("AFTER_CALL:", "vft_kernels._C" in sys.modules)
    """
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert "AFTER_IMPORT: False" in res.stdout, res.stdout
    if _ext.C is not None:
        assert "AFTER_CALL: True" in res.stdout, res.stdout

def test_setup_without_torch_is_one_line():
    code = """
        import runpy, sys
        sys.modules["torch"] = None  # as if torch were not installed
        sys.argv = ["setup.py", "--version"]
        runpy.run_path("setup.py", run_name="__main__")
    """
    res = _run(code)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    assert "pip install torch" in res.stderr and "--no-build-isolation" in res.stderr, res.stderr


def test_setup_refuses_a_torch_older_than_the_tested_minimum(tmp_path):
    # A stand-in torch 2.6 on the path: setup.py must stop with a message naming both
    # versions, before any compile starts (README states the same minimum).
    fake = tmp_path / "torch"
    (fake / "utils").mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '2.6.0+cpu'\nclass version:\n    cuda = None\n")
    (fake / "utils" / "__init__.py").write_text("")
    (fake / "utils" / "cpp_extension.py").write_text(
        "CUDA_HOME = None\nBuildExtension = CppExtension = CUDAExtension = object\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "setup.py"), "--version"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "needs torch >= 2.14" in proc.stderr and "found torch 2.6.0+cpu" in proc.stderr, proc.stderr
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert ">= 2.14" in readme
