// bfloat16 <-> float32 on raw bits, shared by the CPU kernels. float -> bf16 rounds to
// nearest even and maps NaN to the quiet NaN 0x7FC0, bit-identical to c10::BFloat16(float);
// bf16 -> float is exact. The scalar forms are branch-free so loops of them can vectorise;
// with AVX-512 (F + BW) the block conversions and x16 forms use 512-bit code, with AVX2 the
// x8 forms 256-bit code (GCC left the scalar block loops scalar on Zen 5). Which one a
// translation unit gets follows its ISA variant's flags (vft/isa.h); all give the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "vft/isa.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VFT_BF16_AVX512 1
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics trip a false -Wmaybe-uninitialized where they are inlined
// (GCC bug 105593); silenced for the files that include this header.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#elif defined(__AVX2__)
#include <immintrin.h>
#define VFT_BF16_AVX2 1
#endif

namespace vft {
namespace VFT_ISA_NS {  // each variant its own copy (the bodies differ by ISA)
namespace bf16 {

inline float to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

#ifdef VFT_BF16_AVX512
inline __m256i from_f32_x16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 to_f32_x16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
#endif

#ifdef VFT_BF16_AVX2
// from_f32 on 8 lanes: the same integer rounding, NaN -> 0x7FC0; the 32-bit results (< 2^16)
// are packed to 16 bits within each 128-bit half, then the two halves' low quadwords joined.
inline __m128i from_f32_x8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

inline __m256 to_f32_x8(__m128i b) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16)); }
#endif

// n contiguous values, bf16 bits -> floats and back. With a constant n that is a multiple
// of the vector width, GCC 12 warns that the (dead) scalar tail loop "invokes undefined
// behavior" at iteration 2^63 - 1 (-Waggressive-loop-optimizations): a false positive.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Waggressive-loop-optimizations"
#endif
inline void load(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#ifdef VFT_BF16_AVX512
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, to_f32_x16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(VFT_BF16_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, to_f32_x8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}

inline void store(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  int64_t i = 0;
#ifdef VFT_BF16_AVX512
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), from_f32_x16(_mm512_loadu_ps(src + i)));
#elif defined(VFT_BF16_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), from_f32_x8(_mm256_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) dst[i] = from_f32(src[i]);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace bf16
}  // namespace VFT_ISA_NS
}  // namespace vft
