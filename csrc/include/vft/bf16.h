// bfloat16 <-> float32 on raw bits, shared by the CPU kernels. float -> bf16 rounds to
// nearest even and maps NaN to the quiet NaN 0x7FC0, bit-identical to c10::BFloat16(float);
// bf16 -> float is exact. The scalar forms are branch-free so loops of them can vectorise;
// with AVX-512 (F + BW) the block conversions and x16 forms use 512-bit code (GCC left the
// scalar block loops scalar on Zen 5).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VFT_BF16_AVX512 1
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics trip a false -Wmaybe-uninitialized where they are inlined
// (GCC bug 105593); silenced for the files that include this header.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace vft {
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

// n contiguous values, bf16 bits -> floats and back.
inline void load(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#ifdef VFT_BF16_AVX512
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, to_f32_x16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = to_f32(src[i]);
}

inline void store(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  int64_t i = 0;
#ifdef VFT_BF16_AVX512
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), from_f32_x16(_mm512_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) dst[i] = from_f32(src[i]);
}

}  // namespace bf16
}  // namespace vft
