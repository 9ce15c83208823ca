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

// The argument checks every binding runs on each tensor it is given, before any kernel or
// parallel region: a tensor on the wrong device would otherwise be dereferenced from the
// wrong side (a crash, not an error). Each names the argument, the expectation and what
// was given. CUDA entry points also hold a c10::cuda::CUDAGuard for the tensors' device.
#define VFT_CHECK_CPU(t, name) \
  VFT_CHECK((t).device().is_cpu(), name, " must be a CPU tensor, got one on ", (t).device())
#define VFT_CHECK_SAME_DEVICE(t, ref, name) \
  VFT_CHECK((t).device() == (ref).device(), name, " must be on ", (ref).device(), ", got one on ", (t).device())
#define VFT_CHECK_DTYPE(t, dtype, name) \
  VFT_CHECK((t).scalar_type() == (dtype), name, " must be ", (dtype), ", got ", (t).scalar_type())
#define VFT_CHECK_CONTIGUOUS(t, name) \
  VFT_CHECK((t).is_contiguous(), name, " must be contiguous, got strides ", (t).strides())
#define VFT_CHECK_SHAPE(t, shape, name) \
  VFT_CHECK((t).sizes() == (shape), name, " must have shape ", (shape), ", got ", (t).sizes())
#endif
