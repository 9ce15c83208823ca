// CPU kernels of FSQ (docs/spec.md §1): forward (codes + indices), backward, indices -> codes.
//
// Layout: z is viewed as [rows, d] with arbitrary (row, dim) strides. Rows are processed
// in blocks of kRows; inside a block the kRows * d values are one flat array whose
// per-element constants (shift, half_l, ...) repeat with period d, so the element loop is
// a plain contiguous loop that GCC vectorises (16 floats per AVX-512 op, checked with
// -fopt-info-vec). Contiguous float32 blocks are read and written in place; other dtypes
// and strides go through a small conversion buffer. OpenMP splits the blocks over threads.
// The forward rounds by counting precomputed thresholds for levels <= 16 (no tanh; see
// fwd_elements) and evaluates fsq_math.h's tanh otherwise; tests run both paths. Dense bf16
// inputs with bf16 codes count thresholds on 16-bit keys of the bf16 bits instead, 32 lanes
// per AVX-512 instruction, 16 per AVX2 one (forward_bf16_keys). The avx2 variant has explicit
// AVX2 + FMA forms of the element loop and the index packing too (GCC's x86-64-v3 code kept
// them scalar or on gathers).
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vft/bf16.h"
#include "vft/bind.h"
#include "vft/fsq_math.h"
#include "vft/isa.h"

namespace vft {
namespace VFT_ISA_NS {  // one copy per ISA variant (vft/isa.h)
namespace fsq_cpu {
namespace {

using fsq::DimConst;

constexpr int kRows = 16;  // rows per block; kRows * d is a multiple of the vector width
constexpr int kMaxDims = 16;
constexpr int kMaxThresholds = 15;  // levels up to 16 take the threshold path
constexpr int64_t kMinBlocksPerThread = 4;  // below this, one thread is faster than a fork
// Scaling (2-core Zen 4 VM, 256K x 6, avx2 float32, per-call timings): the 2-way split itself
// scales 2x (p50 0.91 -> 0.47 ms). What made 2-thread means ~1.3 ms was the machine: with other
// sessions' processes running (each session its own autogroup, so nice does not help), ~16% of
// 2-thread calls waited ~5 ms at the join for a worker whose CPU was given to another process,
// while 1-thread calls almost never stall. The op layer's fixed per-call cost (~50-70 us before
// the fast path in vft_kernels/ops/fsq.py) was the other part that does not shrink with threads.

// ---------------------------------------------------------------------------------------
// Loads / stores of one block between a tensor and a float buffer.

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// Reads rows [row0, row0 + rows) x d of a strided [*, d] tensor into buf (row-major);
// rows past `rows` are zero-filled so the full-block element loop stays finite.
template <typename T>
void load_block(const T* src, int64_t row0, int rows, int d, int64_t s_row, int64_t s_dim, float* buf) {
  if (s_dim == 1 && (s_row == d || rows == 1)) {  // dense rows: one flat loop, vectorised
    const T* p = src + row0 * s_row;
    for (int i = 0; i < rows * d; ++i) buf[i] = to_float(p[i]);
    std::fill(buf + rows * d, buf + kRows * d, 0.0f);
    return;
  }
  for (int r = 0; r < rows; ++r) {
    const T* p = src + (row0 + r) * s_row;
    for (int j = 0; j < d; ++j) buf[r * d + j] = to_float(p[j * s_dim]);
  }
  std::fill(buf + rows * d, buf + kRows * d, 0.0f);
}

void load_block_any(const at::Tensor& t, int64_t row0, int rows, int d, int64_t s_row, int64_t s_dim,
                    float* buf) {
  switch (t.scalar_type()) {
    case at::kFloat: return load_block(t.const_data_ptr<float>(), row0, rows, d, s_row, s_dim, buf);
    case at::kHalf: return load_block(t.const_data_ptr<c10::Half>(), row0, rows, d, s_row, s_dim, buf);
    case at::kBFloat16: return load_block(t.const_data_ptr<c10::BFloat16>(), row0, rows, d, s_row, s_dim, buf);
    default: VFT_CHECK(false, "fsq: unsupported dtype ", t.scalar_type());
  }
}

// Writes n floats to a contiguous tensor starting at element `offset`.
void store_any(const float* buf, int64_t n, at::Tensor& out, int64_t offset) {
  switch (out.scalar_type()) {
    case at::kFloat: std::memcpy(out.data_ptr<float>() + offset, buf, n * sizeof(float)); return;
    case at::kHalf: {
      c10::Half* p = out.data_ptr<c10::Half>() + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = c10::Half(buf[i]);
      return;
    }
    case at::kBFloat16: {
      c10::BFloat16* p = out.data_ptr<c10::BFloat16>() + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(buf[i]);
      return;
    }
    default: VFT_CHECK(false, "fsq: unsupported output dtype ", out.scalar_type());
  }
}

bool is_dense(const at::Tensor& t, int64_t d) {
  // [rows, d] view of t with unit dim stride and row stride d.
  return t.numel() == 0 || (t.stride(1) == 1 && (t.size(0) == 1 || t.stride(0) == d));
}

bool is_dense_float(const at::Tensor& t, int64_t d) { return t.scalar_type() == at::kFloat && is_dense(t, d); }

bool is_dense_bf16(const at::Tensor& t, int64_t d) { return t.scalar_type() == at::kBFloat16 && is_dense(t, d); }

const uint16_t* bf16_bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<c10::BFloat16>());
}

uint16_t* bf16_bits_mut(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<c10::BFloat16>()); }

// ---------------------------------------------------------------------------------------
// Forward

// Per-element constants of one block (period d), built once per call.
template <int D, typename Acc>
struct FwdTable {
  static constexpr int K = kRows * D;
  alignas(64) float shift[K];
  alignas(64) float half_l[K];
  alignas(64) float offset[K];
  alignas(64) float half_w[K];
  alignas(64) float inv_w[K];  // RN(1 / half_w)
  alignas(64) Acc basis[K];
  alignas(64) float thr[kMaxThresholds][K];  // rounding thresholds in x = z + shift (see below)
  int n_thr = 0;                               // 0: the tanh path
};

// Index contributions accumulate in an unsigned type (no signed overflow is possible). A
// NaN element contributes only the top bit, which no valid contribution (< prod(levels))
// has: a row's index is -1 exactly when the OR of its contributions has that bit.
template <typename Idx>
using AccOf = std::conditional_t<sizeof(Idx) == 4, uint32_t, uint64_t>;
template <typename Acc>
constexpr Acc kNanBit = Acc(1) << (8 * sizeof(Acc) - 1);

// Codes and index contributions of one block, two exact ways (both vectorised, K
// compile-time):
// * thresholds (every level <= kMaxThresholds + 1): bounded = tanh(x) half_l - offset is
//   increasing in x = z + shift, so q + L // 2 = the number of rounding boundaries below
//   bounded = the number of thresholds thr_i <= x, with thr_i = atanh((b_i + offset) / half_l)
//   for the boundaries b_i = i + 0.5 - L // 2 (computed on the host in float64, rounded up
//   to float32, ties to even built in; unused rows NaN). This is exact round(bounded) in
//   real arithmetic: it differs from torch's float32 tanh only where bounded is within a
//   few ulp of a boundary, the tokens docs/spec.md §4 accepts either way. No tanh at all.
// * tanh (larger levels; the arithmetic the CUDA kernel runs, fsq_math.h).
#if defined(__AVX2__) && !defined(__AVX512F__)
// The AVX2 variant of the loops below, 8 lanes per op. GCC keeps the last loop (codes and
// contributions: a NaN select, float -> int, an unsigned multiply) scalar at x86-64-v3, a
// branch per element; here it is explicit, with the same operations in the same order
// (the thresholds counted in integers, exact), so the bits equal the other variants'.
template <int D, typename Acc>
void fwd_elements(const float* __restrict z, float* __restrict codes, Acc* __restrict contrib,
                  const FwdTable<D, Acc>& t) {
  constexpr int K = FwdTable<D, Acc>::K;  // a multiple of 16 (kRows = 16)
  alignas(64) float digit[K];
  if (t.n_thr == 0) {  // the tanh path's digits (levels > 16), vectorised by GCC
    for (int k = 0; k < K; ++k) {
      const float x = z[k] + t.shift[k];
      digit[k] = fsq::round_half_even(fsq::tanh_f32(x) * t.half_l[k] - t.offset[k]) + t.half_w[k];
    }
  } else {
    // The digits counted for G vectors at a time: G independent chains of compare + add per
    // threshold (perf: one vector's chain of n_thr dependent adds, loop overhead included,
    // was half of the avx2 forward). Integer counts: exact, in any order. NaN: digit 0.
    auto count_group = [&]<int G>(int k0) {
      __m256 x[G];
      __m256i count[G];  // minus the number of thresholds <= x
      for (int g = 0; g < G; ++g) {
        x[g] = _mm256_add_ps(_mm256_loadu_ps(z + k0 + 8 * g), _mm256_load_ps(t.shift + k0 + 8 * g));
        count[g] = _mm256_setzero_si256();
      }
      for (int i = 0; i < t.n_thr; ++i) {
        for (int g = 0; g < G; ++g) {
          const __m256 ge = _mm256_cmp_ps(x[g], _mm256_load_ps(t.thr[i] + k0 + 8 * g), _CMP_GE_OQ);
          count[g] = _mm256_add_epi32(count[g], _mm256_castps_si256(ge));
        }
      }
      for (int g = 0; g < G; ++g)
        _mm256_store_ps(digit + k0 + 8 * g, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_setzero_si256(), count[g])));
    };
    constexpr int kFull = K / 32 * 32;  // groups of 4 vectors, then one of 2 (K / 8 is even)
    for (int k0 = 0; k0 < kFull; k0 += 32) count_group.template operator()<4>(k0);
    if constexpr (kFull < K) count_group.template operator()<2>(kFull);
  }
  const __m256 nan_bit = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  for (int k = 0; k < K; k += 8) {
    const __m256 x = _mm256_add_ps(_mm256_loadu_ps(z + k), _mm256_load_ps(t.shift + k));
    const __m256 dg = _mm256_load_ps(digit + k);
    const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    const __m256 half_w = _mm256_load_ps(t.half_w + k), inv = _mm256_load_ps(t.inv_w + k);
    const __m256 q = _mm256_sub_ps(dg, half_w);
    const __m256 r = _mm256_mul_ps(q, inv);  // fsq::div_code
    const __m256 code = _mm256_fmadd_ps(_mm256_fnmadd_ps(r, half_w, q), inv, r);
    _mm256_storeu_ps(codes + k, _mm256_blendv_ps(code, x, nan));
    const __m256 dg0 = _mm256_andnot_ps(nan, dg);  // NaN: digit 0 (the tanh path's is NaN)
    const __m256i d = _mm256_cvttps_epi32(dg0);
    if constexpr (sizeof(Acc) == 4) {
      const __m256i c = _mm256_mullo_epi32(d, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.basis + k)));
      const __m256 out = _mm256_blendv_ps(_mm256_castsi256_ps(c), nan_bit, nan);
      _mm256_store_si256(reinterpret_cast<__m256i*>(contrib + k), _mm256_castps_si256(out));
    } else if (_mm256_movemask_ps(_mm256_cmp_ps(dg0, _mm256_set1_ps(2147483648.0f), _CMP_GE_OQ)) != 0) {
      alignas(32) float dgs[8];  // a digit of 2^31 or more (a level that large): 64-bit conversions
      _mm256_store_ps(dgs, dg0);
      const int nan_lanes = _mm256_movemask_ps(nan);
      for (int l = 0; l < 8; ++l) {
        const Acc c = static_cast<Acc>(static_cast<std::make_signed_t<Acc>>(dgs[l])) * t.basis[k + l];
        contrib[k + l] = (nan_lanes >> l) & 1 ? kNanBit<Acc> : c;
      }
    } else {
      // 64-bit products modulo 2^64 from 32 x 32 -> 64-bit multiplies: d * lo + (d * hi) << 32
      // (0 <= d < 2^31).
      const __m256i nan_i = _mm256_castps_si256(nan);
      for (int h = 0; h < 2; ++h) {
        const __m256i d64 = _mm256_cvtepu32_epi64(h ? _mm256_extracti128_si256(d, 1) : _mm256_castsi256_si128(d));
        const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(t.basis + k + 4 * h));
        const __m256i c = _mm256_add_epi64(_mm256_mul_epu32(d64, b),
                                           _mm256_slli_epi64(_mm256_mul_epu32(d64, _mm256_srli_epi64(b, 32)), 32));
        const __m256i m = _mm256_cvtepi32_epi64(h ? _mm256_extracti128_si256(nan_i, 1) : _mm256_castsi256_si128(nan_i));
        const __m256i out = _mm256_blendv_epi8(c, _mm256_set1_epi64x(static_cast<long long>(kNanBit<Acc>)), m);
        _mm256_store_si256(reinterpret_cast<__m256i*>(contrib + k + 4 * h), out);
      }
    }
  }
}
#else
template <int D, typename Acc>
void fwd_elements(const float* __restrict z, float* __restrict codes, Acc* __restrict contrib,
                  const FwdTable<D, Acc>& t) {
  constexpr int K = FwdTable<D, Acc>::K;
  alignas(64) float x[K];
  alignas(64) float digit[K];
  for (int k = 0; k < K; ++k) x[k] = z[k] + t.shift[k];
  if (t.n_thr > 0) {
    for (int k = 0; k < K; ++k) digit[k] = 0.0f;
    for (int i = 0; i < t.n_thr; ++i) {
      for (int k = 0; k < K; ++k) digit[k] += x[k] >= t.thr[i][k] ? 1.0f : 0.0f;
    }
  } else {
    for (int k = 0; k < K; ++k) {
      digit[k] = fsq::round_half_even(fsq::tanh_f32(x[k]) * t.half_l[k] - t.offset[k]) + t.half_w[k];
    }
  }
  for (int k = 0; k < K; ++k) {
    const bool nan = x[k] != x[k];
    codes[k] = nan ? x[k] : fsq::div_code(digit[k] - t.half_w[k], t.half_w[k], t.inv_w[k]);
    const float dg = nan ? 0.0f : digit[k];  // (the tanh path's digit is NaN there)
    const Acc c = static_cast<Acc>(static_cast<std::make_signed_t<Acc>>(dg)) * t.basis[k];
    contrib[k] = nan ? kNanBit<Acc> : c;
  }
}
#endif

// Row sums of the contributions of one block ([kRows, D] row-major, then kContribPad
// readable entries: the AVX2 path loads whole vectors from a row's start) -> indices.
constexpr int kContribPad = 16;

template <int D, typename Idx>
inline void row_indices(const AccOf<Idx>* __restrict contrib, Idx* __restrict idx, int n) {
  using Acc = AccOf<Idx>;
#if defined(__AVX512F__)
  if constexpr (sizeof(Idx) == 4 && kRows == 16) {
    // Rows as the 16 lanes. Without NaN (the usual block): the D vectors of contributions
    // are loaded once, and each row's D entries are brought to its lane by two-source
    // permutes of vector pairs (compile-time indices and masks): D * ceil(D / 2) permutes,
    // no memory gathers (perf: the gathers below were a third of the forward's time).
    // Integer sums, so the order does not change the result.
    __m512i v[D + 1];
    __m512i any0 = _mm512_setzero_si512();
    for (int i = 0; i < D; ++i) {
      v[i] = _mm512_load_si512(contrib + 16 * i);
      any0 = _mm512_or_si512(any0, v[i]);
    }
    v[D] = _mm512_setzero_si512();
    if (!_mm512_test_epi32_mask(any0, _mm512_set1_epi32(static_cast<int>(kNanBit<Acc>)))) {
      const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      __m512i sum = _mm512_setzero_si512();
      for (int j = 0; j < D; ++j) {
        const __m512i e = _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(D)), _mm512_set1_epi32(j));
        for (int p = 0; 2 * p < D; ++p) {
          const __m512i rel = _mm512_sub_epi32(e, _mm512_set1_epi32(32 * p));  // element within the pair
          const __mmask16 k = _mm512_cmplt_epu32_mask(rel, _mm512_set1_epi32(32));
          sum = _mm512_add_epi32(sum, _mm512_maskz_permutex2var_epi32(k, v[2 * p], rel, v[2 * p + 1]));
        }
      }
      _mm512_mask_storeu_epi32(idx, static_cast<__mmask16>((1u << n) - 1u), sum);
      return;
    }
    // A NaN in the block: D gathers of stride D, summing and OR-ing each row's entries.
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(D));
    __m512i sum = _mm512_setzero_si512(), any = _mm512_setzero_si512();
    for (int j = 0; j < D; ++j) {
      // The masked form with an explicit zero source: GCC warns (-Wmaybe-uninitialized) on the
      // undefined source vector inside the unmasked intrinsic.
      const __m512i c = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), static_cast<__mmask16>(0xFFFF),
                                                    _mm512_add_epi32(rows, _mm512_set1_epi32(j)), contrib, 4);
      sum = _mm512_add_epi32(sum, c);
      any = _mm512_or_si512(any, c);
    }
    const __mmask16 nan = _mm512_test_epi32_mask(any, _mm512_set1_epi32(static_cast<int>(kNanBit<Acc>)));
    const __m512i out = _mm512_mask_blend_epi32(nan, sum, _mm512_set1_epi32(-1));
    _mm512_mask_storeu_epi32(idx, static_cast<__mmask16>((1u << n) - 1u), out);
    return;
  }
#elif defined(__AVX2__)
  if constexpr (sizeof(Idx) == 4) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i any0 = _mm256_setzero_si256();
    for (int i = 0; i < 2 * D; ++i)
      any0 = _mm256_or_si256(any0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(contrib + 8 * i)));
    if (_mm256_testz_si256(any0, _mm256_set1_epi32(static_cast<int>(kNanBit<Acc>)))) {
      // Without NaN (the usual block): each row's D entries as one or two vector loads
      // (entries of the next rows masked off; kContribPad readable entries follow the
      // block), and the 8 rows' horizontal sums by a tree of hadds: no gathers (perf: the
      // gathers below were a third of the bf16 forward's time). Integer sums: any order.
      const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(D), lane);
      const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(D - 8), lane);
      for (int r0 = 0; r0 < n; r0 += 8) {
        __m256i row[8];
        for (int r = 0; r < 8; ++r) {
          const Acc* p = contrib + (r0 + r) * D;
          row[r] = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), m0);
          if constexpr (D > 8)
            row[r] = _mm256_add_epi32(row[r], _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8)), m1));
        }
        // per 128-bit half: rows 0-3 (then 4-7) partial sums; the halves' sums are the rows'
        const __m256i s03 = _mm256_hadd_epi32(_mm256_hadd_epi32(row[0], row[1]), _mm256_hadd_epi32(row[2], row[3]));
        const __m256i s47 = _mm256_hadd_epi32(_mm256_hadd_epi32(row[4], row[5]), _mm256_hadd_epi32(row[6], row[7]));
        const __m256i sum = _mm256_add_epi32(_mm256_permute2x128_si256(s03, s47, 0x20),
                                             _mm256_permute2x128_si256(s03, s47, 0x31));
        const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - r0), lane);
        _mm256_maskstore_epi32(reinterpret_cast<int*>(idx + r0), valid, sum);
      }
      return;
    }
    // A NaN in the block: rows as the 8 lanes, 8 rows at a time: D gathers of stride D, summing
    // and OR-ing each row's entries (the NaN bit: index -1), then a masked store of the valid rows.
    const __m256i rows = _mm256_mullo_epi32(lane, _mm256_set1_epi32(D));
    const __m256i nan_bit = _mm256_set1_epi32(static_cast<int>(kNanBit<Acc>));
    for (int r0 = 0; r0 < n; r0 += 8) {
      const int* base = reinterpret_cast<const int*>(contrib + r0 * D);
      __m256i sum = _mm256_setzero_si256(), any = _mm256_setzero_si256();
      for (int j = 0; j < D; ++j) {
        const __m256i c = _mm256_i32gather_epi32(base, _mm256_add_epi32(rows, _mm256_set1_epi32(j)), 4);
        sum = _mm256_add_epi32(sum, c);
        any = _mm256_or_si256(any, c);
      }
      const __m256i nan = _mm256_cmpeq_epi32(_mm256_and_si256(any, nan_bit), nan_bit);
      const __m256i out = _mm256_blendv_epi8(sum, _mm256_set1_epi32(-1), nan);
      const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - r0), lane);
      _mm256_maskstore_epi32(reinterpret_cast<int*>(idx + r0), valid, out);
    }
    return;
  }
#endif
  for (int r = 0; r < n; ++r) {
    Acc sum = 0, any = 0;
    for (int j = 0; j < D; ++j) {
      sum += contrib[r * D + j];
      any |= contrib[r * D + j];
    }
    idx[r] = (any & kNanBit<Acc>) ? Idx(-1) : static_cast<Idx>(sum);
  }
}

// ---------------------------------------------------------------------------------------
// bf16 -> bf16 forward on the threshold path, 32 lanes per vector op (AVX-512 BW; AVX2: 16).
//
// x = float(z) + shift is non-decreasing in z, so for bf16 inputs each threshold test
// x >= thr_i is z >= zthr_i for the smallest such bf16 value zthr_i (found once per call by
// bisection with the same float arithmetic). On the order-preserving int16 key of the bf16
// bits (negative values: magnitude bits inverted), the digit is a count of 16-bit integer
// compares, 32 elements per instruction, no conversion to float. The bf16 code of each
// (dim, digit) comes from a 64-entry table (two-source word permute) holding exactly what
// the float path computes and rounds, so results are bit-identical to it (tested on every
// bf16 value). NaN inputs (keys above +inf or below -inf) give code 0x7FC0 and index -1.
// AVX2 has no 16-bit permute: its codes are the float path's own arithmetic (div_code and
// the bf16 rounding) on the counted digits, 8 lanes at a time.
#if defined(__AVX2__)
#define VFT_FSQ_BF16_KEYS 1
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int kKeyRows = 32;  // rows per block: D vectors of 32 bf16
#else
constexpr int kKeyRows = 16;  // rows per block: D vectors of 16 bf16
#endif

inline uint16_t key_bits(int k) { return static_cast<uint16_t>(k < 0 ? (k & 0xFFFF) ^ 0x7FFF : k); }

// Smallest key (in [-inf, +inf]) whose value passes x = float(z) + shift >= thr, or one past
// +inf (only NaN keys lie there) when none does; NaN thresholds (unused entries) never pass.
int key_threshold(float shift, float thr) {
  auto pass = [&](int k) { return bf16::to_f32(key_bits(k)) + shift >= thr; };
  int lo = -32641, hi = 32640;  // keys of -inf and +inf
  if (!pass(hi)) return 32641;
  while (lo < hi) {  // pass is monotone in k: find the first k that passes
    const int mid = lo + (hi - lo) / 2;
    if (pass(mid)) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// The keys of the thresholds of one call: key_thr[j][i] for dim j (t repeats with period D).
template <int D>
void key_thresholds(const FwdTable<D, uint32_t>& t, int16_t (&key_thr)[D][kMaxThresholds]) {
  for (int j = 0; j < D; ++j) {
    for (int i = 0; i < t.n_thr; ++i) key_thr[j][i] = static_cast<int16_t>(key_threshold(t.shift[j], t.thr[i][j]));
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <int D>
struct KeyTable {
  alignas(64) int16_t thr[D][kMaxThresholds][32];  // per vector u of a block, per threshold
  alignas(64) int16_t base[D][32];                  // dim * stride: the code table's row
  alignas(64) int32_t basis[D][2][16];              // index basis of each lane (low / high half)
  alignas(64) uint16_t codes[64];                   // bf16 code of (dim, digit) at dim * stride + digit
  int n_thr = 0;
};

// The key path applies: bf16 codes, int32 indices, the threshold path, and a code table of
// at most 64 entries (D * max(levels) <= 64).
template <int D>
bool build_key_table(KeyTable<D>& kt, const FwdTable<D, uint32_t>& t, const std::vector<int64_t>& levels) {
  const int64_t stride = *std::max_element(levels.begin(), levels.end());
  if (t.n_thr == 0 || D * stride > 64) return false;
  kt.n_thr = t.n_thr;
  int16_t key_thr[D][kMaxThresholds];
  key_thresholds<D>(t, key_thr);
  for (int u = 0; u < D; ++u) {
    for (int l = 0; l < 32; ++l) {
      const int k = (32 * u + l) % D;  // the element's dim
      for (int i = 0; i < t.n_thr; ++i) kt.thr[u][i][l] = key_thr[k][i];
      kt.base[u][l] = static_cast<int16_t>(k * stride);
      kt.basis[u][l / 16][l % 16] = static_cast<int32_t>(t.basis[k]);
    }
  }
  std::fill(kt.codes, kt.codes + 64, uint16_t(0));
  for (int j = 0; j < D; ++j) {
    for (int64_t g = 0; g < levels[j]; ++g) {
      kt.codes[j * stride + g] =
          bf16::from_f32(fsq::div_code(static_cast<float>(g) - t.half_w[j], t.half_w[j], t.inv_w[j]));
    }
  }
  return true;
}

// Rows [0, blocks * kKeyRows) of a dense bf16 z -> bf16 codes and int32 indices.
template <int D>
void forward_bf16_keys(const uint16_t* zb, uint16_t* cb, int32_t* idx, int64_t blocks, const KeyTable<D>& kt) {
  at::parallel_for(0, blocks, kMinBlocksPerThread, [&](int64_t blk_begin, int64_t blk_end) {
    const __m512i sign_off = _mm512_set1_epi16(0x7FFF), inf = _mm512_set1_epi16(0x7F80);
    const __m512i qnan = _mm512_set1_epi16(0x7FC0), one = _mm512_set1_epi16(1);
    const __m512i tab_lo = _mm512_load_si512(kt.codes), tab_hi = _mm512_load_si512(kt.codes + 32);
    const __m512i nan_bit = _mm512_set1_epi32(static_cast<int>(kNanBit<uint32_t>));
    const int n_thr = kt.n_thr;
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const uint16_t* src = zb + blk * kKeyRows * D;
      uint16_t* dst = cb + blk * kKeyRows * D;
      alignas(64) uint32_t contrib[kKeyRows * D + kContribPad];  // [vector u][low, high half][16]
      for (int u = 0; u < D; ++u) {
        const __m512i b = _mm512_loadu_si512(src + 32 * u);
        const __m512i key = _mm512_xor_si512(b, _mm512_and_si512(_mm512_srai_epi16(b, 15), sign_off));
        __m512i dg = _mm512_setzero_si512();
        for (int i = 0; i < n_thr; ++i) {
          const __mmask32 ge = _mm512_cmpge_epi16_mask(key, _mm512_load_si512(kt.thr[u][i]));
          dg = _mm512_mask_add_epi16(dg, ge, dg, one);
        }
        const __mmask32 nan = _mm512_cmpgt_epi16_mask(_mm512_and_si512(b, sign_off), inf);
        __m512i code = _mm512_permutex2var_epi16(tab_lo, _mm512_add_epi16(dg, _mm512_load_si512(kt.base[u])), tab_hi);
        _mm512_storeu_si512(dst + 32 * u, _mm512_mask_mov_epi16(code, nan, qnan));
        __m512i lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(dg));
        __m512i hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(dg, 1));
        lo = _mm512_mullo_epi32(lo, _mm512_load_si512(kt.basis[u][0]));
        hi = _mm512_mullo_epi32(hi, _mm512_load_si512(kt.basis[u][1]));
        _mm512_store_si512(contrib + 32 * u, _mm512_mask_mov_epi32(lo, static_cast<__mmask16>(nan), nan_bit));
        _mm512_store_si512(contrib + 32 * u + 16, _mm512_mask_mov_epi32(hi, static_cast<__mmask16>(nan >> 16), nan_bit));
      }
      // contrib is the block's 32 * D contributions in element order: rows 0-15, then 16-31.
      row_indices<D, int32_t>(contrib, idx + blk * kKeyRows, 16);
      row_indices<D, int32_t>(contrib + 16 * D, idx + blk * kKeyRows + 16, 16);
    }
  });
}
#else
template <int D>
struct KeyTable {
  alignas(32) int16_t thr[D][kMaxThresholds][16];  // key threshold - 1 (signed > compares), per vector u
  alignas(32) float half_w[D][2][8];                // per lane of vector u (low / high 8)
  alignas(32) float inv_w[D][2][8];
  alignas(32) int32_t basis[D][2][8];
  int n_thr = 0;
};

template <int D>
bool build_key_table(KeyTable<D>& kt, const FwdTable<D, uint32_t>& t, const std::vector<int64_t>&) {
  if (t.n_thr == 0) return false;
  kt.n_thr = t.n_thr;
  int16_t key_thr[D][kMaxThresholds];
  key_thresholds<D>(t, key_thr);
  for (int u = 0; u < D; ++u) {
    for (int l = 0; l < 16; ++l) {
      const int k = (16 * u + l) % D;  // the element's dim (t's entry k is dim k: k < D)
      for (int i = 0; i < t.n_thr; ++i) kt.thr[u][i][l] = static_cast<int16_t>(key_thr[k][i] - 1);  // >= -32642
      kt.half_w[u][l / 8][l % 8] = t.half_w[k];
      kt.inv_w[u][l / 8][l % 8] = t.inv_w[k];
      kt.basis[u][l / 8][l % 8] = static_cast<int32_t>(t.basis[k]);
    }
  }
  return true;
}

// Rows [0, blocks * kKeyRows) of a dense bf16 z -> bf16 codes and int32 indices.
template <int D>
void forward_bf16_keys(const uint16_t* zb, uint16_t* cb, int32_t* idx, int64_t blocks, const KeyTable<D>& kt) {
  at::parallel_for(0, blocks, kMinBlocksPerThread, [&](int64_t blk_begin, int64_t blk_end) {
    const __m256i sign_off = _mm256_set1_epi16(0x7FFF), inf = _mm256_set1_epi16(0x7F80);
    const __m256i qnan = _mm256_set1_epi16(0x7FC0);
    const __m256i round = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    const __m256i nan_bit = _mm256_set1_epi32(static_cast<int>(kNanBit<uint32_t>));
    const int n_thr = kt.n_thr;
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      const uint16_t* src = zb + blk * kKeyRows * D;
      uint16_t* dst = cb + blk * kKeyRows * D;
      alignas(32) uint32_t contrib[kKeyRows * D + kContribPad];  // element order
      // Vectors u0 .. u0 + G - 1: the digits counted G vectors at a time (G independent chains
      // of compare + add per threshold; perf: one vector's chain was the loop's bottleneck),
      // then each vector's codes and contributions. Integer counts: exact, in any order.
      auto group = [&]<int G>(int u0) {
        __m256i key[G], count[G];  // count: minus the number of thresholds <= key
        for (int g = 0; g < G; ++g) {
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * (u0 + g)));
          key[g] = _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi16(b, 15), sign_off));
          count[g] = _mm256_setzero_si256();
        }
        for (int i = 0; i < n_thr; ++i) {
          for (int g = 0; g < G; ++g) {
            const __m256i thr = _mm256_load_si256(reinterpret_cast<const __m256i*>(kt.thr[u0 + g][i]));
            count[g] = _mm256_add_epi16(count[g], _mm256_cmpgt_epi16(key[g], thr));
          }
        }
        for (int g = 0; g < G; ++g) {
          const int u = u0 + g;
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 16 * u));
          const __m256i dg = _mm256_sub_epi16(_mm256_setzero_si256(), count[g]);
          const __m256i nan = _mm256_cmpgt_epi16(_mm256_and_si256(b, sign_off), inf);
          __m256i code[2];
          for (int h = 0; h < 2; ++h) {
            const __m256i d = _mm256_cvtepu16_epi32(h ? _mm256_extracti128_si256(dg, 1) : _mm256_castsi256_si128(dg));
            // fsq::div_code of digit - half_w, then bf16::from_f32 (a finite code: no NaN case)
            const __m256 half_w = _mm256_load_ps(kt.half_w[u][h]), inv = _mm256_load_ps(kt.inv_w[u][h]);
            const __m256 q = _mm256_sub_ps(_mm256_cvtepi32_ps(d), half_w);
            const __m256 r = _mm256_mul_ps(q, inv);
            const __m256i c = _mm256_castps_si256(_mm256_fmadd_ps(_mm256_fnmadd_ps(r, half_w, q), inv, r));
            const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(c, 16), one);
            code[h] = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(c, round), lsb), 16);
            const __m256i m = _mm256_cvtepi16_epi32(h ? _mm256_extracti128_si256(nan, 1) : _mm256_castsi256_si128(nan));
            const __m256i ctb = _mm256_mullo_epi32(d, _mm256_load_si256(reinterpret_cast<const __m256i*>(kt.basis[u][h])));
            _mm256_store_si256(reinterpret_cast<__m256i*>(contrib + 16 * u + 8 * h), _mm256_blendv_epi8(ctb, nan_bit, m));
          }
          // packus interleaves the 128-bit halves: (lo 0-3, hi 0-3, lo 4-7, hi 4-7) -> element order
          const __m256i codes = _mm256_permute4x64_epi64(_mm256_packus_epi32(code[0], code[1]), 0xD8);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * u), _mm256_blendv_epi8(codes, qnan, nan));
        }
      };
      constexpr int kFull = D / 4 * 4;  // groups of 4 vectors, then one of the D % 4 left
      for (int u0 = 0; u0 < kFull; u0 += 4) group.template operator()<4>(u0);
      if constexpr (D % 4 != 0) group.template operator()<D % 4>(kFull);
      row_indices<D, int32_t>(contrib, idx + blk * kKeyRows, kKeyRows);
    }
  });
}
#endif
#endif

template <int D, typename Idx>
void fsq_forward_impl(const at::Tensor& z2, at::Tensor& codes, at::Tensor& indices,
                      const std::vector<DimConst>& consts, const std::vector<int64_t>& basis,
                      const at::Tensor& thresholds, const std::vector<int64_t>& levels) {
  using Acc = AccOf<Idx>;
  constexpr int K = kRows * D;
  FwdTable<D, Acc> t;
  for (int k = 0; k < K; ++k) {
    const DimConst& c = consts[k % D];
    t.shift[k] = c.shift;
    t.half_l[k] = c.half_l;
    t.offset[k] = c.offset;
    t.half_w[k] = c.half_w;
    t.inv_w[k] = 1.0f / c.half_w;
    t.basis[k] = static_cast<Acc>(basis[k % D]);
  }
  if (thresholds.numel() > 0) {
    t.n_thr = static_cast<int>(thresholds.size(1));
    const float* thr = thresholds.const_data_ptr<float>();
    for (int i = 0; i < t.n_thr; ++i) {
      for (int k = 0; k < K; ++k) t.thr[i][k] = thr[(k % D) * t.n_thr + i];
    }
  }
  const int64_t rows = z2.size(0);
  const int64_t blocks = (rows + kRows - 1) / kRows;
  const int64_t s_row = z2.stride(0), s_dim = z2.stride(1);
  const bool dense_in = is_dense_float(z2, D);
  const bool dense_out = codes.scalar_type() == at::kFloat;
  const float* zf = dense_in ? z2.const_data_ptr<float>() : nullptr;
  float* cf = dense_out ? codes.data_ptr<float>() : nullptr;
  const uint16_t* zb = is_dense_bf16(z2, D) ? bf16_bits(z2) : nullptr;  // bf16 fast paths
  uint16_t* cb = codes.scalar_type() == at::kBFloat16 ? bf16_bits_mut(codes) : nullptr;
  Idx* idx = indices.data_ptr<Idx>();
  int64_t first = 0;  // blocks before this one were done by the bf16 key path
#ifdef VFT_FSQ_BF16_KEYS
  if constexpr (sizeof(Idx) == 4) {
    if (zb != nullptr && cb != nullptr && rows >= kKeyRows) {
      KeyTable<D> kt;
      if (build_key_table<D>(kt, t, levels)) {
        const int64_t key_blocks = rows / kKeyRows;
        forward_bf16_keys<D>(zb, cb, reinterpret_cast<int32_t*>(idx), key_blocks, kt);
        first = key_blocks * (kKeyRows / kRows);
      }
    }
  }
#endif

  at::parallel_for(first, blocks, kMinBlocksPerThread, [&](int64_t blk_begin, int64_t blk_end) {
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      alignas(64) float zbuf[K];
      alignas(64) float cbuf[K];
      alignas(64) Acc contrib[K + kContribPad];
      const int64_t row0 = blk * kRows;
      const int n = static_cast<int>(std::min<int64_t>(kRows, rows - row0));
      const bool full = n == kRows;
      const float* zp = zbuf;
      if (dense_in && full) {
        zp = zf + row0 * D;
      } else if (zb != nullptr && full) {
        bf16::load(zb + row0 * D, zbuf, K);
      } else {
        load_block_any(z2, row0, n, D, s_row, s_dim, zbuf);
      }
      float* cp = (dense_out && full) ? cf + row0 * D : cbuf;
      fwd_elements<D, Acc>(zp, cp, contrib, t);
      if (cp == cbuf) {
        if (cb != nullptr && full) {
          bf16::store(cbuf, cb + row0 * D, K);
        } else {
          store_any(cbuf, static_cast<int64_t>(n) * D, codes, row0 * D);
        }
      }
      row_indices<D, Idx>(contrib, idx + row0, n);
    }
  });
}

template <int D>
void forward_dims(const at::Tensor& z2, at::Tensor& codes, at::Tensor& indices,
                  const std::vector<DimConst>& consts, const std::vector<int64_t>& basis,
                  const at::Tensor& thresholds, const std::vector<int64_t>& levels) {
  if (indices.scalar_type() == at::kInt) {
    fsq_forward_impl<D, int32_t>(z2, codes, indices, consts, basis, thresholds, levels);
  } else {
    fsq_forward_impl<D, int64_t>(z2, codes, indices, consts, basis, thresholds, levels);
  }
}

// Host-side constants: consts [d, 4] float32 (half_l, offset, shift, half_w per dim,
// computed by the reference), levels -> basis.
std::vector<DimConst> read_consts(const at::Tensor& consts, int64_t d) {
  VFT_CHECK(consts.device().is_cpu() && consts.scalar_type() == at::kFloat && consts.dim() == 2 &&
                consts.size(0) == d && consts.size(1) == 4 && consts.is_contiguous(),
            "fsq: consts must be a contiguous CPU float32 tensor [", d, ", 4], got ", consts.sizes(), " ",
            consts.scalar_type());
  std::vector<DimConst> out(d);
  const float* p = consts.const_data_ptr<float>();
  for (int64_t j = 0; j < d; ++j) out[j] = {p[4 * j], p[4 * j + 1], p[4 * j + 2], p[4 * j + 3]};
  return out;
}

std::vector<int64_t> basis_of(const std::vector<int64_t>& levels) {
  std::vector<int64_t> b(levels.size());
  int64_t acc = 1;
  for (size_t j = 0; j < levels.size(); ++j) {
    b[j] = acc;
    acc *= levels[j];
  }
  return b;
}

void check_rows(const at::Tensor& t, const char* name, int64_t d) {
  VFT_CHECK(t.dim() == 2 && t.size(1) == d, "fsq: ", name, " must be [rows, ", d, "], got ", t.sizes());
}

}  // namespace

// z2 [rows, d] (fp32/fp16/bf16, any strides) -> codes [rows, d] (contiguous, fp32/fp16/bf16)
// and indices [rows] (contiguous int32 or int64).
// thresholds: [d, n] float32 contiguous (n <= kMaxThresholds; rows NaN-padded), or empty for
// the tanh path.
void fsq_forward_cpu(const at::Tensor& z2, at::Tensor codes, at::Tensor indices, const at::Tensor& consts,
                     const std::vector<int64_t>& levels, const at::Tensor& thresholds) {
  const int64_t d = static_cast<int64_t>(levels.size());
  VFT_CHECK(d >= 1 && d <= kMaxDims, "fsq: the cpu kernel supports 1..", kMaxDims, " dims, got ", d);
  VFT_CHECK_CPU(z2, "fsq: z");
  VFT_CHECK_CPU(codes, "fsq: codes");
  VFT_CHECK_CPU(indices, "fsq: indices");
  VFT_CHECK_CPU(thresholds, "fsq: thresholds");
  check_rows(z2, "z", d);
  VFT_CHECK(codes.is_contiguous() && codes.sizes() == z2.sizes(), "fsq: codes must be contiguous ", z2.sizes(),
            ", got ", codes.sizes());
  VFT_CHECK(indices.is_contiguous() && indices.dim() == 1 && indices.size(0) == z2.size(0) &&
                (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong),
            "fsq: indices must be contiguous int32/int64 [", z2.size(0), "], got ", indices.sizes(), " ",
            indices.scalar_type());
  VFT_CHECK(thresholds.numel() == 0 ||
                (thresholds.device().is_cpu() && thresholds.scalar_type() == at::kFloat && thresholds.dim() == 2 &&
                 thresholds.size(0) == d && thresholds.size(1) <= kMaxThresholds && thresholds.is_contiguous()),
            "fsq: thresholds must be empty or a contiguous CPU float32 [", d, ", <=", kMaxThresholds, "], got ",
            thresholds.sizes(), " ", thresholds.scalar_type());
  const auto c = read_consts(consts, d);
  const auto basis = basis_of(levels);
  switch (d) {
#define VFT_FSQ_CASE(D) \
  case D: return forward_dims<D>(z2, codes, indices, c, basis, thresholds, levels);
    VFT_FSQ_CASE(1) VFT_FSQ_CASE(2) VFT_FSQ_CASE(3) VFT_FSQ_CASE(4) VFT_FSQ_CASE(5) VFT_FSQ_CASE(6)
    VFT_FSQ_CASE(7) VFT_FSQ_CASE(8) VFT_FSQ_CASE(9) VFT_FSQ_CASE(10) VFT_FSQ_CASE(11) VFT_FSQ_CASE(12)
    VFT_FSQ_CASE(13) VFT_FSQ_CASE(14) VFT_FSQ_CASE(15) VFT_FSQ_CASE(16)
#undef VFT_FSQ_CASE
  }
}

// ---------------------------------------------------------------------------------------
// Backward: grad_z = grad_codes * half_l / half_w * (1 - tanh(z + shift)^2)

void bwd_elements(const float* __restrict g, const float* __restrict z, float* __restrict out,
                  const float* __restrict shift, const float* __restrict scale, int K) {
  for (int k = 0; k < K; ++k) out[k] = fsq::grad(g[k], z[k], shift[k], scale[k]);
}

// grad_codes2, z2 [rows, d] (fp32/fp16/bf16, any strides) -> grad_z [rows, d] contiguous,
// dtype of z.
void fsq_backward_cpu(const at::Tensor& grad_codes2, const at::Tensor& z2, at::Tensor grad_z,
                      const at::Tensor& consts) {
  VFT_CHECK_CPU(grad_codes2, "fsq: grad_codes");
  VFT_CHECK_CPU(z2, "fsq: z");
  VFT_CHECK_CPU(grad_z, "fsq: grad_z");
  VFT_CHECK(z2.dim() == 2, "fsq: z must be [rows, d], got ", z2.sizes());
  const int64_t d = z2.size(1);
  VFT_CHECK(d >= 1 && d <= kMaxDims, "fsq: the cpu kernel supports 1..", kMaxDims, " dims, got ", d);
  check_rows(grad_codes2, "grad_codes", d);
  VFT_CHECK(grad_codes2.size(0) == z2.size(0) && grad_z.is_contiguous() && grad_z.sizes() == z2.sizes(),
            "fsq: grad_codes ", grad_codes2.sizes(), " and grad_z ", grad_z.sizes(), " must match z ", z2.sizes());
  const auto c = read_consts(consts, d);
  const int K = static_cast<int>(kRows * d);
  alignas(64) float shift[kRows * kMaxDims];
  alignas(64) float scale[kRows * kMaxDims];
  for (int k = 0; k < K; ++k) {
    shift[k] = c[k % d].shift;
    scale[k] = c[k % d].half_l / c[k % d].half_w;
  }
  const int64_t rows = z2.size(0);
  const int64_t blocks = (rows + kRows - 1) / kRows;
  const bool dense_z = is_dense_float(z2, d), dense_g = is_dense_float(grad_codes2, d);
  const bool dense_out = grad_z.scalar_type() == at::kFloat;
  const uint16_t* zb = is_dense_bf16(z2, d) ? bf16_bits(z2) : nullptr;  // bf16 fast paths
  const uint16_t* gb = is_dense_bf16(grad_codes2, d) ? bf16_bits(grad_codes2) : nullptr;
  uint16_t* ob = grad_z.scalar_type() == at::kBFloat16 ? bf16_bits_mut(grad_z) : nullptr;

  at::parallel_for(0, blocks, kMinBlocksPerThread, [&](int64_t blk_begin, int64_t blk_end) {
    for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
      alignas(64) float zbuf[kRows * kMaxDims];
      alignas(64) float gbuf[kRows * kMaxDims];
      alignas(64) float obuf[kRows * kMaxDims];
      const int64_t row0 = blk * kRows;
      const int n = static_cast<int>(std::min<int64_t>(kRows, rows - row0));
      const bool full = n == kRows;
      const float* zp = zbuf;
      const float* gp = gbuf;
      if (dense_z && full) {
        zp = z2.const_data_ptr<float>() + row0 * d;
      } else if (zb != nullptr && full) {
        bf16::load(zb + row0 * d, zbuf, K);
      } else {
        load_block_any(z2, row0, n, d, z2.stride(0), z2.stride(1), zbuf);
      }
      if (dense_g && full) {
        gp = grad_codes2.const_data_ptr<float>() + row0 * d;
      } else if (gb != nullptr && full) {
        bf16::load(gb + row0 * d, gbuf, K);
      } else {
        load_block_any(grad_codes2, row0, n, d, grad_codes2.stride(0), grad_codes2.stride(1), gbuf);
      }
      float* op = (dense_out && full) ? grad_z.data_ptr<float>() + row0 * d : obuf;
      bwd_elements(gp, zp, op, shift, scale, K);
      if (op == obuf) {
        if (ob != nullptr && full) {
          bf16::store(obuf, ob + row0 * d, K);
        } else {
          store_any(obuf, n * d, grad_z, row0 * d);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Decode: indices [rows] (int32/int64, any stride) -> codes [rows, d] float32 contiguous.
// q_j = floor(idx / basis_j) mod L_j - L_j // 2 with floor semantics (like the reference),
// so even unvalidated out-of-range indices only ever touch their own output row.

template <typename Idx>
void decode_impl(const at::Tensor& indices, at::Tensor& codes, const std::vector<int64_t>& levels) {
  const int64_t d = static_cast<int64_t>(levels.size());
  const auto basis = basis_of(levels);
  const int64_t rows = indices.size(0), s = indices.stride(0);
  const Idx* in = indices.const_data_ptr<Idx>();
  float* out = codes.data_ptr<float>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, rows, 2048, [&](int64_t r_begin, int64_t r_end) {
    for (int64_t r = r_begin; r < r_end; ++r) {
      const int64_t v = static_cast<int64_t>(in[r * s]);
      float* o = out + r * d;
      for (int64_t j = 0; j < d; ++j) {
        const int64_t L = levels[j];
        int64_t q = v / basis[j];
        if ((v % basis[j] != 0) && (v < 0)) --q;  // floor division
        int64_t m = q % L;
        if (m < 0) m += L;
        const int64_t half_w = L / 2;
        o[j] = v == -1 ? nan : static_cast<float>(m - half_w) / static_cast<float>(half_w);
      }
    }
  });
}

void fsq_decode_cpu(const at::Tensor& indices, at::Tensor codes, const std::vector<int64_t>& levels) {
  const int64_t d = static_cast<int64_t>(levels.size());
  VFT_CHECK_CPU(indices, "fsq: indices");
  VFT_CHECK_CPU(codes, "fsq: codes");
  VFT_CHECK(indices.dim() == 1, "fsq: indices must be 1-D [rows], got ", indices.sizes());
  VFT_CHECK(codes.is_contiguous() && codes.scalar_type() == at::kFloat && codes.dim() == 2 &&
                codes.size(0) == indices.size(0) && codes.size(1) == d,
            "fsq: codes must be contiguous float32 [", indices.size(0), ", ", d, "], got ", codes.sizes(), " ",
            codes.scalar_type());
  switch (indices.scalar_type()) {
    case at::kInt: return decode_impl<int32_t>(indices, codes, levels);
    case at::kLong: return decode_impl<int64_t>(indices, codes, levels);
    default: VFT_CHECK(false, "fsq: indices must be int32 or int64, got ", indices.scalar_type());
  }
}

}  // namespace fsq_cpu
}  // namespace VFT_ISA_NS

#if VFT_ISA_PRIMARY
VFT_DECLARE_VARIANTS(fsq_cpu, fsq_forward_cpu)
VFT_DECLARE_VARIANTS(fsq_cpu, fsq_backward_cpu)
VFT_DECLARE_VARIANTS(fsq_cpu, fsq_decode_cpu)

#ifdef VFT_WITH_CUDA
void fsq_forward_cuda(const at::Tensor& z2, at::Tensor codes, at::Tensor indices, const at::Tensor& consts,
                      const std::vector<int64_t>& levels);
void fsq_backward_cuda(const at::Tensor& grad_codes2, const at::Tensor& z2, at::Tensor grad_z,
                       const at::Tensor& consts);
void fsq_decode_cuda(const at::Tensor& indices, at::Tensor codes, const std::vector<int64_t>& levels);
#endif

void bind_fsq(pybind11::module_& m) {
  m.def("fsq_forward_cpu", VFT_DISPATCH(fsq_cpu, fsq_forward_cpu), "FSQ forward: z [rows, d] -> codes [rows, d], indices [rows] (in place)",
        pybind11::arg("z"), pybind11::arg("codes"), pybind11::arg("indices"), pybind11::arg("consts"),
        pybind11::arg("levels"), pybind11::arg("thresholds"));
  m.def("fsq_backward_cpu", VFT_DISPATCH(fsq_cpu, fsq_backward_cpu), "FSQ backward: grad_codes, z [rows, d] -> grad_z (in place)",
        pybind11::arg("grad_codes"), pybind11::arg("z"), pybind11::arg("grad_z"), pybind11::arg("consts"));
  m.def("fsq_decode_cpu", VFT_DISPATCH(fsq_cpu, fsq_decode_cpu), "FSQ decode: indices [rows] -> codes [rows, d] float32 (in place)",
        pybind11::arg("indices"), pybind11::arg("codes"), pybind11::arg("levels"));
#ifdef VFT_WITH_CUDA
  m.def("fsq_forward_cuda", &fsq_forward_cuda, pybind11::arg("z"), pybind11::arg("codes"), pybind11::arg("indices"),
        pybind11::arg("consts"), pybind11::arg("levels"));
  m.def("fsq_backward_cuda", &fsq_backward_cuda, pybind11::arg("grad_codes"), pybind11::arg("z"),
        pybind11::arg("grad_z"), pybind11::arg("consts"));
  m.def("fsq_decode_cuda", &fsq_decode_cuda, pybind11::arg("indices"), pybind11::arg("codes"),
        pybind11::arg("levels"));
#endif
}
#endif  // VFT_ISA_PRIMARY

}  // namespace vft
