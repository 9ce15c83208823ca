// Shared helpers for the CPU and CUDA kernels: portable function qualifiers and argument
// checks that raise Python ValueError (via c10::ValueError) with expected/actual values.
#pragma once

#if defined(__CUDACC__)
#define VFT_HD __host__ __device__ __forceinline__
#else
#define VFT_HD inline
#endif

#ifndef __CUDACC_RTC__
#include <c10/util/Exception.h>
// TORCH_CHECK_VALUE raises c10::ValueError, which pybind11 turns into Python ValueError.
#define VFT_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "vft: ", __VA_ARGS__)
#endif
