"""``python -m vft_kernels.info``: what is built, what is available, and which backend each
op uses on each device (and why the others are not used)."""
from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, _ext, dispatch


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError as e:
        return f"not installed ({e})"


def report() -> str:
    lines = [
        f"vft_kernels {__version__}",
        f"python      {sys.version.split()[0]} ({platform.machine()})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
        f"GPU available: {torch.cuda.is_available()}"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "") + ")",
        f"triton      {_triton_version()}"
        + ("  [TRITON_INTERPRET=1: Triton kernels run on CPU tensors]" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
        f"threads     {torch.get_num_threads()} (torch intra-op)",
    ]
    if _ext.C is None:
        lines.append(f"_C          not loaded: {_ext.load_error}")
    else:
        bi = _ext.C.build_info()
        kernels = sorted(n for n in dir(_ext.C) if n.endswith(("_cpu", "_cuda")))
        lines += [
            f"_C          built for torch {bi['torch']} (headers {bi.get('torch_headers')}), {bi['compiler']}, "
            f"OpenMP {bi.get('openmp')}",
            f"            cxx flags: {' '.join(bi['cxx_flags'])}",
            f"            CUDA kernels: {'yes, ' + (bi.get('cuda_compiler') or '') if bi['with_cuda'] else 'no'}"
            f" ({bi['cuda_reason']})",
            f"            kernels: {', '.join(kernels) if kernels else 'none yet'}",
        ]
        if hasattr(_ext.C, "cpu_capabilities"):
            caps = _ext.C.cpu_capabilities()
            variants = bi.get("cpu_variants", {})
            lines += [
                "            CPU kernel variants compiled: " + ", ".join(
                    f"{v} ({' '.join(f for f in variants.get(v, []) if f.startswith('-march'))})" for v in caps["compiled"]),
                f"            CPU features: {' '.join(caps['features']) or 'none of interest'}",
                f"            CPU capability: {caps['default']} (supported here: {', '.join(caps['supported'])}; "
                + (f"capped by VFT_CPU_CAPABILITY={os.environ['VFT_CPU_CAPABILITY']}"
                   if os.environ.get("VFT_CPU_CAPABILITY") else "VFT_CPU_CAPABILITY unset")
                + f") -> runs the {caps['variant']} variant",
            ]
        if hasattr(_ext.C, "attention_cpu_bf16_isa"):
            isa = _ext.C.attention_cpu_bf16_isa()
            names = {"amx": "AMX-BF16", "avx512_bf16": "AVX-512 BF16"}
            lines.append("            CPU attention, bf16 forward: "
                         + (f"bf16 tile products on {names[isa]}" if isa else
                            "float32 products (no AMX-BF16 / AVX-512 BF16 on this CPU, or this torch build's "
                            "bf16 brgemm failed its probe)"))
        if hasattr(_ext.C, "huge_pages"):
            hp = _ext.C.huge_pages()
            lines.append(f"            CPU outputs >= {hp['min_bytes'] >> 20} MiB: "
                         + ("on transparent huge pages" if hp["used"] else "ordinary pages")
                         + f" (THP mode: {hp['mode']}; VFT_HUGE_PAGES=0 turns it off)")
    forced = dispatch.forced_backend()
    lines.append(f"backend     {'forced: ' + forced if forced else 'automatic (VFT_BACKEND unset)'}")
    lines.append("")
    lines.append("op / device: backend that runs (first usable in priority order); why the others do not")
    for op in dispatch.OPS:
        for dev in ("cpu", "cuda"):
            rows = dispatch.explain(op, dev)
            usable = [b for b, why in rows if why is None]
            lines.append(f"  {op:20s} {dev:5s} -> {usable[0] if usable else 'none'}")
            for b, why in rows:
                if why is not None:
                    lines.append(f"  {'':20s} {'':5s}    {b}: {why}")
    lines.append("  (per-call arguments such as dtype or head dim can still make a backend fall back)")
    return "\n".join(lines)


def main():
    print(report())


if __name__ == "__main__":
    main()
