// prefix_attention (decode forward) and merge_attention_states: CUDA kernels (see prefix_attention.h for the
// parameter blocks and reprokernels/reference/prefix_attention.py for the specification).
//
// Partial kernel (pa_partial_kernel). 4 warps per block; a block owns one work item at a time (grid-stride over
// items, so no grid limit is reachable): up to QM query rows (QM = 16 at d <= 128, 8 at d <= 256, 4 beyond; a
// warp owns R = QM / 4 of them) against one key range. Its queries go to shared memory once (float32). The key
// range is walked in tiles of KT keys: the block loads the K and V tile into shared memory (float32, a 16-byte
// vector load per group of columns where a key row is contiguous and aligned; unseen keys are never loaded: their
// rows are 0 and flagged, so NaN or inf in a cache's unused slots cannot reach a product), then every warp runs,
// for each of its rows:
//   scores: lane l takes key l % KT and the columns c = l / KT + SUB * i (SUB = 32 / KT lanes per key, so each
//           lane reads its own bank of the padded K tile: row stride d + SUB), then the SUB lanes of a key add
//           their parts by xor shuffles;
//   online softmax in the log2 domain: the tile maximum by a xor butterfly, rescale, p = exp2(s - m);
//   values: lane l owns the output columns l + 32 i; p of key j is broadcast from lane j.
// At the end the lanes' row sums are added by a xor butterfly and the normalised partial output and natural-log
// LSE are stored in float32. Prefix items read each prefix tile once for all QM queries of their block: the rows of
// one task times the heads of one GQA group, so at small batch a shared prefix is read once per kv head and split.
//
// Merge kernels: one warp per query row, no cross-lane operation: every lane reads the row's partition LSEs, computes
// the same weights (merge_weights, the reference's limits: -inf partitions have weight 0 and their o is never read,
// +inf partitions share the weight, NaN propagates) and its own columns of the output, in slot order.
//
// Host emulation (*_host): the same phase functions run for every thread of a block in CPU loops; between phases
// the emulation does what the device does between them (a barrier, or a shuffle pattern replayed lane by lane with
// the same operands in the same order), so the emulated results are the kernels' own arithmetic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.cuh"
#include "prefix_attention.h"

#if defined(__CUDA_ARCH__)
#define PA_UNROLL _Pragma("unroll")
#else
#define PA_UNROLL
#endif

#define PA_HD __host__ __device__ __forceinline__

namespace reprokernels {
namespace {

using i64 = std::int64_t;
constexpr int kWarp = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr int kMaxQM = 16;  // rows per block at most (the smallest head dims)
constexpr int kMaxKT = 32;  // keys per tile at most
constexpr i64 kMaxGrid = i64{1} << 22;
constexpr int kInvalid = static_cast<int>(cudaErrorInvalidValue);
constexpr float kNegInf = -INFINITY;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr i64 kNoLimit = std::numeric_limits<i64>::max();

// ---- scalars ----------------------------------------------------------------------------------------------------

PA_HD float to_f32(float v) { return v; }
PA_HD float to_f32(__half v) { return __half2float(v); }
PA_HD float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
PA_HD const T* cptr(std::uintptr_t v) {
  return reinterpret_cast<const T*>(v);
}
template <typename T>
PA_HD T* mptr(std::uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

PA_HD float ld_float(std::uintptr_t base, int code, i64 off) {
  switch (code) {
    case 0:
      return cptr<float>(base)[off];
    case 1:
      return to_f32(cptr<__half>(base)[off]);
    default:
      return to_f32(cptr<__nv_bfloat16>(base)[off]);
  }
}

PA_HD void st_float(std::uintptr_t base, int code, i64 off, float v) {
  switch (code) {
    case 0:
      mptr<float>(base)[off] = v;
      break;
    case 1:
      mptr<__half>(base)[off] = __float2half_rn(v);
      break;
    default:
      mptr<__nv_bfloat16>(base)[off] = __float2bfloat16_rn(v);
      break;
  }
}

// v rounded to the dtype of code (the reference rounds a prefix to q's dtype once, before any product)
PA_HD float round_to(int code, float v) {
  if (code == 1) return __half2float(__float2half_rn(v));
  if (code == 2) return __bfloat162float(__float2bfloat16_rn(v));
  return v;
}

// max that propagates NaN (fmaxf drops it), so NaN scores poison their row as in the reference
PA_HD float nanmax(float a, float b) { return (a > b || a != a) ? a : b; }

PA_HD i64 imin(i64 a, i64 b) { return a < b ? a : b; }
PA_HD i64 cdiv(i64 a, i64 b) { return (a + b - 1) / b; }

// ---- tiles ------------------------------------------------------------------------------------------------------

// DC: output columns per lane (d <= 32 * DC). R rows per warp, KT keys per tile, SUB lanes per key.
template <int DC>
struct Tile;
template <>
struct Tile<2> {
  static constexpr int R = 4, KT = 32;
};
template <>
struct Tile<4> {
  static constexpr int R = 4, KT = 32;
};
template <>
struct Tile<8> {
  static constexpr int R = 2, KT = 16;
};
template <>
struct Tile<16> {
  static constexpr int R = 1, KT = 8;
};

template <int DC>
struct Cfg {
  static constexpr int R = Tile<DC>::R;
  static constexpr int KT = Tile<DC>::KT;
  static constexpr int SUB = kWarp / KT;
  static constexpr int QM = kWarps * R;
};

int dc_of(i64 D) { return D <= 64 ? 2 : D <= 128 ? 4 : D <= 256 ? 8 : 16; }

// Shared memory of a block, in floats: queries (QM, D), keys (KT, D + SUB) padded so the lanes of a score step hit
// distinct banks, values (KT, D).
template <int DC>
PA_HD i64 smem_floats(i64 D) {
  using C = Cfg<DC>;
  return C::QM * D + C::KT * (D + C::SUB) + C::KT * D;
}

// The small per-row / per-key tables of a block (static shared memory on the device).
struct BlockTables {
  i64 row[kMaxQM];   // global query row (b * Hq + hq) * Lq + i, or -1 for an unused slot
  i64 qoff[kMaxQM];  // element offset of the query in q
  i64 qlim[kMaxQM];  // the last own key the query sees (causal), kNoLimit otherwise
  i64 kpos[kMaxKT];  // key index of each tile row, -1 where the key is unseen or past the range
};

// ---- work items -------------------------------------------------------------------------------------------------

struct Work {
  bool prefix;
  i64 t, b, h, split, mb;  // task (prefix items) or batch row (sequence items), kv head, split, query block
  i64 nq;                  // queries of the item's task or row group (all blocks of it)
  i64 lo, hi;              // key range
};

PA_HD i64 kv_len_of(const PrefixAttnParams& p, i64 b) {
  if (p.kv_len == 0) return p.Lk;
  return p.len_dtype == 0 ? cptr<std::int64_t>(p.kv_len)[b] : static_cast<i64>(cptr<std::int32_t>(p.kv_len)[b]);
}

PA_HD i64 n_prefix_items(const PrefixAttnParams& p, int QM) {
  const i64 G = p.Hq / p.Hkv;
  return p.SP > 0 ? p.T * p.Hkv * p.SP * cdiv(p.B * G * p.Lq, QM) : 0;
}

PA_HD i64 n_seq_items(const PrefixAttnParams& p, int QM) {
  const i64 G = p.Hq / p.Hkv;
  return p.B * p.Hkv * p.S * cdiv(G * p.Lq, QM);
}

// Item w: prefix items first, ordered so that the query blocks of one (task, kv head, split) are neighbours (their
// prefix tiles are read at about the same time: L2 serves the repeats), then the sequence items.
PA_HD Work decode_work(const PrefixAttnParams& p, i64 w, int QM) {
  const i64 G = p.Hq / p.Hkv;
  Work k{};
  const i64 np = n_prefix_items(p, QM);
  if (w < np) {
    const i64 nmb = cdiv(p.B * G * p.Lq, QM);
    k.prefix = true;
    k.mb = w % nmb;
    i64 rest = w / nmb;
    k.split = rest % p.SP;
    rest /= p.SP;
    k.h = rest % p.Hkv;
    k.t = rest / p.Hkv;
    const i64 rows = p.task_off ? cptr<std::int64_t>(p.task_off)[k.t + 1] - cptr<std::int64_t>(p.task_off)[k.t] : p.B;
    k.nq = rows * G * p.Lq;
    k.lo = k.split * p.pchunk;
    k.hi = imin(p.P, k.lo + p.pchunk);
    return k;
  }
  w -= np;
  const i64 nmb = cdiv(G * p.Lq, QM);
  k.prefix = false;
  k.mb = w % nmb;
  i64 rest = w / nmb;
  k.split = rest % p.S;
  rest /= p.S;
  k.h = rest % p.Hkv;
  k.b = rest / p.Hkv;
  k.nq = G * p.Lq;
  k.lo = k.split * p.kchunk;
  k.hi = imin(imin(p.Lk, k.lo + p.kchunk), kv_len_of(p, k.b));
  return k;
}

// Phase "rows" (thread tid < QM): the query row of block slot tid.
PA_HD void rows_thread(const PrefixAttnParams& p, const Work& k, int QM, int tid, BlockTables& tb) {
  if (tid >= QM) return;
  const i64 G = p.Hq / p.Hkv;
  const i64 m = k.mb * QM + tid;
  if (m >= k.nq) {
    tb.row[tid] = -1;
    tb.qoff[tid] = 0;
    tb.qlim[tid] = -1;
    return;
  }
  i64 b, g, i;
  if (k.prefix) {
    const i64 ri = m / (G * p.Lq);
    const i64 rem = m % (G * p.Lq);
    g = rem / p.Lq;
    i = rem % p.Lq;
    b = p.rows ? cptr<std::int64_t>(p.rows)[cptr<std::int64_t>(p.task_off)[k.t] + ri] : ri;
  } else {
    b = k.b;
    g = m / p.Lq;
    i = m % p.Lq;
  }
  const i64 hq = k.h * G + g;
  tb.row[tid] = (b * p.Hq + hq) * p.Lq + i;
  tb.qoff[tid] = b * p.q_sb + hq * p.q_sh + i * p.q_sl;
  tb.qlim[tid] = (k.prefix || !p.causal) ? kNoLimit : p.Lk - p.Lq + i;
}

// Whether warp `warp` owns a used row (rows are filled in order: its first one decides).
PA_HD bool warp_active(const Work& k, int QM, int R, int warp) { return k.mb * QM + warp * R < k.nq; }

// Phase "queries" (every thread): the block's queries to shared memory in float32 (unused slots 0).
PA_HD void queries_thread(const PrefixAttnParams& p, int QM, int tid, const BlockTables& tb, float* qs) {
  const i64 D = p.D;
  for (i64 e = tid; e < QM * D; e += kThreads) {
    const i64 r = e / D, c = e % D;
    qs[e] = tb.row[r] < 0 ? 0.f : ld_float(p.q, p.dtype, tb.qoff[r] + c * p.q_sd);
  }
}

// Whether own key n of row b is seen apart from the range and causality: the padding mask.
PA_HD bool key_kept(const PrefixAttnParams& p, i64 b, i64 n) {
  return p.kpm == 0 || cptr<std::uint8_t>(p.kpm)[b * p.kpm_sb + n * p.kpm_sl] != 0;
}

template <typename T>
struct alignas(16) Pack16 {
  T v[16 / sizeof(T)];
};

PA_HD bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// One group of VEC columns [c0, c0 + VEC) of a key/value row into shared memory (float32, rounded to q's dtype
// when `round` >= 0): a 16-byte load where the row is contiguous and the group aligned, else scalar.
template <typename T>
PA_HD void load_group(const T* row, i64 sd, i64 c0, i64 D, int round, float* dst) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  if (sd == 1 && c0 + VEC <= D && aligned16(row + c0)) {
    const Pack16<T> pk = *reinterpret_cast<const Pack16<T>*>(row + c0);
    PA_UNROLL for (int i = 0; i < VEC; ++i) {
      const float x = to_f32(pk.v[i]);
      dst[c0 + i] = round >= 0 ? round_to(round, x) : x;
    }
    return;
  }
  for (i64 c = c0; c < c0 + VEC && c < D; ++c) {
    const float x = to_f32(row[c * sd]);
    dst[c] = round >= 0 ? round_to(round, x) : x;
  }
}

// Phase "tile" (every thread): keys [n0, n0 + KT) of the item into ks / vs, unseen keys as 0 rows flagged -1.
template <typename T, int DC>
PA_HD void tile_thread(const PrefixAttnParams& p, const Work& k, i64 n0, int tid, BlockTables& tb, float* ks,
                       float* vs) {
  using C = Cfg<DC>;
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  const i64 D = p.D;
  const i64 KS = D + C::SUB;
  const i64 ngroups = cdiv(D, VEC);
  std::uintptr_t kb, vb;
  i64 ko, vo, ksl, vsl, ksd, vsd;
  if (k.prefix) {
    kb = p.pk;
    vb = p.pv;
    ko = k.t * p.pk_st + k.h * p.pk_sh;
    vo = k.t * p.pv_st + k.h * p.pv_sh;
    ksl = p.pk_sl;
    vsl = p.pv_sl;
    ksd = p.pk_sd;
    vsd = p.pv_sd;
  } else {
    kb = p.k;
    vb = p.v;
    ko = k.b * p.k_sb + k.h * p.k_sh;
    vo = k.b * p.v_sb + k.h * p.v_sh;
    ksl = p.k_sl;
    vsl = p.v_sl;
    ksd = p.k_sd;
    vsd = p.v_sd;
  }
  const int round = (k.prefix && p.p_dtype != p.dtype) ? p.dtype : -1;
  for (i64 e = tid; e < C::KT * ngroups; e += kThreads) {
    const i64 j = e / ngroups, c0 = (e % ngroups) * VEC;
    const i64 n = n0 + j;
    float* kd = ks + j * KS;
    float* vd = vs + j * D;
    const bool seen = n < k.hi && (k.prefix || key_kept(p, k.b, n));
    if (!seen) {
      for (i64 c = c0; c < c0 + VEC && c < D; ++c) {
        kd[c] = 0.f;
        vd[c] = 0.f;
      }
      continue;
    }
    load_group<T>(cptr<T>(kb) + ko + n * ksl, ksd, c0, D, round, kd);
    load_group<T>(cptr<T>(vb) + vo + n * vsl, vsd, c0, D, round, vd);
  }
  if (tid < C::KT) {
    const i64 n = n0 + tid;
    tb.kpos[tid] = (n < k.hi && (k.prefix || key_kept(p, k.b, n))) ? n : -1;
  }
}

template <int DC>
PA_HD void tile_dispatch(const PrefixAttnParams& p, const Work& k, i64 n0, int tid, BlockTables& tb, float* ks,
                         float* vs) {
  switch (k.prefix ? p.p_dtype : p.dtype) {
    case 0:
      tile_thread<float, DC>(p, k, n0, tid, tb, ks, vs);
      break;
    case 1:
      tile_thread<__half, DC>(p, k, n0, tid, tb, ks, vs);
      break;
    default:
      tile_thread<__nv_bfloat16, DC>(p, k, n0, tid, tb, ks, vs);
      break;
  }
}

// ---- the per-lane attention state and its phases ----------------------------------------------------------------

template <int DC>
struct Lane {
  float m[Cfg<DC>::R];        // running max of the row's scores (log2 units)
  float l[Cfg<DC>::R];        // this lane's part of the row's sum of p (its keys only)
  float acc[Cfg<DC>::R][DC];  // this lane's output columns, unnormalised
  float s[Cfg<DC>::R];        // the current key's score
  float p[Cfg<DC>::R];        // the current key's p
};

template <int DC>
PA_HD void lane_init(Lane<DC>& st) {
  PA_UNROLL for (int r = 0; r < Cfg<DC>::R; ++r) {
    st.m[r] = kNegInf;
    st.l[r] = 0.f;
    PA_UNROLL for (int i = 0; i < DC; ++i) st.acc[r][i] = 0.f;
  }
}

// Scores, part 1: this lane's columns of q . k for its key.
template <int DC>
PA_HD void score_lane(i64 D, int warp, int lane, const float* qs, const float* ks, Lane<DC>& st) {
  using C = Cfg<DC>;
  const int j = lane % C::KT, sub = lane / C::KT;
  const float* kr = ks + j * (D + C::SUB);
  PA_UNROLL for (int r = 0; r < C::R; ++r) st.s[r] = 0.f;
  for (i64 c = sub; c < D; c += C::SUB) {
    const float kv = kr[c];
    PA_UNROLL for (int r = 0; r < C::R; ++r) st.s[r] += qs[(warp * C::R + r) * D + c] * kv;
  }
}

// Scores, part 2 (after the SUB lanes of each key added their parts): scale and mask.
template <int DC>
PA_HD void mask_lane(float scale2, int warp, int lane, const BlockTables& tb, Lane<DC>& st) {
  using C = Cfg<DC>;
  const i64 n = tb.kpos[lane % C::KT];
  PA_UNROLL for (int r = 0; r < C::R; ++r) {
    const bool seen = n >= 0 && n <= tb.qlim[warp * C::R + r];
    st.s[r] = seen ? st.s[r] * scale2 : kNegInf;
  }
}

// Online softmax step with the tile maximum tmax[r] (the same on every lane): rescale, p of this lane's key.
template <int DC>
PA_HD void softmax_lane(int lane, const float* tmax, Lane<DC>& st) {
  using C = Cfg<DC>;
  const bool owner = lane < C::KT;  // lanes >= KT hold copies of the scores of lanes < KT
  PA_UNROLL for (int r = 0; r < C::R; ++r) {
    const float mn = nanmax(st.m[r], tmax[r]);
    float alpha = 1.f, pv = 0.f;
    if (mn != kNegInf) {
      alpha = exp2f(st.m[r] - mn);
      pv = exp2f(st.s[r] - mn);
    }
    st.m[r] = mn;
    st.p[r] = pv;
    st.l[r] = st.l[r] * alpha + (owner ? pv : 0.f);
    PA_UNROLL for (int i = 0; i < DC; ++i) st.acc[r][i] *= alpha;
  }
}

// Values: key j's p (from lane j) times its value row, into this lane's columns.
template <int DC>
PA_HD void value_lane(i64 D, int lane, int j, const float* pj, const float* vs, Lane<DC>& st) {
  using C = Cfg<DC>;
  const float* vr = vs + j * D;
  PA_UNROLL for (int i = 0; i < DC; ++i) {
    const i64 c = lane + kWarp * i;
    if (c < D) {
      const float x = vr[c];
      PA_UNROLL for (int r = 0; r < C::R; ++r) st.acc[r][i] += pj[r] * x;
    }
  }
}

// Store (after the row sums were added over the lanes): the normalised partial and the natural-log LSE.
template <int DC>
PA_HD void store_lane(const PrefixAttnParams& p, const Work& k, int warp, int lane, const BlockTables& tb,
                      const float* lsum, const Lane<DC>& st) {
  using C = Cfg<DC>;
  const i64 R = p.B * p.Hq * p.Lq;
  const i64 slot = k.prefix ? k.split : p.SP + k.split;
  PA_UNROLL for (int r = 0; r < C::R; ++r) {
    const i64 row = tb.row[warp * C::R + r];
    if (row < 0) continue;
    const bool seen = !(lsum[r] == 0.f);  // NaN counts as seen: it propagates
    const float inv = seen ? 1.f / lsum[r] : 0.f;
    float* o = mptr<float>(p.part_o) + (slot * R + row) * p.D;
    PA_UNROLL for (int i = 0; i < DC; ++i) {
      const i64 c = lane + kWarp * i;
      if (c < p.D) o[c] = seen ? st.acc[r][i] * inv : 0.f;
    }
    if (lane == 0) mptr<float>(p.part_lse)[slot * R + row] = seen ? st.m[r] * kLn2 + logf(lsum[r]) : kNegInf;
  }
}

// ---- the partial kernel ------------------------------------------------------------------------------------------

template <typename V>
__device__ __forceinline__ V shfl_xor(V v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}

template <int DC>
__global__ void __launch_bounds__(kThreads, 3) pa_partial_kernel(const PrefixAttnParams p, i64 n_items) {
  using C = Cfg<DC>;
  extern __shared__ float smem[];
  __shared__ BlockTables tb;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / kWarp, lane = tid % kWarp;
  const i64 D = p.D;
  float* qs = smem;
  float* ks = qs + C::QM * D;
  float* vs = ks + C::KT * (D + C::SUB);
  const float scale2 = p.scale * kLog2e;
  for (i64 w = blockIdx.x; w < n_items; w += gridDim.x) {
    const Work k = decode_work(p, w, C::QM);
    if (k.mb * C::QM >= k.nq) continue;  // a query block past its task's rows (uniform over the block)
    __syncthreads();  // the previous item's tables and tiles are no longer read
    rows_thread(p, k, C::QM, tid, tb);
    __syncthreads();
    queries_thread(p, C::QM, tid, tb, qs);
    Lane<DC> st;
    lane_init(st);
    // A warp whose rows are all unused (a GQA group smaller than the block) still loads tiles, computes nothing.
    const bool active = warp_active(k, C::QM, C::R, warp);
    for (i64 n0 = k.lo; n0 < k.hi; n0 += C::KT) {
      __syncthreads();  // queries stored / the previous tile consumed
      tile_dispatch<DC>(p, k, n0, tid, tb, ks, vs);
      __syncthreads();
      if (!active) continue;  // warp-uniform; nothing below synchronises the block
      score_lane<DC>(D, warp, lane, qs, ks, st);
      PA_UNROLL for (int off = C::KT; off < kWarp; off <<= 1) {
        PA_UNROLL for (int r = 0; r < C::R; ++r) st.s[r] += shfl_xor(st.s[r], off);
      }
      mask_lane<DC>(scale2, warp, lane, tb, st);
      float tmax[C::R];
      PA_UNROLL for (int r = 0; r < C::R; ++r) {
        float v = st.s[r];
        PA_UNROLL for (int off = kWarp / 2; off > 0; off >>= 1) v = nanmax(v, shfl_xor(v, off));
        tmax[r] = v;
      }
      softmax_lane<DC>(lane, tmax, st);
      for (int j = 0; j < C::KT; ++j) {
        float pj[C::R];
        PA_UNROLL for (int r = 0; r < C::R; ++r) pj[r] = __shfl_sync(0xffffffffu, st.p[r], j);
        value_lane<DC>(D, lane, j, pj, vs, st);
      }
    }
    float lsum[C::R];
    PA_UNROLL for (int r = 0; r < C::R; ++r) {
      float v = st.l[r];
      PA_UNROLL for (int off = kWarp / 2; off > 0; off >>= 1) v += shfl_xor(v, off);
      lsum[r] = v;
    }
    store_lane<DC>(p, k, warp, lane, tb, lsum, st);
  }
}

// The host emulation of one block's work item, phase by phase, shuffles lane by lane in the device's order.
template <int DC>
void partial_item_host(const PrefixAttnParams& p, const Work& k, std::vector<float>& smem, BlockTables& tb) {
  using C = Cfg<DC>;
  const i64 D = p.D;
  float* qs = smem.data();
  float* ks = qs + C::QM * D;
  float* vs = ks + C::KT * (D + C::SUB);
  const float scale2 = p.scale * kLog2e;
  for (int tid = 0; tid < kThreads; ++tid) rows_thread(p, k, C::QM, tid, tb);
  for (int tid = 0; tid < kThreads; ++tid) queries_thread(p, C::QM, tid, tb, qs);
  std::vector<Lane<DC>> st(kThreads);
  for (auto& s : st) lane_init(s);
  for (i64 n0 = k.lo; n0 < k.hi; n0 += C::KT) {
    for (int tid = 0; tid < kThreads; ++tid) tile_dispatch<DC>(p, k, n0, tid, tb, ks, vs);
    for (int warp = 0; warp < kWarps; ++warp) {
      if (!warp_active(k, C::QM, C::R, warp)) continue;
      Lane<DC>* L = &st[static_cast<std::size_t>(warp) * kWarp];
      for (int lane = 0; lane < kWarp; ++lane) score_lane<DC>(D, warp, lane, qs, ks, L[lane]);
      for (int off = C::KT; off < kWarp; off <<= 1) {
        float old[kWarp][C::R];
        for (int l = 0; l < kWarp; ++l)
          for (int r = 0; r < C::R; ++r) old[l][r] = L[l].s[r];
        for (int l = 0; l < kWarp; ++l)
          for (int r = 0; r < C::R; ++r) L[l].s[r] = old[l][r] + old[l ^ off][r];
      }
      for (int lane = 0; lane < kWarp; ++lane) mask_lane<DC>(scale2, warp, lane, tb, L[lane]);
      float tmax[kWarp][C::R];
      for (int l = 0; l < kWarp; ++l)
        for (int r = 0; r < C::R; ++r) tmax[l][r] = L[l].s[r];
      for (int off = kWarp / 2; off > 0; off >>= 1) {
        float old[kWarp][C::R];
        for (int l = 0; l < kWarp; ++l)
          for (int r = 0; r < C::R; ++r) old[l][r] = tmax[l][r];
        for (int l = 0; l < kWarp; ++l)
          for (int r = 0; r < C::R; ++r) tmax[l][r] = nanmax(old[l][r], old[l ^ off][r]);
      }
      for (int lane = 0; lane < kWarp; ++lane) softmax_lane<DC>(lane, tmax[lane], L[lane]);
      for (int j = 0; j < C::KT; ++j) {
        float pj[C::R];
        for (int r = 0; r < C::R; ++r) pj[r] = L[j].p[r];
        for (int lane = 0; lane < kWarp; ++lane) value_lane<DC>(D, lane, j, pj, vs, L[lane]);
      }
    }
  }
  for (int warp = 0; warp < kWarps; ++warp) {
    Lane<DC>* L = &st[static_cast<std::size_t>(warp) * kWarp];
    float sum[kWarp][C::R];
    for (int l = 0; l < kWarp; ++l)
      for (int r = 0; r < C::R; ++r) sum[l][r] = L[l].l[r];
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      float old[kWarp][C::R];
      for (int l = 0; l < kWarp; ++l)
        for (int r = 0; r < C::R; ++r) old[l][r] = sum[l][r];
      for (int l = 0; l < kWarp; ++l)
        for (int r = 0; r < C::R; ++r) sum[l][r] = old[l][r] + old[l ^ off][r];
    }
    for (int lane = 0; lane < kWarp; ++lane) store_lane<DC>(p, k, warp, lane, tb, sum[lane], L[lane]);
  }
}

// ---- merge ------------------------------------------------------------------------------------------------------

// The merge of n partitions with LSEs l_0 .. l_{n-1} (the reference's limits): the weight of partition s is
// merge_weight(st, l_s) -- exp(l_s - m) with m the largest LSE; 1 for a +inf partition and 0 for the others when any
// is +inf -- and its o is multiplied by weight / st.safe, and read only where the weight is not 0 (a -inf
// partition's o may hold anything). Two passes over the LSEs instead of arrays of weights: no local memory.
struct MergeStats {
  int n_inf;    // partitions with lse = +inf
  float m;      // the largest lse (0 when every lse is -inf, or when one is +inf)
  float safe;   // the sum of the weights, 1 where it is 0 (nothing seen)
  float lse;    // the merged lse
};

PA_HD float merge_weight(const MergeStats& st, float l) {
  return st.n_inf > 0 ? (l == INFINITY ? 1.f : 0.f) : expf(l - st.m);
}

template <typename ReadLse>
PA_HD MergeStats merge_stats(const ReadLse& lse_of, int n) {
  MergeStats st{0, kNegInf, 1.f, kNegInf};
  for (int s = 0; s < n; ++s) {
    const float l = lse_of(s);
    st.n_inf += l == INFINITY;
    st.m = nanmax(st.m, l);
  }
  if (st.n_inf > 0 || st.m == kNegInf) st.m = 0.f;
  float sum = 0.f;
  for (int s = 0; s < n; ++s) sum += merge_weight(st, lse_of(s));
  const bool seen = !(sum == 0.f);  // NaN counts as seen: it propagates
  st.safe = seen ? sum : 1.f;
  st.lse = st.n_inf > 0 ? INFINITY : (seen ? st.m + logf(st.safe) : kNegInf);
  return st;
}

// Decode merge, lane `lane` of the warp of query row `row`: its columns of out, and lse (lane 0).
PA_HD void merge_parts_lane(const PrefixAttnParams& p, i64 row, int lane) {
  const i64 R = p.B * p.Hq * p.Lq;
  const int n = static_cast<int>(p.SP + p.S);
  const float* ls = cptr<float>(p.part_lse) + row;
  const auto lse_of = [&](int s) { return ls[s * R]; };
  const MergeStats st = merge_stats(lse_of, n);
  for (i64 col = lane; col < p.D; col += kWarp) {
    float acc = 0.f;
    for (int s = 0; s < n; ++s) {
      const float w = merge_weight(st, lse_of(s));
      if (!(w == 0.f)) acc += cptr<float>(p.part_o)[(s * R + row) * p.D + col] * (w / st.safe);
    }
    st_float(p.out, p.dtype, row * p.D + col, acc);
  }
  if (lane == 0) mptr<float>(p.lse)[row] = st.lse;
}

__global__ void __launch_bounds__(kThreads) pa_merge_kernel(const PrefixAttnParams p) {
  const i64 R = p.B * p.Hq * p.Lq;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const i64 nw = static_cast<i64>(gridDim.x) * kWarps;
  for (i64 row = static_cast<i64>(blockIdx.x) * kWarps + threadIdx.x / kWarp; row < R; row += nw) {
    merge_parts_lane(p, row, lane);
  }
}

// merge_attention_states: offset of row r in a tensor with the block's leading sizes and the given strides.
PA_HD i64 row_offset(const MergeStatesParams& p, const std::array<i64, 4>& st, i64 r) {
  i64 off = 0;
  for (int d = 3; d >= 0; --d) {
    off += (r % p.size[d]) * st[d];
    r /= p.size[d];
  }
  return off;
}

PA_HD void merge_states_lane(const MergeStatesParams& p, i64 row, int lane) {
  const float l[2] = {ld_float(p.la, p.la_dtype, row_offset(p, p.la_s, row)),
                      ld_float(p.lb, p.lb_dtype, row_offset(p, p.lb_s, row))};
  const auto lse_of = [&](int s) { return l[s]; };
  const MergeStats st = merge_stats(lse_of, 2);
  const float wa = merge_weight(st, l[0]), wb = merge_weight(st, l[1]);
  const i64 oa = row_offset(p, p.oa_s, row), ob = row_offset(p, p.ob_s, row);
  for (i64 col = lane; col < p.D; col += kWarp) {
    float acc = 0.f;
    if (!(wa == 0.f)) acc += ld_float(p.oa, p.oa_dtype, oa + col * p.oa_sd) * (wa / st.safe);
    if (!(wb == 0.f)) acc += ld_float(p.ob, p.ob_dtype, ob + col * p.ob_sd) * (wb / st.safe);
    st_float(p.o, p.o_dtype, row * p.D + col, acc);
  }
  if (lane == 0) mptr<float>(p.lse)[row] = st.lse;
}

__global__ void __launch_bounds__(kThreads) merge_states_kernel(const MergeStatesParams p) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const i64 nw = static_cast<i64>(gridDim.x) * kWarps;
  for (i64 row = static_cast<i64>(blockIdx.x) * kWarps + threadIdx.x / kWarp; row < p.R; row += nw) {
    merge_states_lane(p, row, lane);
  }
}

// ---- launchers --------------------------------------------------------------------------------------------------

bool valid_code(int c) { return c >= 0 && c <= 2; }

int check_params(const PrefixAttnParams& p) {
  if (p.D < 1 || p.D > kPaMaxHeadDim || p.Lq < 0 || p.Lq > kPaMaxLq || p.B < 0 || p.Hkv < 1 || p.Hq < 1 ||
      p.Hq % p.Hkv != 0 || p.Lk < 0 || p.P < 0 || p.T < 1 || p.S < 1 || p.SP < 0 || p.SP + p.S > kPaMaxParts)
    return kInvalid;
  if (!valid_code(p.dtype) || !valid_code(p.p_dtype) || p.len_dtype < 0 || p.len_dtype > 1) return kInvalid;
  // an empty own cache (Lk = 0) has no storage: its pointers may be 0, and no key is read
  if (!p.q || (p.Lk > 0 && (!p.k || !p.v)) || !p.part_o || !p.part_lse || !p.out || !p.lse) return kInvalid;
  if ((p.P > 0) != (p.SP > 0) || (p.SP > 0 && (!p.pk || !p.pv))) return kInvalid;
  if (p.rows && !p.task_off) return kInvalid;
  const i64 kt = prefix_attention_key_tile(p.D);
  if (p.kchunk < kt || p.kchunk % kt != 0 || p.S * p.kchunk < p.Lk) return kInvalid;
  if (p.SP > 0 && (p.pchunk < kt || p.pchunk % kt != 0 || p.SP * p.pchunk < p.P)) return kInvalid;
  return 0;
}

template <int DC>
int run_partials(const PrefixAttnParams& p, bool host) {
  using C = Cfg<DC>;
  const i64 items = n_prefix_items(p, C::QM) + n_seq_items(p, C::QM);
  if (items == 0) return 0;
  const i64 cap = p.max_blocks > 0 ? p.max_blocks : kMaxGrid;
  const i64 grid = imin(items, cap);
  const std::size_t bytes = static_cast<std::size_t>(smem_floats<DC>(p.D)) * sizeof(float);
  if (host) {
    std::vector<float> smem(static_cast<std::size_t>(smem_floats<DC>(p.D)));
    BlockTables tb{};
    for (i64 blk = 0; blk < grid; ++blk) {
      for (i64 w = blk; w < items; w += grid) {
        const Work k = decode_work(p, w, C::QM);
        if (k.mb * C::QM >= k.nq) continue;
        partial_item_host<DC>(p, k, smem, tb);
      }
    }
    return 0;
  }
  pa_partial_kernel<DC><<<static_cast<unsigned>(grid), kThreads, bytes, as_stream(p.stream)>>>(p, items);
  return last_launch_error();
}

int run_merge(const PrefixAttnParams& p, bool host) {
  const i64 R = p.B * p.Hq * p.Lq;
  if (R == 0) return 0;
  if (host) {
    for (i64 row = 0; row < R; ++row)
      for (int lane = 0; lane < kWarp; ++lane) merge_parts_lane(p, row, lane);
    return 0;
  }
  const i64 grid = imin(cdiv(R, kWarps), kMaxGrid);
  pa_merge_kernel<<<static_cast<unsigned>(grid), kThreads, 0, as_stream(p.stream)>>>(p);
  return last_launch_error();
}

int partials(const PrefixAttnParams& p, bool host) {
  const int err = check_params(p);
  if (err) return err;
  switch (dc_of(p.D)) {
    case 2:
      return run_partials<2>(p, host);
    case 4:
      return run_partials<4>(p, host);
    case 8:
      return run_partials<8>(p, host);
    default:
      return run_partials<16>(p, host);
  }
}

int merge(const PrefixAttnParams& p, bool host) {
  const int err = check_params(p);
  return err ? err : run_merge(p, host);
}

int merge_states(const MergeStatesParams& p, bool host) {
  if (p.R < 0 || p.D < 1 || !p.oa || !p.ob || !p.la || !p.lb || !p.o || !p.lse) return kInvalid;
  if (!valid_code(p.oa_dtype) || !valid_code(p.ob_dtype) || !valid_code(p.la_dtype) || !valid_code(p.lb_dtype) ||
      !valid_code(p.o_dtype))
    return kInvalid;
  i64 rows = 1;
  for (int d = 0; d < 4; ++d) {
    if (p.size[d] < 1) return kInvalid;
    rows *= p.size[d];
  }
  if (rows != p.R) return kInvalid;
  if (p.R == 0) return 0;
  if (host) {
    for (i64 row = 0; row < p.R; ++row)
      for (int lane = 0; lane < kWarp; ++lane) merge_states_lane(p, row, lane);
    return 0;
  }
  const i64 grid = imin(cdiv(p.R, kWarps), kMaxGrid);
  merge_states_kernel<<<static_cast<unsigned>(grid), kThreads, 0, as_stream(p.stream)>>>(p);
  return last_launch_error();
}

}  // namespace

int prefix_attention_query_block(std::int64_t D) {
  switch (dc_of(D)) {
    case 2:
      return Cfg<2>::QM;
    case 4:
      return Cfg<4>::QM;
    case 8:
      return Cfg<8>::QM;
    default:
      return Cfg<16>::QM;
  }
}

int prefix_attention_key_tile(std::int64_t D) {
  switch (dc_of(D)) {
    case 2:
      return Cfg<2>::KT;
    case 4:
      return Cfg<4>::KT;
    case 8:
      return Cfg<8>::KT;
    default:
      return Cfg<16>::KT;
  }
}

int prefix_attention_partials(const PrefixAttnParams& params) { return partials(params, false); }
int prefix_attention_merge(const PrefixAttnParams& params) { return merge(params, false); }
int prefix_attention_partials_host(const PrefixAttnParams& params) { return partials(params, true); }
int prefix_attention_merge_host(const PrefixAttnParams& params) { return merge(params, true); }
int merge_attention_states(const MergeStatesParams& params) { return merge_states(params, false); }
int merge_attention_states_host(const MergeStatesParams& params) { return merge_states(params, true); }

}  // namespace reprokernels
