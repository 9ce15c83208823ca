// CPU kernels of register attention (docs/spec.md §2): FlashAttention-2-style tiles with an
// online softmax in float32. The tile schedule comes from vft/attention_tiles.h (the port
// of vft_kernels/layout.py): fully masked tiles are never visited, fully allowed tiles
// skip the mask, dropped query rows write zeros. Tile products are plain row-major
// C (+)= A B products (operands pre-transposed where needed) through torch's oneDNN
// brgemm micro-kernels when available (x86 with AVX-512), else the BLAS sgemm that torch
// links, else ATen. bfloat16 forward calls on CPUs with bf16 matrix instructions (AMX-BF16,
// or AVX-512 BF16 as on Zen 4) keep their operands in bf16 and run the tile products on
// oneDNN's bf16 brgemm (VNNI-packed key / value tiles, below).
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "vft/attention_tiles.h"
#include "vft/bf16.h"  // also <immintrin.h> and VFT_BF16_AVX512 where AVX-512 F + BW is on
#include "vft/bind.h"
#include "vft/common.h"
#include "vft/isa.h"

// Fortran BLAS sgemm, exported by the BLAS torch links against. Weak: when it is absent
// the pointer is null and the ATen path runs instead.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace vft {
// The choice of tile products, shared by every ISA variant (its state, the probes and the test
// hooks live once, in the baseline unit).
namespace attention_shared {

// kTiles: vft's own AVX2 + FMA tile products (gemm_tiles; variants without AVX2 run BLAS).
enum class GemmPath : int { kBrgemm = 0, kBlas = 1, kAten = 2, kTiles = 3 };

// The float32 tile products for a capability level (vft/isa.h): oneDNN's brgemm (an
// AVX-512 kernel) only from level avx512; at avx2 vft's AVX2 tile products (no per-call
// packing: BLAS copies both operands of every 64 x 64 tile product, perf: a fifth of its
// time); below it BLAS.
GemmPath gemm_path(int level);
// Whether bf16 forwards run bf16 tile products at that level (avx512_bf16 or amx).
bool bf16_brgemm(int level);

}  // namespace attention_shared

#if VFT_ISA_PRIMARY
namespace attention_shared {
namespace {

bool brgemm_works() {
  static const bool ok = [] {
    float a = 1.0f, b = 2.0f, c = 0.0f;
    try {  // torch raises where oneDNN's fp32 ukernel is not built or the CPU lacks AVX-512
      at::native::cpublas::brgemm(1, 1, 1, 1, 1, 1, false, &a, &b, &c, false);
      at::native::cpublas::brgemm_release(false);
    } catch (const c10::Error&) {
      return false;
    }
    return c == 2.0f;
  }();
  return ok;
}

GemmPath best_path() {
  if (brgemm_works()) return GemmPath::kBrgemm;
  return sgemm_ != nullptr ? GemmPath::kBlas : GemmPath::kAten;
}

// The path of the tile products: the best one, probed on first use (a function-local static:
// thread-safe, and nothing runs when the library loads), unless the test hook
// attention_cpu_gemm_path chose one (kNoOverride: none chosen).
constexpr int kNoOverride = -1;
std::atomic<int> g_path_override{kNoOverride};

GemmPath best_path_once() {
  static const GemmPath best = best_path();
  return best;
}

// bf16 tile products: oneDNN's brgemm with B packed in VNNI layout. It runs on AMX where
// torch can pack for it (could_pack), and on AVX-512 BF16 (vdpbf16ps, e.g. Zen 4) where the
// CPU has that extension; there it measured 2x the float32 brgemm's rate on 64x64x64
// tiles. Where neither is present the bf16 inputs go through the float32 products. The
// ISA is decided once, by the CPU flags and a probe product checked against its known
// result (a build whose bf16 brgemm misreads VNNI operands, or raises, is not used).
// Off switch: the test hook attention_cpu_bf16_brgemm (tests and benchmarks compare the
// two paths).
enum class Bf16Isa : int { kNone = 0, kAvx512Bf16 = 1, kAmx = 2 };

bool bf16_brgemm_probe() {
  // C[2, 16] = A[2, 4] B[4, 16], B in VNNI layout: element (k, j) at ((k / 2) * 16 + j) * 2 + k % 2.
  constexpr int64_t M = 2, N = 16, K = 4;
  const auto bval = [](int64_t k, int64_t j) { return static_cast<float>((k * 3 + j) % 7) - 3.0f; };
  at::BFloat16 a[M * K], b[K * N];
  float c[M * N];
  for (int64_t i = 0; i < M * K; ++i) a[i] = at::BFloat16(static_cast<float>(i % 5) - 2.0f);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) b[((k / 2) * N + j) * 2 + k % 2] = at::BFloat16(bval(k, j));
  try {
    at::native::cpublas::brgemm(M, N, K, K, N, N, false, a, b, c, true);
    at::native::cpublas::brgemm_release(true);
  } catch (const c10::Error&) {
    return false;
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float want = 0.0f;  // small integers: exact in any summation order
      for (int64_t k = 0; k < K; ++k) want += static_cast<float>(a[i * K + k]) * bval(k, j);
      if (c[i * N + j] != want) return false;
    }
  return true;
}

Bf16Isa bf16_isa() {
  static const Bf16Isa isa = [] {
    bool amx = false;
    try {
      amx = at::native::cpublas::could_pack(at::kBFloat16);
    } catch (const c10::Error&) {
      amx = false;
    }
#if defined(__x86_64__) && defined(__GNUC__)
    const bool avx512_bf16 = __builtin_cpu_supports("avx512bf16");
#else
    const bool avx512_bf16 = false;
#endif
    if (!(amx || avx512_bf16) || !bf16_brgemm_probe()) return Bf16Isa::kNone;
    return amx ? Bf16Isa::kAmx : Bf16Isa::kAvx512Bf16;
  }();
  return isa;
}
std::atomic<bool> g_bf16_brgemm{true};
}  // namespace

GemmPath gemm_path(int level) {
  const int chosen = g_path_override.load(std::memory_order_relaxed);
  if (chosen != kNoOverride) return static_cast<GemmPath>(chosen);
  const GemmPath best = best_path_once();
#ifdef VFT_HAVE_AVX2
  if (level == isa::kAvx2) return GemmPath::kTiles;
#endif
  if (best == GemmPath::kBrgemm && level < isa::kAvx512) return sgemm_ != nullptr ? GemmPath::kBlas : GemmPath::kAten;
  return best;
}

bool bf16_brgemm(int level) {
  return g_bf16_brgemm.load() && level >= isa::kAvx512Bf16 && gemm_path(level) == GemmPath::kBrgemm &&
         bf16_isa() != Bf16Isa::kNone;
}

}  // namespace attention_shared
#endif  // VFT_ISA_PRIMARY

namespace VFT_ISA_NS {  // one copy per ISA variant (vft/isa.h)
namespace attention_cpu {
namespace {

using attention_shared::GemmPath;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kInf = std::numeric_limits<float>::infinity();
// Query / key rows per tile. 64 keeps a tile's operands in L1/L2 and the skip granularity
// fine; measured faster than 32 and 128 on the benchmark shapes (benchmarks/bench_attention.py).
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 64;

thread_local bool t_vnni_used = false;  // this thread holds a bf16 brgemm context to release

#if defined(__AVX2__) && defined(__FMA__)
#define VFT_GEMM_TILES 1
// Rows [0, R) x columns [j, j + 16) of C = A B (+ C): 2R accumulators of 8 lanes, B's two
// vectors loaded once per k, A broadcast. Columns past n (< 16 left) are masked.
template <int R, bool kMasked>
inline void gemm_strip(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, bool accumulate,
                       float* C, int64_t ldc, __m256i m0, __m256i m1) {
  // (unroll pragmas: fully unrolled early, the accumulators stay in registers; without them
  // GCC stored all 2R to the stack on every k)
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (accumulate) {
      acc[r][0] = kMasked ? _mm256_maskload_ps(C + r * ldc, m0) : _mm256_loadu_ps(C + r * ldc);
      acc[r][1] = kMasked ? _mm256_maskload_ps(C + r * ldc + 8, m1) : _mm256_loadu_ps(C + r * ldc + 8);
    } else {
      acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* b = B + k * ldb;
    const __m256 b0 = kMasked ? _mm256_maskload_ps(b, m0) : _mm256_loadu_ps(b);
    const __m256 b1 = kMasked ? _mm256_maskload_ps(b + 8, m1) : _mm256_loadu_ps(b + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (kMasked) {
      _mm256_maskstore_ps(C + r * ldc, m0, acc[r][0]);
      _mm256_maskstore_ps(C + r * ldc + 8, m1, acc[r][1]);
    } else {
      _mm256_storeu_ps(C + r * ldc, acc[r][0]);
      _mm256_storeu_ps(C + r * ldc + 8, acc[r][1]);
    }
  }
}

template <bool kMasked>
void gemm_rows(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, bool accumulate,
               float* C, int64_t ldc, __m256i m0, __m256i m1) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6)
    gemm_strip<6, kMasked>(K, A + i * lda, lda, B, ldb, accumulate, C + i * ldc, ldc, m0, m1);
  switch (M - i) {
    case 5: return gemm_strip<5, kMasked>(K, A + i * lda, lda, B, ldb, accumulate, C + i * ldc, ldc, m0, m1);
    case 4: return gemm_strip<4, kMasked>(K, A + i * lda, lda, B, ldb, accumulate, C + i * ldc, ldc, m0, m1);
    case 3: return gemm_strip<3, kMasked>(K, A + i * lda, lda, B, ldb, accumulate, C + i * ldc, ldc, m0, m1);
    case 2: return gemm_strip<2, kMasked>(K, A + i * lda, lda, B, ldb, accumulate, C + i * ldc, ldc, m0, m1);
    case 1: return gemm_strip<1, kMasked>(K, A + i * lda, lda, B, ldb, accumulate, C + i * ldc, ldc, m0, m1);
    default: return;
  }
}

// Row-major C[M, N] = A[M, K] B[K, N] (+ C), operands read in place (made for the tile
// shapes: a 64 x 64 B stays in L1): 16-column strips, 6 rows at a time; sums run over k in
// order, one FMA per term.
void gemm_tiles(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                bool accumulate, float* C, int64_t ldc) {
  const __m256i all = _mm256_set1_epi32(-1);
  int64_t j = 0;
  for (; j + 16 <= N; j += 16) gemm_rows<false>(M, K, A, lda, B + j, ldb, accumulate, C + j, ldc, all, all);
  if (j < N) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i left = _mm256_set1_epi32(static_cast<int>(N - j));
    const __m256i m0 = _mm256_cmpgt_epi32(left, lane);
    const __m256i m1 = _mm256_cmpgt_epi32(left, _mm256_add_epi32(lane, _mm256_set1_epi32(8)));
    gemm_rows<true>(M, K, A, lda, B + j, ldb, accumulate, C + j, ldc, m0, m1);
  }
}
#endif

// Row-major C[M, N] = A[M, K] B[K, N] (accumulate: C += A B). Without accumulate C's old
// contents (NaN included) are ignored.
void gemm(GemmPath path, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
          int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < M; ++r) std::fill(C + r * ldc, C + r * ldc + N, 0.0f);
    return;
  }
#ifdef VFT_GEMM_TILES
  if (path == GemmPath::kTiles) return gemm_tiles(M, N, K, A, lda, B, ldb, accumulate, C, ldc);
#endif
  if (path == GemmPath::kBrgemm) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
  } else if (path == GemmPath::kBlas || (path == GemmPath::kTiles && sgemm_ != nullptr)) {
    // Row-major C = A B is column-major C^T = B^T A^T.
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    sgemm_("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  } else {
    auto opts = at::TensorOptions().dtype(at::kFloat);
    auto a = at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
    auto b = at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
    auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
    c.addmm_(a, b, accumulate ? 1.0f : 0.0f, 1.0f);
  }
}

// 2^x for x <= ~0 (softmax numerators), to ~1 ulp; x <= -127 (and -inf) gives exactly 0.
// Branch-free so the loops calling it vectorise.
inline float exp2_nonpos(float x) {
  x = x < -127.0f ? -127.0f : x;
  const float n = (x + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const float f = x - n;                           // [-0.5, 0.5]
  // Taylor series of 2^f = e^(f ln2) to degree 7 (error < 1e-8 on [-0.5, 0.5]).
  float p = 1.5252733804059841e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n; n = -127 gives +0.0
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Inputs of one call as float32 [B*H, N, D] contiguous buffers plus the layout. A dense
// call has one sample per batch row (samples = B, cu = nullptr); a packed call has B = 1
// and sample s at tokens [cu[s], cu[s+1]) of that row, with (cu[s+1] - cu[s]) / (P + R)
// time blocks (layout.blocks is the largest). Kernels work in sample coordinates: token 0
// is the sample's first token, so the tile schedule is the dense one of the sample.
struct Problem {
  TileLayout layout;
  int64_t B, H, N, D;
  const int32_t* keep;  // [samples, layout.blocks]: per-block keeps, clamped to [0, R] when read
  float scale;
  int64_t samples;
  const int32_t* cu = nullptr;  // [samples + 1] for packed calls
  // The caller's CPU capability and the tile products it selects, fixed for the whole call
  // (the worker threads do not see the caller's use_cpu_capability override).
  int level = isa::kBaseline;
  GemmPath path = GemmPath::kAten;

  const int32_t* keep_of(int64_t s) const { return keep + s * layout.blocks; }
  int64_t row_of(int64_t s) const { return cu ? 0 : s; }       // batch row holding sample s
  int64_t start_of(int64_t s) const { return cu ? cu[s] : 0; }  // its first token in that row
  TileLayout layout_of(int64_t s) const {
    TileLayout L = layout;
    if (cu) L.blocks = (cu[s + 1] - cu[s]) / layout.block_size();
    return L;
  }
  int64_t max_len() const { return cu ? layout.seq_len() : N; }  // tokens of the longest sample
  int64_t used() const { return cu ? cu[samples] : N; }           // rows >= used() are padding
};

void scale_tile(float* s, int64_t rows, int64_t cols, int64_t ld, float mul) {
  for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) s[r * ld + c] *= mul;
}

// Sets masked scores of tile rows [q0, q0 + nq) x keys [k0, k0 + nk) to -inf (ld = row
// stride of s). Dropped queries mask their whole row.
void apply_mask(const TileLayout& L, const int32_t* keep, int64_t q0, int64_t nq, int64_t k0, int64_t nk, float* s,
                int64_t ld) {
  const int64_t S = L.block_size(), k1 = k0 + nk;
  for (int64_t r = 0; r < nq; ++r) {
    float* row = s + r * ld;
    const int64_t i = q0 + r;
    if (!L.kept(i, keep)) {
      std::fill(row, row + nk, kNegInf);
      continue;
    }
    for (int64_t tk = k0 / S; tk * S < k1; ++tk) {
      const int64_t lo = std::max(k0, tk * S + L.allowed_prefix(i, tk, keep));
      const int64_t hi = std::min(k1, (tk + 1) * S);
      if (lo < hi) std::fill(row + (lo - k0), row + (hi - k0), kNegInf);
    }
  }
}

// apply_mask for a transposed tile: st[key r][query c] (ld = row stride).
void apply_mask_t(const TileLayout& L, const int32_t* keep, int64_t q0, int64_t nq, int64_t k0, int64_t nk, float* st,
                  int64_t ld) {
  const int64_t S = L.block_size(), k1 = k0 + nk;
  for (int64_t c = 0; c < nq; ++c) {
    const int64_t i = q0 + c;
    const bool kept = L.kept(i, keep);
    for (int64_t tk = k0 / S; tk * S < k1; ++tk) {
      const int64_t lo = std::max(k0, tk * S + (kept ? L.allowed_prefix(i, tk, keep) : 0));
      const int64_t hi = std::min(k1, (tk + 1) * S);
      for (int64_t kk = lo; kk < hi; ++kk) st[(kk - k0) * ld + c] = kNegInf;
    }
  }
}

// Runs task(t, scratch) for t in [0, n) on torch's intra-op threads, handing tasks out
// dynamically (tile costs differ a lot); each thread creates its scratch once. Every task
// writes only its own outputs, so the result does not depend on the schedule.
// chunk: tasks taken at a time (consecutive tasks share operands a worker can keep cached).
template <typename Scratch, typename Task>
void run_tasks(GemmPath path, int64_t n, const Task& task, int64_t chunk = 1) {
  std::atomic<int64_t> next{0};
  chunk = std::max<int64_t>(1, chunk);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t t0 = next.fetch_add(chunk); t0 < n; t0 = next.fetch_add(chunk))
      for (int64_t t = t0; t < std::min(t0 + chunk, n); ++t) task(t, scratch);
    if (path == GemmPath::kBrgemm) at::native::cpublas::brgemm_release(false);
    if (t_vnni_used) {
      at::native::cpublas::brgemm_release(true);
      t_vnni_used = false;
    }
  });
}

template <typename T>
void store_row(T* dst, const float* src, int64_t D, float mul) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d] * mul);
}

// ------------------------------------------------------------------------------------
// Forward: one task per (sample, h, query tile).

struct ForwardScratch {
  std::vector<float> s = std::vector<float>(kBlockM * kBlockN);
  std::vector<float> m = std::vector<float>(kBlockM), l = std::vector<float>(kBlockM);
  std::vector<float> o;
  std::vector<at::BFloat16> p16 = std::vector<at::BFloat16>(kBlockM * kBlockN);  // P in bf16 (bf16 brgemm path)
  // This worker's key tiles of one sample (batch row bh, first token start), prepared on
  // first use: float32 K^T tiles (kt_f32) or, for the bf16 brgemm, VNNI-packed K^T tiles
  // and V panels (kt, v); packed[i] says whether key tile i is ready.
  int64_t packed_bh = -1, packed_start = -1;
  std::vector<uint8_t> packed;
  std::vector<uint16_t> kt, v;
  std::vector<float> kt_f32;
  // Resets the cache when (bh, start) is a new sample; true when key tile i still needs preparing.
  bool needs_tile(int64_t bh, int64_t start, int64_t n_kt, int64_t i) {
    if (packed_bh != bh || packed_start != start) {
      packed_bh = bh;
      packed_start = start;
      packed.assign(n_kt, 0);
    }
    if (packed[i]) return false;
    packed[i] = 1;
    return true;
  }
};

// The forward pass's two tile products in float32: S = Q K^T and O += P V, from q, k, v
// [B*H, N, D] float32. Sample-relative rows: token n of the sample in batch row bh is row
// start + n. Each worker transposes a key tile (K^T [D, kBlockN]) the first time it needs
// it for a sample, in its own scratch; tasks come a sample's query tiles at a time.
struct F32Products {
  static constexpr bool kBf16P = false;  // P V takes P in float32 (in place of S)
  const float *q, *k, *v;
  int64_t N, D, n_kt;
  GemmPath path;
  // S[nq, nk] (ld kBlockN) = Q[q0, +nq) K[k0, +nk)^T; len: the sample's length (tokens)
  void qk(int64_t bh, int64_t start, int64_t q0, int64_t nq, int64_t k0, int64_t nk, float* s,
          ForwardScratch& w, int64_t len) const {
    const int64_t i = k0 / kBlockN;
    if (w.kt_f32.size() < static_cast<size_t>(n_kt * D * kBlockN)) w.kt_f32.resize(n_kt * D * kBlockN);
    float* kt = w.kt_f32.data() + i * D * kBlockN;
    if (w.needs_tile(bh, start, n_kt, i)) {
      const int64_t keys = std::min(kBlockN, len - k0);
      const float* src = k + (bh * N + start + k0) * D;
      for (int64_t j = 0; j < keys; ++j)
        for (int64_t d = 0; d < D; ++d) kt[d * kBlockN + j] = src[j * D + d];
    }
    gemm(path, nq, nk, D, q + (bh * N + start + q0) * D, D, kt, kBlockN, false, s, kBlockN);
  }
  // O[nq, D] += P[nq, nk] (ld kBlockN) V[k0, +nk)
  void pv(int64_t bh, int64_t start, int64_t nq, int64_t k0, int64_t nk, const float* p, float* o,
          ForwardScratch&, bool) const {
    gemm(path, nq, D, nk, p, kBlockN, v + (bh * N + start + k0) * D, D, true, o, D);
  }
};

#ifdef VFT_BF16_AVX512
#define VFT_ATTN_SIMD_ROWS 1
// exp2_nonpos on 16 lanes, the same operations (and NaN handling) as the scalar version.
inline __m512 exp2_nonpos16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-127.0f), x);  // -127 > x ? -127 : x (NaN stays NaN)
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(x, magic), magic);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252733804059841e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// One full row (kBlockN = 64 scores) of the online softmax, as the scalar loops in forward:
// the max of row * a (NaN scores ignored) ...
inline float row_max64(const float* row, float a) {
  const __m512 va = _mm512_set1_ps(a);
  __m512 m0 = _mm512_set1_ps(kNegInf), m1 = m0;
  // max(new, acc): new > acc ? new : acc, so a NaN score never enters the accumulators
  m0 = _mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(row), va), m0);
  m1 = _mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(row + 16), va), m1);
  m0 = _mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(row + 32), va), m0);
  m1 = _mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(row + 48), va), m1);
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}
// ... then p = exp2(row * a - m) written back as float (p16 == nullptr) or as bf16 bits
// to p16, returning the float sum of p.
inline float row_exp64(float* row, float a, float m, uint16_t* p16) {
  const __m512 va = _mm512_set1_ps(a), vm = _mm512_set1_ps(m);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  for (int j = 0; j < 64; j += 32) {
    const __m512 p0 = exp2_nonpos16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(row + j), va), vm));
    const __m512 p1 = exp2_nonpos16(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(row + j + 16), va), vm));
    s0 = _mm512_add_ps(s0, p0);
    s1 = _mm512_add_ps(s1, p1);
    if (p16 != nullptr) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16 + j), bf16::from_f32_x16(p0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16 + j + 16), bf16::from_f32_x16(p1));
    } else {
      _mm512_storeu_ps(row + j, p0);
      _mm512_storeu_ps(row + j + 16, p1);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#elif defined(VFT_BF16_AVX2)
#define VFT_ATTN_SIMD_ROWS 1
// The AVX2 forms of the three functions above: 8 lanes, the same operations per element.
inline __m256 exp2_nonpos8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-127.0f), x);  // -127 > x ? -127 : x (NaN stays NaN)
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(x, magic), magic);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.5252733804059841e-05f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530393381606e-04f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float row_max64(const float* row, float a) {
  const __m256 va = _mm256_set1_ps(a);
  __m256 m0 = _mm256_set1_ps(kNegInf), m1 = m0;
  for (int j = 0; j < 64; j += 16) {  // max(new, acc): a NaN score never enters the accumulators
    m0 = _mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j), va), m0);
    m1 = _mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j + 8), va), m1);
  }
  return hmax8(_mm256_max_ps(m0, m1));
}

inline float row_exp64(float* row, float a, float m, uint16_t* p16) {
  const __m256 va = _mm256_set1_ps(a), vm = _mm256_set1_ps(m);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  for (int j = 0; j < 64; j += 16) {
    const __m256 p0 = exp2_nonpos8(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j), va), vm));
    const __m256 p1 = exp2_nonpos8(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(row + j + 8), va), vm));
    s0 = _mm256_add_ps(s0, p0);
    s1 = _mm256_add_ps(s1, p1);
    if (p16 != nullptr) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p16 + j), bf16::from_f32_x8(p0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p16 + j + 8), bf16::from_f32_x8(p1));
    } else {
      _mm256_storeu_ps(row + j, p0);
      _mm256_storeu_ps(row + j + 8, p1);
    }
  }
  return hsum8(_mm256_add_ps(s0, s1));
}
#endif

// The same products on bf16 brgemm (AMX or AVX-512 BF16) for bf16 inputs of a dense call:
// q [B*H, N, Dp] bf16 with the head dim zero-padded to Dp (a multiple of 32); k, v [B*H, N,
// D] bf16. Each worker packs the K^T tile [Dp, kBlockN] and the V tile [kBlockN, D] (rows
// past N zero) of a key tile into VNNI layout the first time it needs them for a batch row,
// in its own scratch (L2-resident, no per-call buffers), V in column panels of kPanel
// (brgemm's packed leading dimension is at most 64). Tasks are handed out a batch row's
// query tiles at a time, so each tile is packed about once. P is rounded to bf16 before
// P V, the rounding step the bf16 reference takes too (docs/spec.md §4).
constexpr int64_t kPanel = 64;

// VNNI layout of a brgemm B operand [K, n] (bf16): element (k, j) at ((k / 2) * ld + j) * 2 + k % 2,
// i.e. pairs of consecutive K rows interleaved; entries past the data are zeros.
// K^T tile of keys [k0, k0 + kBlockN) for S = Q K^T: K-dim = head dim (Dp), n = keys; read
// straight from K [N, D] (a (d, d + 1) pair of K^T is adjacent in a row of K).
void pack_kt_tile(const uint16_t* kbh, int64_t N, int64_t D, int64_t Dp, int64_t k0, uint16_t* dst) {
  if (k0 + kBlockN <= N && D % 2 == 0) {
    // Full tile, even D: a (d, d + 1) pair is one 32-bit word of a key's row, and the packed
    // tile is the 32-bit transpose [Dp / 2][kBlockN] of the tile's words [kBlockN][D / 2].
    const int64_t W = D / 2;
    for (int64_t w = 0; w < Dp / 2; ++w) {
      uint32_t* out = reinterpret_cast<uint32_t*>(dst) + w * kBlockN;
      if (w >= W) {
        std::fill(out, out + kBlockN, 0u);
        continue;
      }
      for (int64_t j = 0; j < kBlockN; ++j) std::memcpy(out + j, kbh + (k0 + j) * D + 2 * w, sizeof(uint32_t));
    }
    return;
  }
  for (int64_t j = 0; j < kBlockN; ++j) {
    const int64_t key = k0 + j, cols = key < N ? D : 0;  // keys past N: zeros
    const uint16_t* row = kbh + std::min(key, N - 1) * D;
    for (int64_t d = 0; d < Dp; ++d) dst[((d >> 1) * kBlockN + j) * 2 + (d & 1)] = d < cols ? row[d] : uint16_t{0};
  }
}
// V tile rows [k0, k0 + kBlockN), columns [c0, c0 + kPanel) for O += P V: K-dim = keys.
// Rows r and r + 1 are interleaved into 32-bit words (r in the low half).
void pack_v_panel(const uint16_t* vbh, int64_t N, int64_t D, int64_t k0, int64_t c0, uint16_t* dst) {
  const int64_t width = std::min(kPanel, D - c0);
  for (int64_t r = 0; r < kBlockN; r += 2) {
    uint32_t* out = reinterpret_cast<uint32_t*>(dst) + (r >> 1) * kPanel;
    const int64_t c_lo = k0 + r < N ? width : 0, c_hi = k0 + r + 1 < N ? width : 0;  // keys past N: zeros
    const uint16_t* lo = vbh + std::min(k0 + r, N - 1) * D + c0;
    const uint16_t* hi = vbh + std::min(k0 + r + 1, N - 1) * D + c0;
    if (c_hi == width) {  // both rows present
      for (int64_t j = 0; j < width; ++j) out[j] = uint32_t{lo[j]} | (uint32_t{hi[j]} << 16);
    } else {
      for (int64_t j = 0; j < width; ++j)
        out[j] = (j < c_lo ? uint32_t{lo[j]} : 0u) | ((j < c_hi ? uint32_t{hi[j]} : 0u) << 16);
    }
    std::fill(out + width, out + kPanel, 0u);
  }
}

struct Bf16Products {
  static constexpr bool kBf16P = true;  // P V takes P in bf16 (w.p16)
  const at::BFloat16 *q;
  const uint16_t *k, *v;
  int64_t N, D, Dp, n_kt, n_panels;
  // Packs key tile k0 / kBlockN of the sample at token `start` of batch row bh (len tokens;
  // keys past it are zeros) into w, once per sample and worker.
  void ensure_packed(int64_t bh, int64_t start, int64_t len, int64_t k0, ForwardScratch& w) const {
    if (w.kt.size() < static_cast<size_t>(n_kt * Dp * kBlockN)) {
      w.kt.resize(n_kt * Dp * kBlockN);
      w.v.resize(n_kt * n_panels * kBlockN * kPanel);
    }
    const int64_t i = k0 / kBlockN;
    if (!w.needs_tile(bh, start, n_kt, i)) return;
    const int64_t off = (bh * N + start) * D;
    pack_kt_tile(k + off, len, D, Dp, k0, w.kt.data() + i * Dp * kBlockN);
    for (int64_t c = 0; c < n_panels; ++c)
      pack_v_panel(v + off, len, D, k0, c * kPanel, w.v.data() + (i * n_panels + c) * kBlockN * kPanel);
  }
  void qk(int64_t bh, int64_t start, int64_t q0, int64_t nq, int64_t k0, int64_t nk, float* s, ForwardScratch& w,
          int64_t len) const {
    t_vnni_used = true;
    ensure_packed(bh, start, len, k0, w);
    const auto* b = reinterpret_cast<const at::BFloat16*>(w.kt.data() + (k0 / kBlockN) * Dp * kBlockN);
    at::native::cpublas::brgemm(nq, nk, Dp, Dp, kBlockN, kBlockN, false, q + (bh * N + start + q0) * Dp, b, s, true);
  }
  // p_in_p16: the softmax already wrote P to w.p16 (full key tiles); else P is float in p.
  void pv(int64_t bh, int64_t, int64_t nq, int64_t k0, int64_t nk, const float* p, float* o,
          ForwardScratch& w, bool p_in_p16) const {
    t_vnni_used = true;
    for (int64_t r = 0; r < nq && !p_in_p16; ++r) {
      uint16_t* dst = reinterpret_cast<uint16_t*>(w.p16.data()) + r * kBlockN;
      const float* src = p + r * kBlockN;
#pragma omp simd
      for (int64_t j = 0; j < kBlockN; ++j) dst[j] = j < nk ? bf16::from_f32(src[j]) : 0;
    }
    const auto* panels = reinterpret_cast<const at::BFloat16*>(w.v.data() + (k0 / kBlockN) * n_panels * kBlockN * kPanel);
    for (int64_t c = 0; c < n_panels; ++c)
      at::native::cpublas::brgemm(nq, std::min(kPanel, D - c * kPanel), kBlockN, kBlockN, kPanel, D, true,
                                  w.p16.data(), panels + c * kBlockN * kPanel, o + c * kPanel, true);
  }
};

template <typename T, typename Products>
void forward(const Problem& pr, const Products& prod, T* out, float* lse) {
  const int64_t D = pr.D, n_qt = (pr.max_len() + kBlockM - 1) / kBlockM;
  const float alpha = pr.scale * kLog2e;  // scores in log2 units: exp2 instead of exp
  // A batch row's query tiles at a time when there are enough rows to keep every thread
  // busy (workers reuse that row's packed keys and values), else one tile at a time.
  const int64_t chunk = pr.samples * pr.H >= 4 * at::get_num_threads() ? n_qt : 1;
  run_tasks<ForwardScratch>(pr.path, pr.samples * pr.H * n_qt, [&](int64_t t, ForwardScratch& w) {
    const int64_t qt = t % n_qt, sh = t / n_qt, s = sh / pr.H, h = sh % pr.H;
    const TileLayout L = pr.layout_of(s);
    const int64_t N = L.seq_len(), q0 = qt * kBlockM;
    if (q0 >= N) return;
    const int32_t* keep = pr.keep_of(s);
    const int64_t q1 = std::min(q0 + kBlockM, N);
    const int64_t bh = pr.row_of(s) * pr.H + h, start = pr.start_of(s);
    T* out_bh = out + (bh * pr.N + start) * D;
    float* lse_bh = lse + bh * pr.N + start;
    // Rows after the tile's last kept query are dropped: only [q0, qe) is computed.
    const int64_t last = L.last_kept(q0, q1, keep);
    const int64_t qe = last < 0 ? q0 : last + 1, nq = qe - q0;
    w.o.assign(nq * D, 0.0f);
    std::fill(w.m.begin(), w.m.end(), kNegInf);
    std::fill(w.l.begin(), w.l.end(), 0.0f);
    int64_t k_lo, k_hi;
    L.key_range(q0, q1, keep, &k_lo, &k_hi);
    for (int64_t k0 = (k_lo / kBlockN) * kBlockN; k0 < k_hi; k0 += kBlockN) {
      const int64_t k1 = std::min(k0 + kBlockN, N);
      const int cls = L.classify_tile(q0, q1, k0, k1, keep);
      if (cls == kTileMasked) continue;
      // Keys past k_hi or after the last kept key are masked for every row: not computed.
      const int64_t ke = std::min(k_hi, L.last_kept(k0, k1, keep) + 1), nk = ke - k0;
      float* s = w.s.data();
      prod.qk(bh, start, q0, nq, k0, nk, s, w, N);  // S = Q K^T
      // Partial tiles are scaled before masking so that -inf stays -inf whatever the sign of
      // scale; full tiles fold the scale into the softmax loops.
      if (cls == kTilePartial) {
        scale_tile(s, nq, nk, kBlockN, alpha);
        apply_mask(L, keep, q0, nq, k0, nk, s, kBlockN);
      }
      const float a = cls == kTilePartial ? 1.0f : alpha;
      // Full key tiles take the 512-bit (AVX2: 256-bit) row loops (which write P straight to
      // bf16 for the bf16 products); partial ones the scalar loops.
#ifdef VFT_ATTN_SIMD_ROWS
      const bool full_row = nk == kBlockN;
#else
      constexpr bool full_row = false;
#endif
      uint16_t* p16 = Products::kBf16P && full_row ? reinterpret_cast<uint16_t*>(w.p16.data()) : nullptr;
      for (int64_t r = 0; r < nq; ++r) {
        float* row = s + r * kBlockN;
        float mx = kNegInf;
#ifdef VFT_ATTN_SIMD_ROWS
        if (full_row) {
          mx = row_max64(row, a);
        } else
#endif
        {
#pragma omp simd reduction(max : mx)
          for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, row[j] * a);
        }
        const float m_old = w.m[r], m_new = std::max(m_old, mx);
        // Row with nothing allowed yet: subtracting 0 keeps exp2(-inf) = 0 (no inf - inf).
        const float m_use = m_new == kNegInf ? 0.0f : m_new;
        float sum = 0.0f;
#ifdef VFT_ATTN_SIMD_ROWS
        if (full_row) {
          sum = row_exp64(row, a, m_use, p16 != nullptr ? p16 + r * kBlockN : nullptr);
        } else
#endif
        {
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < nk; ++j) {
            row[j] = exp2_nonpos(row[j] * a - m_use);
            sum += row[j];
          }
        }
        const float corr = exp2_nonpos(m_old - m_use);
        w.l[r] = w.l[r] * corr + sum;
        w.m[r] = m_new;
        if (corr != 1.0f) {
          float* o = w.o.data() + r * D;
          for (int64_t d = 0; d < D; ++d) o[d] *= corr;
        }
      }
      prod.pv(bh, start, nq, k0, nk, s, w.o.data(), w, p16 != nullptr);  // O += P V
    }
    for (int64_t r = 0; r < q1 - q0; ++r) {
      T* dst = out_bh + (q0 + r) * D;
      // l == 0 exactly for dropped queries: every kept query sees patch 0.
      if (r < nq && w.l[r] > 0.0f) {
        store_row(dst, w.o.data() + r * D, D, 1.0f / w.l[r]);
        lse_bh[q0 + r] = (w.m[r] + std::log2(w.l[r])) * kLn2;
      } else if (r < nq && L.kept(q0 + r, keep)) {
        // A kept query whose sum is not positive met a NaN score (NaN / inf in q or k):
        // propagate it as the reference does (lse +inf when a score was +inf, else NaN).
        std::fill(dst, dst + D, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
        lse_bh[q0 + r] = w.m[r] == kInf ? kInf : std::numeric_limits<float>::quiet_NaN();
      } else {
        std::fill(dst, dst + D, static_cast<T>(0.0f));
        lse_bh[q0 + r] = kNegInf;
      }
    }
  }, chunk);
}

// ------------------------------------------------------------------------------------
// Backward: one task per (sample, h, group of key tiles). A task owns dk/dv of its key tiles
// and accumulates dq into its group's slice of dq_acc [G, B*H, N, D]; the groups are
// summed in a fixed order afterwards (deterministic, no atomics). G > 1 only when B*H is
// too small to keep every thread busy.

struct BackwardScratch {
  // Transposed tiles [key][query] (ld kBlockM) so every product is a plain A B; ds is
  // dS^T transposed back for dQ.
  std::vector<float> pt = std::vector<float>(kBlockN * kBlockM), dst = std::vector<float>(kBlockN * kBlockM);
  std::vector<float> ds = std::vector<float>(kBlockM * kBlockN);
  std::vector<float> dk, dv;
};

// qt, dot: queries and output gradients transposed, [B*H, D, N]. q_fin, k_fin: q and k with
// non-finite elements zeroed, the operands of dK += dS^T Q and dQ += dS K (a non-finite q_i
// or k_j already makes every allowed dS entry of its row / column NaN; zeroing it there
// keeps 0 * NaN on masked pairs of a partial tile from reaching tokens that cannot see it).
template <typename T>
void backward(const Problem& pr, const float* q_fin, const float* qt, const float* k, const float* k_fin,
              const float* v,
              const float* dout, const float* dot, const float* lse2, const float* delta, float* dq_acc,
              int64_t groups, T* dk, T* dv) {
  const int64_t D = pr.D, BH = pr.B * pr.H, ldt = pr.N;
  const float alpha = pr.scale * kLog2e;
  run_tasks<BackwardScratch>(pr.path, pr.samples * pr.H * groups, [&](int64_t t, BackwardScratch& w) {
    const int64_t g = t % groups, sh = t / groups, s = sh / pr.H, h = sh % pr.H;
    const TileLayout L = pr.layout_of(s);
    const int64_t N = L.seq_len();
    const int64_t n_kt = (N + kBlockN - 1) / kBlockN, per_group = (n_kt + groups - 1) / groups;
    const int32_t* keep = pr.keep_of(s);
    const int64_t bh = pr.row_of(s) * pr.H + h, start = pr.start_of(s);
    const int64_t off = (bh * pr.N + start) * D;  // row-major [N, D] operands
    const int64_t off_t = bh * pr.N * D + start;   // transposed [D, N] operands (ld = ldt)
    float* dq_g = dq_acc + (g * BH + bh) * pr.N * D + start * D;
    std::fill(dq_g, dq_g + N * D, 0.0f);
    for (int64_t kt = g * per_group; kt < std::min(n_kt, (g + 1) * per_group); ++kt) {
      const int64_t k0 = kt * kBlockN, k1 = std::min(k0 + kBlockN, N);
      const int64_t last_k = L.last_kept(k0, k1, keep);
      const int64_t ke = last_k < 0 ? k0 : last_k + 1, nk = ke - k0;
      w.dk.assign(nk * D, 0.0f);
      w.dv.assign(nk * D, 0.0f);
      const float* kj = k + off + k0 * D;
      const float* kj_fin = k_fin + off + k0 * D;
      int64_t q_lo, q_hi;
      L.query_range(k0, k1, keep, &q_lo, &q_hi);
      for (int64_t q0 = (q_lo / kBlockM) * kBlockM; q0 < q_hi; q0 += kBlockM) {
        const int64_t q1 = std::min(q0 + kBlockM, N);
        const int cls = L.classify_tile(q0, q1, k0, k1, keep);
        if (cls == kTileMasked) continue;
        const int64_t qe = std::min(q_hi, L.last_kept(q0, q1, keep) + 1), nq = qe - q0;
        float* pt = w.pt.data();
        float* dst = w.dst.data();
        gemm(pr.path, nk, nq, D, kj, D, qt + off_t + q0, ldt, false, pt, kBlockM);  // S^T = K Q^T
        if (cls == kTilePartial) {  // scale, then mask (as in the forward pass)
          scale_tile(pt, nk, nq, kBlockM, alpha);
          apply_mask_t(L, keep, q0, nq, k0, nk, pt, kBlockM);
        }
        const float a = cls == kTilePartial ? 1.0f : alpha;
        const float* lse_q = lse2 + bh * pr.N + start + q0;
        for (int64_t r = 0; r < nk; ++r) {
          float* row = pt + r * kBlockM;
          // Masked pairs (-inf) give exactly 0, also for a NaN row (lse NaN): a non-finite
          // query must not leak into keys it cannot see.
#pragma omp simd
          for (int64_t c = 0; c < nq; ++c) row[c] = row[c] == kNegInf ? 0.0f : exp2_nonpos(row[c] * a - lse_q[c]);
        }
        gemm(pr.path, nk, D, nq, pt, kBlockM, dout + off + q0 * D, D, true, w.dv.data(), D);  // dV += P^T dO
        gemm(pr.path, nk, nq, D, v + off + k0 * D, D, dot + off_t + q0, ldt, false, dst, kBlockM);  // dP^T = V dO^T
        const float* delta_q = delta + bh * pr.N + start + q0;
        for (int64_t r = 0; r < nk; ++r) {
          const float* prow = pt + r * kBlockM;
          float* drow = dst + r * kBlockM;
#pragma omp simd
          for (int64_t c = 0; c < nq; ++c)  // dS = P (dP - delta); exactly 0 where P is (masked pairs)
            drow[c] = prow[c] == 0.0f ? 0.0f : prow[c] * (drow[c] - delta_q[c]);
        }
        gemm(pr.path, nk, D, nq, dst, kBlockM, q_fin + off + q0 * D, D, true, w.dk.data(), D);  // dK += dS^T Q
        float* ds = w.ds.data();
        for (int64_t c = 0; c < nq; ++c)
          for (int64_t r = 0; r < nk; ++r) ds[c * kBlockN + r] = dst[r * kBlockM + c];
        gemm(pr.path, nq, D, nk, ds, kBlockN, kj_fin, D, true, dq_g + q0 * D, D);  // dQ += dS K
      }
      for (int64_t r = 0; r < k1 - k0; ++r) {
        T* dk_row = dk + off + (k0 + r) * D;
        T* dv_row = dv + off + (k0 + r) * D;
        if (r < nk) {
          store_row(dk_row, w.dk.data() + r * D, D, pr.scale);
          store_row(dv_row, w.dv.data() + r * D, D, 1.0f);
        } else {
          std::fill(dk_row, dk_row + D, static_cast<T>(0.0f));
          std::fill(dv_row, dv_row + D, static_cast<T>(0.0f));
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------
// Entry points

// cu_seqlens: an empty tensor for dense calls, else int32 [S + 1] (packed call, B = 1). All
// checks run here, before any parallel region.
Problem make_problem(const at::Tensor& q, const at::Tensor& keep, const at::Tensor& cu_seqlens, int64_t blocks,
                     int64_t patches, int64_t registers, int64_t mode, double scale) {
  VFT_CHECK_CPU(q, "attention: q");
  VFT_CHECK_CPU(keep, "attention: keep");
  VFT_CHECK_CPU(cu_seqlens, "attention: cu_seqlens");
  VFT_CHECK_DTYPE(cu_seqlens, at::kInt, "attention: cu_seqlens (empty for a dense call)");
  VFT_CHECK(q.dim() == 4, "attention: q must be [B, H, N, D], got ", q.dim(), " dims");
  VFT_CHECK(mode >= 0 && mode <= 2, "attention: mode must be 0, 1 or 2, got ", mode);
  VFT_CHECK(blocks >= 1 && patches >= 1 && registers >= 0, "attention: bad layout T=", blocks, " P=", patches,
            " R=", registers);
  Problem pr{TileLayout{blocks, patches, registers, static_cast<MaskMode>(mode)},
             q.size(0), q.size(1), q.size(2), q.size(3), nullptr, static_cast<float>(scale), q.size(0)};
  VFT_CHECK(pr.D >= 1 && pr.D <= 256, "attention: head dim must be in [1, 256], got ", pr.D);
  pr.level = isa::level();
  pr.path = attention_shared::gemm_path(pr.level);
  const bool packed = cu_seqlens.numel() > 0;
  if (packed) {
    VFT_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.scalar_type() == at::kInt && cu_seqlens.dim() == 1 &&
                  cu_seqlens.is_contiguous() && cu_seqlens.numel() >= 2,
              "attention: cu_seqlens must be a contiguous CPU int32 [S + 1 >= 2] tensor, got ",
              cu_seqlens.scalar_type(), " ", cu_seqlens.sizes());
    VFT_CHECK(pr.B == 1, "attention: packed calls take q [1, H, N, D], got B = ", pr.B);
    pr.cu = cu_seqlens.data_ptr<int32_t>();
    pr.samples = cu_seqlens.numel() - 1;
    VFT_CHECK(pr.cu[0] == 0, "attention: cu_seqlens[0] must be 0, got ", pr.cu[0]);
    const int64_t S = pr.layout.block_size();
    for (int64_t s = 0; s < pr.samples; ++s) {
      const int64_t len = static_cast<int64_t>(pr.cu[s + 1]) - pr.cu[s];
      VFT_CHECK(len >= 0 && len % S == 0 && len / S <= blocks, "attention: sample ", s, " has ", len,
                " tokens; expected a non-negative multiple of P + R = ", S, " with at most ", blocks, " blocks");
    }
    VFT_CHECK(pr.cu[pr.samples] <= pr.N, "attention: cu_seqlens[-1] = ", pr.cu[pr.samples], " exceeds N = ", pr.N);
  } else {
    VFT_CHECK(pr.N == pr.layout.seq_len(), "attention: layout expects N = ", pr.layout.seq_len(), ", got ", pr.N);
  }
  VFT_CHECK(keep.scalar_type() == at::kInt && keep.dim() == 2 && keep.size(0) == pr.samples &&
                keep.size(1) == blocks && keep.is_contiguous(),
            "attention: keep must be a contiguous int32 [", packed ? "S = " : "B = ", pr.samples, ", T = ", blocks,
            "] tensor (per-block keeps), got ", keep.scalar_type(), " ", keep.sizes());
  pr.keep = keep.data_ptr<int32_t>();
  return pr;
}

// Writes value to token rows [pr.used(), N) of every (b, h) of t ([B*H, N, width]): the
// padding after the last packed sample (nothing for dense calls).
template <typename T>
void fill_padding(const Problem& pr, T* t, int64_t width, T value) {
  const int64_t used = pr.used();
  if (used >= pr.N) return;
  for (int64_t bh = 0; bh < pr.B * pr.H; ++bh)
    std::fill(t + (bh * pr.N + used) * width, t + (bh + 1) * pr.N * width, value);
}

void check_out(const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const char* name) {
  VFT_CHECK_CPU(t, name);
  VFT_CHECK_DTYPE(t, dtype, name);
  VFT_CHECK_SHAPE(t, shape, name);
  VFT_CHECK_CONTIGUOUS(t, name);
}

void check_input(const at::Tensor& t, const at::Tensor& q, const char* name) {
  VFT_CHECK_CPU(t, name);
  VFT_CHECK_DTYPE(t, q.scalar_type(), name);
  VFT_CHECK_SHAPE(t, q.sizes(), name);
}

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }




// The bf16 forward on bf16 brgemm (dense and packed calls): zero-pads q's head dim to Dp
// only when D is not a multiple of 32, then runs the shared forward with Bf16Products (keys
// and values are packed by the workers as they go, per sample).
void forward_bf16(const Problem& pr, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& lse) {
  const int64_t BH = pr.B * pr.H, N = pr.N, D = pr.D, Dp = (D + 31) / 32 * 32;
  const int64_t n_kt = (pr.max_len() + kBlockN - 1) / kBlockN, n_panels = (D + kPanel - 1) / kPanel;
  at::Tensor qp = q.reshape({BH, N, D});
  qp = Dp == D ? qp.contiguous() : at::constant_pad_nd(qp, {0, Dp - D}).contiguous();
  const at::Tensor kc = k.reshape({BH, N, D}).contiguous(), vc = v.reshape({BH, N, D}).contiguous();
  const Bf16Products prod{qp.data_ptr<at::BFloat16>(), reinterpret_cast<const uint16_t*>(kc.data_ptr<at::BFloat16>()),
                          reinterpret_cast<const uint16_t*>(vc.data_ptr<at::BFloat16>()), N, D, Dp, n_kt, n_panels};
  forward<at::BFloat16>(pr, prod, out.data_ptr<at::BFloat16>(), lse.data_ptr<float>());
}

}  // namespace

void attention_forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& keep,
                           const at::Tensor& cu_seqlens, int64_t blocks, int64_t patches, int64_t registers,
                           int64_t mode, double scale, at::Tensor& out, at::Tensor& lse) {
  Problem pr = make_problem(q, keep, cu_seqlens, blocks, patches, registers, mode, scale);
  check_input(q, q, "attention: q");
  check_input(k, q, "attention: k");
  check_input(v, q, "attention: v");
  check_out(out, q.scalar_type(), q.sizes(), "attention: out");
  check_out(lse, at::kFloat, {pr.B, pr.H, pr.N}, "attention: lse");
  if (q.scalar_type() == at::kBFloat16 && attention_shared::bf16_brgemm(pr.level)) {
    forward_bf16(pr, q, k, v, out, lse);
    fill_padding(pr, out.data_ptr<at::BFloat16>(), pr.D, static_cast<at::BFloat16>(0.0f));
    fill_padding(pr, lse.data_ptr<float>(), 1, kNegInf);
    return;
  }
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v);
  const F32Products prod{qf.data_ptr<float>(), kf.data_ptr<float>(), vf.data_ptr<float>(), pr.N, pr.D,
                         (pr.max_len() + kBlockN - 1) / kBlockN, pr.path};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_forward_cpu", [&] {
    forward<scalar_t>(pr, prod, out.data_ptr<scalar_t>(), lse.data_ptr<float>());
    fill_padding(pr, out.data_ptr<scalar_t>(), pr.D, static_cast<scalar_t>(0.0f));
  });
  fill_padding(pr, lse.data_ptr<float>(), 1, kNegInf);
}

void attention_backward_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                            const at::Tensor& keep, const at::Tensor& cu_seqlens, int64_t blocks, int64_t patches,
                            int64_t registers, int64_t mode, double scale, at::Tensor& dq, at::Tensor& dk,
                            at::Tensor& dv) {
  Problem pr = make_problem(q, keep, cu_seqlens, blocks, patches, registers, mode, scale);
  for (auto [t, name] : {std::pair{&k, "attention: k"}, {&v, "attention: v"}, {&dout, "attention: dout"}, {&out, "attention: out"}}) check_input(*t, q, name);
  VFT_CHECK_CPU(lse, "attention: lse");
  VFT_CHECK_DTYPE(lse, at::kFloat, "attention: lse");
  VFT_CHECK_SHAPE(lse, at::IntArrayRef({pr.B, pr.H, pr.N}), "attention: lse");
  check_out(dq, q.scalar_type(), q.sizes(), "attention: dq");
  check_out(dk, q.scalar_type(), q.sizes(), "attention: dk");
  check_out(dv, q.scalar_type(), q.sizes(), "attention: dv");
  const at::Tensor qf = as_f32(q), kf = as_f32(k), vf = as_f32(v), dof = as_f32(dout);
  const at::Tensor qtf = qf.transpose(-1, -2).contiguous(), dotf = dof.transpose(-1, -2).contiguous();
  // One pass in the common case: a finite sum means every element is finite (a NaN or inf
  // makes the sum non-finite); otherwise, or if the sum overflowed, non-finite entries are zeroed.
  const auto finite = [](const at::Tensor& t) {
    return std::isfinite(t.sum().item<float>()) ? t : at::where(t.isfinite(), t, 0.0f).contiguous();
  };
  const at::Tensor q_fin = finite(qf), k_fin = finite(kf);
  // delta = rowsum(dO * O); lse in log2 units, +inf on dropped rows so exp2(s - lse2) = 0.
  const at::Tensor delta = (dof * out.to(at::kFloat)).sum(-1).contiguous();
  const at::Tensor lse2 = at::where(lse == -INFINITY, INFINITY, lse * kLog2e).contiguous();
  const int64_t BH = pr.B * pr.H, SH = pr.samples * pr.H, n_kt = (pr.max_len() + kBlockN - 1) / kBlockN;
  const int64_t groups =
      std::max<int64_t>(1, std::min<int64_t>(n_kt, std::max<int64_t>(1, (2 * at::get_num_threads() + SH - 1) / std::max<int64_t>(SH, 1))));
  at::Tensor dq_acc = at::empty({groups, BH, pr.N, pr.D}, qf.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_backward_cpu", [&] {
    backward<scalar_t>(pr, q_fin.data_ptr<float>(), qtf.data_ptr<float>(), kf.data_ptr<float>(), k_fin.data_ptr<float>(),
                       vf.data_ptr<float>(),
                       dof.data_ptr<float>(), dotf.data_ptr<float>(), lse2.data_ptr<float>(), delta.data_ptr<float>(), dq_acc.data_ptr<float>(), groups,
                       dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
    const float* acc = dq_acc.data_ptr<float>();
    scalar_t* dst = dq.data_ptr<scalar_t>();
    const int64_t rows = BH * pr.N, D = pr.D, stride = rows * D, used = pr.used();
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (r % pr.N >= used) continue;  // padding: written by fill_padding (dq_acc holds no value there)
        for (int64_t d = 0; d < D; ++d) {
          float sum = 0.0f;
          for (int64_t g = 0; g < groups; ++g) sum += acc[g * stride + r * D + d];
          dst[r * D + d] = static_cast<scalar_t>(sum * pr.scale);
        }
      }
    });
    for (at::Tensor* t : {&dq, &dk, &dv}) fill_padding(pr, t->data_ptr<scalar_t>(), pr.D, static_cast<scalar_t>(0.0f));
  });
}

// Test hook: the tile classification of the port, for comparison with layout.py.
// tiles: int64 [n, 4] rows (q0, q1, k0, k1) -> int64 [n, 5] rows
// (classify_tile, key_range(q0, q1), query_range(k0, k1)).
at::Tensor attention_tiles_cpu(int64_t blocks, int64_t patches, int64_t registers, int64_t mode,
                               const at::Tensor& keep_blocks, const at::Tensor& tiles) {
  VFT_CHECK(tiles.scalar_type() == at::kLong && tiles.dim() == 2 && tiles.size(1) == 4,
            "attention_tiles: tiles must be int64 [n, 4], got ", tiles.scalar_type(), " ", tiles.sizes());
  VFT_CHECK(keep_blocks.scalar_type() == at::kInt && keep_blocks.dim() == 1 && keep_blocks.numel() == blocks &&
                keep_blocks.is_contiguous() && keep_blocks.device().is_cpu(),
            "attention_tiles: keep must be a contiguous CPU int32 [T = ", blocks, "], got ",
            keep_blocks.scalar_type(), " ", keep_blocks.sizes());
  const int32_t* keep = keep_blocks.data_ptr<int32_t>();
  const TileLayout L{blocks, patches, registers, static_cast<MaskMode>(mode)};
  const at::Tensor t = tiles.contiguous();
  at::Tensor res = at::empty({t.size(0), 5}, t.options());
  const int64_t* in = t.data_ptr<int64_t>();
  int64_t* o = res.data_ptr<int64_t>();
  for (int64_t n = 0; n < t.size(0); ++n) {
    const int64_t* x = in + 4 * n;
    o[5 * n] = L.classify_tile(x[0], x[1], x[2], x[3], keep);
    L.key_range(x[0], x[1], keep, o + 5 * n + 1, o + 5 * n + 2);
    L.query_range(x[2], x[3], keep, o + 5 * n + 3, o + 5 * n + 4);
  }
  return res;
}

}  // namespace attention_cpu
}  // namespace VFT_ISA_NS

#if VFT_ISA_PRIMARY
VFT_DECLARE_VARIANTS(attention_cpu, attention_forward_cpu)
VFT_DECLARE_VARIANTS(attention_cpu, attention_backward_cpu)

void bind_attention(pybind11::module_& m) {
  using namespace attention_shared;
  m.def("attention_forward_cpu", VFT_DISPATCH(attention_cpu, attention_forward_cpu),
        "Register attention forward (float32 math). q, k, v [B, H, N, D] CPU float32/bfloat16/float16; "
        "keep int32 [B, T] ([S, T] packed; per-block keeps); cu_seqlens: empty, or int32 [S + 1] for S samples packed in one row (B = 1); "
        "writes out [B, H, N, D] (q's dtype) and lse float32 [B, H, N].");
  m.def("attention_backward_cpu", VFT_DISPATCH(attention_cpu, attention_backward_cpu),
        "Register attention backward: dout, q, k, v, out [B, H, N, D], lse float32 [B, H, N], keep int32 [B, T] "
        "([S, T] packed), cu_seqlens as in attention_forward_cpu; writes dq, dk, dv [B, H, N, D] (q's dtype).");
  m.def("attention_tiles_cpu", &isa_baseline::attention_cpu::attention_tiles_cpu,
        "Test hook: classify_tile / key_range / query_range of the C++ port for int64 tiles [n, 4] and a "
        "sample's per-block keeps (int32 [T]).");
  m.def(
      "attention_cpu_bf16_brgemm",
      [](bool on) {
        const bool previous = bf16_brgemm(isa::level());
        g_bf16_brgemm.store(on);
        return previous;
      },
      "Test hook: run bf16 forward tile products on bf16 brgemm where available (True, the default) or in "
      "float32; returns whether the bf16 brgemm path was in use (at this thread's CPU capability).");
  m.def(
      "attention_cpu_bf16_isa",
      [] {
        static const char* names[] = {"", "avx512_bf16", "amx"};
        return std::string(names[static_cast<int>(bf16_isa())]);
      },
      "The bf16 matrix instructions the CPU attention's bf16 forward uses: 'amx', 'avx512_bf16', or '' "
      "(none found, or this torch build's bf16 brgemm failed its probe: float32 products).");
  m.def(
      "attention_cpu_gemm_path",
      [](const std::string& name) {
        static const char* names[] = {"brgemm", "blas", "aten", "tiles"};
        const std::string previous = names[static_cast<int>(gemm_path(isa::level()))];
        if (name == "brgemm" || name == "best") {
          VFT_CHECK(name == "best" || brgemm_works(), "attention_cpu_gemm_path: brgemm is not available here");
          g_path_override.store(kNoOverride);
        } else if (name == "blas") {
          VFT_CHECK(sgemm_ != nullptr, "attention_cpu_gemm_path: torch exports no BLAS sgemm here");
          g_path_override.store(static_cast<int>(GemmPath::kBlas));
        } else if (name == "tiles") {
          g_path_override.store(static_cast<int>(GemmPath::kTiles));
        } else {
          VFT_CHECK(name == "aten", "attention_cpu_gemm_path: expected brgemm, blas, aten, tiles or best, got ", name);
          g_path_override.store(static_cast<int>(GemmPath::kAten));
        }
        return previous;
      },
      "Test hook: route the tile products through oneDNN brgemm, BLAS sgemm, ATen or vft's AVX2 tile "
      "products ('tiles'; BLAS in the baseline variant) ('best' = the default); returns the previous path's name.");
}
#endif  // VFT_ISA_PRIMARY

}  // namespace vft
