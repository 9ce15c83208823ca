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
