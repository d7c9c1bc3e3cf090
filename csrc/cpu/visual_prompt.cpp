// visual_prompt on the CPU (no resize: the image is placed at its own size). Spec: reprokernels/reference/visual_prompt.py.
//
// Both passes walk blocks of canvas rows and, inside a block, the batch in sample order. What does not depend on
// the sample (squash(delta) of a shared delta, the rows of a mask shared by the batch, the prompt m * g(delta)
// built from them) is computed once per block into L1/L2-sized buffers by vectorised row loops, so a call costs
// C*H*W squash evaluations (not B times that) and allocates nothing of delta's size: at B = 1 the former
// whole-canvas scalar precompute (std::exp per element, per-element mask tests) was 3/4 of the call. Fixed masks
// are one or two column segments per row; a tensor mask row is expanded to canvas columns once per mask row.
// Per sample, one canvas row of the output (or of the gradient) is one contiguous stream: the row loops are
// RK_CLONES functions, float16 rows are staged through float32 row buffers (half_rows.h).
//
// Backward: a block is owned by one thread, which sums the prompt term's gradient over the batch in sample order
// (shared delta) and the mask gradient over each mask cell in a fixed order (rows in order, then the kw columns),
// so every reduction has the same order for any thread count. Blocks cover whole mask rows when the mask gradient
// is asked for, and all channels of them when a one-channel mask serves C channels.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common.h"
#include "half_rows.h"
#include "kernels.h"

namespace rkcpu {
namespace {

constexpr std::int64_t elem_size(int dt) { return dt == F32 ? 4 : 2; }

// exp(x) for x in [-87, 88.3] (the caller clamps): common.h's fast_exp reduction and polynomial, but 2^n as one
// factor, which that range allows (n in [-126, 127]); fast_exp's two-factor scaling, written for the whole float
// range, is a quarter of the instructions of a vectorised sigmoid.
RK_ALWAYS_INLINE float exp_narrow(float x) {
  float n;
  const float p = exp_poly(x, &n);
  return p * bits_to_float(static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23);
}

// sigmoid = 1 / (1 + exp(-d)), about 1 ulp. Above d = 87, exp(-d) < 2^-125 and 1 + it rounds to 1, so clamping
// there changes nothing; below d = -88.3 the true value is under 5e-39 (subnormal) and 0 is written, as torch's
// 1 / (1 + inf) gives below -88.72. NaN is kept out of the float-to-int conversion and passed through.
inline float sigmoid_f(float d) {
  const bool nan = d != d;
  const float t = nan ? 0.0f : (d > 87.0f ? -87.0f : (d < -88.3f ? 88.3f : -d));
  const float s = 1.0f / (1.0f + exp_narrow(t));
  return nan ? d : (d < -88.3f ? 0.0f : s);
}

// tanh without a libm call (std::tanh does not vectorise): Cephes' tanhf, an odd polynomial below |x| = 0.625
// (where 1 - 2 / (exp(2|x|) + 1) would cancel) and that expression above; about 2 ulp. The sign is put back with
// copysign so tanh(-0) = -0. Beyond |x| = 44.15, exp(2|x|) > 2^127 and 1 - 2 / (e + 1) is exactly 1 from there
// on, so the clamp of 2|x| at 88.3 (inf included) changes nothing.
inline float tanh_f(float x) {
  const bool nan = x != x;
  const float a = std::fabs(x);
  const float z = a * a;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = a + a * z * p;
  const float a2 = nan ? 0.0f : (a > 44.15f ? 88.3f : a + a);
  const float large = 1.0f - 2.0f / (exp_narrow(a2) + 1.0f);
  return nan ? x : std::copysign(a < 0.625f ? small : large, x);
}

template <int K>
inline float dsquash(float g) {
  if constexpr (K == 1) return g * (1.0f - g);
  else if constexpr (K == 2) return 1.0f - g * g;
  else return 1.0f;
}

// dst = squash(src) (src may be dst).
RK_CLONES void squash_row(int kind, const float* src, float* dst, std::int64_t n) {
  if (kind == 1) {
#pragma omp simd
    for (std::int64_t j = 0; j < n; ++j) dst[j] = sigmoid_f(src[j]);
  } else if (kind == 2) {
#pragma omp simd
    for (std::int64_t j = 0; j < n; ++j) dst[j] = tanh_f(src[j]);
  } else if (src != dst) {
    std::memcpy(dst, src, static_cast<std::size_t>(n) * sizeof(float));
  }
}

RK_CLONES void bf16_row_to_float(const std::uint16_t* src, float* dst, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) dst[j] = bf16_to_float(src[j]);
}

RK_CLONES void float_row_to_bf16(const float* src, std::uint16_t* dst, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16(src[j]);
}

// n elements of dtype dt from base[off], base[off + stride], ... into float32.
void load_row(int dt, const void* base, std::int64_t off, std::int64_t stride, float* dst, std::int64_t n) {
  if (stride != 1) {
    for (std::int64_t j = 0; j < n; ++j) dst[j] = load_any(dt, base, off + j * stride);
  } else if (dt == F32) {
    std::memcpy(dst, static_cast<const float*>(base) + off, static_cast<std::size_t>(n) * sizeof(float));
  } else if (dt == F16) {
    f16_row_to_float(static_cast<const std::uint16_t*>(base) + off, dst, n);
  } else {
    bf16_row_to_float(static_cast<const std::uint16_t*>(base) + off, dst, n);
  }
}

// n floats to base[off..off + n) in dtype dt, rounded once.
void store_row(int dt, void* base, std::int64_t off, const float* src, std::int64_t n) {
  if (dt == F32) std::memcpy(static_cast<float*>(base) + off, src, static_cast<std::size_t>(n) * sizeof(float));
  else if (dt == F16) float_row_to_f16(src, static_cast<std::uint16_t*>(base) + off, n);
  else float_row_to_bf16(src, static_cast<std::uint16_t*>(base) + off, n);
}

// The columns of canvas row i where a fixed mask is 1 (at most two segments); 0 elsewhere.
struct Segs {
  int n = 0;
  std::int64_t lo[2] = {0, 0}, hi[2] = {0, 0};
};

Segs fixed_segs(const VisualPromptParams& p, std::int64_t i) {
  Segs s;
  auto add = [&s](std::int64_t lo, std::int64_t hi) {
    if (hi > lo) {
      s.lo[s.n] = lo;
      s.hi[s.n] = hi;
      ++s.n;
    }
  };
  const std::int64_t a = std::clamp<std::int64_t>(p.rect_left, 0, p.W);
  const std::int64_t e = std::clamp<std::int64_t>(p.rect_left + p.rect_w, a, p.W);
  const bool in_rows = i >= p.rect_top && i < p.rect_top + p.rect_h;
  if (!p.invert) {
    if (in_rows) add(a, e);
  } else if (!in_rows) {
    add(0, p.W);
  } else {
    add(0, a);
    add(e, p.W);
  }
  return s;
}

// squash(delta) along canvas row (b, c, i), on the fixed mask's segments only when segs is given (delta is not
// read where the mask is 0): buf, or delta's own row when it is float32, contiguous and not squashed.
const float* g_row(const VisualPromptParams& p, std::int64_t b, std::int64_t c, std::int64_t i, float* buf,
                   const Segs* segs) {
  const void* d = reinterpret_cast<const void*>(p.delta);
  const std::int64_t off = b * p.delta_sb + c * p.delta_sc + i * p.delta_sh;
  const bool f32_row = p.delta_dtype == F32 && p.delta_sw == 1;
  if (f32_row && p.squash == 0) return static_cast<const float*>(d) + off;
  auto part = [&](std::int64_t lo, std::int64_t hi) {
    const float* src = static_cast<const float*>(d) + off + lo;
    if (!f32_row) {
      load_row(p.delta_dtype, d, off + lo * p.delta_sw, p.delta_sw, buf + lo, hi - lo);
      src = buf + lo;
    }
    squash_row(p.squash, src, buf + lo, hi - lo);
  };
  if (segs) {
    for (int s = 0; s < segs->n; ++s) part(segs->lo[s], segs->hi[s]);
  } else {
    part(0, p.W);
  }
  return buf;
}

// The tensor mask along canvas row (b, c, i), expanded to canvas columns (nearest repeat by kw).
void mask_row(const VisualPromptParams& p, std::int64_t kh, std::int64_t kw, std::int64_t b, std::int64_t c,
              std::int64_t i, float* dst) {
  const float* m = reinterpret_cast<const float*>(p.mask) + (p.Bm == 1 ? 0 : b) * p.mask_sb +
                   (p.Cm == 1 ? 0 : c) * p.mask_sc + (i / kh) * p.mask_sh;
  for (std::int64_t wm = 0; wm < p.Wm; ++wm) {
    const float v = m[wm * p.mask_sw];
    float* o = dst + wm * kw;
    for (std::int64_t t = 0; t < kw; ++t) o[t] = v;
  }
}

// Which mask row canvas row (b, c, i) reads: rows with the same key share the expanded row.
inline std::int64_t mask_key(const VisualPromptParams& p, std::int64_t kh, std::int64_t b, std::int64_t c,
                             std::int64_t i) {
  return ((p.Bm == 1 ? 0 : b) * p.Cm + (p.Cm == 1 ? 0 : c)) * p.Hm + i / kh;
}

// pr = m * g, exactly 0 where m == 0 (delta never acts there: a NaN / inf in g changes nothing).
RK_CLONES void mask_mul_row(const float* m, const float* g, float* pr, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) pr[j] = m[j] == 0.0f ? 0.0f : m[j] * g[j];
}

// The fixed mask's prompt: g on the segments (m * g with m = 1), 0 elsewhere.
void prompt_fixed(const Segs& s, const float* g, float* pr, std::int64_t W) {
  std::fill(pr, pr + W, 0.0f);
  for (int k = 0; k < s.n; ++k) std::copy(g + s.lo[k], g + s.hi[k], pr + s.lo[k]);
}

// ------------------------------------------------------------------------------------------------ forward

// One canvas row of the forward: fill or the image row, plus the prompt row pr, clamped, normalised, stored.
struct RowFwd {
  const float* pr = nullptr;
  const void* x = nullptr;  // the image row (element 0 = canvas column j0), in DT or float32 (x_f32)
  void* out = nullptr;      // the output row, DT
  std::int64_t W = 0, j0 = 0, j1 = 0;  // image columns [j0, j1); j0 == j1: no image on this row
  float fill = 0.0f, lo = 0.0f, hi = 0.0f, mu = 0.0f, sd = 1.0f;
  int x_f32 = 0;
};
using RowFwdFn = void (*)(const RowFwd&);

template <bool PRE, bool CLAMP>
inline float finish(float canvas, float prompt, float lo, float hi, float mu, float sd) {
  float v;
  if constexpr (PRE) {
    v = canvas + prompt;
    if constexpr (CLAMP) v = v < lo ? lo : (v > hi ? hi : v);  // NaN stays NaN (both compares false)
    v = (v - mu) / sd;
  } else {
    v = (canvas - mu) / sd + prompt;
  }
  return v;
}

template <int DT, bool PRE, bool CLAMP>
RK_CLONES void fwd_row(const RowFwd& a) {
  const float* pr = a.pr;
  void* out = a.out;
  const float fill = a.fill, lo = a.lo, hi = a.hi, mu = a.mu, sd = a.sd;
  const std::int64_t j0 = a.j0, j1 = a.j1, W = a.W;
#pragma omp simd
  for (std::int64_t j = 0; j < j0; ++j) store<DT>(out, j, finish<PRE, CLAMP>(fill, pr[j], lo, hi, mu, sd));
  if (a.x_f32) {
    const float* x = static_cast<const float*>(a.x) - j0;
#pragma omp simd
    for (std::int64_t j = j0; j < j1; ++j) store<DT>(out, j, finish<PRE, CLAMP>(x[j], pr[j], lo, hi, mu, sd));
  } else {
    const void* x = a.x;
#pragma omp simd
    for (std::int64_t j = j0; j < j1; ++j)
      store<DT>(out, j, finish<PRE, CLAMP>(load<DT>(x, j - j0), pr[j], lo, hi, mu, sd));
  }
#pragma omp simd
  for (std::int64_t j = j1; j < W; ++j) store<DT>(out, j, finish<PRE, CLAMP>(fill, pr[j], lo, hi, mu, sd));
}

constexpr std::int64_t kRowsPerBlock = 16;

inline std::int64_t cdiv(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Samples per task: one chunk (the whole batch) unless the blocks alone are too few to keep every thread busy;
// each further chunk recomputes its blocks' shared rows.
inline std::int64_t batch_chunks(std::int64_t B, std::int64_t nblk, int nt) {
  return std::max<std::int64_t>(1, std::min<std::int64_t>(B, cdiv(4 * nt, std::max<std::int64_t>(nblk, 1))));
}

template <int DT>
void fwd(const VisualPromptParams& p) {
  constexpr int RDT = DT == F16 ? F32 : DT;  // float16 rows are converted around a float32 row loop
  const std::int64_t B = p.B, C = p.C, H = p.H, W = p.W, rows = C * H;
  const int nt = threads_of(p.threads);
  const float* mean = reinterpret_cast<const float*>(p.mean);
  const float* sd = reinterpret_cast<const float*>(p.stdev);
  const bool tmask = p.mask != 0, mask_b = tmask && p.Bm != 1, delta_b = p.delta_per_sample != 0;
  const bool per_sample = mask_b || delta_b;  // the prompt differs between samples
  const std::int64_t kh = tmask ? H / p.Hm : 1, kw = tmask ? W / p.Wm : 1;
  const std::int64_t RB = kRowsPerBlock, nblk = cdiv(rows, RB), nchunk = batch_chunks(B, nblk, nt);
  const void* x = reinterpret_cast<const void*>(p.x);
  void* out = reinterpret_cast<void*>(p.out);
  advise_huge(out, B * rows * W * elem_size(DT));
  const bool pre = p.order == 0, clamp = p.has_clamp != 0;
  const RowFwdFn row_fn = pre ? (clamp ? &fwd_row<RDT, true, true> : &fwd_row<RDT, true, false>)
                              : &fwd_row<RDT, false, false>;
  const bool stage_x = DT == F16 || p.x_sw != 1;
  const std::int64_t j0 = p.left, j1 = p.left + p.w;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> gblk(delta_b ? 0 : RB * W), pblk(per_sample ? 0 : RB * W);
    std::vector<float> grow(W), mrow(tmask ? W : 0), prow(W), xrow(stage_x ? p.w : 0), orow(DT == F16 ? W : 0);
    std::vector<const float*> grows(RB, nullptr);
#pragma omp for schedule(static)
    for (std::int64_t t = 0; t < nblk * nchunk; ++t) {
      const std::int64_t blk = t / nchunk, ch = t % nchunk;
      const std::int64_t r0 = blk * RB, r1 = std::min(rows, r0 + RB);
      const std::int64_t b0 = B * ch / nchunk, b1 = B * (ch + 1) / nchunk;
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t c = r / H, i = r % H;
        const Segs segs = tmask ? Segs{} : fixed_segs(p, i);
        if (!delta_b) grows[r - r0] = g_row(p, 0, c, i, gblk.data() + (r - r0) * W, tmask ? nullptr : &segs);
        if (per_sample) continue;
        float* pr = pblk.data() + (r - r0) * W;
        if (tmask) {
          mask_row(p, kh, kw, 0, c, i, mrow.data());
          mask_mul_row(mrow.data(), grows[r - r0], pr, W);
        } else {
          prompt_fixed(segs, grows[r - r0], pr, W);
        }
      }
      std::int64_t mkey = -1;
      for (std::int64_t b = b0; b < b1; ++b) {
        for (std::int64_t r = r0; r < r1; ++r) {
          const std::int64_t c = r / H, i = r % H;
          const float* pr;
          if (!per_sample) {
            pr = pblk.data() + (r - r0) * W;
          } else {
            const Segs segs = tmask ? Segs{} : fixed_segs(p, i);
            const float* g = delta_b ? g_row(p, b, c, i, grow.data(), tmask ? nullptr : &segs) : grows[r - r0];
            if (tmask) {
              const std::int64_t key = mask_key(p, kh, b, c, i);
              if (key != mkey) {
                mask_row(p, kh, kw, b, c, i, mrow.data());
                mkey = key;
              }
              mask_mul_row(mrow.data(), g, prow.data(), W);
            } else {
              prompt_fixed(segs, g, prow.data(), W);
            }
            pr = prow.data();
          }
          RowFwd a;
          a.pr = pr;
          a.W = W;
          a.fill = p.fill;
          a.lo = p.clamp_lo;
          a.hi = p.clamp_hi;
          a.mu = mean ? mean[c] : 0.0f;  // v - 0 and v / 1 are exact: no flags needed
          a.sd = sd ? sd[c] : 1.0f;
          const std::int64_t orow_off = ((b * C + c) * H + i) * W;
          a.out = DT == F16 ? static_cast<void*>(orow.data()) : static_cast<char*>(out) + orow_off * elem_size(DT);
          const std::int64_t ii = i - p.top;
          if (ii >= 0 && ii < p.h && p.w > 0) {
            a.j0 = j0;
            a.j1 = j1;
            const std::int64_t xbase = b * p.x_sb + c * p.x_sc + ii * p.x_sh;
            if (stage_x) {
              load_row(DT, x, xbase, p.x_sw, xrow.data(), p.w);
              a.x = xrow.data();
              a.x_f32 = 1;
            } else {
              a.x = static_cast<const char*>(x) + xbase * elem_size(DT);
            }
          }
          row_fn(a);
          if (DT == F16) float_row_to_f16(orow.data(), static_cast<std::uint16_t*>(out) + orow_off, W);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ backward

// One canvas row of one sample: d placed image (dx, image columns only) and the prompt term's gradient gt, added
// into acc (ADD: summed over the batch by the caller's sample loop) or written to it.
struct RowBwd {
  const void* g = nullptr;    // the output gradient row, DT, contiguous
  const void* x = nullptr;    // the image row as in RowFwd (read only with a clamp)
  void* dx = nullptr;         // the dx row (w elements, DT) or null
  const float* pm = nullptr;  // the prompt m * g(delta) of the row (read only with a clamp)
  float* acc = nullptr;
  std::int64_t W = 0, j0 = 0, j1 = 0;
  float fill = 0.0f, lo = 0.0f, hi = 0.0f, inv = 1.0f;
  int x_f32 = 0;
};
using RowBwdFn = void (*)(const RowBwd&);

// (gt, gp): the gradient w.r.t. the prompt term and w.r.t. the placed image at one element (the reference's rule;
// the clamp's pass-through is a multiplication by 0/1, so a NaN gradient stays NaN as in the reference).
template <bool PRE, bool CLAMP>
inline void grads(float go, float canvas, float pm, float lo, float hi, float inv, float& gt, float& gp) {
  const float gv = go * inv;
  if constexpr (PRE) {
    float keep = gv;
    if constexpr (CLAMP) {
      const float v = canvas + pm;
      keep = gv * ((v >= lo && v <= hi) ? 1.0f : 0.0f);
    }
    gt = keep;
    gp = keep;
  } else {
    gt = go;
    gp = gv;
  }
}

template <bool ADD>
inline void put(float* acc, std::int64_t j, float v) {
  if constexpr (ADD) acc[j] += v;
  else acc[j] = v;
}

template <int DT, bool PRE, bool CLAMP, bool ADD>
RK_CLONES void bwd_row(const RowBwd& a) {
  const void* g = a.g;
  const float* pm = a.pm;
  float* acc = a.acc;
  const float fill = a.fill, lo = a.lo, hi = a.hi, inv = a.inv;
  const std::int64_t j0 = a.j0, j1 = a.j1, W = a.W;
  auto border = [&](std::int64_t from, std::int64_t to) {
#pragma omp simd
    for (std::int64_t j = from; j < to; ++j) {
      float gt, gp;
      grads<PRE, CLAMP>(load<DT>(g, j), fill, CLAMP ? pm[j] : 0.0f, lo, hi, inv, gt, gp);
      put<ADD>(acc, j, gt);
    }
  };
  border(0, j0);
  if (j1 > j0) {
    void* dx = a.dx;
    if (a.x_f32 || !CLAMP) {
      const float* x = CLAMP ? static_cast<const float*>(a.x) - j0 : nullptr;  // read only with a clamp
#pragma omp simd
      for (std::int64_t j = j0; j < j1; ++j) {
        float gt, gp;
        grads<PRE, CLAMP>(load<DT>(g, j), CLAMP ? x[j] : 0.0f, CLAMP ? pm[j] : 0.0f, lo, hi, inv, gt, gp);
        put<ADD>(acc, j, gt);
        if (dx) store<DT>(dx, j - j0, gp);
      }
    } else {
      const void* x = a.x;
#pragma omp simd
      for (std::int64_t j = j0; j < j1; ++j) {
        float gt, gp;
        grads<PRE, CLAMP>(load<DT>(g, j), load<DT>(x, j - j0), pm[j], lo, hi, inv, gt, gp);
        put<ADD>(acc, j, gt);
        if (dx) store<DT>(dx, j - j0, gp);
      }
    }
  }
  border(j1, W);
}

// d delta of a tensor-masked row: m * g'(delta) * a, 0 where m == 0 (a: the sample's gt or the batch sum of it).
template <int K>
RK_CLONES void dd_tensor_row(const float* a, const float* m, const float* g, float* out, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) out[j] = m[j] == 0.0f ? 0.0f : a[j] * m[j] * dsquash<K>(g[j]);
}

// ... of a fixed-mask row: a * g'(delta) on the segments (a * 1 * g' is the same float), 0 elsewhere.
template <int K>
RK_CLONES void dd_fixed_seg(const float* a, const float* g, float* out, std::int64_t lo, std::int64_t hi) {
#pragma omp simd
  for (std::int64_t j = lo; j < hi; ++j) out[j] = a[j] * dsquash<K>(g[j]);
}

// ... of a shared delta under a tensor mask walked per sample (a per-sample mask, or the mask gradient asked for):
// acc = sum over b of m_b * gt_b (0 where m_b == 0), nz = whether any m_b != 0; d delta = g'(delta) * acc where nz,
// else 0 (delta not read there).
template <int K>
RK_CLONES void dd_nz_row(const float* acc, const float* nz, const float* g, float* out, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) out[j] = nz[j] == 0.0f ? 0.0f : acc[j] * dsquash<K>(g[j]);
}

RK_CLONES void acc_masked_row(const float* gt, const float* m, float* acc, float* nz, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) {
    const bool on = m[j] != 0.0f;
    acc[j] += on ? gt[j] * m[j] : 0.0f;
    nz[j] = on ? 1.0f : nz[j];
  }
}

// acc += a * b (the mask gradient's terms gt * g(delta), summed element-wise over the rows of a mask cell).
RK_CLONES void add_prod_row(float* acc, const float* a, const float* b, std::int64_t n) {
#pragma omp simd
  for (std::int64_t j = 0; j < n; ++j) acc[j] += a[j] * b[j];
}

void dd_row(int kind, const float* a, const float* m, const Segs* segs, const float* g, float* out,
            std::int64_t W) {
  if (m) {
    if (kind == 1) dd_tensor_row<1>(a, m, g, out, W);
    else if (kind == 2) dd_tensor_row<2>(a, m, g, out, W);
    else dd_tensor_row<0>(a, m, g, out, W);
    return;
  }
  std::fill(out, out + W, 0.0f);
  for (int s = 0; s < segs->n; ++s) {
    if (kind == 1) dd_fixed_seg<1>(a, g, out, segs->lo[s], segs->hi[s]);
    else if (kind == 2) dd_fixed_seg<2>(a, g, out, segs->lo[s], segs->hi[s]);
    else dd_fixed_seg<0>(a, g, out, segs->lo[s], segs->hi[s]);
  }
}

// The kw-column sums of a mask cell row (columns in order), written to Wm mask-gradient entries.
void cell_sums(const float* row, std::int64_t Wm, std::int64_t kw, float* dst) {
  for (std::int64_t wm = 0; wm < Wm; ++wm) {
    float s = 0.0f;
    for (std::int64_t t = 0; t < kw; ++t) s += row[wm * kw + t];
    dst[wm] = s;
  }
}

template <int DT>
void bwd(const VisualPromptParams& p) {
  const std::int64_t B = p.B, C = p.C, H = p.H, W = p.W, rows = C * H;
  const int nt = threads_of(p.threads);
  const bool tmask = p.mask != 0, mask_b = tmask && p.Bm != 1, delta_b = p.delta_per_sample != 0;
  const std::int64_t kh = tmask ? H / p.Hm : 1, kw = tmask ? W / p.Wm : 1;
  void* dx = reinterpret_cast<void*>(p.dx);
  void* dd = reinterpret_cast<void*>(p.ddelta);
  float* dm = tmask ? reinterpret_cast<float*>(p.dmask) : nullptr;
  if (!dx && !dd && !dm) return;
  advise_huge(dx, B * C * p.h * p.w * elem_size(DT));
  advise_huge(dd, (delta_b ? B : 1) * rows * W * elem_size(p.delta_dtype));
  // A float16 or W-strided grad goes through float32 row buffers and the float32 row code.
  const bool staged = DT == F16 || p.grad_sw != 1;
  const bool pre = p.order == 0, clamp = p.has_clamp != 0;
  // per_b: the prompt term's gradient is needed per sample, else only its batch sum: a per-sample delta or mask,
  // and the mask gradient (sum over b of gt * g, not (sum of gt) * g: an infinite g meeting gradients of both
  // signs is NaN in the reference, as here)
  const bool per_b = delta_b || mask_b || dm;
  RowBwdFn row_fn;
  if (staged) {
    row_fn = pre ? (clamp ? (per_b ? &bwd_row<F32, true, true, false> : &bwd_row<F32, true, true, true>)
                          : (per_b ? &bwd_row<F32, true, false, false> : &bwd_row<F32, true, false, true>))
                 : (per_b ? &bwd_row<F32, false, false, false> : &bwd_row<F32, false, false, true>);
  } else {
    constexpr int RDT = DT == F16 ? F32 : DT;
    row_fn = pre ? (clamp ? (per_b ? &bwd_row<RDT, true, true, false> : &bwd_row<RDT, true, true, true>)
                          : (per_b ? &bwd_row<RDT, true, false, false> : &bwd_row<RDT, true, false, true>))
                 : (per_b ? &bwd_row<RDT, false, false, false> : &bwd_row<RDT, false, false, true>);
  }
  // Rows in (c, i) order; (i, c) when a one-channel mask's gradient sums its C channels, so that a block holds
  // them all. A block is a whole number of mask cells' rows (rpp canvas rows each) when dm is asked for.
  const bool chan_inner = dm && p.Cm == 1 && C > 1;
  const std::int64_t rpp = dm ? kh * (chan_inner ? C : 1) : 1;
  const std::int64_t RB = rpp * cdiv(kRowsPerBlock, rpp), nblk = cdiv(rows, RB), ncell = RB / rpp;
  const bool reduce_b = (dd && !delta_b) || (dm && p.Bm == 1);
  const std::int64_t nchunk = reduce_b ? 1 : batch_chunks(B, nblk, nt);
  const void* x = reinterpret_cast<const void*>(p.x);
  const void* gr = reinterpret_cast<const void*>(p.grad);
  const float* stdev = reinterpret_cast<const float*>(p.stdev);
  const bool need_g = dd || dm || clamp;
#pragma omp parallel num_threads(nt)
  {
    const std::int64_t nb = RB * W;
    std::vector<float> gblk(!delta_b && need_g ? nb : 0), mblk(tmask && !mask_b ? nb : 0);
    std::vector<float> pblk(clamp && !per_b ? nb : 0), acc(nb), nz(per_b && !delta_b && dd ? nb : 0);
    std::vector<float> cells(dm ? ncell * W : 0);
    std::vector<float> gtrow(W), grow(W), mrow(W), prow(W), ddrow(W);
    std::vector<float> gbuf(staged ? W : 0), xrow(p.w), dxrow(staged ? p.w : 0);
    std::vector<const float*> grows(RB, nullptr);
#pragma omp for schedule(static)
    for (std::int64_t t = 0; t < nblk * nchunk; ++t) {
      const std::int64_t blk = t / nchunk, ch = t % nchunk;
      const std::int64_t r0 = blk * RB, r1 = std::min(rows, r0 + RB);
      const std::int64_t b0 = B * ch / nchunk, b1 = B * (ch + 1) / nchunk;
      auto rc = [&](std::int64_t r, std::int64_t& c, std::int64_t& i) {
        if (chan_inner) {
          c = r % C;
          i = r / C;
        } else {
          c = r / H;
          i = r % H;
        }
      };
      for (std::int64_t r = r0; r < r1; ++r) {
        std::int64_t c, i;
        rc(r, c, i);
        const Segs segs = tmask ? Segs{} : fixed_segs(p, i);
        if (!delta_b && need_g)
          grows[r - r0] = g_row(p, 0, c, i, gblk.data() + (r - r0) * W, tmask ? nullptr : &segs);
        if (tmask && !mask_b) mask_row(p, kh, kw, 0, c, i, mblk.data() + (r - r0) * W);
        if (clamp && !per_b) {
          float* pm = pblk.data() + (r - r0) * W;
          if (tmask) mask_mul_row(mblk.data() + (r - r0) * W, grows[r - r0], pm, W);
          else prompt_fixed(segs, grows[r - r0], pm, W);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(nz.begin(), nz.end(), 0.0f);
      std::fill(cells.begin(), cells.end(), 0.0f);
      auto flush_cells = [&](std::int64_t bm) {
        for (std::int64_t q = 0; q < (r1 - r0) / rpp; ++q) {
          const std::int64_t cell = r0 / rpp + q;  // (cm, hm) of the mask, or hm when chan_inner
          cell_sums(cells.data() + q * W, p.Wm, kw, dm + (bm * p.Cm * p.Hm + cell) * p.Wm);
        }
        std::fill(cells.begin(), cells.end(), 0.0f);
      };
      std::int64_t mkey = -1;
      for (std::int64_t b = b0; b < b1; ++b) {
        for (std::int64_t r = r0; r < r1; ++r) {
          std::int64_t c, i;
          rc(r, c, i);
          const std::int64_t ii = i - p.top;
          const Segs segs = tmask ? Segs{} : fixed_segs(p, i);
          const float* g = nullptr;
          if (need_g) g = delta_b ? g_row(p, b, c, i, grow.data(), tmask ? nullptr : &segs) : grows[r - r0];
          const float* m = nullptr;
          if (tmask && mask_b) {
            const std::int64_t key = mask_key(p, kh, b, c, i);
            if (key != mkey) {
              mask_row(p, kh, kw, b, c, i, mrow.data());
              mkey = key;
            }
            m = mrow.data();
          } else if (tmask) {
            m = mblk.data() + (r - r0) * W;
          }
          RowBwd a;
          if (clamp) {
            if (!per_b) {
              a.pm = pblk.data() + (r - r0) * W;
            } else {
              if (tmask) mask_mul_row(m, g, prow.data(), W);
              else prompt_fixed(segs, g, prow.data(), W);
              a.pm = prow.data();
            }
          }
          a.acc = per_b ? gtrow.data() : acc.data() + (r - r0) * W;
          a.W = W;
          a.fill = p.fill;
          a.lo = p.clamp_lo;
          a.hi = p.clamp_hi;
          a.inv = stdev ? 1.0f / stdev[c] : 1.0f;
          const std::int64_t gbase = b * p.grad_sb + c * p.grad_sc + i * p.grad_sh;
          if (staged) {
            load_row(DT, gr, gbase, p.grad_sw, gbuf.data(), W);
            a.g = gbuf.data();
          } else {
            a.g = static_cast<const char*>(gr) + gbase * elem_size(DT);
          }
          const bool img_row = ii >= 0 && ii < p.h && p.w > 0;
          const std::int64_t dxoff = ((b * C + c) * p.h + ii) * p.w;
          if (img_row) {
            a.j0 = p.left;
            a.j1 = p.left + p.w;
            const std::int64_t xbase = b * p.x_sb + c * p.x_sc + ii * p.x_sh;
            if (clamp && (staged || p.x_sw != 1)) {
              load_row(DT, x, xbase, p.x_sw, xrow.data(), p.w);
              a.x = xrow.data();
              a.x_f32 = 1;
            } else if (clamp) {
              a.x = static_cast<const char*>(x) + xbase * elem_size(DT);
            }
            if (dx) a.dx = staged ? static_cast<void*>(dxrow.data()) : static_cast<char*>(dx) + dxoff * elem_size(DT);
          }
          row_fn(a);
          if (img_row && dx && staged) store_row(DT, dx, dxoff, dxrow.data(), p.w);
          if (!per_b) continue;
          if (dd && delta_b) {
            dd_row(p.squash, gtrow.data(), m, &segs, g, ddrow.data(), W);
            store_row(p.delta_dtype, dd, ((b * C + c) * H + i) * W, ddrow.data(), W);
          } else if (dd) {
            acc_masked_row(gtrow.data(), m, acc.data() + (r - r0) * W, nz.data() + (r - r0) * W, W);
          }
          if (dm) add_prod_row(cells.data() + ((r - r0) / rpp) * W, gtrow.data(), g, W);
        }
        if (dm && p.Bm != 1) flush_cells(b);
      }
      if (dm && p.Bm == 1) flush_cells(0);
      if (dd && !delta_b) {
        for (std::int64_t r = r0; r < r1; ++r) {
          std::int64_t c, i;
          rc(r, c, i);
          const float* ar = acc.data() + (r - r0) * W;
          if (per_b) {  // acc and nz by acc_masked_row
            if (p.squash == 1) dd_nz_row<1>(ar, nz.data() + (r - r0) * W, grows[r - r0], ddrow.data(), W);
            else if (p.squash == 2) dd_nz_row<2>(ar, nz.data() + (r - r0) * W, grows[r - r0], ddrow.data(), W);
            else dd_nz_row<0>(ar, nz.data() + (r - r0) * W, grows[r - r0], ddrow.data(), W);
          } else {
            const Segs segs = tmask ? Segs{} : fixed_segs(p, i);
            dd_row(p.squash, ar, tmask ? mblk.data() + (r - r0) * W : nullptr, &segs, grows[r - r0], ddrow.data(),
                   W);
          }
          store_row(p.delta_dtype, dd, (c * H + i) * W, ddrow.data(), W);
        }
      }
    }
  }
}

bool bad(const VisualPromptParams& p) {
  return p.x_dtype < 0 || p.x_dtype > 2 || p.delta_dtype < 0 || p.delta_dtype > 2 || p.squash < 0 ||
         p.squash > 2 || p.order < 0 || p.order > 1 || !p.delta || (!p.x && p.B * p.C * p.h * p.w > 0) || p.B < 0 ||
         p.C < 0 || p.H < 1 || p.W < 1 || p.h < 0 || p.w < 0 || p.top < 0 || p.left < 0 || p.top + p.h > p.H ||
         p.left + p.w > p.W ||
         (p.mask && (p.Hm < 1 || p.Wm < 1 || p.H % p.Hm || p.W % p.Wm));
}

}  // namespace

int visual_prompt_fwd(const VisualPromptParams& p) {
  if (bad(p) || !p.out) return 1;
  switch (p.x_dtype) {
    case F32: fwd<F32>(p); break;
    case F16: fwd<F16>(p); break;
    default: fwd<BF16>(p); break;
  }
  return 0;
}

int visual_prompt_bwd(const VisualPromptParams& p) {
  if (bad(p) || !p.grad) return 1;
  switch (p.x_dtype) {
    case F32: bwd<F32>(p); break;
    case F16: bwd<F16>(p); break;
    default: bwd<BF16>(p); break;
  }
  return 0;
}

}  // namespace rkcpu

// Test hook (tests/test_cpu_visual_prompt_fast.py, through ctypes; not part of the pybind11 module): converts n
// float16 <-> float32 values with half_rows.h (vector = 1, the dispatched instructions) or with common.h's scalar
// code (vector = 0), so the two can be compared bit for bit. to_half = 0: src uint16, dst float; 1: the reverse.
extern "C" __attribute__((visibility("default"))) int rk_half_rows_hook(int to_half, int vector, const void* src,
                                                                         void* dst, std::int64_t n) {
  using namespace rkcpu;
  if (!src || !dst || n < 0) return 1;
  if (to_half) {
    if (vector) float_row_to_f16(static_cast<const float*>(src), static_cast<std::uint16_t*>(dst), n);
    else half_rows_detail::float_to_f16_scalar(static_cast<const float*>(src), static_cast<std::uint16_t*>(dst), n);
  } else {
    if (vector) f16_row_to_float(static_cast<const std::uint16_t*>(src), static_cast<float*>(dst), n);
    else half_rows_detail::f16_to_float_scalar(static_cast<const std::uint16_t*>(src), static_cast<float*>(dst), n);
  }
  return 0;
}
