"""Test-session setup shared by every test file.

* TRITON_INTERPRET=1 before anything imports triton, so the Triton kernels run on CPU
  tensors (forced with ``use_backend("triton")``; automatic selection on CPU never picks
  them). AOT-compile tests run in a subprocess without it.
* Kernel outputs are poisoned (NaN / sentinel) so unwritten elements fail the checks.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vft_kernels import dispatch  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_and_seed():
    torch.manual_seed(0)
    with dispatch.poison_outputs(True):
        yield
