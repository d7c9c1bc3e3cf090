// label_histogram: CUDA kernels of the joint (source prediction, target label) statistic (see label_histogram.h for
// the parameter block and reprokernels/reference/label_histogram.py for the specification).
//
// The algorithm is the Triton backend's (reprokernels/triton/label_histogram.py), in three launches:
//
// 1. lh_row_kernel (only when logits are given): one warp per row (8 rows per block of 256 threads, grid-stride
//    over rows). The warp walks the row in chunks of 32 consecutive sources, lane l reading source k0 + l
//    (coalesced). weight="count": each lane keeps (best value, its first index, first NaN index) and the warp
//    reduces them (exact: the first NaN, else the largest value at its lowest index, as torch.argmax); the result
//    goes to pred (int32). weight="prob": each lane keeps the online softmax statistics (max, sum exp(x - max)) of
//    its sources and the warp reduces them in a fixed shuffle tree; lane 0 stores m and inv = 1 / sum. With top-k
//    the warp also finds the tie cut-off: per chunk a ballot of (x == thr) in source order, a running count, and
//    the source index of the quota-th tie becomes jstar (K: every tie is kept, there are fewer than quota).
// 2. lh_hist_kernel: one block per (target class t, block of sources, split); thread = source s. The thread walks
//    the samples of class t (its split's share of them) in sample order and sums, in a float32 register, 1 where
//    pred[b] == s (count) or exp(x[b, s] - m[b]) * inv[b] where s is kept (prob). Softmax and scatter are fused:
//    the probabilities exist only in registers. Unsplit, the thread is the only writer of out[s, t] and adds its
//    sum in place (touching only cells with a non-zero sum); split, it stores a partial.
// 3. lh_reduce_kernel (splits > 1): out[s, t] += the partials of the splits, added in split order.
//
// No atomics anywhere and every sum has a fixed order: the result is bitwise deterministic. Index math is int64.
//
// Every kernel is written as per-thread (per-lane) __host__ __device__ functions; the *_host entry point runs them
// in plain CPU loops, lane by lane, with the ballot and the warp reductions emulated in the device's order (the
// same combine calls on the same operands): that is how the kernel code is tested without a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "label_histogram.h"

#define LH_HD __host__ __device__ __forceinline__

namespace reprokernels {
namespace {

using i64 = std::int64_t;
using P = LabelHistogramParams;

constexpr int kWarp = 32;
constexpr int kRowThreads = 256;  // row kernel: 8 warps = 8 rows per block
constexpr int kRowsPerBlock = kRowThreads / kWarp;
// Its launch bounds name 4 resident blocks per SM: a cap of 64 registers (left to its own occupancy target ptxas
// picks 32 and spills the top-k state).
constexpr int kRowMinBlocks = 4;
constexpr int kMaxThreads = 1024;
constexpr int kDefaultHistThreads = 256;
constexpr int kReduceThreads = 256;
constexpr i64 kMaxBlocks = 1 << 20;  // grid-stride beyond this many blocks
constexpr i64 kMaxSplits = 65535;    // gridDim.y of the histogram kernel
constexpr int kInvalid = static_cast<int>(cudaErrorInvalidValue);
constexpr float kNegInf = -INFINITY;
constexpr float kPosInf = INFINITY;

// ---- scalar helpers ---------------------------------------------------------------------------------------------

LH_HD float to_f32(float v) { return v; }
LH_HD float to_f32(__half v) { return __half2float(v); }
LH_HD float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
LH_HD const T* cptr(std::uintptr_t v) {
  return reinterpret_cast<const T*>(v);
}
template <typename T>
LH_HD T* mptr(std::uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

LH_HD i64 imin(i64 a, i64 b) { return a < b ? a : b; }
LH_HD i64 imax(i64 a, i64 b) { return a > b ? a : b; }

template <typename Tx>
LH_HD float ld_x(const P& p, i64 row, i64 k) {
  return to_f32(cptr<Tx>(p.x)[row * p.x_sb + k * p.x_sk]);
}

LH_HD i64 ld_pred(const P& p, i64 b) {
  const i64 off = b * p.pred_s;
  return p.pred_dtype == 0 ? cptr<std::int64_t>(p.pred)[off] : static_cast<i64>(cptr<std::int32_t>(p.pred)[off]);
}

LH_HD int popcount32(unsigned v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// ---- row pass: argmax ------------------------------------------------------------------------------------------

// One lane's argmax state: the largest non-NaN value and its first index (K: none yet), the first NaN index (K:
// none). Lanes see their sources in increasing order, so "strictly greater" keeps the first maximal index.
struct ArgState {
  float best;
  i64 bi;
  i64 nan_i;
};

LH_HD ArgState arg_init(const P& p) { return ArgState{kNegInf, p.K, p.K}; }

template <typename Tx>
LH_HD void argmax_lane(const P& p, i64 row, i64 k, ArgState& a) {
  if (k >= p.K) return;
  const float v = ld_x<Tx>(p, row, k);
  if (v != v) {
    if (a.nan_i == p.K) a.nan_i = k;
  } else if (v > a.best) {
    a.best = v;
    a.bi = k;
  }
}

// Exact and order-independent: the first NaN; else the larger value, a tie going to the lower index.
LH_HD ArgState combine(ArgState a, ArgState b) {
  ArgState r = (b.best > a.best || (b.best == a.best && b.bi < a.bi)) ? b : a;
  r.nan_i = imin(a.nan_i, b.nan_i);
  return r;
}

// torch.argmax: the first NaN, else the first maximal index; a row of -inf only gives 0.
LH_HD void argmax_store(const P& p, i64 row, const ArgState& a) {
  const i64 idx = a.nan_i < p.K ? a.nan_i : (a.bi < p.K ? a.bi : 0);
  mptr<std::int32_t>(p.pred)[row] = static_cast<std::int32_t>(idx);
}

// ---- row pass: softmax statistics and the top-k tie cut-off ---------------------------------------------------

// The online softmax statistics of a set of values: m = max, s = sum exp(v - m). (-inf, 0) is the empty set. A NaN
// makes both NaN (the reference's softmax of such a row is NaN everywhere).
struct Stats {
  float m;
  float s;
};

LH_HD float nanmax(float a, float b) { return (a > b || a != a) ? a : b; }

LH_HD void stats_push(Stats& st, float v) {
  if (v == kNegInf) return;  // adds exp(-inf) = 0
  if (v <= st.m) {
    st.s += expf(v - st.m);
  } else if (v > st.m) {
    st.s = st.s * expf(st.m - v) + 1.f;  // st.m = -inf: 0 * 0 + 1
    st.m = v;
  } else {  // v or st.m is NaN
    st.m = NAN;
    st.s = NAN;
  }
}

LH_HD Stats combine(Stats a, Stats b) {
  const float m = nanmax(a.m, b.m);
  if (m == kNegInf) return Stats{kNegInf, 0.f};
  return Stats{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// One lane's step of the prob row pass: push x[row, k] into the lane's statistics; returns whether it is a tie with
// the row's threshold (a valid source whose value equals thr).
template <typename Tx>
LH_HD bool stats_lane(const P& p, i64 row, i64 k, float thr, Stats& st) {
  if (k >= p.K) return false;
  const float v = ld_x<Tx>(p, row, k);
  stats_push(st, v);
  return v == thr;
}

// The warp-uniform tie cut-off: ties are counted chunk by chunk in source order (mask bit l = source k0 + l); the
// quota-th tie's source index becomes jstar. jstar = K: fewer ties than quota, all of them are kept.
struct TieState {
  float thr;
  i64 quota;
  i64 seen;
  i64 jstar;
  bool done;
};

LH_HD TieState tie_init(const P& p, i64 row) {
  TieState t{NAN, 0, 0, p.K, true};
  if (p.topk) {
    t.thr = cptr<float>(p.thr)[row];
    t.quota = cptr<std::int32_t>(p.quota)[row];
    t.done = t.quota <= 0;
    if (t.done) t.jstar = -1;  // no tie kept (never produced by the caller: the k-th value itself is a tie)
  }
  return t;
}

LH_HD void tie_step(TieState& t, unsigned mask, i64 k0) {
  if (t.done) return;
  const int c = popcount32(mask);
  if (t.seen + c >= t.quota) {
    int need = static_cast<int>(t.quota - t.seen);  // in [1, c]
    for (int l = 0; l < kWarp; ++l) {
      if ((mask >> l) & 1u) {
        if (--need == 0) {
          t.jstar = k0 + l;
          break;
        }
      }
    }
    t.done = true;
  }
  t.seen += c;
}

LH_HD void stats_store(const P& p, i64 row, const Stats& st, const TieState& t) {
  // a +inf logit makes the reference's whole row NaN (exp(inf - inf) enters its sum)
  const float s = st.m == kPosInf ? NAN : st.s;
  mptr<float>(p.m)[row] = st.m;
  mptr<float>(p.inv)[row] = 1.f / s;  // a row of -inf only: inv = inf and exp(-inf - -inf) = NaN, as the reference
  if (p.topk) mptr<std::int32_t>(p.jstar)[row] = static_cast<std::int32_t>(t.jstar);
}

// ---- warp reductions (device) and their host emulation ---------------------------------------------------------

__device__ __forceinline__ float shfl_down(float v, int off) { return __shfl_down_sync(0xffffffffu, v, off); }
__device__ __forceinline__ i64 shfl_down(i64 v, int off) {
  return static_cast<i64>(__shfl_down_sync(0xffffffffu, static_cast<long long>(v), off));
}
__device__ __forceinline__ Stats shfl_down(Stats v, int off) {
  return Stats{shfl_down(v.m, off), shfl_down(v.s, off)};
}
__device__ __forceinline__ ArgState shfl_down(ArgState v, int off) {
  return ArgState{shfl_down(v.best, off), shfl_down(v.bi, off), shfl_down(v.nan_i, off)};
}

// Lane 0 gets the reduction of the warp's values (a tree: lane l combines lane l + off, off = 16, 8, 4, 2, 1).
template <typename V>
__device__ __forceinline__ V warp_reduce(V v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v = combine(v, shfl_down(v, off));
  return v;
}

template <typename V>
V warp_reduce_host(V* v) {
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    for (int l = 0; l < off; ++l) v[l] = combine(v[l], v[l + off]);
  }
  return v[0];
}

// ---- histogram pass ----------------------------------------------------------------------------------------------

// Thread tid of the block for cell c = (class t, source block sb) and split sp: out[s, t] (or its partial) for the
// source s = sb * nt + tid, summed over the split's samples of class t in sample order.
template <typename Tx>
LH_HD void hist_thread(const P& p, i64 cell, i64 sp, int tid, int nt) {
  const i64 nsblk = (p.K + nt - 1) / nt;
  const i64 t = cell / nsblk;
  const i64 s = (cell % nsblk) * nt + tid;
  if (s >= p.K || t >= p.T) return;
  const std::int64_t* starts = cptr<std::int64_t>(p.starts);
  const i64 start = imin(imax(starts[t], 0), p.B);
  const i64 end = imin(imax(starts[t + 1], start), p.B);
  const i64 chunk = (end - start + p.splits - 1) / p.splits;
  const i64 lo = imin(start + sp * chunk, end);
  const i64 hi = imin(lo + chunk, end);
  const std::int64_t* perm = cptr<std::int64_t>(p.perm);
  float acc = 0.f;
  if (p.weight == 0) {
    for (i64 j = lo; j < hi; ++j) {
      const i64 b = perm[j];
      if (b < 0 || b >= p.B) continue;
      if (ld_pred(p, b) == s) acc += 1.f;
    }
  } else {
    const float* m = cptr<float>(p.m);
    const float* inv = cptr<float>(p.inv);
    for (i64 j = lo; j < hi; ++j) {
      const i64 b = perm[j];
      if (b < 0 || b >= p.B) continue;
      const float v = ld_x<Tx>(p, b, s);
      bool keep = true;
      if (p.topk) {
        const float th = cptr<float>(p.thr)[b];
        keep = v > th || (v == th && s <= static_cast<i64>(cptr<std::int32_t>(p.jstar)[b]));
      }
      if (keep) acc += expf(v - m[b]) * inv[b];
    }
  }
  if (p.splits == 1) {
    if (acc != 0.f) {  // the only writer of out[s, t]: touch only the cells this batch adds to (NaN included)
      float* o = mptr<float>(p.out) + s * p.out_sk + t * p.out_st;
      *o += acc;
    }
  } else {
    mptr<float>(p.part)[(sp * p.T + t) * p.K + s] = acc;
  }
}

// out[s, t] += the partials of every split, in split order (f = t * K + s).
LH_HD void reduce_elem(const P& p, i64 f) {
  const i64 n = p.K * p.T;
  const float* part = cptr<float>(p.part);
  float acc = 0.f;
  for (i64 sp = 0; sp < p.splits; ++sp) acc += part[sp * n + f];
  if (acc != 0.f) {
    const i64 t = f / p.K;
    const i64 s = f % p.K;
    mptr<float>(p.out)[s * p.out_sk + t * p.out_st] += acc;
  }
}

// ---- kernels -----------------------------------------------------------------------------------------------------

template <typename Tx>
__global__ void __launch_bounds__(kRowThreads, kRowMinBlocks) lh_row_kernel(const P p) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const i64 nwarps = static_cast<i64>(gridDim.x) * kRowsPerBlock;
  for (i64 row = static_cast<i64>(blockIdx.x) * kRowsPerBlock + static_cast<i64>(threadIdx.x) / kWarp; row < p.B;
       row += nwarps) {  // warp-uniform
    if (p.weight == 0) {
      ArgState a = arg_init(p);
      for (i64 k0 = 0; k0 < p.K; k0 += kWarp) argmax_lane<Tx>(p, row, k0 + lane, a);
      a = warp_reduce(a);
      if (lane == 0) argmax_store(p, row, a);
    } else {
      Stats st{kNegInf, 0.f};
      TieState tie = tie_init(p, row);
      for (i64 k0 = 0; k0 < p.K; k0 += kWarp) {
        const bool eq = stats_lane<Tx>(p, row, k0 + lane, tie.thr, st);
        if (p.topk) tie_step(tie, __ballot_sync(0xffffffffu, eq), k0);
      }
      st = warp_reduce(st);
      if (lane == 0) stats_store(p, row, st, tie);
    }
  }
}

template <typename Tx>
__global__ void __launch_bounds__(kMaxThreads) lh_hist_kernel(const P p, i64 ncells) {
  for (i64 c = blockIdx.x; c < ncells; c += gridDim.x) {
    hist_thread<Tx>(p, c, static_cast<i64>(blockIdx.y), static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
  }
}

__global__ void __launch_bounds__(kReduceThreads) lh_reduce_kernel(const P p) {
  const i64 n = p.K * p.T;
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 f = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; f < n; f += stride) reduce_elem(p, f);
}

// ---- launchers ---------------------------------------------------------------------------------------------------

int elem_size(std::int32_t code) { return code == 0 ? 4 : 2; }

bool params_ok(const P& p) {
  const bool threads_ok =
      p.threads == 0 || (p.threads % kWarp == 0 && p.threads >= kWarp && p.threads <= kMaxThreads);
  if (p.B < 0 || p.K < 1 || p.T < 1 || p.splits < 1 || p.splits > kMaxSplits || !threads_ok) return false;
  if (p.x_dtype < 0 || p.x_dtype > 2 || p.pred_dtype < 0 || p.pred_dtype > 1 || p.weight < 0 || p.weight > 1 ||
      p.topk < 0 || p.topk > 1) {
    return false;
  }
  if (p.B == 0) return true;
  if (p.perm == 0 || p.starts == 0 || p.out == 0 || (p.splits > 1 && p.part == 0)) return false;
  if (p.x != 0 && p.x % static_cast<std::uintptr_t>(elem_size(p.x_dtype)) != 0) return false;
  if (p.weight == 0) return p.pred != 0 && (p.x == 0 || (p.pred_dtype == 1 && p.pred_s == 1));
  if (p.x == 0 || p.m == 0 || p.inv == 0) return false;
  return p.topk == 0 || (p.thr != 0 && p.quota != 0 && p.jstar != 0);
}

int hist_threads(const P& p) {
  if (p.threads != 0) return p.threads;
  int n = kWarp;
  while (n < kDefaultHistThreads && n < p.K) n *= 2;
  return n;
}

template <typename Tx>
void row_host(const P& p, i64 row) {
  if (p.weight == 0) {
    ArgState a[kWarp];
    for (int l = 0; l < kWarp; ++l) a[l] = arg_init(p);
    for (i64 k0 = 0; k0 < p.K; k0 += kWarp) {
      for (int l = 0; l < kWarp; ++l) argmax_lane<Tx>(p, row, k0 + l, a[l]);
    }
    argmax_store(p, row, warp_reduce_host(a));
    return;
  }
  Stats st[kWarp];
  TieState tie = tie_init(p, row);  // warp-uniform: one copy stands for every lane's
  for (int l = 0; l < kWarp; ++l) st[l] = Stats{kNegInf, 0.f};
  for (i64 k0 = 0; k0 < p.K; k0 += kWarp) {
    unsigned mask = 0;
    for (int l = 0; l < kWarp; ++l) {
      if (stats_lane<Tx>(p, row, k0 + l, tie.thr, st[l])) mask |= 1u << l;
    }
    if (p.topk) tie_step(tie, mask, k0);
  }
  stats_store(p, row, warp_reduce_host(st), tie);
}

template <typename Tx>
int run(const P& p, bool host) {
  if (!params_ok(p)) return kInvalid;
  if (p.B == 0) return 0;
  const int nt = hist_threads(p);
  const i64 ncells = p.T * ((p.K + nt - 1) / nt);
  if (host) {
    if (p.x != 0) {
      for (i64 row = 0; row < p.B; ++row) row_host<Tx>(p, row);
    }
    for (i64 c = 0; c < ncells; ++c) {
      for (i64 sp = 0; sp < p.splits; ++sp) {
        for (int tid = 0; tid < nt; ++tid) hist_thread<Tx>(p, c, sp, tid, nt);
      }
    }
    if (p.splits > 1) {
      for (i64 f = 0; f < p.K * p.T; ++f) reduce_elem(p, f);
    }
    return 0;
  }
  const cudaStream_t stream = as_stream(p.stream);
  if (p.x != 0) {
    const i64 blocks = imin((p.B + kRowsPerBlock - 1) / kRowsPerBlock, kMaxBlocks);
    lh_row_kernel<Tx><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(p);
    if (const int err = last_launch_error()) return err;
  }
  const dim3 grid(static_cast<unsigned>(imin(ncells, kMaxBlocks)), static_cast<unsigned>(p.splits));
  lh_hist_kernel<Tx><<<grid, nt, 0, stream>>>(p, ncells);
  if (const int err = last_launch_error()) return err;
  if (p.splits > 1) {
    lh_reduce_kernel<<<grid_for(p.K * p.T, kReduceThreads, kMaxBlocks), kReduceThreads, 0, stream>>>(p);
    if (const int err = last_launch_error()) return err;
  }
  return 0;
}

int dispatch(const P& p, bool host) {
  switch (p.x_dtype) {
    case 0:
      return run<float>(p, host);
    case 1:
      return run<__half>(p, host);
    case 2:
      return run<__nv_bfloat16>(p, host);
    default:
      return kInvalid;
  }
}

}  // namespace

int label_histogram_accumulate(const LabelHistogramParams& params) { return dispatch(params, false); }
int label_histogram_accumulate_host(const LabelHistogramParams& params) { return dispatch(params, true); }

}  // namespace reprokernels
