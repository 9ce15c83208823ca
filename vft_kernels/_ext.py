"""Loads the compiled extension vft_kernels._C, remembering why it failed if it did.

The package works without it (reference backend); ``python -m vft_kernels.info`` shows
``load_error``.
"""
import os

import torch

C = None
load_error = None

if os.environ.get("VFT_DISABLE_EXT") == "1":
    load_error = "disabled by VFT_DISABLE_EXT=1"
else:
    try:
        from . import _C as C  # noqa: N812
    except ImportError as e:
        if "VFT_CPU_CAPABILITY" in str(e):  # a bad cap is the user's error: say so, loudly
            raise ValueError(str(e).split("\nException raised from")[0].strip()) from None
        load_error = f"{type(e).__name__}: {e}"
        if "undefined symbol" in str(e):
            load_error += (
                f" -- _C was probably built against another torch than the installed {torch.__version__};"
                " rebuild with `pip install --no-build-isolation -e .`"
            )

if C is not None:
    built = C.build_info().get("torch", "")
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        load_error = f"_C was built for torch {built}, but torch {torch.__version__} is installed; rebuild it"
        C = None
