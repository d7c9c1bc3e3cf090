// label_histogram on the CPU. count: the argmax of each row (torch.argmax's rule: first maximum, first NaN
// wins) by one thread per row, then the counts added in sample order (integers: exact). prob: each row's softmax
// statistics (vectorised max and float32 sum of exp) and its top-k cut (the k-th largest value and how many ties at
// it are kept, lowest source first; top-1 is the first maximum, no selection), then one thread per block of sources
// adds the kept probabilities in sample order into float64 sums, stored as float32 into the running statistic. Spec: reprokernels/reference/label_histogram.py.
#include <algorithm>
#include <functional>
#include <vector>

#include "common.h"
#include "half_rows.h"
#include "kernels.h"

namespace rkcpu {
namespace {

// torch.argmax of one row: the first maximum, or the first NaN if any. One vectorised sweep for the max and a NaN
// flag (no early exit, which would keep the loop scalar), then a sweep in blocks of 64 for the first element equal
// to it (or the first NaN): each block is tested with a vector reduction, and only the block holding it element by
// element.
template <int DT>
RK_CLONES std::int64_t row_argmax(const void* x, std::int64_t base, std::int64_t sk, std::int64_t K) {
  std::int32_t nan = 0;
  const float m = row_max<DT>(x, base, sk, K, &nan);
  constexpr std::int64_t KB = 64;
  for (std::int64_t k0 = 0; k0 < K; k0 += KB) {
    const std::int64_t k1 = k0 + KB < K ? k0 + KB : K;
    std::int32_t hit = 0;
#pragma omp simd reduction(| : hit)
    for (std::int64_t k = k0; k < k1; ++k) {
      const float v = load<DT>(x, base + k * sk);
      hit |= nan ? v != v : v == m;
    }
    if (!hit) continue;
    for (std::int64_t k = k0; k < k1; ++k) {
      const float v = load<DT>(x, base + k * sk);
      if (nan ? v != v : v == m) return k;
    }
  }
  return 0;  // not reached: the maximum (or a NaN) is an element of the row
}

// Softmax statistics of one row for weight="prob": the max (NaN ignored), whether the row holds a NaN, and
// sum exp(x - max) in float32 (two vectorised sweeps over a row that stays in cache).
template <int DT>
RK_CLONES void row_softmax_stats(const void* x, std::int64_t base, std::int64_t sk, std::int64_t K, float* m_out,
                                 float* s_out, bool* nan_out) {
  std::int32_t nan = 0;
  const float m = row_max<DT>(x, base, sk, K, &nan);
  *m_out = m;
  *s_out = row_sum_exp<DT>(x, base, sk, K, m);
  *nan_out = nan != 0;
}

// A contiguous float16 row as float32 in buf (the CPU's conversion instructions, half_rows.h), or null when the
// row is read in place: the integer half conversion in every sweep made float16 2-3x slower than bfloat16.
template <int DT>
const float* staged_row(const LabelHistogramParams& p, std::int64_t b, std::vector<float>& buf) {
  if (DT != F16 || p.x_sk != 1) return nullptr;
  buf.resize(static_cast<std::size_t>(p.K));
  f16_row_to_float(reinterpret_cast<const std::uint16_t*>(p.x) + b * p.x_sb, buf.data(), p.K);
  return buf.data();
}

template <int DT>
void run(const LabelHistogramParams& p) {
  const void* x = reinterpret_cast<const void*>(p.x);
  const void* tg = reinterpret_cast<const void*>(p.targets);
  float* out = reinterpret_cast<float*>(p.out);
  const std::int64_t B = p.B, K = p.K, T = p.T;
  const int nt = threads_of(p.threads);
  std::vector<std::int64_t> y(B);
  for (std::int64_t b = 0; b < B; ++b) y[b] = load_index(p.target_dtype, tg, b * p.t_s);
  auto in_range = [&](std::int64_t s, std::int64_t t) { return s >= 0 && s < K && t >= 0 && t < T; };
  if (p.weight == 0) {
    std::vector<std::int64_t> pred(B);
    if (p.preds) {
      for (std::int64_t b = 0; b < B; ++b) pred[b] = load_index(p.pred_dtype, x, b * p.x_sb);
    } else {
#pragma omp parallel num_threads(nt)
      {
        std::vector<float> buf;
#pragma omp for schedule(static)
        for (std::int64_t b = 0; b < B; ++b) {
          const float* r = staged_row<DT>(p, b, buf);
          pred[b] = r ? row_argmax<F32>(r, 0, 1, K) : row_argmax<DT>(x, b * p.x_sb, p.x_sk, K);
        }
      }
    }
    for (std::int64_t b = 0; b < B; ++b)
      if (in_range(pred[b], y[b])) out[pred[b] * p.out_sk + y[b] * p.out_st] += 1.0f;
    return;
  }
  // prob: per row max, sum, and the top-k cut. Top-1 without a NaN in the row (BLM+'s case) needs no selection:
  // the kept source is the first maximum and its probability is exactly 1 / sum (exp(0) = 1), so such a row adds
  // inv[b] at (argmax, y[b]) and is never read again.
  std::vector<float> mx(B), thr(B);
  std::vector<double> inv(B);
  std::vector<std::int64_t> last(B);  // the highest source index kept among the ties at thr
  std::vector<std::uint8_t> top1(B);  // the row takes the top-1 shortcut
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> row, tmp, buf;
#pragma omp for schedule(static)
    for (std::int64_t b = 0; b < B; ++b) {
      float m, s;
      bool nan;
      const float* r = staged_row<DT>(p, b, buf);
      if (r)
        row_softmax_stats<F32>(r, 0, 1, K, &m, &s, &nan);
      else
        row_softmax_stats<DT>(x, b * p.x_sb, p.x_sk, K, &m, &s, &nan);
      mx[b] = m;
      inv[b] = 1.0 / static_cast<double>(s);
      top1[b] = p.topk == 1 && !nan;
      if (top1[b]) {
        thr[b] = m;
        last[b] = r ? row_argmax<F32>(r, 0, 1, K) : row_argmax<DT>(x, b * p.x_sb, p.x_sk, K);
      } else if (p.topk > 0) {
        row.resize(static_cast<std::size_t>(K));
        for (std::int64_t k = 0; k < K; ++k) row[k] = load<DT>(x, b * p.x_sb + k * p.x_sk);
        tmp.assign(row.begin(), row.end());
        std::nth_element(tmp.begin(), tmp.begin() + (p.topk - 1), tmp.end(), std::greater<float>());
        const float kth = tmp[p.topk - 1];
        std::int64_t above = 0;
        for (std::int64_t k = 0; k < K; ++k) above += row[k] > kth;
        std::int64_t quota = p.topk - above, lk = -1;
        for (std::int64_t k = 0; k < K && quota > 0; ++k)
          if (row[k] == kth) {
            lk = k;
            --quota;
          }
        thr[b] = kth;
        last[b] = lk;
      }
    }
  }
  constexpr std::int64_t KB = 64;
  const std::int64_t nblk = (K + KB - 1) / KB;
#pragma omp parallel num_threads(nt)
  {
    std::vector<double> acc(KB * T);
#pragma omp for schedule(static)
    for (std::int64_t blk = 0; blk < nblk; ++blk) {
      const std::int64_t k0 = blk * KB, k1 = std::min(K, k0 + KB);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (std::int64_t b = 0; b < B; ++b) {  // sample order: every cell's sum is deterministic
        const std::int64_t t = y[b];
        if (t < 0 || t >= T) continue;
        if (top1[b]) {
          if (last[b] >= k0 && last[b] < k1) acc[(last[b] - k0) * T + t] += inv[b];
          continue;
        }
        for (std::int64_t k = k0; k < k1; ++k) {
          const float v = load<DT>(x, b * p.x_sb + k * p.x_sk);
          if (p.topk > 0 && !(v > thr[b] || (v == thr[b] && k <= last[b]))) continue;
          acc[(k - k0) * T + t] += static_cast<double>(fast_exp(v - mx[b])) * inv[b];
        }
      }
      for (std::int64_t k = k0; k < k1; ++k)
        for (std::int64_t t = 0; t < T; ++t) {
          const double a = acc[(k - k0) * T + t];
          if (a != 0.0) out[k * p.out_sk + t * p.out_st] += static_cast<float>(a);
        }
    }
  }
}

}  // namespace

int label_histogram_accumulate(const LabelHistogramParams& p) {
  if (p.x_dtype < 0 || p.x_dtype > 2 || p.weight < 0 || p.weight > 1 || p.B < 0 || p.K < 1 || p.T < 1 ||
      !p.out || (p.B && (!p.x || !p.targets)) || p.topk < 0 || p.topk > p.K)
    return 1;
  switch (p.x_dtype) {
    case F32: run<F32>(p); break;
    case F16: run<F16>(p); break;
    default: run<BF16>(p); break;
  }
  return 0;
}

}  // namespace rkcpu
