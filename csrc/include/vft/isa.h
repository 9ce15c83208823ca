// Runtime ISA dispatch of the CPU kernels.
//
// setup.py compiles the CPU kernel sources (fsq, attention, flow, block) once per variant
// into the one extension, each into its own namespace so that nothing is shared by name:
//
//   variant        namespace      flags (x86-64)                      runs on
//   baseline       isa_baseline   -march=x86-64-v2 (or VFT_CPU_ARCH)  every x86-64-v2 CPU
//   avx2           isa_avx2       -march=x86-64-v3                    AVX2 + FMA + BMI2 + F16C
//   avx512         isa_avx512     -march=x86-64-v4                    AVX-512 F/BW/CD/DQ/VL
//
// (VFT_ISA_NS / VFT_ISA_LEVEL are set on the command line; VFT_HAVE_AVX2 / VFT_HAVE_AVX512
// say which variants the build has, for the dispatch tables.) The baseline unit also holds
// everything compiled once: the Python bindings, the checks shared with the CUDA kernels,
// the selection below and the allocator. Only it may run at load: the variant units define
// no static initialisers, and their code runs only after the selection has checked the CPU.
//
// Capability levels (what the user caps with VFT_CPU_CAPABILITY or use_cpu_capability):
// baseline < avx2 < avx512 < avx512_bf16 < amx. The two top levels run the avx512 code
// (our kernels have no use for AVX512-BF16 instructions: their float -> bf16 conversion
// flushes subnormals, where c10::BFloat16 does not) and additionally let the attention's
// bf16 forward use oneDNN's bf16 tile products (vdpbf16ps / AMX tiles).
#pragma once

#include <cstdint>
#include <utility>

#ifndef VFT_ISA_NS
#define VFT_ISA_NS isa_baseline
#define VFT_ISA_LEVEL 0
#endif
#define VFT_ISA_PRIMARY (VFT_ISA_LEVEL == 0)

namespace vft {
namespace isa {

enum Level : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };
constexpr int kLevels = 5;

// The capability in use by the calling thread: its use_cpu_capability override, else the
// process-wide level chosen at load (cpuid, capped by VFT_CPU_CAPABILITY).
int level();
// Index of the compiled variant that runs that capability (into the dispatch tables below).
int variant();

// A binding that calls fn of the variant the calling thread's capability selects.
template <typename F>
struct Dispatch;
template <typename R, typename... A>
struct Dispatch<R (*)(A...)> {
  template <R (*... Fs)(A...)>
  static R call(A... a) {
    static constexpr R (*kTable[])(A...) = {Fs...};
    return kTable[variant()](std::forward<A>(a)...);
  }
};

}  // namespace isa
}  // namespace vft

#ifdef VFT_HAVE_AVX2
#define VFT_IF_AVX2(...) __VA_ARGS__
#else
#define VFT_IF_AVX2(...)
#endif
#ifdef VFT_HAVE_AVX512
#define VFT_IF_AVX512(...) __VA_ARGS__
#else
#define VFT_IF_AVX512(...)
#endif

// Declares ns::fn of the other variants with the baseline's signature (at namespace vft
// scope, in the baseline unit, after the baseline's definition). ns is the op's namespace
// inside the variant's (fsq_cpu, attention_cpu, flow_cpu, block_cpu).
#define VFT_DECLARE_VARIANTS(ns, fn)                                                          \
  VFT_IF_AVX2(namespace isa_avx2 { namespace ns { decltype(::vft::isa_baseline::ns::fn) fn; } }) \
  VFT_IF_AVX512(namespace isa_avx512 { namespace ns { decltype(::vft::isa_baseline::ns::fn) fn; } })

// The dispatching entry point of ns::fn, for pybind11's m.def.
#define VFT_DISPATCH(ns, fn)                                                                 \
  (&::vft::isa::Dispatch<decltype(&::vft::isa_baseline::ns::fn)>::template call<            \
      &::vft::isa_baseline::ns::fn VFT_IF_AVX2(, &::vft::isa_avx2::ns::fn) VFT_IF_AVX512(, &::vft::isa_avx512::ns::fn)>)
