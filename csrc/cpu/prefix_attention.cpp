// prefix_attention's forward on the CPU for decoding and short prefills (at most 16 queries per row, no backward:
// the op layer keeps gradients on composite). Work item: one kv head and a block of batch rows that share its
// prefix (a shared (Hkv, P, d) prefix; rows of a task table are items of one row), with every query of the rows
// and the head's GQA group (nb x G x Lq rows); with fewer items than threads, an item's rows are split into parts.
// The prefix keys are read once per item (part), not once per row as the concatenation does.
//
// Per item: keys are staged in chunks as float32 and transposed (d x keys), so a query's scores over a chunk are
// d FMAs on vectors of keys (no horizontal sums); the scores of every key the query sees (all P prefix keys, then
// its own visible keys) are kept, softmax-ed by the row's max, and the values accumulated in float32 rows
// (FMAs over d, keys in order). Unseen own keys (kv_lengths, key_padding_mask) are never read; keys hidden only by
// causal are real data and are read and then dropped. Each output row's sums run over d and over keys in a fixed
// order whatever the blocking or thread count: the same bits for any thread count.
// Spec: reprokernels/reference/prefix_attention.py.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "half_rows.h"
#include "kernels.h"

namespace rkcpu {
namespace {

constexpr std::int64_t kChunk = 64;  // keys staged (transposed) at a time: d x 64 floats, within L1 at d <= 64

// D values of dtype dt at element offset off (unit stride) -> floats; round_dt >= 0: each rounded to that dtype on
// the way (a prefix beside q of a narrower dtype: the contract's one rounding to q's dtype).
void load_row(int dt, const void* base, std::int64_t off, std::int64_t D, float* dst, int round_dt) {
  if (dt == F32) {
    std::memcpy(dst, static_cast<const float*>(base) + off, static_cast<std::size_t>(D) * 4);
  } else if (dt == F16) {
    f16_row_to_float(static_cast<const std::uint16_t*>(base) + off, dst, D);
  } else {
    const std::uint16_t* s = static_cast<const std::uint16_t*>(base) + off;
    for (std::int64_t d = 0; d < D; ++d) dst[d] = bf16_to_float(s[d]);
  }
  if (round_dt == F16) {
    for (std::int64_t d = 0; d < D; ++d) dst[d] = f16_to_float(float_to_f16(dst[d]));
  } else if (round_dt == BF16) {
    for (std::int64_t d = 0; d < D; ++d) dst[d] = bf16_to_float(float_to_bf16(dst[d]));
  }
}

// s[j] = scale * sum_d q[d] kt[d][j] for the nc keys of a transposed chunk (row stride kChunk), d ascending.
RK_CLONES void chunk_scores(const float* q, const float* kt, std::int64_t D, std::int64_t nc, float scale,
                            float* s) {
  float acc[kChunk];
#pragma omp simd
  for (std::int64_t j = 0; j < nc; ++j) acc[j] = 0.0f;
  for (std::int64_t d = 0; d < D; ++d) {
    const float qd = q[d];
    const float* row = kt + d * kChunk;
#pragma omp simd
    for (std::int64_t j = 0; j < nc; ++j) acc[j] += qd * row[j];
  }
#pragma omp simd
  for (std::int64_t j = 0; j < nc; ++j) s[j] = acc[j] * scale;
}

// acc[d] += sum_j w[j] v[j][d] over the n staged value rows of a chunk (row stride D), j ascending.
RK_CLONES void chunk_values(const float* w, const float* v, std::int64_t n, std::int64_t D, float* acc) {
  for (std::int64_t j = 0; j < n; ++j) {
    const float wj = w[j];
    const float* row = v + j * D;
#pragma omp simd
    for (std::int64_t d = 0; d < D; ++d) acc[d] += wj * row[d];
  }
}

// Register tiles of 4 query rows (rows r of q at stride D, of s and w at stride S, of acc at stride D): each
// element's sum runs in the same order as in the one-row functions above (d ascending for a score, keys ascending
// for an output), so a row's bits do not depend on which tile computed it; the tiles only share the loads of a
// key or value row among 4 queries and keep the sums in registers (16 keys or 16 features of 4 rows, as 8-float
// vectors: GCC kept arrays of them on the stack, a store and a load per FMA).
typedef float v8f __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4), may_alias));  // an unaligned view of 8 floats
#define RK_LOAD8(p) (*reinterpret_cast<const v8u*>(p))
#define RK_STORE8(p, x) (*reinterpret_cast<v8u*>(p) = (x))

RK_CLONES void chunk_scores4(const float* q, std::int64_t D, const float* kt, std::int64_t nc, float scale, float* s,
                             std::int64_t S) {
  std::int64_t j0 = 0;
  for (; j0 + 16 <= nc; j0 += 16) {
    v8f a0 = {}, b0 = {}, a1 = {}, b1 = {}, a2 = {}, b2 = {}, a3 = {}, b3 = {};
    for (std::int64_t d = 0; d < D; ++d) {
      const float* kr = kt + d * kChunk + j0;
      const v8f k0 = RK_LOAD8(kr), k1 = RK_LOAD8(kr + 8);
      const float q0 = q[d], q1 = q[D + d], q2 = q[2 * D + d], q3 = q[3 * D + d];
      a0 += q0 * k0;
      b0 += q0 * k1;
      a1 += q1 * k0;
      b1 += q1 * k1;
      a2 += q2 * k0;
      b2 += q2 * k1;
      a3 += q3 * k0;
      b3 += q3 * k1;
    }
    RK_STORE8(s + j0, a0 * scale);
    RK_STORE8(s + j0 + 8, b0 * scale);
    RK_STORE8(s + S + j0, a1 * scale);
    RK_STORE8(s + S + j0 + 8, b1 * scale);
    RK_STORE8(s + 2 * S + j0, a2 * scale);
    RK_STORE8(s + 2 * S + j0 + 8, b2 * scale);
    RK_STORE8(s + 3 * S + j0, a3 * scale);
    RK_STORE8(s + 3 * S + j0 + 8, b3 * scale);
  }
  if (j0 < nc)
    for (int r = 0; r < 4; ++r) {
      for (std::int64_t j = j0; j < nc; ++j) {
        float a = 0.0f;
        for (std::int64_t d = 0; d < D; ++d) a += q[r * D + d] * kt[d * kChunk + j];
        s[r * S + j] = a * scale;
      }
    }
}

RK_CLONES void chunk_values4(const float* w, std::int64_t S, const float* v, std::int64_t n, std::int64_t D,
                             float* acc) {
  std::int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) {
    float* c0 = acc + d0;
    float* c1 = acc + D + d0;
    float* c2 = acc + 2 * D + d0;
    float* c3 = acc + 3 * D + d0;
    v8f a0 = RK_LOAD8(c0), b0 = RK_LOAD8(c0 + 8), a1 = RK_LOAD8(c1), b1 = RK_LOAD8(c1 + 8);
    v8f a2 = RK_LOAD8(c2), b2 = RK_LOAD8(c2 + 8), a3 = RK_LOAD8(c3), b3 = RK_LOAD8(c3 + 8);
    for (std::int64_t j = 0; j < n; ++j) {
      const float* vr = v + j * D + d0;
      const v8f x0 = RK_LOAD8(vr), x1 = RK_LOAD8(vr + 8);
      const float w0 = w[j], w1 = w[S + j], w2 = w[2 * S + j], w3 = w[3 * S + j];
      a0 += w0 * x0;
      b0 += w0 * x1;
      a1 += w1 * x0;
      b1 += w1 * x1;
      a2 += w2 * x0;
      b2 += w2 * x1;
      a3 += w3 * x0;
      b3 += w3 * x1;
    }
    RK_STORE8(c0, a0);
    RK_STORE8(c0 + 8, b0);
    RK_STORE8(c1, a1);
    RK_STORE8(c1 + 8, b1);
    RK_STORE8(c2, a2);
    RK_STORE8(c2 + 8, b2);
    RK_STORE8(c3, a3);
    RK_STORE8(c3 + 8, b3);
  }
  if (d0 < D)
    for (int r = 0; r < 4; ++r)
      for (std::int64_t j = 0; j < n; ++j)
        for (std::int64_t d = d0; d < D; ++d) acc[r * D + d] += w[r * S + j] * v[j * D + d];
}

// Rows [r0, r1) of the item against a staged chunk: 4 at a time, then one by one.
void rows_scores(const float* qf, std::int64_t r0, std::int64_t r1, std::int64_t D, const float* kt, std::int64_t nc,
                 float scale, float* sc, std::int64_t S, std::int64_t col) {
  std::int64_t r = r0;
  for (; r + 4 <= r1; r += 4) chunk_scores4(qf + r * D, D, kt, nc, scale, sc + r * S + col, S);
  for (; r < r1; ++r) chunk_scores(qf + r * D, kt, D, nc, scale, sc + r * S + col);
}

void rows_values(const float* sc, std::int64_t S, std::int64_t col, std::int64_t r0, std::int64_t r1, const float* vs,
                 std::int64_t n, std::int64_t D, float* acc) {
  std::int64_t r = r0;
  for (; r + 4 <= r1; r += 4) chunk_values4(sc + r * S + col, S, vs, n, D, acc + r * D);
  for (; r < r1; ++r) chunk_values(sc + r * S + col, vs, n, D, acc + r * D);
}

// s[j] = exp(s[j] - m) over n scores; returns their sum (in j order, lanes of a fixed width).
RK_CLONES float exp_shift(float* s, std::int64_t n, float m) {
  float l = 0.0f;
#pragma omp simd reduction(+ : l)
  for (std::int64_t j = 0; j < n; ++j) {
    const float e = fast_exp(s[j] - m);
    s[j] = e;
    l += e;
  }
  return l;
}

struct Item {
  const PrefixAttnParams& p;
  int round_dt;  // the prefix's rounding to q's dtype, or -1
  std::int64_t G, S;  // query heads per kv head, score row length (P + Lk)

  // The transposed chunk of n keys: key j of the chunk is the row at element offset off(j) of base.
  template <class Off>
  void stage_keys(int dt, const void* base, Off off, std::int64_t n, int rnd, float* kt, float* tmp) const {
    for (std::int64_t j = 0; j < n; ++j) {
      load_row(dt, base, off(j), p.D, tmp, rnd);
      for (std::int64_t d = 0; d < p.D; ++d) kt[d * kChunk + j] = tmp[d];
    }
  }

  // Rows [r_lo, r_hi) of the item's R = nb x G x Lq query rows (r = (row in block, head in group, query)): a part
  // of an item when items are fewer than threads, or when the item's scores would outgrow the score budget. A
  // row's result does not depend on the part it is computed in. Buffers hold the part's rows (local index r - r_lo).
  void run(std::int64_t hkv, std::int64_t b0, std::int64_t r_lo, std::int64_t r_hi) const {
    const std::int64_t D = p.D, P = p.P, Lq = p.Lq, Lk = p.Lk, GL = G * Lq, NR = r_hi - r_lo;
    const std::int64_t bi_lo = r_lo / GL, bi_hi = (r_hi + GL - 1) / GL;  // the batch rows the part touches
    const void* q = reinterpret_cast<const void*>(p.q);
    std::vector<float>& qf = scratch<float, 0>(static_cast<std::size_t>(NR * D));
    std::vector<float>& sc = scratch<float, 1>(static_cast<std::size_t>(NR * S));
    std::vector<float>& kt = scratch<float, 2>(static_cast<std::size_t>(D * kChunk));
    std::vector<float>& tmp = scratch<float, 3>(static_cast<std::size_t>(D));
    std::vector<float>& acc = scratch<float, 4>(static_cast<std::size_t>(NR * D));
    // a padding mask's visible keys, per batch row of the part (without one, the visible keys are 0 .. len - 1)
    std::vector<std::int32_t>& own = scratch<std::int32_t, 5>(p.kpm ? static_cast<std::size_t>((bi_hi - bi_lo) * Lk)
                                                                      : 0);
    std::vector<std::int64_t>& seen = scratch<std::int64_t, 7>(static_cast<std::size_t>(NR));  // own keys seen
    std::vector<std::int64_t>& most = scratch<std::int64_t, 8>(static_cast<std::size_t>(bi_hi - bi_lo));
    std::vector<float>& lsum = scratch<float, 8>(static_cast<std::size_t>(NR));
    const auto key = [&](std::int64_t bi, std::int64_t j) -> std::int64_t {
      return p.kpm ? own[(bi - bi_lo) * Lk + j] : j;
    };
    for (std::int64_t r = r_lo; r < r_hi; ++r) {  // q's rows
      const std::int64_t bi = r / GL, g = (r / Lq) % G, i = r % Lq;
      const std::int64_t b = b0 + bi, h = hkv * G + g;
      load_row(p.dtype, q, b * p.q_sb + h * p.q_sh + i * p.q_sl, D, qf.data() + (r - r_lo) * D, -1);
    }
    for (std::int64_t bi = bi_lo; bi < bi_hi; ++bi) {  // each batch row's visible own keys, ascending
      const std::int64_t b = b0 + bi;
      std::int64_t n = 0;
      if (p.kpm) {
        std::int32_t* o = own.data() + (bi - bi_lo) * Lk;
        const std::uint8_t* m = reinterpret_cast<const std::uint8_t*>(p.kpm);
        for (std::int64_t j = 0; j < Lk; ++j)
          if (m[b * p.kpm_sb + j * p.kpm_sl]) o[n++] = static_cast<std::int32_t>(j);
      } else {
        n = Lk;
        if (p.kv_len) n = std::min(std::max<std::int64_t>(load_index(p.len_dtype, reinterpret_cast<const void*>(
                                                                          p.kv_len), b * p.len_s), 0), Lk);
      }
      std::int64_t& mb = most[bi - bi_lo];
      mb = 0;
      for (std::int64_t r = std::max(bi * GL, r_lo); r < std::min((bi + 1) * GL, r_hi); ++r) {
        // causal, bottom-right aligned: query i sees own keys j <= i + Lk - Lq (the first c of the visible ones)
        const std::int64_t lim = r % Lq + Lk - Lq;
        std::int64_t c = n;
        if (p.causal) {
          if (p.kpm) {
            const std::int32_t* o = own.data() + (bi - bi_lo) * Lk;
            c = std::upper_bound(o, o + n, lim) - o;
          } else {
            c = std::min(n, std::max<std::int64_t>(lim + 1, 0));
          }
        }
        seen[r - r_lo] = c;
        mb = std::max(mb, c);
      }
    }
    // scores over the prefix: one staging of each chunk for every row of the part
    const std::int64_t t = P && p.task ? load_index(p.task_dtype, reinterpret_cast<const void*>(p.task), b0 * p.task_s)
                                       : 0;
    if (P) {
      const std::int64_t base = t * p.pk_st + hkv * p.pk_sh;
      for (std::int64_t c0 = 0; c0 < P; c0 += kChunk) {
        const std::int64_t nc = std::min(kChunk, P - c0);
        stage_keys(p.p_dtype, reinterpret_cast<const void*>(p.pk), [&](std::int64_t j) {
          return base + (c0 + j) * p.pk_sl; }, nc, round_dt, kt.data(), tmp.data());
        rows_scores(qf.data(), 0, NR, D, kt.data(), nc, p.scale, sc.data(), S, c0);
      }
    }
    // scores over each batch row's own visible keys (those hidden only by causal included, dropped below)
    for (std::int64_t bi = bi_lo; bi < bi_hi; ++bi) {
      const std::int64_t b = b0 + bi, n = most[bi - bi_lo];
      const std::int64_t base = b * p.k_sb + hkv * p.k_sh;
      const std::int64_t r0 = std::max(bi * GL, r_lo) - r_lo, r1 = std::min((bi + 1) * GL, r_hi) - r_lo;
      for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
        const std::int64_t nc = std::min(kChunk, n - c0);
        stage_keys(p.dtype, reinterpret_cast<const void*>(p.k), [&](std::int64_t j) {
          return base + key(bi, c0 + j) * p.k_sl; }, nc, -1, kt.data(), tmp.data());
        rows_scores(qf.data(), r0, r1, D, kt.data(), nc, p.scale, sc.data(), S, P + c0);
      }
    }
    // softmax of each row over the keys it sees (prefix, then its first `seen` own keys): probabilities in place;
    // keys hidden from a row only by causal weigh 0 in the value sums (their values are real, finite data), so the
    // rows of a batch row share one sweep over its most-seen keys
    float* lse = reinterpret_cast<float*>(p.lse);
    for (std::int64_t r = r_lo; r < r_hi; ++r) {
      const std::int64_t bi = r / GL, g = (r / Lq) % G, i = r % Lq, x = r - r_lo;
      const std::int64_t row = ((b0 + bi) * p.Hq + hkv * G + g) * Lq + i;
      float* s = sc.data() + x * S;
      const std::int64_t n = P + seen[x];
      std::fill(s + n, s + P + most[bi - bi_lo], 0.0f);
      float m = -INFINITY;
      for (std::int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;  // (NaN scores skipped: they propagate below)
      if (n == 0 || m == -INFINITY) {  // nothing seen (or every score -inf): out 0, lse -inf
        std::fill(s, s + n, 0.0f);
        lsum[x] = 0.0f;
        lse[row] = -INFINITY;
        continue;
      }
      if (m == INFINITY) m = 0.0f;  // (an inf score: exp gives inf / NaN, as the reference's softmax does)
      const float l = exp_shift(s, n, m);
      lsum[x] = l;
      lse[row] = m + std::log(l);
    }
    // values: each staged chunk of the prefix's for every row of the part, then each batch row's own
    std::fill(acc.begin(), acc.begin() + NR * D, 0.0f);
    std::vector<float>& vs = scratch<float, 9>(static_cast<std::size_t>(kChunk * D));
    if (P) {
      const std::int64_t base = t * p.pv_st + hkv * p.pv_sh;
      for (std::int64_t c0 = 0; c0 < P; c0 += kChunk) {
        const std::int64_t nc = std::min(kChunk, P - c0);
        for (std::int64_t j = 0; j < nc; ++j)
          load_row(p.p_dtype, reinterpret_cast<const void*>(p.pv), base + (c0 + j) * p.pv_sl, D, vs.data() + j * D,
                   round_dt);
        rows_values(sc.data(), S, c0, 0, NR, vs.data(), nc, D, acc.data());
      }
    }
    for (std::int64_t bi = bi_lo; bi < bi_hi; ++bi) {
      const std::int64_t b = b0 + bi, n = most[bi - bi_lo];
      const std::int64_t r0 = std::max(bi * GL, r_lo) - r_lo, r1 = std::min((bi + 1) * GL, r_hi) - r_lo;
      for (std::int64_t c0 = 0; c0 < n; c0 += kChunk) {
        const std::int64_t nc = std::min(kChunk, n - c0);
        for (std::int64_t j = 0; j < nc; ++j)
          load_row(p.dtype, reinterpret_cast<const void*>(p.v), b * p.v_sb + hkv * p.v_sh + key(bi, c0 + j) * p.v_sl,
                   D, vs.data() + j * D, -1);
        rows_values(sc.data(), S, P + c0, r0, r1, vs.data(), nc, D, acc.data());
      }
    }
    void* out = reinterpret_cast<void*>(p.out);
    for (std::int64_t r = r_lo; r < r_hi; ++r) {
      const std::int64_t bi = r / GL, g = (r / Lq) % G, i = r % Lq, x = r - r_lo;
      const std::int64_t row = ((b0 + bi) * p.Hq + hkv * G + g) * Lq + i;
      const float l = lsum[x];
      const float* a = acc.data() + x * D;
      for (std::int64_t d = 0; d < D; ++d) store_any(p.dtype, out, row * D + d, l > 0.0f || l != l ? a[d] / l : 0.0f);
    }
  }
};

}  // namespace

int prefix_attention_fwd(const PrefixAttnParams& p) {
  const auto code_ok = [](std::int32_t c) { return c >= F32 && c <= BF16; };
  if (!code_ok(p.dtype) || (p.P && !code_ok(p.p_dtype)) || p.D < 1 || p.Hkv < 1 || p.Hq % p.Hkv ||
      p.rows_per_item < 1 || (p.task && p.rows_per_item != 1) || p.Lk > INT32_MAX)
    return 1;
  if (p.check_index) {
    if (p.task && !index_within(p.task, p.task_dtype, p.B, 1, p.task_s, 1, 0, p.T - 1)) return kIndexError;
    if (p.kv_len && !index_within(p.kv_len, p.len_dtype, p.B, 1, p.len_s, 1, 0, p.Lk)) return kIndexError + 1;
  }
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0) return 0;
  if (!p.q || !p.out || !p.lse || (p.Lk && (!p.k || !p.v)) || (p.P && (!p.pk || !p.pv))) return 1;
  const std::int64_t G = p.Hq / p.Hkv, nb = p.rows_per_item;
  const std::int64_t blocks = (p.B + nb - 1) / nb;
  const int round_dt = p.P && p.p_dtype != p.dtype && p.dtype != F32 ? p.dtype : -1;
  // fewer items than threads (one kv head and one batch row, say): each item's query rows split into parts of at
  // least 8 rows, so every thread has work (a row's result does not depend on the split)
  // An item's scores (its query rows x (P + Lk) floats) are split into parts of at most score_budget floats too.
  const int nt = threads_of(p.threads);
  const std::int64_t items = p.Hkv * blocks, R = std::min(nb, p.B) * G * p.Lq, S = p.P + p.Lk;
  std::int64_t parts =
      items >= nt ? 1 : std::max<std::int64_t>(1, std::min<std::int64_t>((nt + items - 1) / items, R / 8));
  if (p.score_budget > 0 && R * S > p.score_budget)
    parts = std::max(parts, (R * S + p.score_budget - 1) / p.score_budget);
  parts = std::min(parts, R);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (std::int64_t it = 0; it < items * parts; ++it) {
    const std::int64_t item = it / parts, part = it % parts;
    const std::int64_t hkv = item % p.Hkv, b0 = (item / p.Hkv) * nb;
    const std::int64_t n = std::min(nb, p.B - b0), Ri = n * G * p.Lq;
    const Item work{p, round_dt, G, S};
    const std::int64_t r_lo = part * Ri / parts, r_hi = (part + 1) * Ri / parts;
    if (r_lo < r_hi) work.run(hkv, b0, r_lo, r_hi);  // (the last block may have fewer rows than parts)
  }
  return 0;
}

}  // namespace rkcpu
