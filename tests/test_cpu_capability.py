"""Load-time behaviour of the CPU kernels: nothing runs when vft_kernels._C loads."""
import os
import subprocess
import sys

import pytest

from vft_kernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_c = pytest.mark.skipif(_ext.C is None, reason=f"vft_kernels._C did not load: {_ext.load_error}")


def _child(code, **env):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, **env))


@needs_c
def test_loading_runs_no_matrix_product():
    # oneDNN logs every brgemm it runs (ONEDNN_VERBOSE=all): none may run before the first
    # attention call (the tile-product probe is lazy), and the call itself does run them.
    code = ("import vft_kernels._C\nprint('LOADED', flush=True)\nimport torch, vft_kernels as vk\n"
            "q = torch.randn(1, 1, 70, 16)\n"
            "with vk.use_backend('cpu'):\n"
            "    vk.register_attention(q, q, q, vk.RegisterLayout(1, 70, 0, 'full'))\n"
            "print('CALLED', flush=True)\n")
    proc = _child(code, ONEDNN_VERBOSE="all")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    loaded = lines.index("LOADED")
    assert not [ln for ln in lines[:loaded] if "brgemm" in ln], "a brgemm ran while _C loaded"
    if any("brgemm" in ln for ln in lines):  # torch's brgemm runs here: it was used, after loading
        assert [ln for ln in lines[loaded:] if "brgemm" in ln]
