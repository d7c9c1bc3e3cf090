// label_map on the CPU: one thread per row (rows split statically across threads), each row read once for its
// softmax statistics (max, then sum of exp in a second sweep while the row is still in cache) and only the
// mapped columns read again. The softmax is never materialised. Spec: reprokernels/reference/label_map.py.
#include <algorithm>
#include <vector>

#include "common.h"
#include "gemm_tile.h"
#include "half_rows.h"
#include "kernels.h"

namespace rkcpu {
namespace {

// Row statistics (max, log sum exp(x - max)) of one row, float32. Two sweeps over a row that stays in cache.
template <int DT>
RK_CLONES void row_stats(const void* x, std::int64_t base, std::int64_t sk, std::int64_t K, float* m_out,
                         float* ls_out) {
  std::int32_t nan = 0;
  float m = row_max<DT>(x, base, sk, K, &nan);
  if (nan) m = NAN;  // torch's max propagates NaN
  const float shift = (m == -INFINITY) ? 0.0f : m;
  *m_out = m;
  *ls_out = std::log(row_sum_exp<DT>(x, base, sk, K, shift));
}

// 16-bit rows are staged through a float32 row buffer (one conversion sweep, then the float32 sweeps on a row in
// L1/L2): converting in every sweep made the bf16/fp16 kernels slower than the float32 one on half the bytes.
// float16: the CPU's conversion instructions (half_rows.h); bfloat16 converts by a shift in any vector loop.
template <int DT>
RK_CLONES void row_to_float(const void* x, std::int64_t base, std::int64_t sk, std::int64_t K, float* dst) {
  if (DT == F16 && sk == 1) {
    f16_row_to_float(static_cast<const std::uint16_t*>(x) + base, dst, K);
  } else if (sk == 1) {
#pragma omp simd
    for (std::int64_t k = 0; k < K; ++k) dst[k] = load<DT>(x, base + k);
  } else {
    for (std::int64_t k = 0; k < K; ++k) dst[k] = load<DT>(x, base + k * sk);
  }
}

template <int DT>
RK_CLONES void row_from_float(const float* src, std::int64_t K, void* dst, std::int64_t obase) {
  if (DT == F16) {
    float_row_to_f16(src, static_cast<std::uint16_t*>(dst) + obase, K);
    return;
  }
#pragma omp simd
  for (std::int64_t k = 0; k < K; ++k) store<DT>(dst, obase + k, src[k]);
}

std::int64_t map_at(const LabelMapParams& p, std::int64_t t, std::int64_t j) {
  const void* mp = reinterpret_cast<const void*>(p.mapping);
  return p.map_dtype == 0 ? static_cast<const std::int64_t*>(mp)[t * p.map_st + j * p.map_sm]
                          : static_cast<const std::int32_t*>(mp)[t * p.map_st + j * p.map_sm];
}

// Per target: the weight of each real entry (1 for sum, 1/count for mean, as the reference's index_weights).
std::vector<float> target_weights(const LabelMapParams& p) {
  std::vector<float> w(p.T, 0.0f);
#pragma omp parallel for schedule(static) num_threads(p.T * p.M >= (1 << 14) ? threads_of(p.threads) : 1)
  for (std::int64_t t = 0; t < p.T; ++t) {
    std::int64_t n = 0;
    for (std::int64_t j = 0; j < p.M; ++j) n += map_at(p, t, j) >= 0;
    w[t] = p.reduce == 1 ? 1.0f : (n > 0 ? 1.0f / static_cast<float>(n) : 0.0f);
  }
  return w;
}

// The mapping's entries in (t, j) order, read once: their sources (-1 where there is none, or out of range) and
// weights (the target's, 0 for no source: such an entry's value, 0 or a finite transform of 0, adds +0.0 as the
// reference's masked sum does). A pass over the whole mapping (CLIP's 32,157 entries took longer than a row's
// gather), so the targets are split across the threads.
void entry_table(const LabelMapParams& p, const std::vector<float>& w, std::int64_t* src, float* we) {
#pragma omp parallel for schedule(static) num_threads(p.T * p.M >= (1 << 14) ? threads_of(p.threads) : 1)
  for (std::int64_t t = 0; t < p.T; ++t)
    for (std::int64_t j = 0; j < p.M; ++j) {
      const std::int64_t k = map_at(p, t, j);
      const bool none = k < 0 || k >= p.K;  // -1: no source; out of range: never read
      src[t * p.M + j] = none ? -1 : k;
      we[t * p.M + j] = none ? 0.0f : w[t];
    }
}

inline float transform(int input, float v, float m, float ls) {
  if (input == 1) return fast_exp(v - m - ls);
  if (input == 2) return (v - m) - ls;
  return v;
}

// The row's (max, log-sum) for the softmax inputs, also saved in lse for the backward.
template <int DT>
inline void saved_row_stats(const LabelMapParams& p, std::int64_t b, float* m, float* ls) {
  row_stats<DT>(reinterpret_cast<const void*>(p.x), b * p.x_sb, p.x_sk, p.K, m, ls);
  reinterpret_cast<float*>(p.lse)[2 * b] = *m;
  reinterpret_cast<float*>(p.lse)[2 * b + 1] = *ls;
}

// f(v) of n gathered values in place: identity, softmax or log-softmax from the row's (max, log-sum).
RK_CLONES void transform_entries(int input, float* v, std::int64_t n, float m, float ls) {
  if (input == 1) {
#pragma omp simd
    for (std::int64_t e = 0; e < n; ++e) v[e] = fast_exp(v[e] - m - ls);
  } else if (input == 2) {
#pragma omp simd
    for (std::int64_t e = 0; e < n; ++e) v[e] = (v[e] - m) - ls;
  }
}

// val[e] = row[src[e]], 0 where src[e] is not in [0, K): a gather the avx512f / avx2 clones vectorise (the index
// is clamped into the row for the load, so no lane reads outside it, and the select drops it).
RK_CLONES void gather_entries(const float* row, std::int64_t K, const std::int64_t* src, std::int64_t E,
                              float* val) {
#pragma omp simd
  for (std::int64_t e = 0; e < E; ++e) {
    const bool none = src[e] < 0 || src[e] >= K;
    const float v = row[none ? 0 : src[e]];
    val[e] = none ? 0.0f : v;
  }
}

template <int DT>
void index_fwd(const LabelMapParams& p) {
  const void* x = reinterpret_cast<const void*>(p.x);
  void* out = reinterpret_cast<void*>(p.out);
  const std::vector<float> w = target_weights(p);
  const int odt = p.input == 0 ? DT : F32;
  const std::int64_t E = p.T * p.M;
  // The logits as they are, from a contiguous int64 mapping: the gather reads the mapping itself and an entry
  // without a source gathers 0, so each target's sum times its weight is the entry-weighted sum bit for bit; a
  // copy of the mapping was as much work as a row's gather at small batches. Else the entry table.
  const bool map_direct = p.input == 0 && p.map_dtype == 0 && p.map_sm == 1 && p.map_st == p.M;
  std::vector<std::int64_t>& src = scratch<std::int64_t, 0>(map_direct ? 0 : static_cast<std::size_t>(E));
  std::vector<float>& we = scratch<float, 1>(map_direct ? 0 : static_cast<std::size_t>(E));
  if (!map_direct) entry_table(p, w, src.data(), we.data());
  const std::int64_t* srcp = map_direct ? reinterpret_cast<const std::int64_t*>(p.mapping) : src.data();
  // A 16-bit row is staged as float32 (one conversion sweep) when the softmax statistics read all of it, and any
  // row when the mapping gathers much of it in no order (CLIP's 81 templates x 397 classes of 32,157 columns): one
  // sequential sweep the prefetcher follows, then the gather from L1/L2 (gathering from memory took longer than
  // torch.compile's whole kernel).
  const bool staged = (DT != F32 && p.input != 0) || (p.input == 0 && E * 4 >= p.K);
  const bool direct = DT == F32 && p.x_sk == 1;  // gather straight from a contiguous float32 row
#pragma omp parallel num_threads(threads_of(p.threads))
  {
    // (slots 2 and 3: a pool thread may also be the calling thread, which holds slots 0 and 1)
    std::vector<float>& val = scratch<float, 2>(static_cast<std::size_t>(E));
    std::vector<float>& xrow = scratch<float, 3>(staged ? static_cast<std::size_t>(p.K) : 0);
#pragma omp for schedule(static)
    for (std::int64_t b = 0; b < p.B; ++b) {
      const std::int64_t base = b * p.x_sb;
      float m = 0.0f, ls = 0.0f;
      if (staged) row_to_float<DT>(x, base, p.x_sk, p.K, xrow.data());
      if (staged && p.input != 0) {
        row_stats<F32>(xrow.data(), 0, 1, p.K, &m, &ls);
        reinterpret_cast<float*>(p.lse)[2 * b] = m;
        reinterpret_cast<float*>(p.lse)[2 * b + 1] = ls;
      } else if (p.input != 0) {
        saved_row_stats<DT>(p, b, &m, &ls);
      }
      // gather the mapped logits, then transform them in one vectorisable sweep (a scalar exp per entry cost
      // ~17 ns: BAR's 1000 entries per row took longer than eager's whole softmax)
      if (staged || direct)
        gather_entries(staged ? xrow.data() : static_cast<const float*>(x) + base, p.K, srcp, E, val.data());
      else
        for (std::int64_t e = 0; e < E; ++e)
          val[e] = srcp[e] < 0 || srcp[e] >= p.K ? 0.0f : load<DT>(x, base + srcp[e] * p.x_sk);
      transform_entries(p.input, val.data(), E, m, ls);
      for (std::int64_t t = 0; t < p.T; ++t) {
        const float* v = val.data() + t * p.M;
        // lanes of partial sums (a fixed order for a given M, whatever the thread count): one dependent add
        // per entry made CLIP's 81-entry targets latency-bound
        float acc = 0.0f;
        if (map_direct) {
          const float wt = w[t];
#pragma omp simd reduction(+ : acc)
          for (std::int64_t j = 0; j < p.M; ++j) acc += v[j] * wt;
        } else {
          const float* wt = we.data() + t * p.M;
#pragma omp simd reduction(+ : acc)
          for (std::int64_t j = 0; j < p.M; ++j) acc += v[j] * wt[j];
        }
        store_any(odt, out, b * p.T + t, acc);
      }
    }
  }
}

// d x from the row's logits x and c = d out / d f (null: c = 0, a column no target reads): probs p (c - S),
// log_probs c - p S, with p = softmax(x) from the saved (max, log-sum) and S as the caller's. out may be x or c.
RK_CLONES void softmax_grads(int input, const float* x, const float* c, float* out, std::int64_t n, float m,
                             float ls, float S) {
  if (input == 1 && c) {
#pragma omp simd
    for (std::int64_t k = 0; k < n; ++k) out[k] = fast_exp(x[k] - m - ls) * (c[k] - S);
  } else if (input == 1) {
#pragma omp simd
    for (std::int64_t k = 0; k < n; ++k) out[k] = fast_exp(x[k] - m - ls) * (0.0f - S);
  } else if (c) {
#pragma omp simd
    for (std::int64_t k = 0; k < n; ++k) out[k] = c[k] - fast_exp(x[k] - m - ls) * S;
  } else {
#pragma omp simd
    for (std::int64_t k = 0; k < n; ++k) out[k] = 0.0f - fast_exp(x[k] - m - ls) * S;
  }
}

template <int DT>
void index_bwd(const LabelMapParams& p) {
  const void* x = reinterpret_cast<const void*>(p.x);
  const float* lse = reinterpret_cast<const float*>(p.lse);
  const float* saved = reinterpret_cast<const float*>(p.out);
  const void* g = reinterpret_cast<const void*>(p.grad);
  void* dx = reinterpret_cast<void*>(p.dx);
  const std::vector<float> w = target_weights(p);
  const std::int64_t E = p.T * p.M, K = p.K;
  std::vector<std::int64_t>& src = scratch<std::int64_t, 0>(static_cast<std::size_t>(E));
  std::vector<float>& we = scratch<float, 1>(static_cast<std::size_t>(E));
  entry_table(p, w, src.data(), we.data());
  std::vector<float> tw(p.T, 0.0f);  // sum of a target's entry weights (log_probs' S), in entry order
  for (std::int64_t t = 0; t < p.T; ++t) {
    float acc = 0.0f;  // (a local: through memory, each add waited for the previous store)
    for (std::int64_t j = 0; j < p.M; ++j)
      if (src[t * p.M + j] >= 0) acc += we[t * p.M + j];
    tw[t] = acc;
  }
  advise_huge(dx, p.B * K * (DT == F32 ? 4 : 2));
  // Each row's c = d out / d f is scattered entry by entry in (t, j) order, so a column's contributions add in the
  // reference's index_add_ order (no inverse table: building and sorting one for CLIP's 32,157 entries cost more
  // than the rows at small batches). Logits: d x = c, scattered onto a zeroed row (the float32 output row itself).
  // Softmax inputs with a sparse
  // mapping (E * 8 < K: a verbalizer's 40 entries in a 128,256-token vocabulary): c lives only at the mapped
  // columns (reset, then scattered, in a K-sized buffer nobody zeroes), the row's one dense sweep writes every
  // column's d x as if unmapped, and the mapped columns are then recomputed with their c (a repeated column gets the
  // same value each time): one pass over the row. A dense mapping (BAR's 1,000 entries in 1,000 columns): c
  // scattered onto a zeroed row and the sweep applied to it, cheaper than compacting the entries. The same values.
  const bool in_place = DT == F32 && p.input == 0;
  const bool sparse = E * 8 < K;
  const bool out_f32 = DT == F32;  // d x written straight into the output row; 16-bit: through a float32 row
#pragma omp parallel num_threads(threads_of(p.threads))
  {
    std::vector<float>& gv = scratch<float, 2>(static_cast<std::size_t>(p.T));
    std::vector<float>& crow = scratch<float, 3>(in_place ? 0 : static_cast<std::size_t>(K));
    std::vector<float>& xrow = scratch<float, 4>(
        p.input != 0 && (DT != F32 || p.x_sk != 1) ? static_cast<std::size_t>(K) : 0);
    std::vector<float>& drow = scratch<float, 5>(p.input != 0 && !out_f32 ? static_cast<std::size_t>(K) : 0);
    std::vector<float>& xs = scratch<float, 6>(p.input != 0 ? static_cast<std::size_t>(E) : 0);
    std::vector<float>& cs = scratch<float, 7>(p.input != 0 ? static_cast<std::size_t>(E) : 0);
    std::vector<std::int64_t>& ks = scratch<std::int64_t, 8>(p.input != 0 ? static_cast<std::size_t>(E) : 0);
#pragma omp for schedule(static)
    for (std::int64_t b = 0; b < p.B; ++b) {
      const std::int64_t base = b * p.x_sb, obase = b * K;
      for (std::int64_t t = 0; t < p.T; ++t) gv[t] = load_any(p.grad_dtype, g, b * p.grad_sb + t * p.grad_st);
      float* c = in_place ? static_cast<float*>(dx) + obase : crow.data();
      auto scatter = [&] {  // (t, j) order: the reference's index_add_ order per column
        for (std::int64_t t = 0; t < p.T; ++t)
          for (std::int64_t j = 0; j < p.M; ++j)
            if (src[t * p.M + j] >= 0) c[src[t * p.M + j]] += gv[t] * we[t * p.M + j];
      };
      if (p.input == 0) {
        std::fill(c, c + K, 0.0f);
        scatter();
        if (!in_place) row_from_float<DT>(c, K, dx, obase);
        continue;
      }
      const float m = lse[2 * b], ls = lse[2 * b + 1];
      float S = 0.0f;
      for (std::int64_t t = 0; t < p.T; ++t) S += gv[t] * (p.input == 1 ? saved[b * p.T + t] : tw[t]);
      if (sparse) {
        for (std::int64_t e = 0; e < E; ++e)
          if (src[e] >= 0) c[src[e]] = 0.0f;
      } else {
        std::fill(c, c + K, 0.0f);
      }
      scatter();
      const float* xr = static_cast<const float*>(x) + base;  // a contiguous float32 row, read in place
      if (DT != F32 || p.x_sk != 1) {
        row_to_float<DT>(x, base, p.x_sk, K, xrow.data());
        xr = xrow.data();
      }
      if (!sparse) {
        softmax_grads(p.input, xr, c, c, K, m, ls, S);
        row_from_float<DT>(c, K, dx, obase);
        continue;
      }
      float* d = out_f32 ? static_cast<float*>(dx) + obase : drow.data();
      softmax_grads(p.input, xr, nullptr, d, K, m, ls, S);
      std::int64_t n = 0;
      for (std::int64_t e = 0; e < E; ++e)
        if (src[e] >= 0) {
          ks[n] = src[e];
          xs[n] = xr[src[e]];
          cs[n++] = c[src[e]];
        }
      softmax_grads(p.input, xs.data(), cs.data(), xs.data(), n, m, ls, S);
      for (std::int64_t u = 0; u < n; ++u) d[ks[u]] = xs[u];
      if (!out_f32) row_from_float<DT>(d, K, dx, obase);
    }
  }
}

// A dense (K, T) mapping: out = f(x) W as the packed, blocked register-tile GEMM of gemm_tile.h into a float32
// (B, T) product, then stored in the output's dtype. Rows are read in place (float32, contiguous, logits as they
// are) or converted block by block into float32 and transformed (softmax inputs: every row's statistics first, in
// one parallel sweep, saved for the backward).
template <int DT>
void dense_fwd(const LabelMapParams& p) {
  const GemmTiles& gt = gemm_tiles();
  const void* x = reinterpret_cast<const void*>(p.x);
  const float* W = reinterpret_cast<const float*>(p.w);  // (K, T) float32 contiguous
  void* out = reinterpret_cast<void*>(p.out);
  float* lse = reinterpret_cast<float*>(p.lse);
  const std::int64_t B = p.B, K = p.K, T = p.T;
  const int nt = threads_of(p.threads);
  if (p.input != 0) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (std::int64_t b = 0; b < B; ++b) {
      std::vector<float>& row = scratch<float, 2>(DT != F32 || p.x_sk != 1 ? static_cast<std::size_t>(K) : 0);
      if (DT != F32 || p.x_sk != 1) {
        row_to_float<DT>(x, b * p.x_sb, p.x_sk, K, row.data());
        row_stats<F32>(row.data(), 0, 1, K, &lse[2 * b], &lse[2 * b + 1]);
      } else {
        row_stats<F32>(x, b * p.x_sb, 1, K, &lse[2 * b], &lse[2 * b + 1]);
      }
    }
  }
  const bool rows_in_place = DT == F32 && p.x_sk == 1 && p.input == 0;
  const auto rows_a = [&](std::int64_t b, std::int64_t k0, std::int64_t k1, float* buf) -> const float* {
    if (rows_in_place) return static_cast<const float*>(x) + b * p.x_sb + k0;
    row_to_float<DT>(x, b * p.x_sb + k0 * p.x_sk, p.x_sk, k1 - k0, buf);
    if (p.input != 0) transform_entries(p.input, buf, k1 - k0, lse[2 * b], lse[2 * b + 1]);
    return buf;
  };
  const std::int64_t pw = 16 * gt.max_nv;
  const auto pack_b = [&](std::int64_t k0, std::int64_t k1, std::int64_t j0, float* dst) {
    const std::int64_t w = std::min(pw, T - j0);
    for (std::int64_t k = k0; k < k1; ++k) {
      float* d = dst + (k - k0) * pw;
      std::memcpy(d, W + k * T + j0, static_cast<std::size_t>(w) * sizeof(float));
      std::fill(d + w, d + pw, 0.0f);
    }
  };
  const auto store = [&](std::int64_t b0, std::int64_t nr, std::int64_t t0, std::int64_t t1, const float* c,
                         std::int64_t ldc) {
    for (std::int64_t r = 0; r < nr; ++r)
      for (std::int64_t t = t0; t < t1; ++t) store_any(p.out_dtype, out, (b0 + r) * T + t, c[r * ldc + t - t0]);
  };
  gemm_blocked(gt, B, T, K, nt, pack_b, rows_a, store, W, T);
}

// d x = f'(c) with c = grad W^T: the blocked GEMM of gemm_tile.h with A = grad (as float32) and B = W^T, packed
// from W block by block (no whole transposed copy: CLIP's is 51 MB); the softmax gradient and the store run on
// each finished block.
template <int DT>
void dense_bwd(const LabelMapParams& p) {
  const void* x = reinterpret_cast<const void*>(p.x);
  const float* W = reinterpret_cast<const float*>(p.w);
  const float* lse = reinterpret_cast<const float*>(p.lse);
  const float* saved = reinterpret_cast<const float*>(p.out);
  const void* g = reinterpret_cast<const void*>(p.grad);
  const std::int64_t B = p.B, K = p.K, T = p.T;
  const int nt = threads_of(p.threads);
  // grad as float32 (B, T) once: it is read K times
  std::vector<float> gf(B * T);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) gf[b * T + t] = load_any(p.grad_dtype, g, b * p.grad_sb + t * p.grad_st);
  if (p.dx) {
    void* dx = reinterpret_cast<void*>(p.dx);
    const GemmTiles& gt = gemm_tiles();
    // S_b = sum_t grad_bt d out_bt / d f: the saved probabilities' weights (probs), W's column sums (log_probs)
    std::vector<float> S(p.input != 0 ? B : 0, 0.0f);
    if (p.input != 0) {
      std::vector<float> colsum(T, 0.0f);
      if (p.input == 2)
        for (std::int64_t k = 0; k < K; ++k)
          for (std::int64_t t = 0; t < T; ++t) colsum[t] += W[k * T + t];
      for (std::int64_t b = 0; b < B; ++b) {
        const float* gb = gf.data() + b * T;
        float s = 0.0f;
        for (std::int64_t t = 0; t < T; ++t) s += gb[t] * (p.input == 1 ? saved[b * T + t] : colsum[t]);
        S[b] = s;
      }
    }
    const std::int64_t pw = 16 * gt.max_nv;
    const auto pack_wt = [&](std::int64_t t0, std::int64_t t1, std::int64_t k0, float* dst) {
      for (std::int64_t j = 0; j < pw; ++j) {
        if (k0 + j < K)
          for (std::int64_t t = t0; t < t1; ++t) dst[(t - t0) * pw + j] = W[(k0 + j) * T + t];
        else
          for (std::int64_t t = t0; t < t1; ++t) dst[(t - t0) * pw + j] = 0.0f;
      }
    };
    const auto rows_grad = [&](std::int64_t b, std::int64_t t0, std::int64_t, float*) -> const float* {
      return gf.data() + b * T + t0;
    };
    const auto finish = [&](std::int64_t b0, std::int64_t nr, std::int64_t k0, std::int64_t k1, float* c,
                            std::int64_t ldc) {
      const std::int64_t w = k1 - k0;
      float* xs = scratch<float, 3>(p.input != 0 ? static_cast<std::size_t>(w) : 0).data();
      for (std::int64_t r = 0; r < nr; ++r) {
        const std::int64_t b = b0 + r;
        float* cr = c + r * ldc;
        if (p.input != 0) {
          row_to_float<DT>(x, b * p.x_sb + k0 * p.x_sk, p.x_sk, w, xs);
          softmax_grads(p.input, xs, cr, cr, w, lse[2 * b], lse[2 * b + 1], S[b]);
        }
        if (DT == F32)
          std::memcpy(static_cast<float*>(dx) + b * K + k0, cr, static_cast<std::size_t>(w) * 4);
        else
          row_from_float<DT>(cr, w, dx, b * K + k0);
      }
    };
    advise_huge(dx, B * K * (DT == F32 ? 4 : 2));
    gemm_blocked(gt, B, K, T, nt, pack_wt, rows_grad, finish);
  }
  if (p.dw) {
    void* dw = reinterpret_cast<void*>(p.dw);
    constexpr std::int64_t KB = 64;  // sources per work item; each sums over the batch in sample order
    const std::int64_t nblk = (K + KB - 1) / KB;
#pragma omp parallel num_threads(nt)
    {
      std::vector<float> acc(KB * T);
#pragma omp for schedule(static)
      for (std::int64_t blk = 0; blk < nblk; ++blk) {
        const std::int64_t k0 = blk * KB, k1 = std::min(K, k0 + KB);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (std::int64_t b = 0; b < B; ++b) {
          const float m = p.input ? lse[2 * b] : 0.0f, ls = p.input ? lse[2 * b + 1] : 0.0f;
          const float* gb = gf.data() + b * T;
          for (std::int64_t k = k0; k < k1; ++k) {
            const float f = transform(p.input, load<DT>(x, b * p.x_sb + k * p.x_sk), m, ls);
            float* a = acc.data() + (k - k0) * T;
#pragma omp simd
            for (std::int64_t t = 0; t < T; ++t) a[t] += f * gb[t];
          }
        }
        for (std::int64_t k = k0; k < k1; ++k)
          for (std::int64_t t = 0; t < T; ++t) store_any(p.dw_dtype, dw, k * T + t, acc[(k - k0) * T + t]);
      }
    }
  }
}

bool bad(const LabelMapParams& p) {
  return p.x_dtype < 0 || p.x_dtype > 2 || p.input < 0 || p.input > 2 || p.B < 0 || p.K < 0 || p.T < 0 ||
         (p.B > 0 && p.K > 0 && !p.x);
}

}  // namespace

#define RK_DISPATCH(fn, p)       \
  switch ((p).x_dtype) {         \
    case F32: fn<F32>(p); break; \
    case F16: fn<F16>(p); break; \
    default: fn<BF16>(p); break; \
  }

int label_map_fwd(const LabelMapParams& p) {
  if (bad(p) || (p.B && p.T && !p.out) || (p.input && p.B && !p.lse) || (p.M && p.T && !p.mapping) ||
      p.map_dtype < 0 || p.map_dtype > 1)
    return 1;
  if (p.check_index && !index_within(p.mapping, p.map_dtype, p.T, p.M, p.map_st, p.map_sm, -1, p.K - 1))
    return kIndexError;
  RK_DISPATCH(index_fwd, p);
  return 0;
}

int label_map_bwd(const LabelMapParams& p) {
  if (bad(p) || (p.B && p.K && !p.dx) || (p.input && p.B && !p.lse) || (p.input == 1 && p.B && p.T && !p.out) ||
      (p.B && p.T && !p.grad) || (p.M && p.T && !p.mapping))
    return 1;
  RK_DISPATCH(index_bwd, p);
  return 0;
}

int label_map_dense_fwd(const LabelMapParams& p) {
  if (bad(p) || (p.B && p.T && !p.out) || (p.input && p.B && !p.lse) || (p.K && p.T && !p.w)) return 1;
  RK_DISPATCH(dense_fwd, p);
  return 0;
}

int label_map_dense_bwd(const LabelMapParams& p) {
  if (bad(p) || (p.input && p.B && !p.lse) || (p.input == 1 && p.B && p.T && !p.out) || (p.K && p.T && !p.w) ||
      (p.B && p.T && !p.grad))
    return 1;
  RK_DISPATCH(dense_bwd, p);
  return 0;
}

}  // namespace rkcpu
