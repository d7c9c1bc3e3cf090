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
  const bool pre = p.order == 0, clamp = p.has_clamp != 0;
  const float lo = p.clamp_lo, hi = p.clamp_hi;
  const std::int64_t j0 = p.left, j1 = p.left + p.w;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(cached ? 0 : W);
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
      const float mu = mean ? mean[c] : 0.0f, s = sd ? sd[c] : 1.0f;
      const bool has_mean = mean != nullptr, has_std = sd != nullptr;
      auto finish = [&](float canvas, float prompt) {
        float v;
        if (pre) {
          v = canvas + prompt;
          if (clamp) v = v < lo ? lo : (v > hi ? hi : v);
          if (has_mean) v = v - mu;
          if (has_std) v = v / s;
        } else {
          v = canvas;
          if (has_mean) v = v - mu;
          if (has_std) v = v / s;
          v = v + prompt;
        }
        return v;
      };
      const std::int64_t obase = r * W;
      const std::int64_t ii = i - p.top;
      const bool img_row = ii >= 0 && ii < p.h;
      const float fill = p.fill;
      if (!img_row) {
#pragma omp simd
        for (std::int64_t j = 0; j < W; ++j) store<DT>(out, obase + j, finish(fill, pr[j]));
        continue;
      }
#pragma omp simd
      for (std::int64_t j = 0; j < j0; ++j) store<DT>(out, obase + j, finish(fill, pr[j]));
      const std::int64_t xbase = b * p.x_sb + c * p.x_sc + ii * p.x_sh - j0 * p.x_sw;
      if (p.x_sw == 1) {
#pragma omp simd
        for (std::int64_t j = j0; j < j1; ++j) store<DT>(out, obase + j, finish(load<DT>(x, xbase + j), pr[j]));
      } else {
        for (std::int64_t j = j0; j < j1; ++j)
          store<DT>(out, obase + j, finish(load<DT>(x, xbase + j * p.x_sw), pr[j]));
      }
#pragma omp simd
      for (std::int64_t j = j1; j < W; ++j) store<DT>(out, obase + j, finish(fill, pr[j]));
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
  if (dx || dd) {
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
