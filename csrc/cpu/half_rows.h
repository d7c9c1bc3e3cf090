// float16 rows <-> float32 rows with the CPU's conversion instructions, bitwise equal to common.h's exact scalar
// conversions (f16_to_float / float_to_f16).
//
//   f16_row_to_float(src, dst, n)   n IEEE halves (raw uint16 bits) -> n floats
//   float_row_to_f16(src, dst, n)   n floats -> n halves, round to nearest even, overflow to inf
//
// Why: GCC 12 does not vectorise _Float16 conversions, and the integer-arithmetic conversion of common.h, although
// it vectorises, costs a dozen integer ops per element; a float16 row loop then runs at half the speed of the same
// bfloat16 loop (a shift). AVX-512F's vcvtph2ps / vcvtps2ph convert 16 lanes per instruction, F16C's 8. The module
// is built without -march flags, so these live in functions with their own target attribute and are chosen once
// per process from cpuid (__builtin_cpu_supports) through a function-local static; other CPUs, other compilers and
// the row tails run the scalar code. Use them to stage a float16 row through a float32 row buffer (L1-sized) around
// a float32 row loop.
//
// Bitwise: both directions round-to-nearest-even in hardware exactly like the scalar code, subnormals included,
// and float -> half keeps a NaN's sign and top payload bits with the quiet bit set, as float_to_f16 does. The one
// difference is half -> float of a signalling NaN: vcvtph2ps quiets it, f16_to_float keeps the bits; the vector
// path clears the float quiet bit again in those lanes, so every one of the 65,536 halves converts to the same
// bits on every path (tests/test_cpu_visual_prompt_fast.py checks all of them and a float set through
// rk_half_rows_hook in visual_prompt.cpp).
#pragma once
#include <cstdint>

#include "common.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define RK_HALF_ROWS_X86 1
#endif

namespace rkcpu {
namespace half_rows_detail {

using HalfToFloatFn = void (*)(const std::uint16_t*, float*, std::int64_t);
using FloatToHalfFn = void (*)(const float*, std::uint16_t*, std::int64_t);

inline void f16_to_float_scalar(const std::uint16_t* src, float* dst, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = f16_to_float(src[i]);
}

inline void float_to_f16_scalar(const float* src, std::uint16_t* dst, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) dst[i] = float_to_f16(src[i]);
}

#ifdef RK_HALF_ROWS_X86
__attribute__((target("avx512f"))) inline void f16_to_float_avx512(const std::uint16_t* src, float* dst,
                                                                     std::int64_t n) {
  const __m512i exp_quiet = _mm512_set1_epi32(0x7e00), exp_only = _mm512_set1_epi32(0x7c00);
  const __m512i payload = _mm512_set1_epi32(0x1ff), quiet = _mm512_set1_epi32(0x00400000);
  // the zero-masked forms with every lane on: GCC 12's unmasked intrinsics start from _mm512_undefined_*, which
  // -Wmaybe-uninitialized reports under the strict build; the instruction is the same
  const __mmask16 all = 0xffff;
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m512i f = _mm512_castps_si512(_mm512_maskz_cvtph_ps(all, h));
    // signalling NaN lanes (exponent all ones, quiet bit clear, payload non-zero): undo the hardware's quieting
    const __m512i h32 = _mm512_maskz_cvtepu16_epi32(all, h);
    const __mmask16 snan =
        _mm512_mask_test_epi32_mask(_mm512_cmpeq_epi32_mask(_mm512_and_si512(h32, exp_quiet), exp_only), h32, payload);
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_mask_andnot_epi32(f, snan, quiet, f)));
  }
  f16_to_float_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx512f"))) inline void float_to_f16_avx512(const float* src, std::uint16_t* dst,
                                                                     std::int64_t n) {
  const __mmask16 all = 0xffff;
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_maskz_cvtps_ph(all, _mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  float_to_f16_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) inline void f16_to_float_f16c(const std::uint16_t* src, float* dst,
                                                                    std::int64_t n) {
  const __m256i exp_quiet = _mm256_set1_epi32(0x7e00), exp_only = _mm256_set1_epi32(0x7c00);
  const __m256i payload = _mm256_set1_epi32(0x1ff), quiet = _mm256_set1_epi32(0x00400000);
  const __m256i zero = _mm256_setzero_si256();
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i f = _mm256_castps_si256(_mm256_cvtph_ps(h));
    const __m256i h32 = _mm256_cvtepu16_epi32(h);
    const __m256i nan_exp = _mm256_cmpeq_epi32(_mm256_and_si256(h32, exp_quiet), exp_only);
    const __m256i no_payload = _mm256_cmpeq_epi32(_mm256_and_si256(h32, payload), zero);
    const __m256i snan = _mm256_andnot_si256(no_payload, nan_exp);
    const __m256i out = _mm256_andnot_si256(_mm256_and_si256(snan, quiet), f);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(out));
  }
  f16_to_float_scalar(src + i, dst + i, n - i);
}

__attribute__((target("avx2,f16c"))) inline void float_to_f16_f16c(const float* src, std::uint16_t* dst,
                                                                    std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  float_to_f16_scalar(src + i, dst + i, n - i);
}
#endif

inline HalfToFloatFn pick_half_to_float() {
#ifdef RK_HALF_ROWS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &f16_to_float_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return &f16_to_float_f16c;
#endif
  return &f16_to_float_scalar;
}

inline FloatToHalfFn pick_float_to_half() {
#ifdef RK_HALF_ROWS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &float_to_f16_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return &float_to_f16_f16c;
#endif
  return &float_to_f16_scalar;
}

}  // namespace half_rows_detail

// n halves (IEEE binary16 bits) -> n floats, exact. src and dst must not overlap.
inline void f16_row_to_float(const std::uint16_t* src, float* dst, std::int64_t n) {
  static const half_rows_detail::HalfToFloatFn fn = half_rows_detail::pick_half_to_float();
  fn(src, dst, n);
}

// n floats -> n halves, round to nearest even (float_to_f16's bits). src and dst must not overlap.
inline void float_row_to_f16(const float* src, std::uint16_t* dst, std::int64_t n) {
  static const half_rows_detail::FloatToHalfFn fn = half_rows_detail::pick_float_to_half();
  fn(src, dst, n);
}

}  // namespace rkcpu
