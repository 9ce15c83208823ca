// CUDA kernels of the flow ODE step (docs/spec.md §3). Same structure as the Triton kernels:
// one launch for none / cfg / Heun; two for APG (per-(group, chunk) partial sums, then an
// update pass whose blocks fold their group's partials into the APG coefficients and write
// x_next, the momentum state and the prefix frames). Per-element math: vft/flow_math.h.
// Tensors are viewed as rows x L (rows = groups for APG, samples otherwise); grid
// (cdiv(L, kTile), rows); int64 offsets.
// c10 headers only: ATen/cuda/CUDAContext.h pulls in cusparse.h, which a bare toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "vft/flow_math.h"

namespace vft {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTile = 2048;  // elements per update block
constexpr int kMaxPart = 64;     // partial sums per group (chunks of the reduction)
constexpr int64_t kMaxRows = 65535;

template <typename T>
__device__ __forceinline__ float ldf(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? scratch[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, typename M, bool kMom>
__global__ void __launch_bounds__(kThreads) apg_reduce_kernel(const T* __restrict__ vc, const T* __restrict__ vu,
                                                              const M* __restrict__ state, float* __restrict__ part,
                                                              int64_t L, int64_t chunk, float momentum) {
  __shared__ float scratch[kThreads / 32];
  const int64_t base = static_cast<int64_t>(blockIdx.y) * L;
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t hi = min(L, lo + chunk);
  float dd = 0.f, dv = 0.f, vv = 0.f;
  for (int64_t i = base + lo + threadIdx.x; i < base + hi; i += kThreads) {
    const float c = ldf(vc, i);
    float d;
    if constexpr (kMom) {
      d = flow::apg_diff(c, ldf(vu, i), momentum, ldf(state, i));
    } else {
      d = flow::apg_diff(c, ldf(vu, i));
    }
    dd += d * d;
    dv += d * c;
    vv += c * c;
  }
  dd = block_sum(dd, scratch);
  dv = block_sum(dv, scratch);
  vv = block_sum(vv, scratch);
  if (threadIdx.x == 0) {
    float* p = part + (static_cast<int64_t>(blockIdx.y) * kMaxPart + blockIdx.x) * 3;
    p[0] = dd;
    p[1] = dv;
    p[2] = vv;
  }
}

struct Scalars {
  float scale, eta, threshold, momentum;
};

template <typename T, typename M, int kMode, bool kMom, bool kPrefix>
__global__ void __launch_bounds__(kThreads)
    update_kernel(T* out, const T* x, const T* a, const T* b, M* state, const T* __restrict__ prefix,
                  const float* __restrict__ part, const float* __restrict__ t, const float* __restrict__ tn, int64_t L,
                  int64_t rows_per_sample, int n_part, Scalars s, flow::Prefix geo) {
  const int64_t row = blockIdx.y;
  const int64_t sample = row / rows_per_sample;
  const float dt = tn[sample] - t[sample];
  flow::ApgCoeffs k{1.f, 0.f};
  if constexpr (kMode == flow::kApg) {
    __shared__ flow::ApgCoeffs shared_k;
    if (threadIdx.x == 0) {
      float dd = 0.f, dv = 0.f, vv = 0.f;
      for (int j = 0; j < n_part; ++j) {
        const float* p = part + (row * kMaxPart + j) * 3;
        dd += p[0];
        dv += p[1];
        vv += p[2];
      }
      shared_k = flow::apg_coeffs(dd, dv, vv, s.scale, s.eta, s.threshold);
    }
    __syncthreads();
    k = shared_k;
  }
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t hi = min(L, lo + kTile);
  for (int64_t col = lo + threadIdx.x; col < hi; col += kThreads) {
    const int64_t i = row * L + col;
    const float va = ldf(a, i);
    float v;
    if constexpr (kMode == flow::kNone) {
      v = va;
    } else if constexpr (kMode == flow::kCfg) {
      v = flow::cfg_velocity(va, ldf(b, i), s.scale);
    } else if constexpr (kMode == flow::kHeun) {
      v = flow::heun_velocity(va, ldf(b, i));
    } else {
      float d;
      if constexpr (kMom) {
        d = flow::apg_diff(va, ldf(b, i), s.momentum, ldf(state, i));
        state[i] = static_cast<M>(d);
      } else {
        d = flow::apg_diff(va, ldf(b, i));
      }
      v = flow::apg_velocity(va, d, k);
    }
    float res = flow::euler(ldf(x, i), dt, v);
    if constexpr (kPrefix) {
      const int64_t r = i / geo.inner;
      if (r % geo.T < geo.P) res = ldf(prefix, flow::prefix_index(i, r, geo));
    }
    out[i] = static_cast<T>(res);
  }
}

// Calls f(T{}) with T the C++ type of a float32 / float16 / bfloat16 dtype.
template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      VFT_CHECK(false, "dtype ", st, " not supported (float32, float16, bfloat16)");
  }
}

template <int kMode, typename T, typename M, bool kMom>
void launch_update(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& a, const T* b, M* state,
                   const T* prefix, const float* part, const torch::Tensor& t, const torch::Tensor& tn, int64_t rows,
                   int64_t L, int64_t rows_per_sample, int n_part, Scalars s, flow::Prefix geo) {
  const dim3 grid(static_cast<unsigned>((L + kTile - 1) / kTile), static_cast<unsigned>(rows));
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto args = [&](auto kernel) {
    kernel<<<grid, kThreads, 0, stream>>>(out.data_ptr<T>(), x.data_ptr<T>(), a.data_ptr<T>(), b, state, prefix, part,
                                          t.data_ptr<float>(), tn.data_ptr<float>(), L, rows_per_sample, n_part, s,
                                          geo);
  };
  if (prefix != nullptr) {
    args(update_kernel<T, M, kMode, kMom, true>);
  } else {
    args(update_kernel<T, M, kMode, kMom, false>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* ptr_or_null(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace

void flow_step_cuda(torch::Tensor out, torch::Tensor x, torch::Tensor v_cond, c10::optional<torch::Tensor> v_uncond,
                    torch::Tensor t, torch::Tensor t_next, const std::string& guidance, double scale, double apg_eta,
                    double apg_norm_threshold, double apg_momentum, c10::optional<torch::Tensor> momentum,
                    int64_t reduce_ndim, c10::optional<torch::Tensor> prefix, int64_t prefix_len) {
  const Prepared prep = flow_prepare(out, x, v_cond, v_uncond, t, t_next, guidance, apg_momentum, momentum,
                                     reduce_ndim, prefix, prefix_len);
  const flow::Mode mode = prep.mode;
  const flow::Geometry& geo = prep.geo;
  VFT_CHECK(x.is_cuda(), "flow_step_cuda needs CUDA tensors, got ", x.device());
  if (geo.numel == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const Scalars s{static_cast<float>(scale), static_cast<float>(apg_eta), static_cast<float>(apg_norm_threshold),
                  static_cast<float>(apg_momentum)};
  const int64_t rows = mode == flow::kApg ? geo.G : geo.B;
  const int64_t L = geo.numel / rows;
  VFT_CHECK(rows <= kMaxRows, "at most ", kMaxRows, " rows (APG groups or samples) per launch, got ", rows);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* pre = ptr_or_null<T>(prefix);
    if (mode == flow::kNone) {
      launch_update<flow::kNone, T, float, false>(out, x, v_cond, nullptr, nullptr, pre, nullptr, t, t_next, rows, L,
                                                  1, 0, s, geo.prefix);
      return;
    }
    const T* vu = v_uncond->data_ptr<T>();
    if (mode == flow::kCfg) {
      launch_update<flow::kCfg, T, float, false>(out, x, v_cond, vu, nullptr, pre, nullptr, t, t_next, rows, L, 1, 0,
                                                 s, geo.prefix);
      return;
    }
    int64_t n_part = std::min<int64_t>(kMaxPart, (L + kTile - 1) / kTile);
    const int64_t chunk = (L + n_part - 1) / n_part;
    n_part = (L + chunk - 1) / chunk;
    auto part = torch::empty({rows, kMaxPart, 3}, x.options().dtype(torch::kFloat));
    const dim3 grid(static_cast<unsigned>(n_part), static_cast<unsigned>(rows));
    auto stream = c10::cuda::getCurrentCUDAStream();
    const T* vc = v_cond.data_ptr<T>();
    float* pp = part.data_ptr<float>();
    if (!momentum.has_value()) {
      apg_reduce_kernel<T, float, false><<<grid, kThreads, 0, stream>>>(vc, vu, nullptr, pp, L, chunk, 0.f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_update<flow::kApg, T, float, false>(out, x, v_cond, vu, nullptr, pre, pp, t, t_next, rows, L,
                                                 rows / geo.B, static_cast<int>(n_part), s, geo.prefix);
      return;
    }
    dispatch_float(momentum->scalar_type(), [&](auto mtag) {
      using M = decltype(mtag);
      M* state = momentum->data_ptr<M>();
      apg_reduce_kernel<T, M, true><<<grid, kThreads, 0, stream>>>(vc, vu, state, pp, L, chunk, s.momentum);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_update<flow::kApg, T, M, true>(out, x, v_cond, vu, state, pre, pp, t, t_next, rows, L, rows / geo.B,
                                            static_cast<int>(n_part), s, geo.prefix);
    });
  });
}

void flow_heun_step_cuda(torch::Tensor out, torch::Tensor x, torch::Tensor v1, torch::Tensor v2, torch::Tensor t,
                         torch::Tensor t_next) {
  const flow::Geometry geo = flow_check(out, x, v1, v2, t, t_next, flow::kHeun, c10::nullopt, 0, c10::nullopt, 0);
  VFT_CHECK(x.is_cuda(), "flow_heun_step_cuda needs CUDA tensors, got ", x.device());
  if (geo.numel == 0) return;
  VFT_CHECK(geo.B <= kMaxRows, "at most ", kMaxRows, " samples per launch, got ", geo.B);
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch_update<flow::kHeun, T, float, false>(out, x, v1, v2.data_ptr<T>(), nullptr, nullptr, nullptr, t, t_next,
                                                geo.B, geo.numel / geo.B, 1, 0, Scalars{1.f, 0.f, 0.f, 0.f},
                                                geo.prefix);
  });
}

}  // namespace vft
