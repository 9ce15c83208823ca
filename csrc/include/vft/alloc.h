// Kernel outputs on the CPU, backed by transparent huge pages when they are large.
//
// A fresh output of tens of megabytes costs one page fault per 4 KiB page the kernel
// writes: glibc's malloc serves blocks of at least 32 MiB (its largest dynamic mmap
// threshold on 64-bit) with a fresh mmap every time, so every call faults every page. For
// FSQ on 4M tokens that was 30 ms of a 47 ms call, against 10 ms for the kernel itself.
// Outputs of at least kHugeMinBytes get their own mapping, 2 MiB aligned, with its whole
// 2 MiB pages advised MADV_HUGEPAGE, so they fault 512x less often (the tail past the last
// whole 2 MiB page keeps 4 KiB pages: no memory is spent on rounding); freeing unmaps it.
// Smaller outputs stay with torch's allocator: glibc reuses them from its heap after the
// first free, without faults, where a fresh huge page would cost its zeroing every call.
// The tensors are ordinary CPU tensors (resizable). Used when the kernel allows huge pages
// for madvised memory (/sys/kernel/mm/transparent_hugepage/enabled is "always" or
// "madvise") and VFT_HUGE_PAGES is not "0"; otherwise at::empty.
#pragma once
#include <ATen/ATen.h>

#include <cstddef>
#include <string>

namespace vft {

constexpr size_t kHugePageBytes = size_t(2) << 20;
constexpr size_t kHugeMinBytes = size_t(32) << 20;

// "madvise", "always", "never", "unavailable" (not Linux, or no THP), or "disabled" (VFT_HUGE_PAGES=0).
const std::string& huge_page_mode();
bool huge_pages_used();

// A contiguous CPU tensor; huge-page backed when huge_pages_used() and it is large enough.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace vft
