// CUDA kernels of FSQ (docs/spec.md §1), using the per-element math of vft/fsq_math.h (the same
// code the CPU kernels run and the CPU tests validate). One thread per row of the
// [rows, d] view (d <= 16 values, strided), grid-stride loop, int64 offsets.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

#include "vft/common.h"
#include "vft/fsq_math.h"

namespace vft {
namespace {

constexpr int kMaxDims = 16;
constexpr int kThreads = 256;

// Passed by value (kernel parameter space): per-dim constants and index basis.
struct Params {
  fsq::DimConst c[kMaxDims];
  int64_t basis[kMaxDims];
  int64_t levels[kMaxDims];
  int d;
};

// d dims; consts (CPU float32 [d, 4], may be undefined) and levels (may be empty) fill
// the per-dim constants and the index basis.
Params make_params(int64_t d, const at::Tensor& consts, const std::vector<int64_t>& levels) {
  VFT_CHECK(d >= 1 && d <= kMaxDims, "fsq: the cuda kernel supports 1..", kMaxDims, " dims, got ", d);
  Params p{};
  p.d = static_cast<int>(d);
  int64_t acc = 1;
  for (size_t j = 0; j < levels.size(); ++j) {
    p.levels[j] = levels[j];
    p.basis[j] = acc;
    acc *= levels[j];
  }
  if (consts.defined()) {
    VFT_CHECK(consts.device().is_cpu() && consts.scalar_type() == at::kFloat && consts.is_contiguous() &&
                  consts.dim() == 2 && consts.size(0) == d && consts.size(1) == 4,
              "fsq: consts must be a contiguous CPU float32 tensor [", d, ", 4], got ", consts.sizes());
    const float* c = consts.const_data_ptr<float>();
    for (int64_t j = 0; j < d; ++j) p.c[j] = {c[4 * j], c[4 * j + 1], c[4 * j + 2], c[4 * j + 3]};
  }
  return p;
}

int blocks_for(int64_t rows) {
  const int64_t want = (rows + kThreads - 1) / kThreads;
  return static_cast<int>(want < 65535 * 8 ? want : 65535 * 8);
}

template <typename T, typename C, typename Idx>
__global__ void forward_kernel(const T* __restrict__ z, C* __restrict__ codes, Idx* __restrict__ idx, int64_t rows,
                               int64_t s_row, int64_t s_dim, const Params p) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // Unsigned accumulation: wraps like the reference's int64 -> int32 cast, never UB.
    using Acc = std::conditional_t<sizeof(Idx) == 4, uint32_t, uint64_t>;
    Acc sum = 0;
    bool nan = false;
    for (int j = 0; j < p.d; ++j) {
      const fsq::DimConst& c = p.c[j];
      const float x = static_cast<float>(z[r * s_row + j * s_dim]) + c.shift;
      const float q = fsq::round_half_even(fsq::tanh_f32(x) * c.half_l - c.offset);
      const bool is_nan = x != x;
      codes[r * p.d + j] = static_cast<C>(is_nan ? x : fsq::div_code(q, c.half_w, 0.0f));
      nan |= is_nan;
      const float digit = is_nan ? 0.0f : q + c.half_w;
      sum += static_cast<Acc>(static_cast<std::make_signed_t<Acc>>(digit)) * static_cast<Acc>(p.basis[j]);
    }
    idx[r] = nan ? Idx(-1) : static_cast<Idx>(sum);
  }
}

template <typename G, typename T>
__global__ void backward_kernel(const G* __restrict__ g, const T* __restrict__ z, T* __restrict__ out, int64_t rows,
                                int64_t sg_row, int64_t sg_dim, int64_t sz_row, int64_t sz_dim, const Params p) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    for (int j = 0; j < p.d; ++j) {
      const fsq::DimConst& c = p.c[j];
      const float gz = fsq::grad(static_cast<float>(g[r * sg_row + j * sg_dim]), static_cast<float>(z[r * sz_row + j * sz_dim]),
                                 c.shift, c.half_l / c.half_w);
      out[r * p.d + j] = static_cast<T>(gz);
    }
  }
}

template <typename Idx>
__global__ void decode_kernel(const Idx* __restrict__ idx, float* __restrict__ codes, int64_t rows, int64_t s,
                              const Params p) {
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = static_cast<int64_t>(idx[r * s]);
    for (int j = 0; j < p.d; ++j) {
      const int64_t L = p.levels[j], b = p.basis[j];
      int64_t q = v / b;
      if (v - q * b < 0) --q;  // floor division, like the reference
      int64_t m = q % L;
      if (m < 0) m += L;
      const float half_w = static_cast<float>(L / 2);
      codes[r * p.d + j] = v == -1 ? __int_as_float(0x7fc00000) : __fdiv_rn(static_cast<float>(m) - half_w, half_w);
    }
  }
}

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: VFT_CHECK(false, "fsq: unsupported dtype ", t, " (float32, float16, bfloat16)");
  }
}

}  // namespace

void fsq_forward_cuda(const at::Tensor& z2, at::Tensor codes, at::Tensor indices, const at::Tensor& consts,
                      const std::vector<int64_t>& levels) {
  const Params p = make_params(static_cast<int64_t>(levels.size()), consts, levels);
  VFT_CHECK(z2.is_cuda() && codes.is_cuda() && indices.is_cuda() && z2.dim() == 2 && z2.size(1) == p.d &&
                codes.is_contiguous() && codes.sizes() == z2.sizes() && indices.is_contiguous() &&
                indices.numel() == z2.size(0),
            "fsq: cuda forward expects z [rows, ", p.d, "], contiguous codes and indices on CUDA; got z ",
            z2.sizes(), ", codes ", codes.sizes(), ", indices ", indices.sizes());
  VFT_CHECK_SAME_DEVICE(codes, z2, "fsq: codes");
  VFT_CHECK_SAME_DEVICE(indices, z2, "fsq: indices");
  const c10::cuda::CUDAGuard guard(z2.device());
  const int64_t rows = z2.size(0);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(z2.scalar_type(), [&](auto zt) {
    using T = decltype(zt);
    dispatch_float(codes.scalar_type(), [&](auto ct) {
      using C = decltype(ct);
      if (indices.scalar_type() == at::kInt) {
        forward_kernel<T, C, int32_t><<<blocks_for(rows), kThreads, 0, stream>>>(
            z2.const_data_ptr<T>(), codes.data_ptr<C>(), indices.data_ptr<int32_t>(), rows, z2.stride(0), z2.stride(1), p);
      } else {
        VFT_CHECK(indices.scalar_type() == at::kLong, "fsq: indices must be int32/int64, got ", indices.scalar_type());
        forward_kernel<T, C, int64_t><<<blocks_for(rows), kThreads, 0, stream>>>(
            z2.const_data_ptr<T>(), codes.data_ptr<C>(), indices.data_ptr<int64_t>(), rows, z2.stride(0), z2.stride(1), p);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fsq_backward_cuda(const at::Tensor& grad_codes2, const at::Tensor& z2, at::Tensor grad_z, const at::Tensor& consts) {
  const Params p = make_params(z2.size(1), consts, {});
  VFT_CHECK(z2.is_cuda() && grad_codes2.is_cuda() && grad_z.is_cuda() && grad_codes2.sizes() == z2.sizes() &&
                grad_z.is_contiguous() && grad_z.sizes() == z2.sizes(),
            "fsq: cuda backward expects grad_codes, z, grad_z [rows, d] on CUDA; got ", grad_codes2.sizes(), ", ",
            z2.sizes(), ", ", grad_z.sizes());
  VFT_CHECK_SAME_DEVICE(grad_codes2, z2, "fsq: grad_codes");
  VFT_CHECK_SAME_DEVICE(grad_z, z2, "fsq: grad_z");
  const c10::cuda::CUDAGuard guard(z2.device());
  const int64_t rows = z2.size(0);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(grad_codes2.scalar_type(), [&](auto gt) {
    using G = decltype(gt);
    dispatch_float(z2.scalar_type(), [&](auto zt) {
      using T = decltype(zt);
      backward_kernel<G, T><<<blocks_for(rows), kThreads, 0, stream>>>(
          grad_codes2.const_data_ptr<G>(), z2.const_data_ptr<T>(), grad_z.data_ptr<T>(), rows, grad_codes2.stride(0),
          grad_codes2.stride(1), z2.stride(0), z2.stride(1), p);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fsq_decode_cuda(const at::Tensor& indices, at::Tensor codes, const std::vector<int64_t>& levels) {
  const Params p = make_params(static_cast<int64_t>(levels.size()), at::Tensor(), levels);
  VFT_CHECK(indices.is_cuda() && codes.is_cuda() && indices.dim() == 1 && codes.is_contiguous() &&
                codes.scalar_type() == at::kFloat && codes.dim() == 2 && codes.size(0) == indices.size(0) &&
                codes.size(1) == p.d,
            "fsq: cuda decode expects indices [rows] and contiguous float32 codes [rows, ", p.d, "] on CUDA; got ",
            indices.sizes(), ", ", codes.sizes());
  VFT_CHECK_SAME_DEVICE(codes, indices, "fsq: codes");
  const c10::cuda::CUDAGuard guard(indices.device());
  const int64_t rows = indices.size(0);
  if (rows == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (indices.scalar_type() == at::kInt) {
    decode_kernel<int32_t><<<blocks_for(rows), kThreads, 0, stream>>>(indices.const_data_ptr<int32_t>(),
                                                                       codes.data_ptr<float>(), rows, indices.stride(0), p);
  } else {
    VFT_CHECK(indices.scalar_type() == at::kLong, "fsq: indices must be int32 or int64, got ", indices.scalar_type());
    decode_kernel<int64_t><<<blocks_for(rows), kThreads, 0, stream>>>(indices.const_data_ptr<int64_t>(),
                                                                       codes.data_ptr<float>(), rows, indices.stride(0), p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vft
