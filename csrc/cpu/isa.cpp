// The CPU capability selection of vft/isa.h: what this CPU supports (cpuid, asked when the
// module loads, never the build machine's), the cap VFT_CPU_CAPABILITY puts on it, the
// per-thread override of use_cpu_capability, and their Python bindings. Compiled once, in
// the baseline unit.
#include "vft/isa.h"

#include <torch/extension.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "vft/bind.h"
#include "vft/common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define VFT_X86 1
#endif

namespace vft {
namespace isa {
namespace {

constexpr const char* kNames[kLevels] = {"baseline", "avx2", "avx512", "avx512_bf16", "amx"};
constexpr int kUnset = -1;

// The compiled variants: their capability levels, in the order of the dispatch tables.
constexpr int kVariantLevels[] = {kBaseline VFT_IF_AVX2(, kAvx2) VFT_IF_AVX512(, kAvx512)};
constexpr int kVariants = sizeof(kVariantLevels) / sizeof(int);

std::atomic<int> g_level{kBaseline};  // the process-wide capability (set once at load)
int g_supported = kBaseline;          // the highest level this CPU supports (set once at load)
thread_local int t_level = kUnset;    // use_cpu_capability's override on this thread

#ifdef VFT_X86
// AMX: CPUID.(7,0):EDX bits 24 (AMX-TILE) and 22 (AMX-BF16), with the OS saving the tile
// state (XCR0 bits 17 and 18). Linux still asks each process to request the tile data
// permission (oneDNN does so before it uses AMX).
bool cpu_has_amx() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((lo >> 17) & 3u) == 3u;
}
#endif

// The highest level this CPU and OS support (libgcc's checks include the OS saving the
// AVX / AVX-512 register state).
int detect() {
#ifdef VFT_X86
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("x86-64-v3")) return kBaseline;
  if (!__builtin_cpu_supports("x86-64-v4")) return kAvx2;
  if (!__builtin_cpu_supports("avx512bf16")) return kAvx512;
  return cpu_has_amx() ? kAmx : kAvx512Bf16;
#else
  return kBaseline;
#endif
}

// The CPU features the levels are made of, as this CPU reports them.
std::vector<std::string> features() {
  std::vector<std::string> out;
#ifdef VFT_X86
  __builtin_cpu_init();
#define VFT_FEATURE(name) \
  if (__builtin_cpu_supports(name)) out.emplace_back(name);
  VFT_FEATURE("sse4.2") VFT_FEATURE("popcnt") VFT_FEATURE("avx") VFT_FEATURE("avx2") VFT_FEATURE("fma")
  VFT_FEATURE("bmi2") VFT_FEATURE("f16c") VFT_FEATURE("avx512f") VFT_FEATURE("avx512bw") VFT_FEATURE("avx512vl")
  VFT_FEATURE("avx512dq") VFT_FEATURE("avx512cd") VFT_FEATURE("avx512bf16")
#undef VFT_FEATURE
  if (cpu_has_amx()) out.emplace_back("amx-tile+amx-bf16");
#endif
  return out;
}

std::string supported_list() {
  std::string s;
  for (int l = 0; l <= g_supported; ++l) s += std::string(l ? ", " : "") + kNames[l];
  return s;
}

// name -> level; an unknown name or one above this CPU's is a ValueError saying what it supports.
int parse(const std::string& name, const char* what) {
  for (int l = 0; l < kLevels; ++l) {
    if (name != kNames[l]) continue;
    VFT_CHECK(l <= g_supported, what, "=", name, ": this CPU does not support it; it supports ", supported_list());
    return l;
  }
  VFT_CHECK(false, what, "=", name, " is not a CPU capability: expected one of baseline, avx2, avx512, ",
            "avx512_bf16, amx; this CPU supports ", supported_list());
  return kBaseline;
}

// Called from the module's init (before any kernel can run).
void select_at_load() {
#ifdef VFT_X86
  __builtin_cpu_init();
  VFT_CHECK(__builtin_cpu_supports("x86-64-v2"), "vft_kernels._C needs an x86-64-v2 CPU (SSE4.2, POPCNT) for its ",
            "baseline kernels; this CPU lacks them");
#endif
  g_supported = detect();
  int level = g_supported;
  if (const char* env = std::getenv("VFT_CPU_CAPABILITY"); env != nullptr && *env != '\0') {
    level = parse(env, "VFT_CPU_CAPABILITY");
  }
  g_level.store(level);
}

int variant_of(int level) {
  int v = 0;
  for (int i = 0; i < kVariants; ++i)
    if (kVariantLevels[i] <= level) v = i;
  return v;
}

}  // namespace

int level() { return t_level != kUnset ? t_level : g_level.load(std::memory_order_relaxed); }

int variant() { return variant_of(level()); }

void bind_isa(pybind11::module_& m) {
  select_at_load();
  m.def(
      "cpu_capability", [] { return std::string(kNames[level()]); },
      "The CPU capability the kernels called from this thread use: baseline, avx2, avx512, avx512_bf16 or amx.");
  m.def(
      "set_thread_cpu_capability",
      [](const std::string& name) {
        const std::string previous = t_level == kUnset ? "" : kNames[t_level];
        t_level = name.empty() ? kUnset : parse(name, "cpu capability");
        return previous;
      },
      "Override the capability for this thread ('' removes the override); returns the previous override "
      "('' when there was none). Used by vft_kernels.use_cpu_capability.",
      pybind11::arg("name"));
  m.def(
      "cpu_capabilities",
      [] {
        pybind11::dict d;
        std::vector<std::string> supported, variants;
        for (int l = 0; l <= g_supported; ++l) supported.emplace_back(kNames[l]);
        for (int i = 0; i < kVariants; ++i) variants.emplace_back(kNames[kVariantLevels[i]]);
        d["supported"] = supported;  // by this CPU, lowest first
        d["compiled"] = variants;    // the code variants in this build
        d["default"] = std::string(kNames[g_level.load()]);  // the process-wide choice made at load
        d["variant"] = std::string(kNames[kVariantLevels[variant()]]);  // the code this thread runs
        d["features"] = features();
        return d;
      },
      "What this CPU supports, which code variants were compiled, the capability chosen at load and the "
      "variant the calling thread runs.");
}

}  // namespace isa
}  // namespace vft
