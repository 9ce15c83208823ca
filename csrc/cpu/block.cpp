// CPU kernels of the transformer-block ops (docs/spec_block_ops.md): adaLN modulated
// LayerNorm fused with the gated residual, SwiGLU, QK-RMSNorm and QK-LayerNorm; forward and
// backward.
//
// Every kernel works on contiguous tensors (the host wrapper, vft_kernels/cpp/block.py,
// makes them so) one token row at a time: the row is read once into a float buffer, its
// statistics are taken with lane-parallel float sums folded into double (so the compiler
// vectorises them), and every output of the row is written while it is in cache. The
// modulation of a row is found from its index (frame = row / S, kind = s >= P), never
// materialised. Backward passes recompute the statistics / SiLU instead of storing them.
// Reductions over tokens (d scale, d shift, d gate) run per frame on one thread, so no
// atomics are needed; the QK weight gradients use one double partial per thread.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "vft/bind.h"
#include "vft/common.h"

namespace vft {
namespace {

using OptT = std::optional<at::Tensor>;
constexpr int64_t kLanes = 16;
// A parallel_for chunk is at least this many elements: below it, waking the thread team
// costs more than the work.
constexpr int64_t kGrainElems = 1 << 14;

int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(width, 1)); }

// sum of p[0, n) with kLanes independent float accumulators (vectorisable), folded in double.
inline double lane_sum(const float* p, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 16
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += p[i + l];
  }
  double s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += p[i];
  return s;
}

// sum of (p[i] - c)^2.
inline double lane_sq_dev(const float* p, int64_t n, float c) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 16
    for (int64_t l = 0; l < kLanes; ++l) {
      const float d = p[i + l] - c;
      acc[l] += d * d;
    }
  }
  double s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) {
    const double d = static_cast<double>(p[i]) - c;
    s += d * d;
  }
  return s;
}

// sum of a[i] * b[i].
inline double lane_dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 16
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  double s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// LayerNorm statistics of a float row: mean and 1 / sqrt(biased variance + eps), two-pass.
inline void row_stats(const float* p, int64_t n, double eps, float& mean, float& rstd) {
  const double mu = lane_sum(p, n) / n;
  const double var = lane_sq_dev(p, n, static_cast<float>(mu)) / n;
  mean = static_cast<float>(mu);
  rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
}

template <typename T>
inline void load_row(float* dst, const T* src, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Geometry of x [B*T, S, W] and of a modulation [B*T, K, W]: row r -> its modulation row.
struct Geo {
  int64_t S, W, P;
  inline int64_t frame(int64_t row) const { return row / S; }
  inline int64_t mod_row(int64_t row, int64_t K) const {
    const int64_t f = row / S, s = row % S;
    return f * K + ((K == 2 && s >= P) ? 1 : 0);
  }
};

template <typename T>
const T* ptr_or_null(const OptT& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_ptr_or_null(const OptT& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

int64_t kinds(const OptT& t) { return t.has_value() ? t->size(1) : 1; }

// ------------------------------------------------------------------------------------
// Block norm: x_new = x + gate[sel] h (optional), y = LN(x_new or x) (1 + scale[sel]) + shift[sel] (optional)

template <typename T>
void block_norm_forward_impl(const at::Tensor& x, const OptT& gate, const OptT& h, const OptT& scale,
                             const OptT& shift, int64_t P, double eps, const OptT& x_new, const OptT& y) {
  const int64_t W = x.size(2), S = x.size(1), rows = x.size(0) * S;
  const Geo geo{S, W, P};
  const T* xp = x.data_ptr<T>();
  const T *gp = ptr_or_null<T>(gate), *hp = ptr_or_null<T>(h), *scp = ptr_or_null<T>(scale),
          *shp = ptr_or_null<T>(shift);
  T *xo = mut_ptr_or_null<T>(x_new), *yo = mut_ptr_or_null<T>(y);
  const int64_t Kg = kinds(gate), Ksc = kinds(scale), Ksh = kinds(shift);
  at::parallel_for(0, rows, grain_rows(W), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(W);
    float* b = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * W;
      if (hp != nullptr) {
        const T* g = gp + geo.mod_row(r, Kg) * W;
        const T* hr = hp + r * W;
        T* out = xo + r * W;
#pragma GCC ivdep
        for (int64_t w = 0; w < W; ++w) {
          const T v = static_cast<T>(static_cast<float>(xr[w]) + static_cast<float>(g[w]) * static_cast<float>(hr[w]));
          out[w] = v;
          b[w] = static_cast<float>(v);  // the norm reads x_new as rounded to T
        }
      } else if (yo != nullptr) {
        load_row(b, xr, W);
      }
      if (yo == nullptr) continue;
      float m, rstd;
      row_stats(b, W, eps, m, rstd);
      const T* sc = scp + geo.mod_row(r, Ksc) * W;
      const T* sh = shp + geo.mod_row(r, Ksh) * W;
      T* out = yo + r * W;
#pragma GCC ivdep
      for (int64_t w = 0; w < W; ++w) {
        out[w] = static_cast<T>((b[w] - m) * rstd * (1.0f + static_cast<float>(sc[w])) + static_cast<float>(sh[w]));
      }
    }
  });
}

template <typename T>
void block_norm_backward_impl(const OptT& d_res, const OptT& dy, const at::Tensor& xn, const OptT& gate,
                              const OptT& h, const OptT& scale, int64_t P, double eps, const at::Tensor& g_out,
                              const OptT& dgate, const OptT& dh, const OptT& dscale, const OptT& dshift) {
  const int64_t W = xn.size(2), S = xn.size(1), frames = xn.size(0);
  const T *drp = ptr_or_null<T>(d_res), *dyp = ptr_or_null<T>(dy), *xp = xn.data_ptr<T>(),
          *gp = ptr_or_null<T>(gate), *hp = ptr_or_null<T>(h), *scp = ptr_or_null<T>(scale);
  T *go = g_out.data_ptr<T>(), *dgo = mut_ptr_or_null<T>(dgate), *dho = mut_ptr_or_null<T>(dh),
    *dsco = mut_ptr_or_null<T>(dscale), *dsho = mut_ptr_or_null<T>(dshift);
  const int64_t Kg = kinds(gate), Ksc = kinds(scale);
  const bool norm = scp != nullptr && dyp != nullptr;
  at::parallel_for(0, frames, std::max<int64_t>(1, grain_rows(W * S)), [&](int64_t f_begin, int64_t f_end) {
    std::vector<float> mem(3 * W);
    float *xh = mem.data(), *dyh = xh + W, *gf = dyh + W;
    // Sums over the S tokens of a frame: float partials over kFold tokens (vectorised), folded
    // into double, so they stay at least as accurate as a pairwise float sum.
    constexpr int64_t kFold = 16;
    std::vector<float> part(6 * W);
    std::vector<double> acc(6 * W);
    float* acc_sc = part.data();     // [2, W]
    float* acc_sh = acc_sc + 2 * W;  // [2, W]
    float* acc_g = acc_sh + 2 * W;   // [2, W]
    auto fold = [&]() {
      for (int64_t i = 0; i < 6 * W; ++i) {
        acc[i] += part[i];
        part[i] = 0.0f;
      }
    };
    for (int64_t f = f_begin; f < f_end; ++f) {
      std::fill(acc.begin(), acc.end(), 0.0);
      std::fill(part.begin(), part.end(), 0.0f);
      for (int64_t s = 0; s < S; ++s) {
        if (s % kFold == kFold - 1) fold();
        const int64_t r = f * S + s;
        if (drp != nullptr) {
          load_row(gf, drp + r * W, W);
        } else {
          std::fill(gf, gf + W, 0.0f);
        }
        if (norm) {
          load_row(xh, xp + r * W, W);
          float m, rstd;
          row_stats(xh, W, eps, m, rstd);
          const int64_t ks = (Ksc == 2 && s >= P) ? 1 : 0;
          const T* sc = scp + (f * Ksc + ks) * W;
          const T* dyr = dyp + r * W;
          float* asc = acc_sc + ks * W;
          float* ash = acc_sh + ks * W;
#pragma GCC ivdep
          for (int64_t w = 0; w < W; ++w) {
            const float d = static_cast<float>(dyr[w]);
            xh[w] = (xh[w] - m) * rstd;
            dyh[w] = d * (1.0f + static_cast<float>(sc[w]));
            asc[w] += d * xh[w];
            ash[w] += d;
          }
          const float a = static_cast<float>(lane_sum(dyh, W) / W);
          const float c = static_cast<float>(lane_dot(dyh, xh, W) / W);
#pragma GCC ivdep
          for (int64_t w = 0; w < W; ++w) gf[w] += rstd * (dyh[w] - a - xh[w] * c);
        }
        T* gr = go + r * W;
#pragma GCC ivdep
        for (int64_t w = 0; w < W; ++w) gr[w] = static_cast<T>(gf[w]);
        if (hp != nullptr) {
          const int64_t kg = (Kg == 2 && s >= P) ? 1 : 0;
          const T* gt = gp + (f * Kg + kg) * W;
          const T* hr = hp + r * W;
          T* dhr = dho + r * W;
          float* ag = acc_g + kg * W;
#pragma GCC ivdep
          for (int64_t w = 0; w < W; ++w) {
            dhr[w] = static_cast<T>(gf[w] * static_cast<float>(gt[w]));
            ag[w] += gf[w] * static_cast<float>(hr[w]);
          }
        }
      }
      fold();
      const double* tot_sc = acc.data();
      const double* tot_sh = tot_sc + 2 * W;
      const double* tot_g = tot_sh + 2 * W;
      if (dsco != nullptr) {
        for (int64_t k = 0; k < Ksc; ++k) {
          for (int64_t w = 0; w < W; ++w) {
            // K = 1: both kinds' sums go to the one shared row
            const double vsc = Ksc == 2 ? tot_sc[k * W + w] : tot_sc[w] + tot_sc[W + w];
            const double vsh = Ksc == 2 ? tot_sh[k * W + w] : tot_sh[w] + tot_sh[W + w];
            dsco[(f * Ksc + k) * W + w] = static_cast<T>(vsc);
            dsho[(f * Ksc + k) * W + w] = static_cast<T>(vsh);
          }
        }
      }
      if (dgo != nullptr) {
        for (int64_t k = 0; k < Kg; ++k) {
          for (int64_t w = 0; w < W; ++w) {
            dgo[(f * Kg + k) * W + w] = static_cast<T>(Kg == 2 ? tot_g[k * W + w] : tot_g[w] + tot_g[W + w]);
          }
        }
      }
    }
  });
}

void check_cpu_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_opt(const OptT& t, const at::Tensor& like, const char* name) {
  if (!t.has_value()) return;
  check_cpu_contig(*t, name);
  TORCH_CHECK(t->scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type(), ", got ",
              t->scalar_type());
}

// x [F, S, W] (F = B * T frames); gate / scale / shift [F, K, W]; h, x_new, y [F, S, W].
void block_norm_forward_cpu(const at::Tensor& x, const OptT& gate, const OptT& h, const OptT& scale,
                            const OptT& shift, int64_t patches, double eps, const OptT& x_new, const OptT& y) {
  check_cpu_contig(x, "x");
  TORCH_CHECK(x.dim() == 3, "x must be [frames, S, W], got ", x.sizes());
  for (auto* p : {&gate, &h, &scale, &shift, &x_new, &y}) check_opt(*p, x, "block_norm_forward_cpu argument");
  TORCH_CHECK(h.has_value() == gate.has_value() && h.has_value() == x_new.has_value(),
              "gate, h and x_new go together");
  TORCH_CHECK(scale.has_value() == shift.has_value() && scale.has_value() == y.has_value(),
              "scale, shift and y go together");
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_norm_forward_cpu", [&] {
    block_norm_forward_impl<scalar_t>(x, gate, h, scale, shift, patches, eps, x_new, y);
  });
}

void block_norm_backward_cpu(const OptT& d_res, const OptT& dy, const at::Tensor& xn, const OptT& gate,
                             const OptT& h, const OptT& scale, int64_t patches, double eps, const at::Tensor& g_out,
                             const OptT& dgate, const OptT& dh, const OptT& dscale, const OptT& dshift) {
  check_cpu_contig(xn, "xn");
  check_cpu_contig(g_out, "g_out");
  TORCH_CHECK(xn.dim() == 3, "xn must be [frames, S, W], got ", xn.sizes());
  for (auto* p : {&d_res, &dy, &gate, &h, &scale, &dgate, &dh, &dscale, &dshift})
    check_opt(*p, xn, "block_norm_backward_cpu argument");
  TORCH_CHECK(h.has_value() == gate.has_value() && h.has_value() == dh.has_value() && h.has_value() == dgate.has_value(),
              "gate, h, dgate and dh go together");
  TORCH_CHECK(scale.has_value() == dscale.has_value() && scale.has_value() == dshift.has_value(),
              "scale, dscale and dshift go together");
  if (xn.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xn.scalar_type(), "block_norm_backward_cpu", [&] {
    block_norm_backward_impl<scalar_t>(d_res, dy, xn, gate, h, scale, patches, eps, g_out, dgate, dh, dscale,
                                       dshift);
  });
}

// ------------------------------------------------------------------------------------
// SwiGLU: out = silu(a) b for gate_up = [a | b]

// exp(x) in plain float arithmetic that the compiler vectorises (libm's expf is a call per
// element): Cody-Waite reduction x = n ln2 + r with ln2 split in two, |r| <= ln2 / 2, and a
// degree-6 minimax polynomial for e^r (the classic single-precision coefficients), then
// 2^n from the exponent bits. Within about 2 ulp of expf on [-87.3, 88.7]; beyond it 0 / inf;
// NaN stays NaN.
inline float exp_f32(float x) {
  float xc = x < -87.3f ? -87.3f : x;
  xc = xc > 88.7f ? 88.7f : xc;
  // n = round(x / ln2) by the 1.5 * 2^23 trick (std::floor does not vectorise here)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float e = y * two_n;
  return x > 88.7f ? INFINITY : (x < -87.3f ? 0.0f : e);
}

inline float sigmoid_f32(float a) { return 1.0f / (1.0f + exp_f32(-a)); }

// out[i] = silu(a[i]) * b[i], float buffers.
inline void silu_mul(float* out, const float* a, const float* b, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * sigmoid_f32(a[i]) * b[i];
}

// d silu(a) b / da and / db times d.
inline void silu_mul_backward(float* da, float* db, const float* a, const float* b, const float* d, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float sig = sigmoid_f32(a[i]);
    da[i] = d[i] * b[i] * sig * (1.0f + a[i] * (1.0f - sig));
    db[i] = d[i] * a[i] * sig;
  }
}

template <typename T>
inline void store_row(T* dst, const float* src, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// gate_up [rows, 2H] -> out [rows, H]
void swiglu_forward_cpu(const at::Tensor& gate_up, const at::Tensor& out) {
  check_cpu_contig(gate_up, "gate_up");
  check_cpu_contig(out, "out");
  TORCH_CHECK(gate_up.dim() == 2 && out.dim() == 2 && gate_up.size(1) == 2 * out.size(1) &&
                  gate_up.size(0) == out.size(0),
              "swiglu_forward_cpu: gate_up [rows, 2H] and out [rows, H] expected, got ", gate_up.sizes(), " and ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == gate_up.scalar_type(), "out must have gate_up's dtype");
  const int64_t rows = gate_up.size(0), H = out.size(1);
  if (rows == 0 || H == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate_up.scalar_type(), "swiglu_forward_cpu", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(3 * H), [&](int64_t begin, int64_t end) {
      std::vector<float> mem(3 * H);
      float *a = mem.data(), *b = a + H, *y = b + H;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = in + r * 2 * H;
        if constexpr (std::is_same_v<scalar_t, float>) {
          auto* of = reinterpret_cast<float*>(o + r * H);  // scalar_t is float here
          const auto* rf = reinterpret_cast<const float*>(row);
          silu_mul(of, rf, rf + H, H);
        } else {
          load_row(a, row, H);
          load_row(b, row + H, H);
          silu_mul(y, a, b, H);
          store_row(o + r * H, y, H);
        }
      }
    });
  });
}

// dout [rows, H], gate_up [rows, 2H] -> dgate_up [rows, 2H]
void swiglu_backward_cpu(const at::Tensor& dout, const at::Tensor& gate_up, const at::Tensor& dgate_up) {
  check_cpu_contig(dout, "dout");
  check_cpu_contig(gate_up, "gate_up");
  check_cpu_contig(dgate_up, "dgate_up");
  TORCH_CHECK(gate_up.dim() == 2 && dout.dim() == 2 && gate_up.size(1) == 2 * dout.size(1) &&
                  gate_up.size(0) == dout.size(0) && dgate_up.sizes() == gate_up.sizes(),
              "swiglu_backward_cpu: dout [rows, H], gate_up and dgate_up [rows, 2H] expected");
  TORCH_CHECK(dout.scalar_type() == gate_up.scalar_type() && dgate_up.scalar_type() == gate_up.scalar_type(),
              "swiglu_backward_cpu: dtypes must match");
  const int64_t rows = gate_up.size(0), H = dout.size(1);
  if (rows == 0 || H == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate_up.scalar_type(), "swiglu_backward_cpu", [&] {
    const scalar_t *in = gate_up.data_ptr<scalar_t>(), *d = dout.data_ptr<scalar_t>();
    scalar_t* o = dgate_up.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(5 * H), [&](int64_t begin, int64_t end) {
      std::vector<float> mem(5 * H);
      float *a = mem.data(), *b = a + H, *dd = b + H, *da = dd + H, *db = da + H;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = in + r * 2 * H;
        if constexpr (std::is_same_v<scalar_t, float>) {
          auto* of = reinterpret_cast<float*>(o + r * 2 * H);  // scalar_t is float here
          const auto* rf = reinterpret_cast<const float*>(row);
          silu_mul_backward(of, of + H, rf, rf + H, reinterpret_cast<const float*>(d + r * H), H);
        } else {
          load_row(a, row, H);
          load_row(b, row + H, H);
          load_row(dd, d + r * H, H);
          silu_mul_backward(da, db, a, b, dd, H);
          store_row(o + r * 2 * H, da, H);
          store_row(o + r * 2 * H + H, db, H);
        }
      }
    });
  });
}

// ------------------------------------------------------------------------------------
// QK norm: qkv [B, N, 3, H, D] -> q, k, v [B, H, N, D], q and k normalised per head vector:
// RMSNorm scaled by weights float32 [2, D] (q, k), or, when centered, LayerNorm (mean
// subtracted, biased variance) without weights (wts is null).

template <typename T>
void qk_norm_forward_impl(const at::Tensor& qkv, const float* wts, int64_t H, double eps, bool centered, T* q, T* k,
                          T* v) {
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / (3 * H);
  const T* in = qkv.data_ptr<T>();
  T* outs[3] = {q, k, v};
  at::parallel_for(0, B * N, grain_rows(3 * H * D), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(D);
    float* x = buf.data();
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / N, n = bn % N;
      for (int64_t part = 0; part < 3; ++part) {
        for (int64_t hd = 0; hd < H; ++hd) {
          const T* src = in + ((bn * 3 + part) * H + hd) * D;
          T* dst = outs[part] + ((b * H + hd) * N + n) * D;
          if (part == 2) {
            std::copy(src, src + D, dst);
            continue;
          }
          load_row(x, src, D);
          if (centered) {
            float mean, r;
            row_stats(x, D, eps, mean, r);
#pragma GCC ivdep
            for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>((x[i] - mean) * r);
            continue;
          }
          const float r = static_cast<float>(1.0 / std::sqrt(lane_dot(x, x, D) / D + eps));
          const float* w = wts + part * D;
#pragma GCC ivdep
          for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(x[i] * r * w[i]);
        }
      }
    }
  });
}

// Centred: dx = r (dy - mean(dy) - xhat mean(dy xhat)), xhat = (x - mean) r; no weight
// gradient (dw_partial is null).
template <typename T>
void qk_norm_backward_impl(const T* dq, const T* dk, const T* dv, const at::Tensor& qkv, const float* wts, int64_t H,
                           double eps, bool centered, T* dqkv, double* dw_partial) {
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / (3 * H);
  const T* in = qkv.data_ptr<T>();
  const T* grads[3] = {dq, dk, dv};
  at::parallel_for(0, B * N, grain_rows(3 * H * D), [&](int64_t begin, int64_t end) {
    std::vector<float> mem(5 * D, 0.0f);
    float *x = mem.data(), *gw = x + D, *dy = gw + D, *part_acc = dy + D;  // float partials [2, D]
    double* dw = centered ? nullptr : dw_partial + at::get_thread_num() * 2 * D;
    auto fold = [&]() {  // float partials over a few rows, folded into double (vectorised sums)
      if (centered) return;
      for (int64_t i = 0; i < 2 * D; ++i) {
        dw[i] += part_acc[i];
        part_acc[i] = 0.0f;
      }
    };
    for (int64_t bn = begin; bn < end; ++bn) {
      if ((bn - begin) % 8 == 7) fold();
      const int64_t b = bn / N, n = bn % N;
      for (int64_t part = 0; part < 3; ++part) {
        for (int64_t hd = 0; hd < H; ++hd) {
          const T* g = grads[part] + ((b * H + hd) * N + n) * D;
          T* dst = dqkv + ((bn * 3 + part) * H + hd) * D;
          if (part == 2) {
            std::copy(g, g + D, dst);
            continue;
          }
          const T* src = in + ((bn * 3 + part) * H + hd) * D;
          load_row(x, src, D);
          load_row(dy, g, D);
          if (centered) {
            float mean, r;
            row_stats(x, D, eps, mean, r);
#pragma GCC ivdep
            for (int64_t i = 0; i < D; ++i) x[i] = (x[i] - mean) * r;  // xhat
            const float c1 = static_cast<float>(lane_sum(dy, D) / D);
            const float c2 = static_cast<float>(lane_dot(dy, x, D) / D);
#pragma GCC ivdep
            for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(r * (dy[i] - c1 - x[i] * c2));
            continue;
          }
          const float r = static_cast<float>(1.0 / std::sqrt(lane_dot(x, x, D) / D + eps));
          const float* w = wts + part * D;
          float* dwp = part_acc + part * D;
#pragma GCC ivdep
          for (int64_t i = 0; i < D; ++i) {
            gw[i] = dy[i] * w[i];
            dwp[i] += dy[i] * x[i] * r;
          }
          const float c = static_cast<float>(lane_dot(gw, x, D) / D) * r * r * r;
#pragma GCC ivdep
          for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<T>(r * gw[i] - c * x[i]);
        }
      }
    }
    fold();
  });
}

// The weights of the RMSNorm mode, float32 [2, D]; none in the centred mode (-> nullptr).
const float* qk_weights(const OptT& weights, bool centered, int64_t D) {
  VFT_CHECK(weights.has_value() != centered, "qk_norm: weights must be given for the RMSNorm and absent for the ",
            "centred LayerNorm, got centered = ", centered, " and ", weights.has_value() ? "weights" : "no weights");
  if (centered) return nullptr;
  check_cpu_contig(*weights, "qk_norm: weights");
  VFT_CHECK_DTYPE(*weights, at::kFloat, "qk_norm: weights");
  VFT_CHECK_SHAPE(*weights, at::IntArrayRef({2, D}), "qk_norm: weights");
  return weights->data_ptr<float>();
}

void qk_norm_forward_cpu(const at::Tensor& qkv, int64_t heads, const OptT& weights, double eps, bool centered,
                         const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (auto* p : {&qkv, &q, &k, &v}) check_cpu_contig(*p, "qk_norm_forward_cpu argument");
  TORCH_CHECK(qkv.dim() == 3 && heads > 0 && qkv.size(2) % (3 * heads) == 0, "qkv must be [B, N, 3 H D], got ",
              qkv.sizes());
  const int64_t D = qkv.size(2) / (3 * heads);
  const float* wts = qk_weights(weights, centered, D);
  for (auto* p : {&q, &k, &v}) {
    TORCH_CHECK(p->scalar_type() == qkv.scalar_type() && p->numel() == qkv.numel() / 3,
                "outputs must be [B, H, N, D] in qkv's dtype");
  }
  if (qkv.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "qk_norm_forward_cpu", [&] {
    qk_norm_forward_impl<scalar_t>(qkv, wts, heads, eps, centered, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                   v.data_ptr<scalar_t>());
  });
}

// -> float64 weight-gradient partials [threads, 2, D] (summed by the caller; [0, 2, D] when centered)
at::Tensor qk_norm_backward_cpu(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                const at::Tensor& qkv, int64_t heads, const OptT& weights, double eps, bool centered,
                                const at::Tensor& dqkv) {
  for (auto* p : {&dq, &dk, &dv, &qkv, &dqkv}) check_cpu_contig(*p, "qk_norm_backward_cpu argument");
  TORCH_CHECK(qkv.dim() == 3 && heads > 0 && qkv.size(2) % (3 * heads) == 0, "qkv must be [B, N, 3 H D], got ",
              qkv.sizes());
  const int64_t D = qkv.size(2) / (3 * heads);
  const float* wts = qk_weights(weights, centered, D);
  TORCH_CHECK(dqkv.sizes() == qkv.sizes() && dqkv.scalar_type() == qkv.scalar_type(), "dqkv must be like qkv");
  for (auto* p : {&dq, &dk, &dv}) {
    TORCH_CHECK(p->scalar_type() == qkv.scalar_type() && p->numel() == qkv.numel() / 3,
                "gradients must be [B, H, N, D] in qkv's dtype");
  }
  at::Tensor partial = at::zeros({centered ? 0 : at::get_num_threads(), 2, D}, qkv.options().dtype(at::kDouble));
  if (qkv.numel() == 0) return partial;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "qk_norm_backward_cpu", [&] {
    qk_norm_backward_impl<scalar_t>(dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), qkv,
                                    wts, heads, eps, centered, dqkv.data_ptr<scalar_t>(),
                                    centered ? nullptr : partial.data_ptr<double>());
  });
  return partial;
}

}  // namespace

void bind_block(pybind11::module_& m) {
  m.def("block_norm_forward_cpu", &block_norm_forward_cpu,
        "Gated residual (x_new = x + gate[sel] h) and/or adaLN modulated LayerNorm of x_new (or x), contiguous "
        "CPU tensors x [frames, S, W], modulation [frames, K, W]; writes x_new and y.",
        pybind11::arg("x"), pybind11::arg("gate"), pybind11::arg("h"), pybind11::arg("scale"), pybind11::arg("shift"),
        pybind11::arg("patches"), pybind11::arg("eps"), pybind11::arg("x_new"), pybind11::arg("y"));
  m.def("block_norm_backward_cpu", &block_norm_backward_cpu,
        "Backward of block_norm_forward_cpu given the norm input xn; writes g (grad of x), dgate, dh, dscale, dshift.",
        pybind11::arg("d_res"), pybind11::arg("dy"), pybind11::arg("xn"), pybind11::arg("gate"), pybind11::arg("h"),
        pybind11::arg("scale"), pybind11::arg("patches"), pybind11::arg("eps"), pybind11::arg("g_out"),
        pybind11::arg("dgate"), pybind11::arg("dh"), pybind11::arg("dscale"), pybind11::arg("dshift"));
  m.def("swiglu_forward_cpu", &swiglu_forward_cpu, "out = silu(a) b for gate_up = [a | b] [rows, 2H].",
        pybind11::arg("gate_up"), pybind11::arg("out"));
  m.def("swiglu_backward_cpu", &swiglu_backward_cpu, "Gradient of swiglu_forward_cpu w.r.t. gate_up.",
        pybind11::arg("dout"), pybind11::arg("gate_up"), pybind11::arg("dgate_up"));
  m.def("qk_norm_forward_cpu", &qk_norm_forward_cpu,
        "Split qkv [B, N, 3 H D] into q, k, v [B, H, N, D], normalising q and k per head: RMSNorm with weights "
        "float32 [2, D], or (centered, weights None) LayerNorm without weights.",
        pybind11::arg("qkv"), pybind11::arg("heads"), pybind11::arg("weights"), pybind11::arg("eps"),
        pybind11::arg("centered"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"));
  m.def("qk_norm_backward_cpu", &qk_norm_backward_cpu,
        "Backward of qk_norm_forward_cpu: writes dqkv, returns float64 weight-gradient partials [threads, 2, D] "
        "([0, 2, D] when centered).",
        pybind11::arg("dq"), pybind11::arg("dk"), pybind11::arg("dv"), pybind11::arg("qkv"), pybind11::arg("heads"),
        pybind11::arg("weights"), pybind11::arg("eps"), pybind11::arg("centered"), pybind11::arg("dqkv"));
}

}  // namespace vft
