// Each op's C++ file defines one bind_<op>() that adds its CPU (and, when built with
// VFT_WITH_CUDA, CUDA) entry points to the extension module. bindings.cpp calls them all.
#pragma once
#include <torch/extension.h>

#include <string>

namespace vft {
void bind_fsq(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_flow(pybind11::module_& m);
void bind_block(pybind11::module_& m);
void bind_alloc(pybind11::module_& m);
namespace isa {
// cpu_capability, cpu_capabilities, set_thread_cpu_capability; selects the variant at load.
void bind_isa(pybind11::module_& m);
}  // namespace isa
#ifdef VFT_WITH_CUDA
// Defined in csrc/cuda/device_info.cu: nvcc version and the archs it compiled for.
std::string cuda_compiler_info();
#endif
}  // namespace vft
