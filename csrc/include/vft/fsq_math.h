// Per-element FSQ math (docs/spec.md §1) shared by the CPU (csrc/cpu/fsq.cpp) and CUDA
// (csrc/cuda/fsq.cu) kernels, so the CPU tests validate the arithmetic the GPU runs.
//
// Everything is branch-free float32 arithmetic (selects, no library calls except
// rint/fabs/fma) so that GCC vectorises the element loops that call it.
#pragma once
#include <cstdint>

#include "vft/common.h"

#include <cmath>

namespace vft {
namespace fsq {

// Per-dim constants, computed on the host by the reference (float32) so that the kernels
// use bit-identical half_l / offset / shift.
struct DimConst {
  float half_l;   // (L - 1) * (1 + eps) / 2
  float offset;   // 0.5 if L even else 0
  float shift;    // atanh(offset / half_l)
  float half_w;   // L // 2
};

VFT_HD float abs_f32(float x) {
#if defined(__CUDACC__)
  return fabsf(x);
#else
  return std::fabs(x);
#endif
}

// Round half to even (torch.round), exact for every float in the default rounding mode.
VFT_HD float round_half_even(float x) {
#if defined(__CUDACC__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}

// 2/(exp(y)+1) for y in [0, inf] (NaN: unspecified). exp via 2^n * e^r, |r| <= ln2/2,
// degree-7 Taylor polynomial (truncation < 6e-9 relative). y is clamped to 20 (NaN too):
// beyond it tanh(y/2) rounds to 1 in float32 anyway, and 2^29 fits the int shift below.
VFT_HD float two_over_exp_plus_one(float y) {
  y = y < 20.0f ? y : 20.0f;
  const float n = round_half_even(y * 1.44269504088896341f);
  const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split hi + lo
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float e = p * static_cast<float>(1 << static_cast<int>(n));
  return 2.0f / (e + 1.0f);
}

// tanh(x) for |x| < 0.55: x + x^3 P(x^2), P a degree-4 least-squares fit (< 1 ulp there).
VFT_HD float tanh_small(float x) {
  const float t = x * x;
  float p = -0.006264492403715849f;
  p = p * t + 0.021064236760139465f;
  p = p * t - 0.05385032296180725f;
  p = p * t + 0.13332565128803253f;
  p = p * t - 0.33333316445350647f;
  return x + x * t * p;
}

// tanh(x), within ~3 ulp of the correctly rounded value (absolute error < 2e-7) for
// every finite x, exactly +-1 for +-inf, 0 at 0. NaN input gives an unspecified value:
// callers test isnan themselves.
//   |x| <  0.55: tanh_small
//   |x| >= 0.55: 1 - 2/(exp(2|x|)+1), no cancellation since the result is >= 0.5
VFT_HD float tanh_f32(float x) {
  const float a = abs_f32(x);
  const float big = 1.0f - two_over_exp_plus_one(2.0f * a);
  const float big_signed = x < 0.0f ? -big : big;
  const float small = tanh_small(x);
  return a < 0.55f ? small : big_signed;  // both computed: a select, vectorisable
}

// 1 - tanh(x)^2 = u (2 - u) with u = 1 - tanh|x| = 2/(exp(2|x|)+1), for every x: u is
// accurate to a few ulp relative, and d(u (2 - u))/du = 2 (1 - u) damps its error, so no
// cancellation anywhere and no branch (one exp per element; the loop vectorises).
VFT_HD float sech2_f32(float x) {
  const float u = two_over_exp_plus_one(2.0f * abs_f32(x));
  return u * (2.0f - u);
}

// q / half_w correctly rounded (bit-identical to the reference's division). CPU: one
// multiply by inv = RN(1 / half_w) and one fused correction step (Markstein), cheaper
// than a vector divide; checked against IEEE division for every half_w < 5000 and |q| <=
// half_w + 2, plus samples up to 2**22. CUDA: the IEEE division intrinsic.
VFT_HD float div_code(float q, float half_w, float inv) {
#if defined(__CUDA_ARCH__)
  (void)inv;
  return __fdiv_rn(q, half_w);
#else
  const float r = q * inv;
  return std::fma(std::fma(-r, half_w, q), inv, r);
#endif
}

// d codes / d z = half_l * (1 - tanh(z + shift)^2) / (L // 2); scale = half_l / (L // 2).
// NaN z gives a NaN gradient: multiplied in as a select of two constants, which stays a
// vector blend (a select of computed values lets GCC sink them into branches).
VFT_HD float grad(float g, float z, float shift, float scale) {
  const float x = z + shift;
  const float nan_or_one = x == x ? 1.0f : __builtin_nanf("");
  return g * scale * sech2_f32(x) * nan_or_one;
}

}  // namespace fsq
}  // namespace vft
