// Shared helpers of the CPU kernels: 16-bit <-> float32 conversions written as plain integer arithmetic (so
// `#pragma omp simd` loops vectorise them with any -m flags and no F16C / AVX512-BF16 requirement), typed loads
// and stores by dtype code, a polynomial expf that vectorises (glibc's vector expf needs -ffast-math), and the
// OpenMP thread-count plumbing. No torch headers: the Python launchers pass raw pointers, sizes and strides.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Function multiversioning of the hot row loops: GCC compiles each RK_CLONES function for AVX-512F, AVX2 and the
// portable baseline and picks one at load time (an ifunc resolver reading cpuid), so the default build stays
// portable (no -march=native) and still runs 16 / 8 lanes where the CPU has them. Only functions without an
// OpenMP parallel region inside get it (the outlined parallel body would not be cloned); they are called from the
// parallel loops. GCC contracts a * b + c into an FMA in C++ where the target has one (the avx512f clone), so the
// clones differ in rounding and in the lane count of a vectorised reduction; on one machine every thread runs the
// same clone (the same bits for any thread count). GCC on x86-64 Linux (glibc ifunc) only; elsewhere, or with
// -DRK_NO_CLONES, the baseline alone. The 256-bit clone is x86-64-v3 (AVX2 + FMA + F16C) where GCC dispatches on
// it (GCC 12 and later): a plain "avx2" clone has no FMA (-mavx2 does not imply -mfma), so every exp polynomial
// and product there was a multiply and an add; older GCC keeps "avx2".
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && !defined(RK_NO_CLONES)
#if __GNUC__ >= 12
#define RK_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default"), noinline))
#else
#define RK_CLONES __attribute__((target_clones("avx512f", "avx2", "default"), noinline))
#endif
#else
#define RK_CLONES
#endif

// The exp polynomials must inline into the `omp simd` loops that call them: an out-of-line call per element keeps
// the loop scalar (10x slower). GCC stopped inlining fast_exp once it called exp_poly, so both are forced.
#if defined(__GNUC__) || defined(__clang__)
#define RK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define RK_ALWAYS_INLINE inline
#endif

namespace rkcpu {

enum Dtype : std::int32_t { F32 = 0, F16 = 1, BF16 = 2 };

inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_float(std::uint16_t h) { return bits_to_float(static_cast<std::uint32_t>(h) << 16); }

// Round to nearest even, NaN kept quiet (torch's rule).
inline std::uint16_t float_to_bf16(float f) {
  std::uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

// IEEE half -> float, exact (subnormals included): the magic-number method (no branches on the hot path
// except the subnormal/inf select, which vectorises as a blend).
inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = (static_cast<std::uint32_t>(h) & 0x8000u) << 16;
  const std::uint32_t em = static_cast<std::uint32_t>(h) & 0x7fffu;
  std::uint32_t out;
  if (em >= 0x7c00u) {
    out = 0x7f800000u | ((em & 0x3ffu) << 13);  // inf / NaN
  } else if (em >= 0x0400u) {
    out = (em << 13) + (112u << 23);  // normal: rebias 15 -> 127
  } else {
    out = float_to_bits(bits_to_float(em | (126u << 23)) - bits_to_float(126u << 23));  // subnormal / zero
  }
  return bits_to_float(sign | out);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN kept.
inline std::uint16_t float_to_f16(float f) {
  std::uint32_t u = float_to_bits(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  std::uint32_t h;
  if (u > 0x7f800000u) {
    h = 0x7e00u | ((u >> 13) & 0x3ffu);
  } else if (u >= 0x47800000u) {  // >= 65536: inf (65520 and up round to inf below as well)
    h = 0x7c00u;
  } else if (u >= 0x38800000u) {  // normal half
    const std::uint32_t mant_odd = (u >> 13) & 1u;
    u += 0xfffu + mant_odd;
    h = ((u - (112u << 23)) >> 13);
    if (h > 0x7c00u) h = 0x7c00u;
  } else {  // subnormal half or zero: add 0.5 to move the bits into place, float addition rounds (RNE)
    const float r = bits_to_float(u) + 0.5f;
    h = float_to_bits(r) - float_to_bits(0.5f);
  }
  return static_cast<std::uint16_t>(sign | h);
}

template <int DT>
inline float load(const void* p, std::int64_t i) {
  if constexpr (DT == F32) return static_cast<const float*>(p)[i];
  else if constexpr (DT == F16) return f16_to_float(static_cast<const std::uint16_t*>(p)[i]);
  else return bf16_to_float(static_cast<const std::uint16_t*>(p)[i]);
}

template <int DT>
inline void store(void* p, std::int64_t i, float v) {
  if constexpr (DT == F32) static_cast<float*>(p)[i] = v;
  else if constexpr (DT == F16) static_cast<std::uint16_t*>(p)[i] = float_to_f16(v);
  else static_cast<std::uint16_t*>(p)[i] = float_to_bf16(v);
}

inline float load_any(std::int32_t dt, const void* p, std::int64_t i) {
  return dt == F32 ? load<F32>(p, i) : dt == F16 ? load<F16>(p, i) : load<BF16>(p, i);
}
inline void store_any(std::int32_t dt, void* p, std::int64_t i, float v) {
  if (dt == F32) store<F32>(p, i, v);
  else if (dt == F16) store<F16>(p, i, v);
  else store<BF16>(p, i, v);
}

// Integer index of any width (codes: 0 int64, 1 int32, 2 int16, 3 int8, 4 uint8).
inline std::int64_t load_index(std::int32_t code, const void* p, std::int64_t i) {
  switch (code) {
    case 0: return static_cast<const std::int64_t*>(p)[i];
    case 1: return static_cast<const std::int32_t*>(p)[i];
    case 2: return static_cast<const std::int16_t*>(p)[i];
    case 3: return static_cast<const std::int8_t*>(p)[i];
    default: return static_cast<const std::uint8_t*>(p)[i];
  }
}

// The polynomial part of expf: x = n ln 2 + r by Cody-Waite reduction, e^r by a degree-6 polynomial (about 1 ulp),
// n returned for the caller's 2^n. No calls or branches, so `omp simd` loops vectorise it. x must be clamped.
RK_ALWAYS_INLINE float exp_poly(float x, float* n_out) {
  // round to nearest by the 1.5 * 2^23 trick: vectorises without SSE4.1's roundps
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  *n_out = n;
  return p * r * r + r + 1.0f;
}

// expf for x <= 0 mostly (softmax), valid on the whole float range.
RK_ALWAYS_INLINE float fast_exp(float x) {
  x = x < -104.0f ? -104.0f : (x > 88.7f ? 88.7f : x);
  float n;
  const float p = exp_poly(x, &n);
  // 2^n by building the exponent; n in [-150, 128): split in two factors so no intermediate overflows
  const std::int32_t ni = static_cast<std::int32_t>(n);
  const std::int32_t n1 = ni / 2, n2 = ni - ni / 2;
  return p * bits_to_float(static_cast<std::uint32_t>(n1 + 127) << 23) *
         bits_to_float(static_cast<std::uint32_t>(n2 + 127) << 23);
}

// The max of a row ignoring NaN, and whether it holds one: one vectorised sweep (inlined into each caller's clone).
template <int DT>
inline float row_max(const void* x, std::int64_t base, std::int64_t sk, std::int64_t K, std::int32_t* nan_out) {
  float m = -INFINITY;
  std::int32_t nan = 0;
  if (sk == 1) {
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (std::int64_t k = 0; k < K; ++k) {
      const float v = load<DT>(x, base + k);
      nan |= v != v;
      m = v > m ? v : m;
    }
  } else {
    for (std::int64_t k = 0; k < K; ++k) {
      const float v = load<DT>(x, base + k * sk);
      nan |= v != v;
      m = v > m ? v : m;
    }
  }
  *nan_out = nan;
  return m;
}

// sum_k exp(x_k - shift) over a row in float32: one vectorised sweep (inlined into each caller's clone).
template <int DT>
RK_ALWAYS_INLINE float row_sum_exp(const void* x, std::int64_t base, std::int64_t sk, std::int64_t K, float shift) {
  float s = 0.0f;
  if (sk == 1) {
#pragma omp simd reduction(+ : s)
    for (std::int64_t k = 0; k < K; ++k) s += fast_exp(load<DT>(x, base + k) - shift);
  } else {
    for (std::int64_t k = 0; k < K; ++k) s += fast_exp(load<DT>(x, base + k * sk) - shift);
  }
  return s;
}

inline int threads_of(std::int32_t t) { return t > 0 ? t : 1; }

// A per-thread scratch vector of n elements, reused across calls (capacity kept; contents stale: the caller
// overwrites or fills what it reads). Buffers of 128 KiB and more that a call allocates afresh are mmapped by glibc
// and faulted in page by page on every call: for a 32,157-entry label mapping that was 1.2 ms per backward call,
// more than the work at small batches. Slot tells apart the buffers of one function. Threads are the caller's and
// OpenMP's pool threads, which live as long as the process.
template <typename T, int Slot>
inline std::vector<T>& scratch(std::size_t n) {
  thread_local std::vector<T> v;
  v.resize(n);
  return v;
}

// A large fresh output (a new mmap from the allocator, not yet touched) costs more in first-touch page faults than
// in writes: about 30 ms for 77 MB on 4 KiB pages. Asking for transparent huge pages on it (what PyTorch itself
// does with THP_MEM_ALLOC_ENABLE=1) makes the faults 2 MiB ones. Only a hint: no effect where THP is "never",
// none needed where it is "always", never an error; page-aligned interior of buffers of 8 MiB or more only.
inline void advise_huge(void* p, std::int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(1) << 21;
  if (!p || bytes < (std::int64_t(8) << 20)) return;
  const std::uintptr_t b = (reinterpret_cast<std::uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t e = (reinterpret_cast<std::uintptr_t>(p) + static_cast<std::uintptr_t>(bytes)) & ~(kHuge - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace rkcpu
