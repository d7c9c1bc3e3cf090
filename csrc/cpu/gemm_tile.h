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
#include <vector>

#include "common.h"

namespace rkcpu {

// GCC's generic vectors of the target's width (a wider one is lowered through memory: 10x slower on AVX2).
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

// RB rows x NV vectors of V: RB x NV * lanes(V) columns of C.
// accumulate: start from C's values (a later block of the inner dimension) instead of 0. A sum continued from its
// stored float32 partial is the same running sum bit for bit, whatever the blocking.
template <typename V, int RB, int NV>
RK_ALWAYS_INLINE void gemm_tile_body(const float* const* a, const float* b, std::int64_t ldb, std::int64_t n,
                                     float* c, std::int64_t ldc, bool accumulate) {
  constexpr int L = sizeof(V) / sizeof(float);
  V acc[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = V{};
      if (accumulate) std::memcpy(&acc[r][v], c + r * ldc + L * v, sizeof(V));
    }
#pragma GCC unroll 4
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

using GemmTileFn = void (*)(const float* const*, const float*, std::int64_t, std::int64_t, float*, std::int64_t,
                           bool);

// The tile functions of one target: fn[nv] computes 16 * nv columns (nv = 1 .. max_nv) of rb rows.
struct GemmTiles {
  int rb;
  int max_nv;
  GemmTileFn fn[5];
};

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
template <int NV>
__attribute__((target("avx512f"))) void gemm_tile_avx512(const float* const* a, const float* b, std::int64_t ldb,
                                                          std::int64_t n, float* c, std::int64_t ldc, bool acc) {
  gemm_tile_body<v16f, 6, NV>(a, b, ldb, n, c, ldc, acc);  // 6 x 4 zmm accumulators + 4 of B: 28 of 32 registers
}
__attribute__((target("avx2,fma"))) inline void gemm_tile_avx2(const float* const* a, const float* b,
                                                               std::int64_t ldb, std::int64_t n, float* c,
                                                               std::int64_t ldc, bool acc) {
  gemm_tile_body<v8f, 6, 2>(a, b, ldb, n, c, ldc, acc);  // 6 x 2 ymm accumulators + 2 of B: 14 of 16
}
#endif

inline void gemm_tile_portable(const float* const* a, const float* b, std::int64_t ldb, std::int64_t n, float* c,
                               std::int64_t ldc, bool acc) {
  gemm_tile_body<v4f, 2, 4>(a, b, ldb, n, c, ldc, acc);  // SSE2: 2 x 4 xmm accumulators + 4 of B: 12 of 16
}

// The portable tiles 16 * NV columns wide: a tile set with the AVX-512 one's panel width (64 columns), so the
// tests run that width's packing and partial panels on any CPU (REPROKERNELS_CPU_PORTABLE_TILES=wide).
template <int NV>
void gemm_tile_portable_wide(const float* const* a, const float* b, std::int64_t ldb, std::int64_t n, float* c,
                             std::int64_t ldc, bool acc) {
  gemm_tile_body<v4f, 2, 4 * NV>(a, b, ldb, n, c, ldc, acc);
}

inline const GemmTiles& gemm_tiles() {
  static const GemmTiles tiles = [] {
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    // (REPROKERNELS_CPU_PORTABLE_TILES=1: the baseline tiles on any CPU, so tests reach them on a vector machine;
    // =wide: the same 64 columns wide)
    const char* portable = std::getenv("REPROKERNELS_CPU_PORTABLE_TILES");
    if (portable && std::strcmp(portable, "wide") == 0)
      return GemmTiles{2, 4,
                       {nullptr, &gemm_tile_portable_wide<1>, &gemm_tile_portable_wide<2>,
                        &gemm_tile_portable_wide<3>, &gemm_tile_portable_wide<4>}};
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

// A float32 buffer of n elements from a per-thread scratch vector, its start aligned to 64 bytes (a packed panel's
// 16-float rows then never straddle two cache lines).
template <int Slot>
inline float* aligned_scratch(std::size_t n) {
  std::vector<float>& v = scratch<float, Slot>(n + 16);
  const std::uintptr_t p = reinterpret_cast<std::uintptr_t>(v.data());
  return reinterpret_cast<float*>((p + 63) & ~std::uintptr_t(63));
}

// C = A (M x n) B (n x N) in float32, handed to the caller block by block.
// Packed and blocked: B is copied, per block of nc columns and kc rows of the inner dimension (kc x nc about
// 256 KiB, within a core's L2), into panels of pw = 16 * max_nv columns (contiguous, 64-byte aligned, zero past N)
// shared by the threads. Each work item (rb rows of A x a group of the block's panels) runs its register tiles over
// the block into a float32 C: per thread (rb x nc) where the inner dimension is one block, else (round_up(M, rb) x
// nc), the sums continued from it block by block. Blocks: all of B where it is small; else few columns (a label
// map's forward: N = T < n = K) give kc and one block of columns, many (its backward: N = K > n = T) the whole
// inner dimension (up to 1024) and blocks of columns. A B read in place had rows whose 16-float runs straddled
// cache lines unless N was a multiple of 16 (T = 100: 1.3x slower than T = 112), and was streamed again per rb
// rows of A (CLIP's 32,157 x 397 omega is 51 MB).
// Where packing costs more than it saves (b_in_place given: B row-major with row stride ldb), B is read in place
// in 16-column groups, its last N % 16 columns from a zero-padded (n, 16) copy: at most two row tiles (each element
// of B used by so few rows), a B of at most 64 Ki floats (within L2 anyway; BLM's 1000 x 16 took 1.5x longer
// packed at B64), or one 16-column group (the tail copy is then all of B, packed once: blocks of K would only add
// a serial pack and two barriers per block; 64 x 32157 x 16 with softmax inputs was 1.2x slower blocked). Fewer row
// tiles than threads split the columns across threads too, so every thread has work.
//   pack_b(k0, k1, j0, dst): dst[(k - k0) * pw + j] = B[k][j0 + j] for j < pw (0 where j0 + j >= N).
//   rows_a(m, k0, k1, buf): row m of A over [k0, k1) as float32: a pointer into A, or buf (k1 - k0 floats) filled.
//   done(m0, nr, j0, j1, c, ldc): C's rows [m0, m0 + nr) x columns [j0, j1) are final, at c (row m0, column j0;
//   row stride ldc; the caller may overwrite them). Called once for each, inside the parallel region, by the
//   thread that computed them: the caller's epilogue runs on data still in cache.
// Each C element is one running sum over k in order (stored and reloaded between blocks): the same bits for any
// thread count, blocking or B source.
template <class PackB, class RowsA, class Done>
void gemm_blocked(const GemmTiles& g, std::int64_t M, std::int64_t N, std::int64_t n, int nt, const PackB& pack_b,
                  const RowsA& rows_a, const Done& done, const float* b_in_place = nullptr, std::int64_t ldb = 0) {
  const int rb = g.rb;
  const std::int64_t nblk = (M + rb - 1) / rb, n16 = (N + 15) / 16 * 16;
  if (M == 0 || N == 0) return;
  constexpr std::int64_t kBlock = std::int64_t(64) << 10;  // floats of B per packed block
  const bool in_place = b_in_place != nullptr && (nblk <= 2 || n * N <= kBlock || N <= 16);
  const std::int64_t pw = in_place ? 16 : 16 * g.max_nv, np = (N + pw - 1) / pw;
  std::int64_t kc = n, npb = np;
  if (!in_place && n * np * pw > kBlock) {
    if (n >= np * pw) {
      kc = std::min<std::int64_t>(n, std::max<std::int64_t>(64, std::min<std::int64_t>(1024, kBlock / (np * pw))));
    } else {
      kc = std::min<std::int64_t>(n, 1024);
      npb = std::max<std::int64_t>(1, kBlock / kc / pw);
    }
  }
  const std::int64_t ldc = std::min(npb, np) * pw;
  if (n == 0) {
    float* z = aligned_scratch<6>(static_cast<std::size_t>(ldc));
    for (std::int64_t m = 0; m < M; ++m)
      for (std::int64_t j0 = 0; j0 < N; j0 += ldc) {
        std::fill(z, z + ldc, 0.0f);  // (done may overwrite it)
        done(m, 1, j0, std::min(N, j0 + ldc), z, ldc);
      }
    return;
  }
  // (one block of the inner dimension: each item's C is final when its tiles are done, so a per-thread C, which
  // stays in cache, serves; else C keeps every row's partial sums between blocks)
  const bool thread_c = kc == n;
  // (a shared C above 8 MiB, a forward over very many rows, is the call's own: a per-thread scratch keeps its
  // capacity for the life of the thread)
  const std::size_t c_size = thread_c ? 0 : static_cast<std::size_t>(nblk * rb * ldc);
  std::vector<float> own_shared_c(c_size > (std::size_t(1) << 21) ? c_size : 0);
  float* shared_c = thread_c ? nullptr : own_shared_c.empty() ? aligned_scratch<6>(c_size) : own_shared_c.data();
  // panel groups per row block: enough work items for every thread when there are few rows
  const std::int64_t ncg = nblk >= nt ? 1 : std::min<std::int64_t>(npb, (nt + nblk - 1) / nblk);
  float* packed = aligned_scratch<4>(static_cast<std::size_t>(in_place ? (N % 16 ? n * 16 : 0) : npb * kc * pw));
  if (in_place && N % 16) {  // the tail copy: the last N % 16 columns, zero-padded to 16
    for (std::int64_t k = 0; k < n; ++k) {
      std::memcpy(packed + k * 16, b_in_place + k * ldb + N / 16 * 16, static_cast<std::size_t>(N % 16) * 4);
      std::fill(packed + k * 16 + N % 16, packed + k * 16 + 16, 0.0f);
    }
  }
#pragma omp parallel num_threads(nt)
  {
    float* stage = aligned_scratch<5>(static_cast<std::size_t>(rb * kc));
    float* own_c = thread_c ? aligned_scratch<7>(static_cast<std::size_t>(rb * ldc)) : nullptr;
    const float* a[8];
    for (std::int64_t pb = 0; pb < np; pb += npb) {
      const std::int64_t nbp = std::min(npb, np - pb);  // panels in this column block
      for (std::int64_t k0 = 0; k0 < n; k0 += kc) {
        const std::int64_t k1 = std::min(n, k0 + kc);
        if (!in_place) {
#pragma omp for schedule(static)
          for (std::int64_t q = 0; q < nbp; ++q) pack_b(k0, k1, (pb + q) * pw, packed + q * kc * pw);
        }
        const std::int64_t ng = std::min(ncg, nbp);
#pragma omp for schedule(static)
        for (std::int64_t item = 0; item < nblk * ng; ++item) {
          const std::int64_t cg = item / nblk, m0 = (item % nblk) * rb;
          const std::int64_t nr = std::min<std::int64_t>(rb, M - m0);
          for (std::int64_t r = 0; r < nr; ++r) a[r] = rows_a(m0 + r, k0, k1, stage + r * kc);
          for (std::int64_t r = nr; r < rb; ++r) a[r] = a[0];  // (computed, never read back)
          const std::int64_t q0 = cg * nbp / ng, q1 = (cg + 1) * nbp / ng;
          float* c = thread_c ? own_c : shared_c + m0 * ldc;  // (row m0 of C, column pb * pw)
          for (std::int64_t q = q0; q < q1; ++q) {
            const std::int64_t j = (pb + q) * pw;
            float* cp = c + q * pw;
            if (!in_place)
              g.fn[std::min(pw, n16 - j) / 16](a, packed + q * kc * pw, pw, k1 - k0, cp, ldc, k0 > 0);
            else if (j + 16 <= N)
              g.fn[1](a, b_in_place + k0 * ldb + j, ldb, k1 - k0, cp, ldc, k0 > 0);
            else
              g.fn[1](a, packed + k0 * 16, 16, k1 - k0, cp, ldc, k0 > 0);
          }
          if (k1 == n && q1 > q0)
            done(m0, nr, (pb + q0) * pw, std::min(N, (pb + q1) * pw), c + q0 * pw, ldc);
        }
      }
    }
  }
}

}  // namespace rkcpu
