// visual_prompt: fused forward and backward kernels (see visual_prompt.h for the parameter block and
// reprokernels/reference/visual_prompt.py for the specification).
//
// Structure. Every GPU thread's work lives in a __host__ __device__ function (vp_fwd_item, vp_bwd_item)
// that takes the argument block and a work-item index. The kernels are grid-stride loops over those
// items; the *_host entry points run the very same functions in a plain loop over host pointers, which is
// how the kernel code is tested on machines without a GPU (reprokernels/cuda/visual_prompt.py, emulate=True).
//
// Forward: one item = VEC consecutive output columns of one (b, c, y) row (VEC = 16 bytes of the output
// type), so a full group is stored with one 16-byte store and, where delta's layout allows, delta is read
// with 16-byte loads. Everything is computed in float32 and rounded once at the store.
//
// Backward: one item = (batch chunk k, channel group, tile). With a fixed mask a tile is one canvas pixel
// and a channel group one channel. With a tensor mask a tile is one of the split_h x split_w parts of a
// kh x kw mask window, and the channel group is every channel when the mask is shared over channels and its
// gradient is asked for (Cm == 1), so the item owns every term of its dmask partial. The thread loops
// channel, tile row, tile column and then the samples of its chunk: the shared-delta gradient of a pixel is
// summed over the chunk in a register and written once (a float32 partial per chunk, summed over chunks by
// the caller), the dmask terms accumulate in registers (one per sample of the chunk for a per-sample mask)
// and are written once as a float32 partial per (chunk, tile), summed by the caller. Every output element
// is written by exactly one thread: no atomics, bitwise deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "visual_prompt.h"

// `#pragma unroll` only for the device pass: the host compiler (-Wall -Werror) rejects unknown pragmas.
#if defined(__CUDA_ARCH__)
#define VP_UNROLL _Pragma("unroll")
#define VP_NO_UNROLL _Pragma("unroll 1")
#else
#define VP_UNROLL
#define VP_NO_UNROLL
#endif

#define VP_HD __host__ __device__ __forceinline__

namespace reprokernels {
namespace {

using i64 = std::int64_t;
constexpr int kMaxChunk = kVisualPromptMaxChunk;
// Launch bounds with an explicit minimum of resident blocks: without one, ptxas picks its own occupancy
// target (~80 registers here) and spills the backward rather than exceed it; with one, the register cap is
// 65536 / (threads * blocks) and the kernels fit below it without spills (see the ptxas -v lines).
constexpr int kThreads = 256;  // forward: cap 64 registers, 40-60 used
constexpr int kFwdMinBlocks = 4;
constexpr int kBwdThreads = 128;  // backward: cap 102 registers, 86-95 used (several samples in flight)
constexpr int kBwdMinBlocks = 5;
constexpr int kInvalid = static_cast<int>(cudaErrorInvalidValue);

// ---- scalar helpers -------------------------------------------------------------------------------------

VP_HD float to_f32(float v) { return v; }
VP_HD float to_f32(__half v) { return __half2float(v); }
VP_HD float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
VP_HD T from_f32(float v);
template <>
VP_HD float from_f32<float>(float v) {
  return v;
}
template <>
VP_HD __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
VP_HD __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
VP_HD float ld(const T* p) {
  return to_f32(*p);
}

template <typename T>
VP_HD const T* cptr(std::uintptr_t v) {
  return reinterpret_cast<const T*>(v);
}
template <typename T>
VP_HD T* mptr(std::uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

// m * g rounded on its own: the forward and the backward's recomputation of v = p + m * g (for the clamp
// test) must agree bit for bit, so the product may not be contracted into an FMA in one and not the other.
VP_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// 0 none, 1 sigmoid, 2 tanh
VP_HD float squash_fwd(int squash, float d) {
  if (squash == 1) return 1.f / (1.f + expf(-d));
  if (squash == 2) return tanhf(d);
  return d;
}

// d(loss)/d(delta) from dg = d(loss)/d(g) and g = squash(delta), in the order of torch's
// sigmoid_backward (dg * (1 - s) * s) and tanh_backward (dg * (1 - t * t)).
VP_HD float squash_bwd(int squash, float dg, float g) {
  if (squash == 1) return dg * (1.f - g) * g;
  if (squash == 2) return dg * (1.f - g * g);
  return dg;
}

// torch.clamp: NaN stays NaN (fminf/fmaxf would drop it).
VP_HD float clamp_f(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

struct Norm {
  float mean, stdev;
  bool has_mean, has_std;
};

VP_HD Norm load_norm(const VisualPromptParams& p, i64 c) {
  Norm n{0.f, 1.f, p.mean != 0, p.stdev != 0};
  if (n.has_mean) n.mean = cptr<float>(p.mean)[c];
  if (n.has_std) n.stdev = cptr<float>(p.stdev)[c];
  return n;
}

// (v - mean) / std as the reference computes it (a true division, not a reciprocal multiply).
VP_HD float apply_norm(const Norm& n, float v) {
  if (n.has_mean) v -= n.mean;
  if (n.has_std) v /= n.stdev;
  return v;
}

// ---- the derived argument block ---------------------------------------------------------------------------

struct VpArgs {
  VisualPromptParams p;
  i64 kh, kw;        // tensor mask repeat factors H / Hm, W / Wm (1 with the fixed mask)
  i64 tiles_h;       // backward tile grid: (Hm * split_h, Wm * split_w) of a tensor mask, the canvas otherwise
  i64 tiles_w;
  i64 th, tw;        // tile size kh / split_h x kw / split_w (1 x 1 with the fixed mask)
  i64 nsplit;        // tiles per mask window: split_h * split_w
  i64 ncg;           // backward channel groups: 1 when a Cm == 1 tensor mask sums dmask over c, else C
  i64 nchunks;       // ceil(B / chunk)
  i64 ngroups;       // forward column groups per row: ceil(W / VEC)
  float scale_h;     // resize source-index scales, computed as PyTorch does
  float scale_w;
  bool vec_out;      // forward: full groups may be stored with 16-byte stores
  bool vec_delta;    // forward: full groups may load delta with 16-byte loads
  bool ddelta_partial;  // shared delta with nchunks > 1: float32 partials per chunk
  bool mask_batched;    // tensor mask with Bm != 1: dmask partials per sample (and tile)
};

// PyTorch's area_pixel_compute_scale (bilinear) / compute_scales_value (nearest), in float32.
float resize_scale(int mode, bool align, i64 in, i64 out) {
  if (mode == 2 && align) return out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.f;
  return static_cast<float>(in) / static_cast<float>(out);
}

// Fills the type-independent fields; false when the parameters are outside what the kernels serve.
bool make_args(const VisualPromptParams& p, VpArgs& a) {
  a = VpArgs{};
  a.p = p;
  if (p.B < 0 || p.C < 0 || p.h < 0 || p.w < 0 || p.H < 1 || p.W < 1) return false;
  if (p.h2 < 0 || p.w2 < 0 || p.top < 0 || p.left < 0 || p.top + p.h2 > p.H || p.left + p.w2 > p.W) return false;
  if (p.resize == 0 && (p.h2 != p.h || p.w2 != p.w)) return false;  // an empty image (h2 = 0) is only fill
  if (p.resize != 0 && (p.h < 1 || p.w < 1 || p.h2 < 1 || p.w2 < 1)) return false;
  if (p.x_dtype < 0 || p.x_dtype > 2 || (p.delta_dtype != 0 && p.delta_dtype != p.x_dtype)) return false;
  if (p.squash < 0 || p.squash > 2 || p.order < 0 || p.order > 1 || p.resize < 0 || p.resize > 2) return false;
  if (p.chunk < 1) return false;
  if (p.mask != 0) {
    if ((p.Bm != 1 && p.Bm != p.B) || (p.Cm != 1 && p.Cm != p.C) || p.Hm < 1 || p.Wm < 1) return false;
    if (p.H % p.Hm != 0 || p.W % p.Wm != 0) return false;
    a.kh = p.H / p.Hm;
    a.kw = p.W / p.Wm;
    if (p.split_h < 1 || p.split_w < 1 || a.kh % p.split_h != 0 || a.kw % p.split_w != 0) return false;
    a.tiles_h = p.Hm * p.split_h;
    a.tiles_w = p.Wm * p.split_w;
    a.th = a.kh / p.split_h;
    a.tw = a.kw / p.split_w;
    a.nsplit = p.split_h * p.split_w;
    // one item sums over every channel only when it owns a channel-shared dmask entry
    a.ncg = (p.Cm == 1 && p.dmask != 0) ? 1 : p.C;
    a.mask_batched = p.Bm != 1;
  } else {
    if (p.split_h != 1 || p.split_w != 1) return false;
    a.kh = a.kw = a.th = a.tw = a.nsplit = 1;
    a.tiles_h = p.H;
    a.tiles_w = p.W;
    a.ncg = p.C;
    a.mask_batched = false;
  }
  a.nchunks = (p.B + p.chunk - 1) / p.chunk;
  a.ddelta_partial = !p.delta_per_sample && a.nchunks > 1;
  a.scale_h = resize_scale(p.resize, p.align_corners != 0, p.h, p.h2);
  a.scale_w = resize_scale(p.resize, p.align_corners != 0, p.w, p.w2);
  return true;
}

// ---- sampling the placed image -----------------------------------------------------------------------------

// Source taps of one output coordinate along one axis: i1 = i0 + (i0 < n - 1), weight l of i1.
struct Tap {
  i64 i0, i1;
  float l;
};

// resize 0: identity; 1: PyTorch's nearest_neighbor_compute_source_index (floorf(dst * scale), clipped);
// 2: PyTorch's area_pixel_compute_source_index + guard_index_and_lambda (bilinear).
VP_HD Tap source_tap(int mode, bool align, float scale, i64 dst, i64 n_in) {
  Tap t{dst, dst, 0.f};
  if (mode == 1) {
    const i64 s = static_cast<i64>(floorf(static_cast<float>(dst) * scale));
    t.i0 = t.i1 = s < n_in - 1 ? s : n_in - 1;
  } else if (mode == 2) {
    float src = align ? scale * static_cast<float>(dst) : scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
    if (src < 0.f) src = 0.f;
    i64 i0 = static_cast<i64>(src);  // src >= 0: truncation is floor
    if (i0 > n_in - 1) i0 = n_in - 1;
    float l = src - static_cast<float>(i0);
    l = l < 0.f ? 0.f : (l > 1.f ? 1.f : l);
    t.i0 = i0;
    t.i1 = i0 + (i0 < n_in - 1 ? 1 : 0);
    t.l = l;
  }
  return t;
}

// The placed image's value at an inside position with taps (ty, tx); xbc points at x[b, c].
template <typename T>
VP_HD float sample_x(const VisualPromptParams& p, const T* xbc, const Tap& ty, const Tap& tx) {
  if (p.resize != 2) return ld(xbc + ty.i0 * p.x_sh + tx.i0 * p.x_sw);
  const T* r0 = xbc + ty.i0 * p.x_sh;
  const T* r1 = xbc + ty.i1 * p.x_sh;
  const float x00 = ld(r0 + tx.i0 * p.x_sw), x01 = ld(r0 + tx.i1 * p.x_sw);
  const float x10 = ld(r1 + tx.i0 * p.x_sw), x11 = ld(r1 + tx.i1 * p.x_sw);
  return (1.f - ty.l) * ((1.f - tx.l) * x00 + tx.l * x01) + ty.l * ((1.f - tx.l) * x10 + tx.l * x11);
}

VP_HD float fixed_mask_at(const VisualPromptParams& p, i64 y, i64 xx) {
  const bool in = y >= p.rect_top && y < p.rect_top + p.rect_h && xx >= p.rect_left && xx < p.rect_left + p.rect_w;
  return in != (p.invert != 0) ? 1.f : 0.f;
}

// ---- 16-byte vector access -----------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(16) VpPack {
  T v[N];
};

// N consecutive elements from a 16-byte aligned address, upcast to float32.
template <typename D, int N>
VP_HD void load_vec(const D* src, float* dst) {
  constexpr int kPer = static_cast<int>(16 / sizeof(D));
  static_assert(N % kPer == 0, "a group is a whole number of 16-byte packs");
  VP_UNROLL for (int s = 0; s < N / kPer; ++s) {
    const VpPack<D, kPer> pk = reinterpret_cast<const VpPack<D, kPer>*>(src)[s];
    VP_UNROLL for (int i = 0; i < kPer; ++i) dst[s * kPer + i] = to_f32(pk.v[i]);
  }
}

template <typename T, int N>
VP_HD void store_vec(T* dst, const float* src) {
  static_assert(N * sizeof(T) == 16, "one 16-byte pack");
  VpPack<T, N> pk;
  VP_UNROLL for (int i = 0; i < N; ++i) pk.v[i] = from_f32<T>(src[i]);
  *reinterpret_cast<VpPack<T, N>*>(dst) = pk;
}

// ---- forward: one item = VEC output columns of one (b, c, y) row ------------------------------------------------

template <typename T, typename D, int VEC>
VP_HD void vp_fwd_item(const VpArgs& a, i64 item) {
  const VisualPromptParams& p = a.p;
  const i64 grp = item % a.ngroups;
  const i64 row = item / a.ngroups;  // (b * C + c) * H + y: the output is contiguous
  const i64 y = row % p.H;
  const i64 bc = row / p.H;
  const i64 c = bc % p.C;
  const i64 b = bc / p.C;
  const i64 x0 = grp * VEC;
  const int ncols = p.W - x0 < VEC ? static_cast<int>(p.W - x0) : VEC;

  // mask of the group's columns; `any` lets a group outside a fixed mask skip delta entirely
  float m[VEC];
  bool any = false;
  if (p.mask != 0) {
    const float* mrow = cptr<float>(p.mask) + b * p.mask_sb + c * p.mask_sc + (y / a.kh) * p.mask_sh;
    i64 mc = x0 / a.kw, rem = x0 % a.kw;
    VP_UNROLL for (int j = 0; j < VEC; ++j) {
      m[j] = j < ncols ? mrow[mc * p.mask_sw] : 0.f;
      if (++rem == a.kw) {
        rem = 0;
        ++mc;
      }
      any = any || m[j] != 0.f;
    }
  } else {
    VP_UNROLL for (int j = 0; j < VEC; ++j) {
      m[j] = j < ncols ? fixed_mask_at(p, y, x0 + j) : 0.f;
      any = any || m[j] != 0.f;
    }
  }

  // t = m * squash(delta), 0 where m == 0 (delta is not read there)
  float t[VEC];
  VP_UNROLL for (int j = 0; j < VEC; ++j) t[j] = 0.f;
  if (any) {
    const D* drow = cptr<D>(p.delta) + b * p.delta_sb + c * p.delta_sc + y * p.delta_sh;
    float d[VEC];
    if (a.vec_delta && ncols == VEC) {
      load_vec<D, VEC>(drow + x0, d);
    } else {
      VP_UNROLL for (int j = 0; j < VEC; ++j) d[j] = (j < ncols && m[j] != 0.f) ? ld(drow + (x0 + j) * p.delta_sw) : 0.f;
    }
    VP_UNROLL for (int j = 0; j < VEC; ++j) t[j] = m[j] != 0.f ? mul_rn(m[j], squash_fwd(p.squash, d[j])) : 0.f;
  }

  // placed image, combine, normalise
  const Norm nrm = load_norm(p, c);
  const i64 iy = y - p.top;
  const bool row_in = iy >= 0 && iy < p.h2;
  Tap ty{0, 0, 0.f};
  if (row_in) ty = source_tap(p.resize, p.align_corners != 0, a.scale_h, iy, p.h);
  const T* xbc = cptr<T>(p.x) + b * p.x_sb + c * p.x_sc;
  const bool pre = p.order == 0;
  float o[VEC];
  VP_UNROLL for (int j = 0; j < VEC; ++j) {
    const i64 ix = x0 + j - p.left;
    const bool inside = row_in && j < ncols && ix >= 0 && ix < p.w2;
    float pv = p.fill;
    if (inside) pv = sample_x(p, xbc, ty, source_tap(p.resize, p.align_corners != 0, a.scale_w, ix, p.w));
    if (pre) {
      float v = pv + t[j];
      if (p.has_clamp) v = clamp_f(v, p.clamp_lo, p.clamp_hi);
      o[j] = apply_norm(nrm, v);
    } else {
      o[j] = apply_norm(nrm, pv) + t[j];
    }
  }

  T* orow = mptr<T>(p.out) + row * p.W;
  if (a.vec_out && ncols == VEC) {
    store_vec<T, VEC>(orow + x0, o);
  } else {
    VP_UNROLL for (int j = 0; j < VEC; ++j) {
      if (j < ncols) orow[x0 + j] = from_f32<T>(o[j]);
    }
  }
}

// ---- backward: one item = (batch chunk, channel group, tile) -------------------------------------------------------

// What the samples of one pixel (c, y, xx) share.
struct BwdPixel {
  Norm nrm;
  Tap ty, tx;   // source taps (only when the clamp needs the placed value)
  bool inside;  // the pixel shows the image
  float mfix;   // the fixed mask's value (unused with a tensor mask)
};

// Running per-sample pointers and output offsets of one pixel, advanced by one sample per step (products
// j * stride for unrolled samples would be hoisted by the compiler as live 64-bit offsets per tensor).
template <typename T, typename D>
struct BwdCursor {
  const T* g;      // grad[b, c, y, xx]
  const D* d;      // delta[b | shared, c, y, xx]
  const float* m;  // mask[b | 0, c | 0, cy, cx] (unused with the fixed mask)
  const T* xbc;    // x[b, c]
  i64 dx_off;      // dx / d_placed[b, c, iy, ix]
  i64 dd_off;      // per-sample ddelta[b, c, y, xx]
};

// One sample's terms of one pixel: writes dx and a per-sample ddelta, adds the shared ddelta term to dacc
// and the dmask term (gt * g) to macc, then advances the cursor to the next sample.
template <typename T, typename D>
VP_HD void bwd_sample(const VisualPromptParams& p, const BwdPixel& px, BwdCursor<T, D>& cur, i64 dx_step,
                      i64 dd_step, float& dacc, float& macc) {
  const bool has_mask = p.mask != 0;
  const bool pre = p.order == 0;
  const bool clamp = pre && p.has_clamp != 0;
  const bool need_delta = p.ddelta != 0;
  const bool need_mask = p.dmask != 0 && has_mask;
  const float m = has_mask ? *cur.m : px.mfix;
  const float go = ld(cur.g);
  float g = 0.f;  // squash(delta), read only where something uses it
  if (need_mask || (m != 0.f && (need_delta || clamp))) g = squash_fwd(p.squash, ld(cur.d));
  float gpl, gt;  // d(loss)/d(placed), d(loss)/d(t)
  if (pre) {
    float gv = px.nrm.has_std ? go / px.nrm.stdev : go;
    if (clamp) {  // recompute v exactly as the forward did; torch.clamp passes the gradient where lo <= v <= hi
      const float pv = px.inside ? sample_x(p, cur.xbc, px.ty, px.tx) : p.fill;
      const float v = pv + (m != 0.f ? mul_rn(m, g) : 0.f);
      if (!(v >= p.clamp_lo && v <= p.clamp_hi)) gv = 0.f;
    }
    gpl = gt = gv;
  } else {
    gpl = px.nrm.has_std ? go / px.nrm.stdev : go;
    gt = go;
  }
  if (p.dx != 0 && px.inside) {
    if (p.resize == 0) {
      mptr<T>(p.dx)[cur.dx_off] = from_f32<T>(gpl);
    } else {
      mptr<float>(p.dx)[cur.dx_off] = gpl;
    }
  }
  if (need_delta) {
    const float dd = m != 0.f ? squash_bwd(p.squash, gt * m, g) : 0.f;
    if (p.delta_per_sample) {
      mptr<D>(p.ddelta)[cur.dd_off] = from_f32<D>(dd);
    } else {
      dacc += dd;
    }
  }
  if (need_mask) macc += gt * g;
  cur.g += p.grad_sb;
  cur.d += p.delta_sb;
  cur.m += p.mask_sb;
  cur.xbc += p.x_sb;
  cur.dx_off += dx_step;
  cur.dd_off += dd_step;
}

// kPerSampleMask: the dmask of a per-sample tensor mask (Bm == B) is asked for. Its item keeps one dmask
// accumulator per sample of its chunk (chunk <= kMaxChunk, the sample loop unrolled so they stay in
// registers). Otherwise one running sum suffices and the sample loop stays rolled over a chunk of any size,
// which the launcher makes large (few float32 partials of a shared delta to sum afterwards).
template <typename T, typename D, bool kPerSampleMask>
VP_HD void vp_bwd_item(const VpArgs& a, i64 item) {
  const VisualPromptParams& p = a.p;
  const i64 tx_i = item % a.tiles_w;
  i64 r = item / a.tiles_w;
  const i64 ty_i = r % a.tiles_h;
  r /= a.tiles_h;
  const i64 cg = r % a.ncg;
  const i64 k = r / a.ncg;
  const i64 b0 = k * p.chunk;
  const i64 nb = p.B - b0 < p.chunk ? p.B - b0 : p.chunk;
  const i64 cx = tx_i / p.split_w;  // the mask cell of the tile (fixed mask: the pixel)
  const i64 cy = ty_i / p.split_h;
  const i64 part = (ty_i % p.split_h) * p.split_w + tx_i % p.split_w;  // the tile within its window
  const i64 c_lo = a.ncg == 1 ? 0 : cg;
  const i64 c_hi = a.ncg == 1 ? p.C : cg + 1;
  const bool has_mask = p.mask != 0;
  const bool clamp = p.order == 0 && p.has_clamp != 0;
  const bool align = p.align_corners != 0;
  const i64 dx_step = p.C * p.h2 * p.w2;  // h2 == h, w2 == w without resize
  const i64 dd_step = p.C * p.H * p.W;

  constexpr int kAcc = kPerSampleMask ? kMaxChunk : 1;
  float macc[kAcc];  // dmask: per sample of the chunk, or summed over the chunk
  VP_UNROLL for (int j = 0; j < kAcc; ++j) macc[j] = 0.f;

  // the window loops stay rolled: unrolling them around an unrolled sample loop only costs registers
  VP_NO_UNROLL for (i64 c = c_lo; c < c_hi; ++c) {
    BwdPixel px;
    px.nrm = load_norm(p, c);
    VP_NO_UNROLL for (i64 ky = 0; ky < a.th; ++ky) {
      const i64 y = ty_i * a.th + ky;
      const i64 iy = y - p.top;
      const bool row_in = iy >= 0 && iy < p.h2;
      px.ty = Tap{0, 0, 0.f};
      if (clamp && row_in) px.ty = source_tap(p.resize, align, a.scale_h, iy, p.h);
      VP_NO_UNROLL for (i64 kx = 0; kx < a.tw; ++kx) {
        const i64 xx = tx_i * a.tw + kx;
        const i64 ix = xx - p.left;
        px.inside = row_in && ix >= 0 && ix < p.w2;
        px.tx = Tap{0, 0, 0.f};
        if (clamp && px.inside) px.tx = source_tap(p.resize, align, a.scale_w, ix, p.w);
        px.mfix = has_mask ? 0.f : fixed_mask_at(p, y, xx);
        BwdCursor<T, D> cur;
        cur.g = cptr<T>(p.grad) + b0 * p.grad_sb + c * p.grad_sc + y * p.grad_sh + xx * p.grad_sw;
        cur.d = cptr<D>(p.delta) + b0 * p.delta_sb + c * p.delta_sc + y * p.delta_sh + xx * p.delta_sw;
        cur.m = has_mask ? cptr<float>(p.mask) + b0 * p.mask_sb + c * p.mask_sc + cy * p.mask_sh + cx * p.mask_sw
                         : nullptr;
        cur.xbc = cptr<T>(p.x) + b0 * p.x_sb + c * p.x_sc;
        cur.dx_off = ((b0 * p.C + c) * p.h2 + iy) * p.w2 + ix;
        cur.dd_off = ((b0 * p.C + c) * p.H + y) * p.W + xx;
        float dacc = 0.f;  // shared delta: this pixel's gradient summed over the chunk
        if constexpr (kPerSampleMask) {
          VP_UNROLL for (int j = 0; j < kMaxChunk; ++j) {
            if (j < nb) bwd_sample(p, px, cur, dx_step, dd_step, dacc, macc[j]);
          }
        } else {
          for (i64 j = 0; j < nb; ++j) bwd_sample(p, px, cur, dx_step, dd_step, dacc, macc[0]);
        }
        if (p.ddelta != 0 && !p.delta_per_sample) {
          if (a.ddelta_partial) {
            mptr<float>(p.ddelta)[((k * p.C + c) * p.H + y) * p.W + xx] = dacc;
          } else {
            mptr<D>(p.ddelta)[(c * p.H + y) * p.W + xx] = from_f32<D>(dacc);
          }
        }
      }
    }
  }

  if (p.dmask != 0 && has_mask) {
    const i64 cm = p.Cm == 1 ? 0 : c_lo;
    const i64 cell = cy * p.Wm + cx;
    const i64 plane = p.Hm * p.Wm;
    float* out = mptr<float>(p.dmask);
    if constexpr (kPerSampleMask) {  // partials (nsplit, B, Cm, Hm, Wm)
      VP_UNROLL for (int j = 0; j < kMaxChunk; ++j) {
        if (j < nb) out[((part * p.B + b0 + j) * p.Cm + cm) * plane + cell] = macc[j];
      }
    } else {  // Bm == 1: partials (nchunks * nsplit, Cm, Hm, Wm)
      out[((k * a.nsplit + part) * p.Cm + cm) * plane + cell] = macc[0];
    }
  }
}

// ---- kernels: grid-stride loops over the items ------------------------------------------------------------------

template <typename T, typename D, int VEC>
__global__ void __launch_bounds__(kThreads, kFwdMinBlocks) vp_fwd_kernel(const VpArgs a, i64 n) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    vp_fwd_item<T, D, VEC>(a, i);
  }
}

template <typename T, typename D, bool kPerSampleMask>
__global__ void __launch_bounds__(kBwdThreads, kBwdMinBlocks) vp_bwd_kernel(const VpArgs a, i64 n) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    vp_bwd_item<T, D, kPerSampleMask>(a, i);
  }
}

// ---- launchers ---------------------------------------------------------------------------------------------------

bool aligned16(std::uintptr_t ptr) { return ptr % 16 == 0; }

template <typename T, typename D>
int run_fwd(VpArgs a, bool host) {
  const VisualPromptParams& p = a.p;
  constexpr int VEC = static_cast<int>(16 / sizeof(T));
  constexpr i64 kPerD = static_cast<i64>(16 / sizeof(D));  // VEC * sizeof(D) is a multiple of 16
  const bool has_image = p.h2 > 0 && p.w2 > 0;  // an empty image (h = 0) has no data pointer and shows only fill
  if (p.B > 0 && p.C > 0 && ((has_image && p.x == 0) || p.delta == 0 || p.out == 0)) return kInvalid;
  a.ngroups = (p.W + VEC - 1) / VEC;
  // Rows of the contiguous output start 16-byte aligned when W % VEC == 0; delta rows when its row, channel
  // and batch strides are whole packs and its columns are contiguous.
  a.vec_out = aligned16(p.out) && p.W % VEC == 0;
  a.vec_delta = aligned16(p.delta) && p.delta_sw == 1 && p.delta_sh % kPerD == 0 && p.delta_sc % kPerD == 0 &&
                p.delta_sb % kPerD == 0;
  const i64 n = p.B * p.C * p.H * a.ngroups;
  if (n == 0) return 0;
  if (host) {
    for (i64 i = 0; i < n; ++i) vp_fwd_item<T, D, VEC>(a, i);
    return 0;
  }
  vp_fwd_kernel<T, D, VEC><<<grid_for(n, kThreads), kThreads, 0, as_stream(p.stream)>>>(a, n);
  return last_launch_error();
}

template <typename T, typename D>
int run_bwd(const VpArgs& a, bool host) {
  const VisualPromptParams& p = a.p;
  const i64 n = a.nchunks * a.ncg * a.tiles_h * a.tiles_w;
  if (n == 0) return 0;
  if (p.grad == 0 || p.delta == 0) return kInvalid;
  if (p.order == 0 && p.has_clamp && p.h2 > 0 && p.w2 > 0 && p.x == 0) return kInvalid;
  if (p.dx == 0 && p.ddelta == 0 && (p.dmask == 0 || p.mask == 0)) return 0;  // nothing asked
  const bool per_sample_mask = p.dmask != 0 && p.mask != 0 && a.mask_batched;
  if (per_sample_mask && p.chunk > kMaxChunk) return kInvalid;
  if (host) {
    for (i64 i = 0; i < n; ++i) {
      if (per_sample_mask) {
        vp_bwd_item<T, D, true>(a, i);
      } else {
        vp_bwd_item<T, D, false>(a, i);
      }
    }
    return 0;
  }
  const unsigned grid = grid_for(n, kBwdThreads);
  if (per_sample_mask) {
    vp_bwd_kernel<T, D, true><<<grid, kBwdThreads, 0, as_stream(p.stream)>>>(a, n);
  } else {
    vp_bwd_kernel<T, D, false><<<grid, kBwdThreads, 0, as_stream(p.stream)>>>(a, n);
  }
  return last_launch_error();
}

enum class Pass { kFwd, kBwd };

template <typename T, typename D>
int run(Pass pass, const VpArgs& a, bool host) {
  return pass == Pass::kFwd ? run_fwd<T, D>(a, host) : run_bwd<T, D>(a, host);
}

// Instantiated pairs (x type, delta type): (f32, f32), (f16, f32), (f16, f16), (bf16, f32), (bf16, bf16).
int dispatch(Pass pass, const VisualPromptParams& p, bool host) {
  VpArgs a;
  if (!make_args(p, a)) return kInvalid;
  const bool d32 = p.delta_dtype == 0;
  switch (p.x_dtype) {
    case 0:
      return run<float, float>(pass, a, host);
    case 1:
      return d32 ? run<__half, float>(pass, a, host) : run<__half, __half>(pass, a, host);
    case 2:
      return d32 ? run<__nv_bfloat16, float>(pass, a, host) : run<__nv_bfloat16, __nv_bfloat16>(pass, a, host);
    default:
      return kInvalid;
  }
}

}  // namespace

int visual_prompt_fwd(const VisualPromptParams& params) { return dispatch(Pass::kFwd, params, false); }
int visual_prompt_bwd(const VisualPromptParams& params) { return dispatch(Pass::kBwd, params, false); }
int visual_prompt_fwd_host(const VisualPromptParams& params) { return dispatch(Pass::kFwd, params, true); }
int visual_prompt_bwd_host(const VisualPromptParams& params) { return dispatch(Pass::kBwd, params, true); }

std::int64_t visual_prompt_num_chunks(const VisualPromptParams& params) {
  if (params.chunk < 1 || params.B <= 0) return 0;
  return (params.B + params.chunk - 1) / params.chunk;
}

}  // namespace reprokernels
