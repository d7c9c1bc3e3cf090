// visual_prompt on the CPU (no resize: the image is placed at its own size). Work is split by canvas rows.
// Forward: with a shared delta and a mask shared by the batch, the prompt m * g(delta) is computed once per call
// (C x H x W floats), then every row is fill/image + prompt -> clamp -> normalise in three branch-free segments.
// Backward: one thread per (channel, canvas row) walks the batch in sample order, so the shared delta's gradient
// is summed in a fixed order; the mask gradient is a second pass, one thread per mask row, in a fixed order too.
// Spec: reprokernels/reference/visual_prompt.py.
#include <algorithm>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace rkcpu {
namespace {

inline float squash(int kind, float d) {
  if (kind == 1) return 1.0f / (1.0f + std::exp(-d));
  if (kind == 2) return std::tanh(d);
  return d;
}

struct Ctx {
  const VisualPromptParams& p;
  const float* mean;
  const float* stdev;
  const float* G;  // squash(delta) (C, H, W) for a shared delta, else null
  std::int64_t kh, kw;
  bool mask_shared;  // the mask does not depend on b

  float g_at(std::int64_t b, std::int64_t c, std::int64_t i, std::int64_t j) const {
    if (G) return G[(c * p.H + i) * p.W + j];
    const float d = load_any(p.delta_dtype, reinterpret_cast<const void*>(p.delta),
                             b * p.delta_sb + c * p.delta_sc + i * p.delta_sh + j * p.delta_sw);
    return squash(p.squash, d);
  }
  float m_at(std::int64_t b, std::int64_t c, std::int64_t i, std::int64_t j) const {
    if (p.mask) {
      const float* m = reinterpret_cast<const float*>(p.mask);
      const std::int64_t bm = p.Bm == 1 ? 0 : b, cm = p.Cm == 1 ? 0 : c;
      return m[bm * p.mask_sb + cm * p.mask_sc + (i / kh) * p.mask_sh + (j / kw) * p.mask_sw];
    }
    const bool in = i >= p.rect_top && i < p.rect_top + p.rect_h && j >= p.rect_left && j < p.rect_left + p.rect_w;
    return (in != static_cast<bool>(p.invert)) ? 1.0f : 0.0f;
  }
  // m * g and g along canvas row (b, c, i)
  void prompt_row(std::int64_t b, std::int64_t c, std::int64_t i, float* pr, float* gr) const {
    for (std::int64_t j = 0; j < p.W; ++j) {
      const float g = g_at(b, c, i, j);
      if (gr) gr[j] = g;
      const float m = m_at(b, c, i, j);
      pr[j] = m == 0.0f ? 0.0f : m * g;  // where the mask is 0, delta is never read (NaN/inf there: no effect)
    }
  }
};

constexpr std::int64_t elem_size(int dt) { return dt == F32 ? 4 : 2; }

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

template <int DT>
void fwd(const VisualPromptParams& p) {
  const std::int64_t B = p.B, C = p.C, H = p.H, W = p.W;
  const int nt = threads_of(p.threads);
  const float* mean = reinterpret_cast<const float*>(p.mean);
  const float* sd = reinterpret_cast<const float*>(p.stdev);
  std::vector<float> G;
  if (!p.delta_per_sample) {
    G.resize(C * H * W);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (std::int64_t r = 0; r < C * H; ++r) {
      const std::int64_t c = r / H, i = r % H;
      for (std::int64_t j = 0; j < W; ++j)
        G[r * W + j] = squash(p.squash, load_any(p.delta_dtype, reinterpret_cast<const void*>(p.delta),
                                                 c * p.delta_sc + i * p.delta_sh + j * p.delta_sw));
    }
  }
  Ctx ctx{p, mean, sd, G.empty() ? nullptr : G.data(), p.mask ? H / p.Hm : 1, p.mask ? W / p.Wm : 1,
          !p.mask || p.Bm == 1};
  std::vector<float> Pc;  // the prompt m * g once per call when nothing in it depends on b
  const bool cached = !p.delta_per_sample && ctx.mask_shared;
  if (cached) {
    Pc.resize(C * H * W);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (std::int64_t r = 0; r < C * H; ++r) ctx.prompt_row(0, r / H, r % H, Pc.data() + r * W, nullptr);
  }
  const void* x = reinterpret_cast<const void*>(p.x);
  void* out = reinterpret_cast<void*>(p.out);
  advise_huge(out, B * C * H * W * elem_size(DT));
  const bool pre = p.order == 0, clamp = p.has_clamp != 0;
  const RowFwdFn row_fn = pre ? (clamp ? &fwd_row<DT, true, true> : &fwd_row<DT, true, false>)
                              : &fwd_row<DT, false, false>;
  const std::int64_t j0 = p.left, j1 = p.left + p.w;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(cached ? 0 : W), xrow(p.x_sw == 1 ? 0 : p.w);
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < B * C * H; ++r) {
      const std::int64_t b = r / (C * H), c = (r / H) % C, i = r % H;
      const float* pr;
      if (cached) {
        pr = Pc.data() + (c * H + i) * W;
      } else {
        ctx.prompt_row(b, c, i, buf.data(), nullptr);
        pr = buf.data();
      }
      RowFwd a;
      a.pr = pr;
      a.W = W;
      a.fill = p.fill;
      a.lo = p.clamp_lo;
      a.hi = p.clamp_hi;
      a.mu = mean ? mean[c] : 0.0f;  // v - 0 and v / 1 are exact: no flags needed
      a.sd = sd ? sd[c] : 1.0f;
      a.out = static_cast<char*>(out) + r * W * elem_size(DT);
      const std::int64_t ii = i - p.top;
      if (ii >= 0 && ii < p.h && p.w > 0) {
        a.j0 = j0;
        a.j1 = j1;
        const std::int64_t xbase = b * p.x_sb + c * p.x_sc + ii * p.x_sh;
        if (p.x_sw == 1) {
          a.x = static_cast<const char*>(x) + xbase * elem_size(DT);
        } else {  // a strided image row: gathered once into float32, then the same row code
          for (std::int64_t jj = 0; jj < p.w; ++jj) xrow[jj] = load<DT>(x, xbase + jj * p.x_sw);
          a.x = xrow.data();
          a.x_f32 = 1;
        }
      }
      row_fn(a);
    }
  }
}

// gt (gradient w.r.t. the prompt term) and gp (w.r.t. the placed image) along canvas row (b, c, i).
template <int DT>
void grad_row(const Ctx& ctx, std::int64_t b, std::int64_t c, std::int64_t i, float* gt, float* gp, float* g) {
  const VisualPromptParams& p = ctx.p;
  const void* gr = reinterpret_cast<const void*>(p.grad);
  const void* x = reinterpret_cast<const void*>(p.x);
  const float inv = ctx.stdev ? 1.0f / ctx.stdev[c] : 1.0f;
  const bool has_std = ctx.stdev != nullptr;
  const std::int64_t gbase = b * p.grad_sb + c * p.grad_sc + i * p.grad_sh;
  const std::int64_t ii = i - p.top;
  for (std::int64_t j = 0; j < p.W; ++j) {
    const float go = load<DT>(gr, gbase + j * p.grad_sw);
    const float gv = has_std ? go * inv : go;
    g[j] = ctx.g_at(b, c, i, j);
    if (p.order == 0) {
      float keep = gv;
      if (p.has_clamp) {
        const std::int64_t jj = j - p.left;
        const bool in = ii >= 0 && ii < p.h && jj >= 0 && jj < p.w;
        const float canvas = in ? load<DT>(x, b * p.x_sb + c * p.x_sc + ii * p.x_sh + jj * p.x_sw) : p.fill;
        const float m = ctx.m_at(b, c, i, j);
        const float v = canvas + (m == 0.0f ? 0.0f : m * g[j]);
        keep = gv * ((v >= p.clamp_lo && v <= p.clamp_hi) ? 1.0f : 0.0f);
      }
      gt[j] = keep;
      gp[j] = keep;
    } else {
      gt[j] = go;
      gp[j] = gv;
    }
  }
}

inline float dsquash(int kind, float g) {
  if (kind == 1) return g * (1.0f - g);
  if (kind == 2) return 1.0f - g * g;
  return 1.0f;
}

// One canvas row of one sample in the backward with a shared delta and mask: d placed image (dx, image columns
// only) and the prompt term's gradient added into acc (summed over the batch in sample order by the caller).
struct RowBwd {
  const void* g = nullptr;   // the output gradient row, DT, contiguous
  const void* x = nullptr;   // the image row as in RowFwd (read only with a clamp)
  void* dx = nullptr;        // the dx row (w elements) or null
  const float* pm = nullptr; // the prompt m * g(delta) of the row (read only with a clamp)
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

template <int DT, bool PRE, bool CLAMP>
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
      acc[j] += gt;
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
        acc[j] += gt;
        if (dx) store<DT>(dx, j - j0, gp);
      }
    } else {
      const void* x = a.x;
#pragma omp simd
      for (std::int64_t j = j0; j < j1; ++j) {
        float gt, gp;
        grads<PRE, CLAMP>(load<DT>(g, j), load<DT>(x, j - j0), pm[j], lo, hi, inv, gt, gp);
        acc[j] += gt;
        if (dx) store<DT>(dx, j - j0, gp);
      }
    }
  }
  border(j1, W);
}

// The backward with a shared delta and a mask that does not depend on the sample (every fixed mask, a tensor mask
// with Bm == 1), grad contiguous along W: one thread per (channel, canvas row) walks the batch in sample order,
// summing the prompt term's gradient; d delta = m * g'(delta) * that sum, once per element (0 where m == 0).
template <int DT>
void bwd_shared(const VisualPromptParams& p, const Ctx& ctx) {
  const std::int64_t B = p.B, C = p.C, H = p.H, W = p.W;
  const bool pre = p.order == 0, clamp = p.has_clamp != 0;
  const RowBwdFn row_fn = pre ? (clamp ? &bwd_row<DT, true, true> : &bwd_row<DT, true, false>)
                              : &bwd_row<DT, false, false>;
  const void* x = reinterpret_cast<const void*>(p.x);
  const void* gr = reinterpret_cast<const void*>(p.grad);
  void* dx = reinterpret_cast<void*>(p.dx);
  void* dd = reinterpret_cast<void*>(p.ddelta);
  // Blocks of RB canvas rows: for one sample they are RB * W contiguous elements of grad (a stream the
  // prefetchers follow), and the block's sums stay in L1/L2 while the batch is walked in sample order.
  constexpr std::int64_t RB = 16;
  const std::int64_t rows = C * H, nblk = (rows + RB - 1) / RB;
#pragma omp parallel num_threads(threads_of(p.threads))
  {
    std::vector<float> m(RB * W), pm(RB * W), acc(RB * W), xrow(p.x_sw == 1 ? 0 : p.w);
#pragma omp for schedule(static)
    for (std::int64_t blk = 0; blk < nblk; ++blk) {
      const std::int64_t r0 = blk * RB, r1 = std::min(rows, r0 + RB);
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t c = r / H, i = r % H;
        const float* G = ctx.G + r * W;
        float* mr = m.data() + (r - r0) * W;
        float* pmr = pm.data() + (r - r0) * W;
        for (std::int64_t j = 0; j < W; ++j) {
          mr[j] = ctx.m_at(0, c, i, j);
          pmr[j] = mr[j] == 0.0f ? 0.0f : mr[j] * G[j];
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::int64_t b = 0; b < B; ++b) {
        for (std::int64_t r = r0; r < r1; ++r) {
          const std::int64_t c = r / H, i = r % H, ii = i - p.top;
          const bool img_row = ii >= 0 && ii < p.h && p.w > 0;
          RowBwd a;
          a.pm = pm.data() + (r - r0) * W;
          a.acc = acc.data() + (r - r0) * W;
          a.W = W;
          a.fill = p.fill;
          a.lo = p.clamp_lo;
          a.hi = p.clamp_hi;
          a.inv = ctx.stdev ? 1.0f / ctx.stdev[c] : 1.0f;
          a.g = static_cast<const char*>(gr) + (b * p.grad_sb + c * p.grad_sc + i * p.grad_sh) * elem_size(DT);
          if (img_row) {
            a.j0 = p.left;
            a.j1 = p.left + p.w;
            const std::int64_t xbase = b * p.x_sb + c * p.x_sc + ii * p.x_sh;
            a.x_f32 = p.x_sw != 1;
            if (p.x_sw == 1) {
              a.x = static_cast<const char*>(x) + xbase * elem_size(DT);
            } else {
              if (clamp)
                for (std::int64_t jj = 0; jj < p.w; ++jj) xrow[jj] = load<DT>(x, xbase + jj * p.x_sw);
              a.x = xrow.data();
            }
            a.dx = dx ? static_cast<char*>(dx) + (((b * C + c) * p.h + ii) * p.w) * elem_size(DT) : nullptr;
          }
          row_fn(a);
        }
      }
      if (dd)
        for (std::int64_t r = r0; r < r1; ++r) {
          const float* G = ctx.G + r * W;
          const float* mr = m.data() + (r - r0) * W;
          const float* ar = acc.data() + (r - r0) * W;
          for (std::int64_t j = 0; j < W; ++j)
            store_any(p.delta_dtype, dd, r * W + j, mr[j] == 0.0f ? 0.0f : ar[j] * mr[j] * dsquash(p.squash, G[j]));
        }
    }
  }
}

template <int DT>
void bwd(const VisualPromptParams& p) {
  const std::int64_t B = p.B, C = p.C, H = p.H, W = p.W;
  const int nt = threads_of(p.threads);
  std::vector<float> G;
  if (!p.delta_per_sample) {
    G.resize(C * H * W);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (std::int64_t r = 0; r < C * H; ++r) {
      const std::int64_t c = r / H, i = r % H;
      for (std::int64_t j = 0; j < W; ++j)
        G[r * W + j] = squash(p.squash, load_any(p.delta_dtype, reinterpret_cast<const void*>(p.delta),
                                                 c * p.delta_sc + i * p.delta_sh + j * p.delta_sw));
    }
  }
  Ctx ctx{p, reinterpret_cast<const float*>(p.mean), reinterpret_cast<const float*>(p.stdev),
          G.empty() ? nullptr : G.data(), p.mask ? H / p.Hm : 1, p.mask ? W / p.Wm : 1, !p.mask || p.Bm == 1};
  void* dx = reinterpret_cast<void*>(p.dx);
  void* dd = reinterpret_cast<void*>(p.ddelta);
  advise_huge(dx, B * C * p.h * p.w * elem_size(DT));
  advise_huge(dd, (p.delta_per_sample ? B : 1) * C * H * W * elem_size(p.delta_dtype));
  if ((dx || dd) && !p.delta_per_sample && ctx.mask_shared && p.grad_sw == 1) {
    bwd_shared<DT>(p, ctx);
  } else if (dx || dd) {
#pragma omp parallel num_threads(nt)
    {
      std::vector<float> gt(W), gp(W), g(W), acc(W);
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < C * H; ++r) {
        const std::int64_t c = r / H, i = r % H, ii = i - p.top;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (std::int64_t b = 0; b < B; ++b) {
          grad_row<DT>(ctx, b, c, i, gt.data(), gp.data(), g.data());
          if (dx && ii >= 0 && ii < p.h) {
            const std::int64_t obase = ((b * C + c) * p.h + ii) * p.w;
            for (std::int64_t jj = 0; jj < p.w; ++jj) store<DT>(dx, obase + jj, gp[jj + p.left]);
          }
          if (dd) {
            for (std::int64_t j = 0; j < W; ++j) {
              const float m = ctx.m_at(b, c, i, j);
              const float v = m == 0.0f ? 0.0f : gt[j] * m * dsquash(p.squash, g[j]);
              if (p.delta_per_sample) store_any(p.delta_dtype, dd, ((b * C + c) * H + i) * W + j, v);
              else acc[j] += v;
            }
          }
        }
        if (dd && !p.delta_per_sample)
          for (std::int64_t j = 0; j < W; ++j) store_any(p.delta_dtype, dd, (c * H + i) * W + j, acc[j]);
      }
    }
  }
  if (p.dmask) {
    float* dm = reinterpret_cast<float*>(p.dmask);
    const std::int64_t kh = ctx.kh, kw = ctx.kw;
#pragma omp parallel num_threads(nt)
    {
      std::vector<float> gt(W), gp(W), g(W), acc(p.Wm);
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < p.Bm * p.Cm * p.Hm; ++r) {
        const std::int64_t bm = r / (p.Cm * p.Hm), cm = (r / p.Hm) % p.Cm, hm = r % p.Hm;
        std::fill(acc.begin(), acc.end(), 0.0f);
        const std::int64_t b0 = p.Bm == 1 ? 0 : bm, b1 = p.Bm == 1 ? B : bm + 1;
        const std::int64_t c0 = p.Cm == 1 ? 0 : cm, c1 = p.Cm == 1 ? C : cm + 1;
        for (std::int64_t b = b0; b < b1; ++b)
          for (std::int64_t c = c0; c < c1; ++c)
            for (std::int64_t i = hm * kh; i < (hm + 1) * kh; ++i) {
              grad_row<DT>(ctx, b, c, i, gt.data(), gp.data(), g.data());
              for (std::int64_t j = 0; j < W; ++j) acc[j / kw] += gt[j] * g[j];
            }
        for (std::int64_t wm = 0; wm < p.Wm; ++wm) dm[r * p.Wm + wm] = acc[wm];
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
