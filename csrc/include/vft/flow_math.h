// Per-element math of the flow ODE step (docs/spec.md §3), shared by the CPU and CUDA kernels so
// that the CPU tests also validate the CUDA arithmetic. Everything is float32.
//
// APG in closed form: with d the momentum-updated v_cond - v_uncond, c = min(1, thr / |d|)
// (1 without threshold or when |d| = 0) and k = <d, v_cond> / |v_cond|^2 (0 when
// |v_cond| = 0), the thresholded diff is c d, its projection on u = v_cond / |v_cond| is
// c k v_cond, and v = v_cond + (scale - 1) (c d + (eta - 1) c k v_cond) = alpha v_cond + beta d.
#pragma once

#include <math.h>
#include <stdint.h>

#include "vft/common.h"

namespace vft {
namespace flow {

enum Mode : int { kNone = 0, kCfg = 1, kApg = 2, kHeun = 3 };

// The two per-group coefficients of APG from the group sums |d|^2, <d, v_cond>, |v_cond|^2.
struct ApgCoeffs {
  float alpha, beta;
};

VFT_HD ApgCoeffs apg_coeffs(float dd, float dv, float vv, float scale, float eta, float threshold) {
  // c = min(1, thr / |d|) as the reference's clamp: |d| = 0 gives 1, a NaN |d| gives NaN
  // (a NaN / inf velocity poisons its whole group, as in the reference).
  const float norm = sqrtf(dd);
  const float r = threshold / norm;
  const float c = (threshold > 0.f) ? (r >= 1.f ? 1.f : r) : 1.f;
  const float k = vv > 0.f ? dv / vv : 0.f;
  // A non-finite value anywhere in the group makes the reference's projection NaN for the
  // whole group (0 * NaN, inf - inf in <d, u> u); the closed form would keep some of it finite.
  if (!(isfinite(dd) && isfinite(dv) && isfinite(vv))) return {NAN, NAN};
  return {1.f + (scale - 1.f) * (eta - 1.f) * c * k, (scale - 1.f) * c};
}

// d = v_cond - v_uncond (+ momentum * previous running state).
VFT_HD float apg_diff(float vc, float vu, float momentum, float prev) { return (vc - vu) + momentum * prev; }
VFT_HD float apg_diff(float vc, float vu) { return vc - vu; }

VFT_HD float apg_velocity(float vc, float d, ApgCoeffs k) { return k.alpha * vc + k.beta * d; }

VFT_HD float cfg_velocity(float vc, float vu, float scale) { return vu + scale * (vc - vu); }

VFT_HD float heun_velocity(float v1, float v2) { return 0.5f * (v1 + v2); }

VFT_HD float euler(float x, float dt, float v) { return x + dt * v; }

// Prefix frames: x is [B, C, T, inner...] contiguous, prefix [B, C, P, inner...]. The prefix
// source of flat element i in row r = i / inner (an index over [B, C, T]), when r % T < P.
struct Prefix {
  int64_t T, P, inner;
};

VFT_HD int64_t prefix_index(int64_t i, int64_t row, Prefix g) {
  return ((row / g.T) * g.P + row % g.T) * g.inner + (i - row * g.inner);
}

// Shapes of one call: B samples of S = numel / B elements; G groups of L elements (APG).
struct Geometry {
  int64_t B, numel, G, L;
  Prefix prefix;
};

}  // namespace flow
}  // namespace vft

#if !defined(__CUDACC_RTC__)
#include <torch/extension.h>

#include <string>

// Host entry points (defined in csrc/cpu/flow.cpp; the _cuda ones in csrc/cuda/flow.cu).
namespace vft {
flow::Mode flow_mode(const std::string& guidance);
// Validates a call (contiguous tensors, dtypes, shapes) and returns its geometry.
flow::Geometry flow_check(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& v_cond,
                          const c10::optional<torch::Tensor>& v_uncond, const torch::Tensor& t,
                          const torch::Tensor& t_next, flow::Mode mode, const c10::optional<torch::Tensor>& momentum,
                          int64_t reduce_ndim, const c10::optional<torch::Tensor>& prefix, int64_t prefix_len);
// The common start of the flow_step entry points: parses guidance, drops a momentum state
// (no APG momentum) and a prefix (prefix_len 0) the call does not use, validates the call
// (flow_check) and returns its mode and geometry.
struct Prepared {
  flow::Mode mode;
  flow::Geometry geo;
};
Prepared flow_prepare(const torch::Tensor& out, const torch::Tensor& x, const torch::Tensor& v_cond,
                      const c10::optional<torch::Tensor>& v_uncond, const torch::Tensor& t,
                      const torch::Tensor& t_next, const std::string& guidance, double apg_momentum,
                      c10::optional<torch::Tensor>& momentum, int64_t reduce_ndim,
                      c10::optional<torch::Tensor>& prefix, int64_t prefix_len);
#ifdef VFT_WITH_CUDA
void flow_step_cuda(torch::Tensor out, torch::Tensor x, torch::Tensor v_cond, c10::optional<torch::Tensor> v_uncond,
                    torch::Tensor t, torch::Tensor t_next, const std::string& guidance, double scale, double apg_eta,
                    double apg_norm_threshold, double apg_momentum, c10::optional<torch::Tensor> momentum,
                    int64_t reduce_ndim, c10::optional<torch::Tensor> prefix, int64_t prefix_len);
void flow_heun_step_cuda(torch::Tensor out, torch::Tensor x, torch::Tensor v1, torch::Tensor v2, torch::Tensor t,
                         torch::Tensor t_next);
#endif
}  // namespace vft
#endif
