"""Which instruction-set variant of the C++ CPU kernels runs (csrc/include/vft/isa.h).

``vft_kernels._C`` holds the CPU kernels compiled several times: a portable baseline
(x86-64-v2), AVX2 + FMA (x86-64-v3) and AVX-512 (x86-64-v4). When it loads it asks the CPU
(cpuid) what it supports and picks the highest level; ``VFT_CPU_CAPABILITY`` caps it::

    VFT_CPU_CAPABILITY=baseline|avx2|avx512|avx512_bf16|amx

(an unknown value, or one this CPU does not support, is a ValueError that lists what the CPU
supports, raised where the extension loads: the first op call that wants a C++ kernel). ``avx512_bf16`` and ``amx`` run the AVX-512 code
and additionally let bf16 attention forwards use bf16 tile products.

For tests and benchmarks, ``use_cpu_capability(name)`` switches the calling thread only
(other threads keep theirs), and ``cpu_capability()`` says what the calling thread uses.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

LEVELS = ("baseline", "avx2", "avx512", "avx512_bf16", "amx")


def _c(what: str):
    from . import _ext  # loads _C on first use (importing vft_kernels loads no backend)

    if _ext.C is None or not hasattr(_ext.C, "cpu_capability"):
        raise RuntimeError(f"{what} needs the C++ extension vft_kernels._C, which did not load ({_ext.load_error})")
    return _ext.C


def cpu_capability() -> Optional[str]:
    """The capability the CPU kernels called from this thread use (one of ``LEVELS``), or None
    when the C++ extension is not available."""
    from . import _ext

    if _ext.C is None or not hasattr(_ext.C, "cpu_capability"):
        return None
    return _ext.C.cpu_capability()


def cpu_capabilities() -> dict:
    """``{"supported": levels this CPU has (lowest first), "compiled": the code variants built,
    "default": the level chosen at load, "variant": the code this thread runs, "features": the
    CPU's relevant features}``."""
    return dict(_c("cpu_capabilities").cpu_capabilities())


@contextlib.contextmanager
def use_cpu_capability(name: str) -> Iterator[str]:
    """Run the CPU kernels at capability ``name`` on this thread inside the block (restored on
    exit, also on error; nests). ValueError for an unknown name or one this CPU lacks."""
    c = _c("use_cpu_capability")
    previous = c.set_thread_cpu_capability(str(name))
    try:
        yield c.cpu_capability()
    finally:
        c.set_thread_cpu_capability(previous)
