// Huge-page backed CPU outputs (see vft/alloc.h).
#include "vft/alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <string>

#include "vft/bind.h"
#include "vft/common.h"
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace vft {
namespace {

std::string read_mode() {
  const char* env = std::getenv("VFT_HUGE_PAGES");
  if (env != nullptr && std::string(env) == "0") return "disabled";
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // The selected mode is the bracketed word: "always [madvise] never".
  std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string word;
  while (f >> word)
    if (word.size() > 2 && word.front() == '[' && word.back() == ']') return word.substr(1, word.size() - 2);
#endif
  return "unavailable";
}

// One mapping: base and length as mmap returned them (after trimming to the aligned part).
struct Mapping {
  void* base;
  size_t length;
};

void unmap(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
#if defined(__linux__)
  munmap(m->base, m->length);
#endif
  delete m;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (n >= kHugeMinBytes) {
      // Map 2 MiB more than needed, then unmap the unaligned head and the tail past the
      // last page, so the data starts on a 2 MiB boundary.
      const size_t page = 4096, length = (n + page - 1) / page * page;
      void* raw = mmap(nullptr, length + kHugePageBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK_WITH(OutOfMemoryError, raw != MAP_FAILED, "vft: out of memory mapping ", n,
                       " bytes for a kernel output");
      const auto start = reinterpret_cast<uintptr_t>(raw);
      const uintptr_t aligned = (start + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
      if (aligned > start) munmap(raw, aligned - start);
      const uintptr_t end = start + length + kHugePageBytes;
      if (end > aligned + length) munmap(reinterpret_cast<void*>(aligned + length), end - aligned - length);
      void* p = reinterpret_cast<void*>(aligned);
      // Only the whole 2 MiB pages: the tail stays on 4 KiB pages, so no memory is spent on
      // rounding. Advice only: a refusal leaves ordinary pages.
      madvise(p, n / kHugePageBytes * kHugePageBytes, MADV_HUGEPAGE);
      return {p, new Mapping{p, length}, &unmap, cpu};
    }
#endif
    return c10::GetCPUAllocator()->allocate(n);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator g_huge;

}  // namespace

const std::string& huge_page_mode() {
  static const std::string mode = read_mode();
  return mode;
}

bool huge_pages_used() {
  static const bool used = huge_page_mode() == "madvise" || huge_page_mode() == "always";
  return used;
}

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
  if (!huge_pages_used() || bytes < kHugeMinBytes) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(sizes, &g_huge, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::nullopt);
}

void bind_alloc(pybind11::module_& m) {
  m.def(
      "empty_cpu", [](const std::vector<int64_t>& sizes, at::ScalarType dtype) {
        int64_t bytes = c10::elementSize(dtype);
        for (int64_t s : sizes) {
          VFT_CHECK(s >= 0, "empty_cpu: sizes must be >= 0, got ", at::IntArrayRef(sizes));
          VFT_CHECK(s == 0 || bytes <= std::numeric_limits<int64_t>::max() / s, "empty_cpu: sizes ",
                    at::IntArrayRef(sizes), " of ", dtype, " overflow the addressable bytes");
          bytes = s == 0 ? 0 : bytes * s;
        }
        return empty_output(sizes, dtype);
      },
      "An uninitialised contiguous CPU tensor for a kernel output: huge-page backed from 32 MiB "
      "when the OS allows it (see huge_pages()), else torch.empty.",
      pybind11::arg("sizes"), pybind11::arg("dtype"));
  m.def(
      "huge_pages", [] {
        pybind11::dict d;
        d["mode"] = huge_page_mode();
        d["used"] = huge_pages_used();
        d["min_bytes"] = kHugeMinBytes;
        return d;
      },
      "How kernel outputs are allocated: the transparent-huge-page mode read at first use "
      "(or 'disabled' by VFT_HUGE_PAGES=0), whether huge pages are used, and from what size.");
}

}  // namespace vft
