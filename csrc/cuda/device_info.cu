// Reports the nvcc version and target archs of this build (used by _C.build_info()).
#include <string>

namespace vft {
std::string cuda_compiler_info() {
  std::string s = "nvcc " + std::to_string(__CUDACC_VER_MAJOR__) + "." +
                  std::to_string(__CUDACC_VER_MINOR__);
#ifdef __CUDA_ARCH_LIST__
#define VFT_STR2(...) #__VA_ARGS__
#define VFT_STR(...) VFT_STR2(__VA_ARGS__)
  s += std::string(", archs ") + VFT_STR(__CUDA_ARCH_LIST__);
#endif
  return s;
}
}  // namespace vft
