// label_map: CUDA kernels of the output interface (see label_map.h for the parameter block and
// reprokernels/reference/label_map.py for the specification).
//
// Structure. The kernels are written as per-thread phases in __host__ __device__ functions that take the
// parameter block, the row and the thread's index in its block; between phases the kernel synchronises the block
// or reduces a value over it (warp shuffles, then one shared-memory slot per warp, then the first warp). The
// *_host entry points run the very same phase functions for every "thread" of a block in a plain CPU loop, phase
// after phase, and the block reductions in the same tree order (block_reduce_host): that is how the kernel code is
// tested on machines without a GPU (reprokernels/cuda/label_map.py, emulate=True).
//
// Index mappings, forward (lm_fwd_kernel): one block per row (grid-stride over rows). For probs / log_probs every
// thread runs an online (max, sum exp(x - max)) pass over its part of the row, 16 bytes at a time where the row
// is contiguous (a scalar head up to the first 16-byte boundary, vector groups, a scalar tail), and the block
// reduces the pairs; thread 0 saves (max, log sum) in lse. Then each thread computes targets t = tid, tid + nt,
// ...: it reads only the mapped columns of the row, applies f from the row's statistics and writes the mean or
// sum once. The (B, K) softmax is never materialised and the row is read once.
//
// Index mappings, backward (lm_bwd_kernel): one block per (row, chunk of columns). The row scalar S is a block
// reduction over the targets. Phase 1 writes the dense part of d x over the chunk (-p_k S, or 0 for raw logits),
// vectorised like the forward; after a block barrier, phase 2 overwrites the mapped columns with their full value
// from an inverse table (the mapping's entries sorted by source, stable: built once per call by the caller): the
// first entry of each column's run sums the run's w * g[t] in entry order. Every element is written by one thread
// per phase: no atomics, bitwise deterministic, repeated entries need no conflict handling.
//
// Dense mappings: the row statistics come from the forward kernel with no targets; then one simple tiled GEMM
// kernel (64 x 64 outputs per block of 256 threads, 4 x 4 per thread, K steps of 16 through shared memory,
// float32 accumulation) serves out = f(x) W (softmax / log-softmax applied as the A tile is loaded), d x = g W^T
// (with the softmax backward in the store) and d W = f(x)^T g, whose batch reduction runs in a fixed order inside
// one block per output tile (no split, no atomics: deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common.cuh"
#include "label_map.h"

// `#pragma unroll` only for the device pass: the host compiler (-Wall -Werror) rejects unknown pragmas.
#if defined(__CUDA_ARCH__)
#define LM_UNROLL _Pragma("unroll")
#else
#define LM_UNROLL
#endif

#define LM_HD __host__ __device__ __forceinline__

namespace reprokernels {
namespace {

using i64 = std::int64_t;
constexpr int kWarp = 32;
// Threads per block of the row kernels at most. Their launch bounds name a minimum of one resident block: the
// register cap is then 64 per thread and ptxas stays under it without spills (left to its own occupancy target
// it picks 32 registers and spills the forward).
constexpr int kMaxThreads = 1024;
constexpr i64 kMaxRowBlocks = 1 << 20;     // grid-stride over rows beyond this many blocks
constexpr int kMaxChunks = 65535;          // gridDim.y of the index backward
constexpr int kInvalid = static_cast<int>(cudaErrorInvalidValue);
constexpr float kNegInf = -INFINITY;

// ---- scalar helpers ---------------------------------------------------------------------------------------------

LM_HD float to_f32(float v) { return v; }
LM_HD float to_f32(__half v) { return __half2float(v); }
LM_HD float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
LM_HD T from_f32(float v);
template <>
LM_HD float from_f32<float>(float v) {
  return v;
}
template <>
LM_HD __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
LM_HD __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
LM_HD const T* cptr(std::uintptr_t v) {
  return reinterpret_cast<const T*>(v);
}
template <typename T>
LM_HD T* mptr(std::uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

LM_HD i64 imin(i64 a, i64 b) { return a < b ? a : b; }

// A float element of a tensor whose dtype is a runtime code (0 float32, 1 float16, 2 bfloat16): used where a
// few scalars are read (grad, the dense GEMM's tiles), the row passes are templated on the logits' dtype.
LM_HD float ld_float(std::uintptr_t base, int code, i64 off) {
  switch (code) {
    case 0:
      return cptr<float>(base)[off];
    case 1:
      return to_f32(cptr<__half>(base)[off]);
    default:
      return to_f32(cptr<__nv_bfloat16>(base)[off]);
  }
}

LM_HD void st_float(std::uintptr_t base, int code, i64 off, float v) {
  switch (code) {
    case 0:
      mptr<float>(base)[off] = v;
      break;
    case 1:
      mptr<__half>(base)[off] = from_f32<__half>(v);
      break;
    default:
      mptr<__nv_bfloat16>(base)[off] = from_f32<__nv_bfloat16>(v);
      break;
  }
}

// An index of the mapping: code 0 int64, 1 int32.
LM_HD i64 ld_index(std::uintptr_t base, int code, i64 off) {
  return code == 0 ? cptr<std::int64_t>(base)[off] : static_cast<i64>(cptr<std::int32_t>(base)[off]);
}

// f(x) from the row's (max, log sum exp(x - max)): identity, softmax or log-softmax. Kept apart rather than
// as their sum so that (x - max) - logsum stays exact for large |x| (as torch's log_softmax does).
LM_HD float apply_input(int input, float v, float mx, float ls) {
  if (input == 1) return expf((v - mx) - ls);
  if (input == 2) return (v - mx) - ls;
  return v;
}

// ---- 16-byte vector access --------------------------------------------------------------------------------------

template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
struct alignas(16) Pack16 {
  T v[vec_of<T>()];
};

LM_HD bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// Elements of T before ptr reaches a 16-byte boundary (ptr is T-aligned), at most n.
template <typename T>
LM_HD i64 head_of(const void* ptr, i64 n) {
  const std::uintptr_t mis = reinterpret_cast<std::uintptr_t>(ptr) % 16;
  const i64 h = mis == 0 ? 0 : static_cast<i64>((16 - mis) / sizeof(T));
  return h < n ? h : n;
}

// ---- block reductions -------------------------------------------------------------------------------------------

// The online softmax statistics of a set of values: m = max, s = sum exp(v - m). (-inf, 0) is the empty set.
struct Stats {
  float m;
  float s;
};

// max that propagates NaN (fmaxf drops it), so a NaN logit poisons its row as it does in the reference
LM_HD float nanmax(float a, float b) { return (a > b || a != a) ? a : b; }

LM_HD float combine(float a, float b) { return a + b; }
LM_HD Stats combine(Stats a, Stats b) {
  const float m = nanmax(a.m, b.m);
  if (m == kNegInf) return Stats{kNegInf, 0.f};
  return Stats{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

template <typename V>
LM_HD V identity();
template <>
LM_HD float identity<float>() {
  return 0.f;
}
template <>
LM_HD Stats identity<Stats>() {
  return Stats{kNegInf, 0.f};
}

// Adds N values: one rescale per group (a group of -inf values, or -inf so far, adds nothing).
template <int N>
LM_HD void stats_push(Stats& st, const float (&v)[N]) {
  float mx = st.m;
  LM_UNROLL for (int i = 0; i < N; ++i) mx = nanmax(mx, v[i]);
  if (mx == kNegInf) return;
  float add = 0.f;
  LM_UNROLL for (int i = 0; i < N; ++i) add += expf(v[i] - mx);
  st.s = st.s * expf(st.m - mx) + add;
  st.m = mx;
}

__device__ __forceinline__ float shfl_down(float v, int off) { return __shfl_down_sync(0xffffffffu, v, off); }
__device__ __forceinline__ Stats shfl_down(Stats v, int off) {
  return Stats{shfl_down(v.m, off), shfl_down(v.s, off)};
}

// Lane l < off takes combine(v[l], v[l + off]) for off = 16, 8, 4, 2, 1: lane 0 ends with the warp's value.
template <typename V>
__device__ __forceinline__ V warp_reduce(V v) {
  LM_UNROLL for (int off = kWarp / 2; off > 0; off >>= 1) v = combine(v, shfl_down(v, off));
  return v;
}

// Every thread of the block gets the reduction of the block's values: warps, then the warps' values in the
// first warp (identity beyond the last warp). red: kWarp + 1 shared slots. blockDim.x is a multiple of 32.
template <typename V>
__device__ __forceinline__ V block_reduce(V v, V* red) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int nw = static_cast<int>(blockDim.x) / kWarp;
  v = warp_reduce(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_reduce(lane < nw ? red[lane] : identity<V>());
    if (lane == 0) red[kWarp] = v;
  }
  __syncthreads();
  return red[kWarp];  // red[0..31] of the next reduction are written only after its first barrier
}

// The host emulation of warp_reduce / block_reduce: the same combine calls on the same operands.
template <typename V>
void warp_reduce_host(V* v) {
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    for (int l = 0; l < off; ++l) v[l] = combine(v[l], v[l + off]);
  }
}

template <typename V>
V block_reduce_host(std::vector<V>& v, int nt) {
  V red[kWarp];
  for (int w = 0; w < kWarp; ++w) red[w] = identity<V>();
  for (int w = 0; w < nt / kWarp; ++w) {
    warp_reduce_host(&v[static_cast<std::size_t>(w) * kWarp]);
    red[w] = v[static_cast<std::size_t>(w) * kWarp];
  }
  warp_reduce_host(red);
  return red[0];
}

// ---- index mapping, forward -------------------------------------------------------------------------------------

template <typename Tx>
LM_HD const Tx* x_row(const LabelMapParams& p, i64 row) {
  return cptr<Tx>(p.x) + row * p.x_sb;
}

template <typename Tx>
LM_HD void stats_push_pack(Stats& st, const Pack16<Tx>& pk) {
  float v[vec_of<Tx>()];
  LM_UNROLL for (int i = 0; i < vec_of<Tx>(); ++i) v[i] = to_f32(pk.v[i]);
  stats_push(st, v);
}

// Phase 1: the thread's part of the row's statistics.
template <typename Tx>
LM_HD Stats fwd_stats_thread(const LabelMapParams& p, i64 row, int tid, int nt) {
  Stats st = identity<Stats>();
  const Tx* xr = x_row<Tx>(p, row);
  const i64 K = p.K;
  if (p.x_sk != 1) {
    for (i64 k = tid; k < K; k += nt) {
      const float v[1] = {to_f32(xr[k * p.x_sk])};
      stats_push(st, v);
    }
    return st;
  }
  constexpr int VEC = vec_of<Tx>();
  const i64 head = head_of<Tx>(xr, K);  // < VEC <= nt
  if (tid < head) {
    const float v[1] = {to_f32(xr[tid])};
    stats_push(st, v);
  }
  const i64 ngroups = (K - head) / VEC;
  const Pack16<Tx>* body = reinterpret_cast<const Pack16<Tx>*>(xr + head);
  i64 g = tid;
  for (; g + nt < ngroups; g += 2 * static_cast<i64>(nt)) {  // two loads in flight, pushed in the same order
    const Pack16<Tx> a = body[g];
    const Pack16<Tx> b = body[g + nt];
    stats_push_pack(st, a);
    stats_push_pack(st, b);
  }
  if (g < ngroups) stats_push_pack(st, body[g]);
  const i64 k = head + ngroups * VEC + tid;  // the tail: fewer than VEC elements
  if (k < K) {
    const float v[1] = {to_f32(xr[k])};
    stats_push(st, v);
  }
  return st;
}

// Between the phases: the row's (max, log-sum), saved by thread 0.
LM_HD void fwd_finish_stats(const LabelMapParams& p, i64 row, int tid, Stats st, float& mx, float& ls) {
  mx = st.m;
  ls = logf(st.s);
  if (tid == 0) {
    mptr<float>(p.lse)[2 * row] = mx;
    mptr<float>(p.lse)[2 * row + 1] = ls;
  }
}

// Phase 2: targets tid, tid + nt, ...: the mapped columns only, each output written once.
template <typename Tx>
LM_HD void fwd_gather_thread(const LabelMapParams& p, i64 row, int tid, int nt, float mx, float ls) {
  const Tx* xr = x_row<Tx>(p, row);
  for (i64 t = tid; t < p.T; t += nt) {
    float acc = 0.f;
    i64 cnt = 0;
    for (i64 j = 0; j < p.M; ++j) {
      const i64 src = ld_index(p.mapping, p.map_dtype, t * p.map_st + j * p.map_sm);
      if (src < 0 || src >= p.K) continue;  // -1: no source (the op range-checks; never read out of bounds)
      acc += apply_input(p.input, to_f32(xr[src * p.x_sk]), mx, ls);
      ++cnt;
    }
    const float w = p.reduce == 1 ? 1.f : (cnt > 0 ? 1.f / static_cast<float>(cnt) : 0.f);
    const float v = cnt > 0 ? acc * w : 0.f;  // a target without sources gives 0
    const i64 o = row * p.T + t;
    if (p.input == 0) {
      mptr<Tx>(p.out)[o] = from_f32<Tx>(v);
    } else {
      mptr<float>(p.out)[o] = v;
    }
  }
}

template <typename Tx>
__global__ void __launch_bounds__(kMaxThreads, 1) lm_fwd_kernel(const LabelMapParams p) {
  __shared__ Stats red[kWarp + 1];
  const int tid = static_cast<int>(threadIdx.x);
  const int nt = static_cast<int>(blockDim.x);
  for (i64 row = blockIdx.x; row < p.B; row += gridDim.x) {
    float mx = 0.f, ls = 0.f;
    if (p.input != 0) {
      const Stats st = block_reduce(fwd_stats_thread<Tx>(p, row, tid, nt), red);
      fwd_finish_stats(p, row, tid, st, mx, ls);
    }
    fwd_gather_thread<Tx>(p, row, tid, nt, mx, ls);
  }
}

// ---- index mapping, backward ------------------------------------------------------------------------------------

// Phase 1: the thread's part of S = sum_t g_t out_t (probs) or sum_t g_t tw_t (log_probs).
LM_HD float bwd_s_thread(const LabelMapParams& p, i64 row, int tid, int nt) {
  float s = 0.f;
  for (i64 t = tid; t < p.T; t += nt) {
    const float g = ld_float(p.grad, p.grad_dtype, row * p.grad_sb + t * p.grad_st);
    const float o = p.input == 1 ? cptr<float>(p.out)[row * p.T + t] : cptr<float>(p.tw)[t];
    s += g * o;
  }
  return s;
}

LM_HD float dense_val(int input, float x, float mx, float ls, float S) {
  return input == 0 ? 0.f : -expf((x - mx) - ls) * S;
}

// One group of VEC columns of the dense part (x unused for raw logits), stored 16 bytes at once where aligned.
template <typename Tx>
LM_HD void dense_group(int input, const Pack16<Tx>& x, float mx, float ls, float S, Tx* dst, bool vec_store) {
  Pack16<Tx> o;
  LM_UNROLL for (int i = 0; i < vec_of<Tx>(); ++i) o.v[i] = from_f32<Tx>(dense_val(input, to_f32(x.v[i]), mx, ls, S));
  if (vec_store) {
    *reinterpret_cast<Pack16<Tx>*>(dst) = o;
  } else {
    LM_UNROLL for (int i = 0; i < vec_of<Tx>(); ++i) dst[i] = o.v[i];
  }
}

// Phase 2: d x over the chunk without the mapped terms: -p_k S (or 0), 16 bytes at a time where x's row is
// contiguous (without x: where dx allows); the stores are vectorised too where dx is aligned at the same column.
template <typename Tx>
LM_HD void bwd_dense_thread(const LabelMapParams& p, i64 row, i64 c, int tid, int nt, float mx, float ls, float S) {
  const i64 k0 = c * p.chunk;
  const i64 n = imin(p.K, k0 + p.chunk) - k0;
  if (n <= 0) return;
  Tx* d = mptr<Tx>(p.dx) + row * p.K + k0;
  const Tx* xr = x_row<Tx>(p, row) + k0 * p.x_sk;
  const bool need_x = p.input != 0;
  if (need_x && p.x_sk != 1) {
    for (i64 k = tid; k < n; k += nt) d[k] = from_f32<Tx>(dense_val(p.input, to_f32(xr[k * p.x_sk]), mx, ls, S));
    return;
  }
  constexpr int VEC = vec_of<Tx>();
  const i64 head = need_x ? head_of<Tx>(xr, n) : head_of<Tx>(d, n);
  const bool vec_store = aligned16(d + head);
  if (tid < head) d[tid] = from_f32<Tx>(dense_val(p.input, need_x ? to_f32(xr[tid]) : 0.f, mx, ls, S));
  const i64 ngroups = (n - head) / VEC;
  const Pack16<Tx>* xs = reinterpret_cast<const Pack16<Tx>*>(xr + head);  // read only with need_x
  Tx* ds = d + head;
  i64 g = tid;
  for (; g + nt < ngroups; g += 2 * static_cast<i64>(nt)) {  // two loads in flight before the stores
    Pack16<Tx> a{}, b{};
    if (need_x) {
      a = xs[g];
      b = xs[g + nt];
    }
    dense_group(p.input, a, mx, ls, S, ds + g * VEC, vec_store);
    dense_group(p.input, b, mx, ls, S, ds + (g + nt) * VEC, vec_store);
  }
  if (g < ngroups) {
    Pack16<Tx> a{};
    if (need_x) a = xs[g];
    dense_group(p.input, a, mx, ls, S, ds + g * VEC, vec_store);
  }
  const i64 k = head + ngroups * VEC + tid;
  if (k < n) d[k] = from_f32<Tx>(dense_val(p.input, need_x ? to_f32(xr[k]) : 0.f, mx, ls, S));
}

// Phase 3 (after a block barrier): the mapped columns of the chunk, each by the thread holding the first entry
// of its run in the source-sorted table, summing the run in entry order.
template <typename Tx>
LM_HD void bwd_sparse_thread(const LabelMapParams& p, i64 row, i64 c, int tid, int nt, float mx, float ls, float S) {
  const i64 k0 = c * p.chunk;
  const i64 k1 = imin(p.K, k0 + p.chunk);
  const i64 n_entries = p.T * p.M;
  const i64* esrc = cptr<i64>(p.esrc);
  const i64* etgt = cptr<i64>(p.etgt);
  const float* ew = cptr<float>(p.ew);
  const i64 e0 = cptr<i64>(p.blk)[c] < 0 ? 0 : cptr<i64>(p.blk)[c];
  const i64 e1 = imin(cptr<i64>(p.blk)[c + 1], n_entries);
  const Tx* xr = x_row<Tx>(p, row);
  Tx* d = mptr<Tx>(p.dx) + row * p.K;
  for (i64 e = e0 + tid; e < e1; e += nt) {
    const i64 col = esrc[e];
    // only the chunk's own columns (no other block writes them), once per column
    if (col < k0 || col >= k1 || (e > e0 && esrc[e - 1] == col)) continue;
    float acc = 0.f;
    for (i64 f = e; f < e1 && esrc[f] == col; ++f) {
      const i64 t = etgt[f];
      if (t >= 0 && t < p.T) acc += ew[f] * ld_float(p.grad, p.grad_dtype, row * p.grad_sb + t * p.grad_st);
    }
    float val = acc;
    if (p.input != 0) {
      const float pc = expf((to_f32(xr[col * p.x_sk]) - mx) - ls);
      val = p.input == 1 ? pc * (acc - S) : acc - pc * S;
    }
    d[col] = from_f32<Tx>(val);
  }
}

LM_HD void bwd_row_stats(const LabelMapParams& p, i64 row, float& mx, float& ls) {
  mx = cptr<float>(p.lse)[2 * row];
  ls = cptr<float>(p.lse)[2 * row + 1];
}

template <typename Tx>
__global__ void __launch_bounds__(kMaxThreads, 1) lm_bwd_kernel(const LabelMapParams p) {
  __shared__ float red[kWarp + 1];
  const int tid = static_cast<int>(threadIdx.x);
  const int nt = static_cast<int>(blockDim.x);
  const i64 c = blockIdx.y;
  for (i64 row = blockIdx.x; row < p.B; row += gridDim.x) {
    float mx = 0.f, ls = 0.f, S = 0.f;
    if (p.input != 0) {
      bwd_row_stats(p, row, mx, ls);
      S = block_reduce(bwd_s_thread(p, row, tid, nt), red);
    }
    bwd_dense_thread<Tx>(p, row, c, tid, nt, mx, ls, S);
    __syncthreads();  // the mapped columns below overwrite some of these stores
    bwd_sparse_thread<Tx>(p, row, c, tid, nt, mx, ls, S);
  }
}

// ---- dense mappings: one tiled GEMM -----------------------------------------------------------------------------

constexpr int kTile = 64;   // outputs per block along each dimension
constexpr int kTileL = 16;  // contraction step
constexpr int kTx = 16;     // threads along each dimension: 4 x 4 outputs per thread
constexpr int kPer = kTile / kTx;
constexpr int kGemmThreads = kTx * kTx;

// C[i, j] = sum_l A(i, l) B(l, j) (+ epilogue), i < Mg, j < Ng, l < Lg. A(i, l) = f(a[i, l]) where f applies the
// input transform from the statistics of batch row i (a_stats_i) or l; the epilogue (epi = input) is the softmax
// backward with p = softmax(ex[i, j]) and S = srow[i]. C is contiguous (Mg, Ng) of c_code.
struct Gemm {
  i64 Mg, Ng, Lg, ntn;
  std::uintptr_t a;
  i64 a_si, a_sl;
  int a_code, a_input, a_stats_i;
  std::uintptr_t b;
  i64 b_sl, b_sj;
  int b_code;
  std::uintptr_t lse;
  std::uintptr_t c;
  int c_code;
  int epi;
  std::uintptr_t ex;
  i64 ex_si, ex_sj;
  int ex_code;
  std::uintptr_t srow;
};

using TileRow = float[kTile + 1];  // +1: the transposed stores of a tile do not all hit one bank

// Phase 1: the thread's elements of the A (kTile x kTileL) and B (kTileL x kTile) tiles, along the unit stride
// where there is one (coalesced), zero outside the matrices.
LM_HD void gemm_load(const Gemm& g, i64 i0, i64 j0, i64 l0, int tid, TileRow* As, TileRow* Bs) {
  const bool a_i_fast = g.a_si == 1 && g.a_sl != 1;
  const bool b_l_fast = g.b_sl == 1 && g.b_sj != 1;
  LM_UNROLL for (int q = 0; q < kTile * kTileL / kGemmThreads; ++q) {
    const int e = tid + q * kGemmThreads;
    const int ia = a_i_fast ? e % kTile : e / kTileL;
    const int la = a_i_fast ? e / kTile : e % kTileL;
    const i64 i = i0 + ia, l = l0 + la;
    float v = 0.f;
    if (i < g.Mg && l < g.Lg) {
      v = ld_float(g.a, g.a_code, i * g.a_si + l * g.a_sl);
      if (g.a_input != 0) {
        const float* st = cptr<float>(g.lse) + 2 * (g.a_stats_i ? i : l);
        v = apply_input(g.a_input, v, st[0], st[1]);
      }
    }
    As[la][ia] = v;
    const int jb = b_l_fast ? e / kTileL : e % kTile;
    const int lb = b_l_fast ? e % kTileL : e / kTile;
    const i64 j = j0 + jb, lj = l0 + lb;
    Bs[lb][jb] = (j < g.Ng && lj < g.Lg) ? ld_float(g.b, g.b_code, lj * g.b_sl + j * g.b_sj) : 0.f;
  }
}

// Phase 2: the thread's 4 x 4 outputs (rows ty + 16 r, columns tx + 16 s) accumulate the step, l in order.
LM_HD void gemm_mma(const TileRow* As, const TileRow* Bs, int tid, float* acc) {
  const int tx = tid % kTx, ty = tid / kTx;
  LM_UNROLL for (int l = 0; l < kTileL; ++l) {
    float a[kPer], b[kPer];
    LM_UNROLL for (int r = 0; r < kPer; ++r) {
      a[r] = As[l][ty + kTx * r];
      b[r] = Bs[l][tx + kTx * r];
    }
    LM_UNROLL for (int r = 0; r < kPer; ++r) {
      LM_UNROLL for (int s = 0; s < kPer; ++s) acc[r * kPer + s] += a[r] * b[s];
    }
  }
}

// Phase 3: the epilogue and the store, cast once.
LM_HD void gemm_store(const Gemm& g, i64 i0, i64 j0, int tid, const float* acc) {
  const int tx = tid % kTx, ty = tid / kTx;
  LM_UNROLL for (int r = 0; r < kPer; ++r) {
    const i64 i = i0 + ty + kTx * r;
    if (i >= g.Mg) continue;
    float mx = 0.f, ls = 0.f, S = 0.f;
    if (g.epi != 0) {
      mx = cptr<float>(g.lse)[2 * i];
      ls = cptr<float>(g.lse)[2 * i + 1];
      S = cptr<float>(g.srow)[i];
    }
    LM_UNROLL for (int s = 0; s < kPer; ++s) {
      const i64 j = j0 + tx + kTx * s;
      if (j >= g.Ng) continue;
      float v = acc[r * kPer + s];
      if (g.epi != 0) {
        const float pk = expf((ld_float(g.ex, g.ex_code, i * g.ex_si + j * g.ex_sj) - mx) - ls);
        v = g.epi == 1 ? pk * (v - S) : v - pk * S;
      }
      st_float(g.c, g.c_code, i * g.Ng + j, v);
    }
  }
}

__global__ void __launch_bounds__(kGemmThreads) lm_gemm_kernel(const Gemm g, i64 ntiles) {
  __shared__ TileRow As[kTileL];
  __shared__ TileRow Bs[kTileL];
  const int tid = static_cast<int>(threadIdx.x);
  for (i64 tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const i64 i0 = (tile / g.ntn) * kTile, j0 = (tile % g.ntn) * kTile;
    float acc[kPer * kPer];
    LM_UNROLL for (int q = 0; q < kPer * kPer; ++q) acc[q] = 0.f;
    for (i64 l0 = 0; l0 < g.Lg; l0 += kTileL) {  // the contraction (the batch, for d W) in a fixed order
      gemm_load(g, i0, j0, l0, tid, As, Bs);
      __syncthreads();
      gemm_mma(As, Bs, tid, acc);
      __syncthreads();
    }
    gemm_store(g, i0, j0, tid, acc);
  }
}

int run_gemm(Gemm g, bool host, std::uintptr_t stream) {
  const i64 ntm = (g.Mg + kTile - 1) / kTile;
  g.ntn = (g.Ng + kTile - 1) / kTile;
  const i64 ntiles = ntm * g.ntn;
  if (ntiles == 0) return 0;
  if (host) {
    std::vector<float> acc(static_cast<std::size_t>(kGemmThreads) * kPer * kPer);  // every thread's registers
    auto acc_of = [&acc](int tid) { return &acc[static_cast<std::size_t>(tid) * kPer * kPer]; };
    TileRow As[kTileL], Bs[kTileL];
    for (i64 tile = 0; tile < ntiles; ++tile) {
      const i64 i0 = (tile / g.ntn) * kTile, j0 = (tile % g.ntn) * kTile;
      for (float& v : acc) v = 0.f;
      for (i64 l0 = 0; l0 < g.Lg; l0 += kTileL) {
        for (int tid = 0; tid < kGemmThreads; ++tid) gemm_load(g, i0, j0, l0, tid, As, Bs);
        for (int tid = 0; tid < kGemmThreads; ++tid) gemm_mma(As, Bs, tid, acc_of(tid));
      }
      for (int tid = 0; tid < kGemmThreads; ++tid) gemm_store(g, i0, j0, tid, acc_of(tid));
    }
    return 0;
  }
  const unsigned grid = static_cast<unsigned>(imin(ntiles, kMaxRowBlocks));
  lm_gemm_kernel<<<grid, kGemmThreads, 0, as_stream(stream)>>>(g, ntiles);
  return last_launch_error();
}

// ---- launchers --------------------------------------------------------------------------------------------------

bool float_code(std::int32_t c) { return c >= 0 && c <= 2; }
int elem_size(std::int32_t code) { return code == 0 ? 4 : 2; }
bool aligned_to(std::uintptr_t ptr, int bytes) { return ptr % static_cast<std::uintptr_t>(bytes) == 0; }

bool common_ok(const LabelMapParams& p) {
  const bool threads_ok =
      p.threads == 0 || (p.threads % kWarp == 0 && p.threads >= kWarp && p.threads <= kMaxThreads);
  return p.B >= 0 && p.K >= 0 && p.T >= 0 && p.M >= 0 && p.input >= 0 && p.input <= 2 && p.reduce >= 0 &&
         p.reduce <= 1 && threads_ok && float_code(p.x_dtype) && (p.B == 0 || p.K == 0 || p.x != 0) &&
         aligned_to(p.x, elem_size(p.x_dtype));
}

// Threads per block: the caller's choice, else the smallest power of two in [32, 1024] reaching `want`.
int pick_threads(const LabelMapParams& p, i64 want) {
  if (p.threads != 0) return p.threads;
  int n = kWarp;
  while (n < kMaxThreads && n < want) n *= 2;
  return n;
}

unsigned row_blocks(i64 B) { return static_cast<unsigned>(imin(B, kMaxRowBlocks)); }

template <typename Tx>
int run_fwd(const LabelMapParams& p, bool host) {
  if (p.B == 0) return 0;
  if ((p.T > 0 && p.out == 0) || (p.T > 0 && p.M > 0 && p.mapping == 0) || (p.input != 0 && p.lse == 0) ||
      (p.map_dtype != 0 && p.map_dtype != 1)) {
    return kInvalid;
  }
  // targets: one per thread up to 256; the statistics pass: about 4 groups of 16 bytes per thread
  i64 want = imin(p.T, 256);
  if (p.input != 0) want = want > (p.K / vec_of<Tx>() + 3) / 4 ? want : (p.K / vec_of<Tx>() + 3) / 4;
  const int nt = pick_threads(p, want);
  if (host) {
    std::vector<Stats> part(static_cast<std::size_t>(nt));
    for (i64 row = 0; row < p.B; ++row) {
      float mx = 0.f, ls = 0.f;
      if (p.input != 0) {
        for (int tid = 0; tid < nt; ++tid) part[static_cast<std::size_t>(tid)] = fwd_stats_thread<Tx>(p, row, tid, nt);
        const Stats st = block_reduce_host(part, nt);
        for (int tid = 0; tid < nt; ++tid) fwd_finish_stats(p, row, tid, st, mx, ls);
      }
      for (int tid = 0; tid < nt; ++tid) fwd_gather_thread<Tx>(p, row, tid, nt, mx, ls);
    }
    return 0;
  }
  lm_fwd_kernel<Tx><<<row_blocks(p.B), nt, 0, as_stream(p.stream)>>>(p);
  return last_launch_error();
}

template <typename Tx>
int run_bwd(const LabelMapParams& p, bool host) {
  if (p.B == 0 || p.K == 0) return 0;
  const bool has_entries = p.T > 0 && p.M > 0;
  if (p.dx == 0 || p.blk == 0 || p.chunk < 1 || p.nchunks < 1 || p.nchunks > kMaxChunks ||
      p.chunk * p.nchunks < p.K || (p.nchunks - 1) * p.chunk >= p.K || !float_code(p.grad_dtype) ||
      (has_entries && (p.esrc == 0 || p.etgt == 0 || p.ew == 0)) || (p.T > 0 && p.grad == 0) ||
      (p.input != 0 && p.lse == 0) || (p.input == 1 && p.T > 0 && p.out == 0) ||
      (p.input == 2 && p.T > 0 && p.tw == 0)) {
    return kInvalid;
  }
  // about 2 groups of 16 bytes of the chunk per thread
  const int nt = pick_threads(p, (p.chunk / vec_of<Tx>() + 1) / 2);
  if (host) {
    std::vector<float> part(static_cast<std::size_t>(nt));
    for (i64 row = 0; row < p.B; ++row) {
      for (i64 c = 0; c < p.nchunks; ++c) {
        float mx = 0.f, ls = 0.f, S = 0.f;
        if (p.input != 0) {
          bwd_row_stats(p, row, mx, ls);
          for (int tid = 0; tid < nt; ++tid) part[static_cast<std::size_t>(tid)] = bwd_s_thread(p, row, tid, nt);
          S = block_reduce_host(part, nt);
        }
        for (int tid = 0; tid < nt; ++tid) bwd_dense_thread<Tx>(p, row, c, tid, nt, mx, ls, S);
        for (int tid = 0; tid < nt; ++tid) bwd_sparse_thread<Tx>(p, row, c, tid, nt, mx, ls, S);
      }
    }
    return 0;
  }
  const dim3 grid(row_blocks(p.B), static_cast<unsigned>(p.nchunks));
  lm_bwd_kernel<Tx><<<grid, nt, 0, as_stream(p.stream)>>>(p);
  return last_launch_error();
}

enum class Pass { kFwd, kBwd };

int dispatch(Pass pass, const LabelMapParams& p, bool host) {
  if (!common_ok(p)) return kInvalid;
  switch (p.x_dtype) {
    case 0:
      return pass == Pass::kFwd ? run_fwd<float>(p, host) : run_bwd<float>(p, host);
    case 1:
      return pass == Pass::kFwd ? run_fwd<__half>(p, host) : run_bwd<__half>(p, host);
    default:
      return pass == Pass::kFwd ? run_fwd<__nv_bfloat16>(p, host) : run_bwd<__nv_bfloat16>(p, host);
  }
}

int dense_fwd(const LabelMapParams& p, bool host) {
  if (!common_ok(p) || !float_code(p.w_dtype) || !float_code(p.out_dtype)) return kInvalid;
  if (p.B == 0) return 0;
  if ((p.T > 0 && (p.out == 0 || (p.K > 0 && p.w == 0))) || (p.input != 0 && p.lse == 0)) return kInvalid;
  if (p.input != 0) {  // the row statistics: the index forward without targets
    LabelMapParams s = p;
    s.T = 0;
    s.M = 0;
    s.mapping = 0;
    const int err = dispatch(Pass::kFwd, s, host);
    if (err != 0) return err;
  }
  Gemm g{};
  g.Mg = p.B;
  g.Ng = p.T;
  g.Lg = p.K;
  g.a = p.x;
  g.a_si = p.x_sb;
  g.a_sl = p.x_sk;
  g.a_code = p.x_dtype;
  g.a_input = p.input;
  g.a_stats_i = 1;
  g.b = p.w;
  g.b_sl = p.w_sk;
  g.b_sj = p.w_st;
  g.b_code = p.w_dtype;
  g.lse = p.lse;
  g.c = p.out;
  g.c_code = p.out_dtype;
  return run_gemm(g, host, p.stream);
}

int dense_bwd(const LabelMapParams& p, bool host) {
  if (!common_ok(p) || !float_code(p.w_dtype) || !float_code(p.grad_dtype)) return kInvalid;
  const bool do_dx = p.dx != 0 && p.B > 0 && p.K > 0;
  const bool do_dw = p.dw != 0 && p.K > 0 && p.T > 0;
  if ((do_dx || do_dw) && p.T > 0 && (p.w == 0 || (p.B > 0 && p.grad == 0))) return kInvalid;
  if (p.input != 0 && p.B > 0 && (p.lse == 0 || (do_dx && p.srow == 0))) return kInvalid;
  if (do_dx) {  // d x = softmax backward of g W^T
    Gemm g{};
    g.Mg = p.B;
    g.Ng = p.K;
    g.Lg = p.T;
    g.a = p.grad;
    g.a_si = p.grad_sb;
    g.a_sl = p.grad_st;
    g.a_code = p.grad_dtype;
    g.b = p.w;
    g.b_sl = p.w_st;
    g.b_sj = p.w_sk;
    g.b_code = p.w_dtype;
    g.lse = p.lse;
    g.c = p.dx;
    g.c_code = p.x_dtype;
    g.epi = p.input;
    g.ex = p.x;
    g.ex_si = p.x_sb;
    g.ex_sj = p.x_sk;
    g.ex_code = p.x_dtype;
    g.srow = p.srow;
    const int err = run_gemm(g, host, p.stream);
    if (err != 0) return err;
  }
  if (do_dw) {  // d W = f(x)^T g, the batch summed in order inside each tile's block
    Gemm g{};
    g.Mg = p.K;
    g.Ng = p.T;
    g.Lg = p.B;
    g.a = p.x;
    g.a_si = p.x_sk;
    g.a_sl = p.x_sb;
    g.a_code = p.x_dtype;
    g.a_input = p.input;
    g.a_stats_i = 0;
    g.b = p.grad;
    g.b_sl = p.grad_sb;
    g.b_sj = p.grad_st;
    g.b_code = p.grad_dtype;
    g.lse = p.lse;
    g.c = p.dw;
    g.c_code = p.w_dtype;
    return run_gemm(g, host, p.stream);
  }
  return 0;
}

}  // namespace

int label_map_fwd(const LabelMapParams& params) { return dispatch(Pass::kFwd, params, false); }
int label_map_bwd(const LabelMapParams& params) { return dispatch(Pass::kBwd, params, false); }
int label_map_dense_fwd(const LabelMapParams& params) { return dense_fwd(params, false); }
int label_map_dense_bwd(const LabelMapParams& params) { return dense_bwd(params, false); }
int label_map_fwd_host(const LabelMapParams& params) { return dispatch(Pass::kFwd, params, true); }
int label_map_bwd_host(const LabelMapParams& params) { return dispatch(Pass::kBwd, params, true); }
int label_map_dense_fwd_host(const LabelMapParams& params) { return dense_fwd(params, true); }
int label_map_dense_bwd_host(const LabelMapParams& params) { return dense_bwd(params, true); }

}  // namespace reprokernels
