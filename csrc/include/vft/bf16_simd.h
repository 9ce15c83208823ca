// bfloat16 <-> float32 on 16 lanes of AVX-512 (F + BW), bit-identical to the scalar
// conversions the kernels use elsewhere: float -> bf16 rounds to nearest even and maps NaN
// to the quiet NaN 0x7FC0 (as c10::BFloat16(float) does); bf16 -> float is exact.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

#include <cstdint>

#define VFT_HAVE_BF16_SIMD 1
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics trip a false -Wmaybe-uninitialized where they are inlined
// (GCC bug 105593); silenced for the files that include this header.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace vft {
namespace simd {

inline __m256i bf16x16_from_f32(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 f32x16_from_bf16(__m256i b) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

// n floats -> n bf16 bits (n a multiple of 16), and back.
inline void store_bf16x16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), bf16x16_from_f32(_mm512_loadu_ps(src + i)));
}

inline void load_bf16x16(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16)
    _mm512_storeu_ps(dst + i, f32x16_from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
}

}  // namespace simd
}  // namespace vft
#endif
