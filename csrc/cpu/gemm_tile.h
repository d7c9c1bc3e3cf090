// A register-tile GEMM for the skinny products of label_map's dense mappings: C (RB x 16*NV) = A (RB x n) B (n x
// 16*NV), the RB rows of A given as pointers (float32, contiguous), B row-major with row stride ldb. torch's BLAS
// (MKL on this AMD machine) took 250-400 us for BLM's (256 x 1000) x (1000 x 10), 20 GFLOP/s, where the whole
// product is one read of the logits; a tile of RB rows x 16*NV columns kept in vector registers reads each B row
// once per RB rows and A's rows as RB sequential streams.
//
// Each C element is one running sum over i = 0 .. n-1 (a fused multiply-add where the target has one): the same
// bits whatever the rows' split across threads. The module is built without -march flags, so the tile is compiled
// three times with its own target attribute (AVX-512F, AVX2 + FMA, the portable baseline), each with the tile
// shape its register file holds, and one set is chosen once per process from cpuid (as half_rows.h does).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"

namespace rkcpu {

// GCC's generic vectors of the target's width (a wider one is lowered through memory: 10x slower on AVX2).
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

// RB rows x NV vectors of V: RB x NV * lanes(V) columns of C.
template <typename V, int RB, int NV>
RK_ALWAYS_INLINE void gemm_tile_body(const float* const* a, const float* b, std::int64_t ldb, std::int64_t n,
                                     float* c, std::int64_t ldc) {
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (std::int64_t i = 0; i < n; ++i) {
    V w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&w[v], b + i * ldb + L * v, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const float s = a[r][i];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += s * w[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(c + r * ldc + L * v, &acc[r][v], sizeof(V));
}

using GemmTileFn = void (*)(const float* const*, const float*, std::int64_t, std::int64_t, float*, std::int64_t);

// The tile functions of one target: fn[nv] computes 16 * nv columns (nv = 1 .. max_nv) of rb rows.
struct GemmTiles {
  int rb;
  int max_nv;
  GemmTileFn fn[5];
};

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
template <int NV>
__attribute__((target("avx512f"))) void gemm_tile_avx512(const float* const* a, const float* b, std::int64_t ldb,
                                                          std::int64_t n, float* c, std::int64_t ldc) {
  gemm_tile_body<v16f, 6, NV>(a, b, ldb, n, c, ldc);  // 6 x 4 zmm accumulators + 4 of B: 28 of 32 registers
}
__attribute__((target("avx2,fma"))) inline void gemm_tile_avx2(const float* const* a, const float* b,
                                                               std::int64_t ldb, std::int64_t n, float* c,
                                                               std::int64_t ldc) {
  gemm_tile_body<v8f, 6, 2>(a, b, ldb, n, c, ldc);  // 6 x 2 ymm accumulators + 2 of B: 14 of 16
}
#endif

inline void gemm_tile_portable(const float* const* a, const float* b, std::int64_t ldb, std::int64_t n, float* c,
                               std::int64_t ldc) {
  gemm_tile_body<v4f, 2, 4>(a, b, ldb, n, c, ldc);  // SSE2: 2 x 4 xmm accumulators + 4 of B: 12 of 16
}

inline const GemmTiles& gemm_tiles() {
  static const GemmTiles tiles = [] {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    // (REPROKERNELS_CPU_PORTABLE_TILES=1: the baseline tiles on any CPU, so tests reach them on a vector machine)
    const char* portable = std::getenv("REPROKERNELS_CPU_PORTABLE_TILES");
    if (portable && portable[0] && std::strcmp(portable, "0") != 0)
      return GemmTiles{2, 1, {nullptr, &gemm_tile_portable, nullptr, nullptr, nullptr}};
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
      return GemmTiles{6, 4,
                       {nullptr, &gemm_tile_avx512<1>, &gemm_tile_avx512<2>, &gemm_tile_avx512<3>,
                        &gemm_tile_avx512<4>}};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return GemmTiles{6, 1, {nullptr, &gemm_tile_avx2, nullptr, nullptr, nullptr}};
#endif
    return GemmTiles{2, 1, {nullptr, &gemm_tile_portable, nullptr, nullptr, nullptr}};
  }();
  return tiles;
}

// C (rb x ncols) for the tiles' rb rows of A: ncols a multiple of 16, B's columns [0, ncols) readable.
inline void gemm_rows(const GemmTiles& g, const float* const* a, const float* b, std::int64_t ldb, std::int64_t n,
                      std::int64_t ncols, float* c, std::int64_t ldc) {
  for (std::int64_t j = 0; j < ncols;) {
    const int nv = static_cast<int>(std::min<std::int64_t>(g.max_nv, (ncols - j) / 16));
    g.fn[nv](a, b + j, ldb, n, c + j, ldc);
    j += 16 * nv;
  }
}

}  // namespace rkcpu
