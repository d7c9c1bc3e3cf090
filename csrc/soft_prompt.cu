// soft_prompt_concat: fused forward and backward kernels (see soft_prompt.h for the parameter block and
// reprokernels/reference/soft_prompt.py for the specification).
//
// Structure. Every GPU thread's work lives in a __host__ __device__ function (sp_fwd_item, sp_bwd_prompt_item,
// sp_bwd_embeds_item) that takes the argument block and a work-item index. The kernels are grid-stride loops
// over those items; the *_host entry points run the very same functions in a plain loop over host pointers,
// which is how the kernel code is tested on machines without a GPU (reprokernels/cuda/soft_prompt.py,
// emulate=True).
//
// Forward (and the d inputs_embeds backward, the inverse gather): an output row is served by `lanes`
// consecutive threads (a power of two <= 32, so within one warp), lane i copying the groups i, i + lanes, ...
// of VEC = 16 bytes of the output type. Each lane resolves its row on its own (the same few index loads for
// every lane of the row, served as one broadcast): a prompt row of the chosen task, or a token row gathered
// from the embedding table by id / read from inputs_embeds (times embed_scale). Every source row is read once
// and every output byte written once with 16-byte stores where alignment and D allow (the caller decides and
// the launcher re-checks); scalar element access otherwise. Index math is int64 throughout.
//
// Backward of the prompt: one item = (batch chunk k, task t, prompt row p, feature group g). The samples of
// task t are order[offsets[t] : offsets[t + 1]] (a stable argsort of task_ids: increasing sample index);
// the item sums its chunk of them in float32 in that fixed order and writes the group once: the prompt's
// dtype when there is one chunk, a float32 partial per chunk (summed by the caller) otherwise. No atomics:
// bitwise deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "soft_prompt.h"

// `#pragma unroll` only for the device pass: the host compiler (-Wall -Werror) rejects unknown pragmas.
#if defined(__CUDA_ARCH__)
#define SP_UNROLL _Pragma("unroll")
#define SP_UNROLL4 _Pragma("unroll 4")
#else
#define SP_UNROLL
#define SP_UNROLL4
#endif

#define SP_HD __host__ __device__ __forceinline__

namespace reprokernels {
namespace {

using i64 = std::int64_t;
constexpr int kThreads = 256;
constexpr int kMaxLanes = 32;  // threads per output row at most: one warp
constexpr int kInvalid = static_cast<int>(cudaErrorInvalidValue);

// ---- scalar helpers -------------------------------------------------------------------------------------

SP_HD float to_f32(float v) { return v; }
SP_HD float to_f32(__half v) { return __half2float(v); }
SP_HD float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
SP_HD T from_f32(float v);
template <>
SP_HD float from_f32<float>(float v) {
  return v;
}
template <>
SP_HD __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
SP_HD __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
SP_HD const T* cptr(std::uintptr_t v) {
  return reinterpret_cast<const T*>(v);
}
template <typename T>
SP_HD T* mptr(std::uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

// An integer index tensor's element as int64; codes 0 int64, 1 int32, 2 int16, 3 int8, 4 uint8 (checked by
// the launcher). Read once per row, so a runtime switch costs nothing next to the row copy.
SP_HD i64 ld_index(std::uintptr_t base, int code, i64 off) {
  switch (code) {
    case 0:
      return cptr<std::int64_t>(base)[off];
    case 1:
      return cptr<std::int32_t>(base)[off];
    case 2:
      return cptr<std::int16_t>(base)[off];
    case 3:
      return cptr<std::int8_t>(base)[off];
    default:
      return cptr<std::uint8_t>(base)[off];
  }
}

// ---- 16-byte vector access ----------------------------------------------------------------------------------

template <typename S, int K>
struct alignas(K * sizeof(S)) SpPack {
  S v[K];
};

// Elements per pack when a group of N elements of S is accessed: 16 bytes, or the whole group when smaller
// (a half-precision source of a float32 output: 4 halves, 8 bytes).
template <typename S, int N>
constexpr int pack_elems() {
  return N * static_cast<int>(sizeof(S)) < 16 ? N : 16 / static_cast<int>(sizeof(S));
}

template <typename S, int N>
SP_HD void load_group(const S* src, float* dst) {
  constexpr int K = pack_elems<S, N>();
  static_assert(N % K == 0, "a group is a whole number of packs");
  SP_UNROLL for (int s = 0; s < N / K; ++s) {
    const SpPack<S, K> pk = reinterpret_cast<const SpPack<S, K>*>(src)[s];
    SP_UNROLL for (int i = 0; i < K; ++i) dst[s * K + i] = to_f32(pk.v[i]);
  }
}

template <typename T, int N>
SP_HD void store_group(T* dst, const float* src) {
  constexpr int K = pack_elems<T, N>();
  static_assert(N % K == 0, "a group is a whole number of packs");
  SP_UNROLL for (int s = 0; s < N / K; ++s) {
    SpPack<T, K> pk;
    SP_UNROLL for (int i = 0; i < K; ++i) pk.v[i] = from_f32<T>(src[s * K + i]);
    reinterpret_cast<SpPack<T, K>*>(dst)[s] = pk;
  }
}

// Output features per group: 16 bytes of the output type.
template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}

// ---- the derived argument block ---------------------------------------------------------------------------

struct SpArgs {
  SoftPromptParams p;
  i64 ngroups;     // groups of VEC features per row: ceil(D / VEC)
  int lanes;       // threads per row (power of two <= 32)
  int lane_shift;  // log2(lanes)
  bool has_scale;  // embed_scale != 1
};

// The insertion point of sample b, clamped into [0, L] (the op checks the range; the clamp keeps every
// derived token index inside [0, L) regardless).
SP_HD i64 insert_of(const SoftPromptParams& p, i64 b) {
  if (p.insert == 0) return 0;
  const i64 s = ld_index(p.insert, p.insert_dtype, b * p.insert_s);
  return s < 0 ? 0 : (s > p.L ? p.L : s);
}

// ---- row copy: the groups lane, lane + lanes, ... of one row ------------------------------------------------

// dst[x] = S->T(src[x * src_sd] (* scale)) for the row's features x, in groups of VEC = 16 bytes of T; a null
// src writes a zero row. Same type without a scale: a raw copy (bit-exact, NaN payloads included).
template <typename S, typename T>
SP_HD void copy_row_part(T* dst, const S* src, i64 src_sd, i64 D, i64 ngroups, int lane, int lanes, float scale,
                         bool has_scale, bool vec_dst, bool vec_src) {
  constexpr int VEC = vec_of<T>();
  for (i64 g = lane; g < ngroups; g += lanes) {
    const i64 x0 = g * VEC;
    const int ncols = D - x0 < VEC ? static_cast<int>(D - x0) : VEC;
    const bool full = ncols == VEC;
    if constexpr (std::is_same<S, T>::value) {
      if (!has_scale && src != nullptr) {
        if (full && vec_dst && vec_src) {
          *reinterpret_cast<SpPack<T, VEC>*>(dst + x0) = *reinterpret_cast<const SpPack<T, VEC>*>(src + x0);
        } else {
          for (int j = 0; j < ncols; ++j) dst[x0 + j] = src[(x0 + j) * src_sd];
        }
        continue;
      }
    }
    float v[VEC];
    if (src == nullptr) {
      SP_UNROLL for (int j = 0; j < VEC; ++j) v[j] = 0.f;
    } else if (full && vec_src) {
      load_group<S, VEC>(src + x0, v);
    } else {
      SP_UNROLL for (int j = 0; j < VEC; ++j) v[j] = j < ncols ? to_f32(src[(x0 + j) * src_sd]) : 0.f;
    }
    if (has_scale) {
      SP_UNROLL for (int j = 0; j < VEC; ++j) v[j] *= scale;
    }
    if (full && vec_dst) {
      store_group<T, VEC>(dst + x0, v);
    } else {
      SP_UNROLL for (int j = 0; j < VEC; ++j) {
        if (j < ncols) dst[x0 + j] = from_f32<T>(v[j]);
      }
    }
  }
}

// ---- forward: one item = one lane of one output row ----------------------------------------------------------

template <typename Pt, typename Tt>
SP_HD void sp_fwd_item(const SpArgs& a, i64 item) {
  const SoftPromptParams& p = a.p;
  const i64 row = item >> a.lane_shift;  // b * (P + L) + j: the output is contiguous
  const int lane = static_cast<int>(item & (a.lanes - 1));
  const i64 PL = p.P + p.L;
  const i64 b = row / PL;
  const i64 j = row - b * PL;
  const i64 s = insert_of(p, b);
  Tt* orow = mptr<Tt>(p.out) + row * p.D;
  if (j >= s && j < s + p.P) {  // a prompt row, cast into the token dtype, never scaled
    const i64 t = p.task != 0 ? ld_index(p.task, p.task_dtype, b * p.task_s) : 0;
    const Pt* src = (t >= 0 && t < p.T) ? cptr<Pt>(p.prompt) + t * p.prompt_st + (j - s) * p.prompt_sp : nullptr;
    copy_row_part<Pt, Tt>(orow, src, p.prompt_sd, p.D, a.ngroups, lane, a.lanes, 1.f, false, p.vec_out != 0,
                          p.vec_prompt != 0);
    return;
  }
  const i64 l = j < s ? j : j - p.P;  // a token row
  const Tt* src;
  if (p.from_ids) {
    const i64 id = ld_index(p.ids, p.ids_dtype, b * p.ids_sb + l * p.ids_sl);
    src = (id >= 0 && id < p.V) ? cptr<Tt>(p.tokens) + id * p.tok_sv : nullptr;  // never out of bounds
  } else {
    src = cptr<Tt>(p.tokens) + b * p.tok_sb + l * p.tok_sl;
  }
  copy_row_part<Tt, Tt>(orow, src, p.tok_sd, p.D, a.ngroups, lane, a.lanes, p.embed_scale, a.has_scale,
                        p.vec_out != 0, p.vec_tokens != 0);
}

// ---- backward of inputs_embeds: one item = one lane of one (b, l) row: the inverse gather ----------------------

template <typename Tg>
SP_HD void sp_bwd_embeds_item(const SpArgs& a, i64 item) {
  const SoftPromptParams& p = a.p;
  const i64 row = item >> a.lane_shift;  // b * L + l: dembeds is contiguous
  const int lane = static_cast<int>(item & (a.lanes - 1));
  const i64 b = row / p.L;
  const i64 l = row - b * p.L;
  const i64 s = insert_of(p, b);
  const i64 j = l < s ? l : l + p.P;
  const Tg* src = cptr<Tg>(p.grad) + b * p.grad_sb + j * p.grad_sj;
  copy_row_part<Tg, Tg>(mptr<Tg>(p.dembeds) + row * p.D, src, p.grad_sd, p.D, a.ngroups, lane, a.lanes,
                        p.embed_scale, a.has_scale, p.vec_out != 0, p.vec_grad != 0);
}

// ---- backward of the prompt: one item = (chunk k, task t, prompt row pr, feature group g) ---------------------

template <typename Pt, typename Tg>
SP_HD void sp_bwd_prompt_item(const SpArgs& a, i64 item) {
  constexpr int VEC = vec_of<Tg>();
  const SoftPromptParams& p = a.p;
  const i64 g = item % a.ngroups;
  i64 r = item / a.ngroups;
  const i64 pr = r % p.P;
  r /= p.P;
  const i64 t = r % p.T;
  const i64 k = r / p.T;
  const i64 x0 = g * VEC;
  const int ncols = p.D - x0 < VEC ? static_cast<int>(p.D - x0) : VEC;
  const bool vec_src = p.vec_grad != 0 && ncols == VEC;

  // this chunk of the task's samples, clamped into [0, B]
  i64 lo_t = 0, hi_t = p.B;
  if (p.offsets != 0) {
    lo_t = cptr<std::int64_t>(p.offsets)[t];
    hi_t = cptr<std::int64_t>(p.offsets)[t + 1];
  }
  lo_t = lo_t < 0 ? 0 : lo_t;
  hi_t = hi_t > p.B ? p.B : hi_t;
  const i64 lo = lo_t + k * p.chunk;
  const i64 hi = hi_t - lo < p.chunk ? hi_t : lo + p.chunk;

  float acc[VEC];
  SP_UNROLL for (int q = 0; q < VEC; ++q) acc[q] = 0.f;
  const Tg* gbase = cptr<Tg>(p.grad) + pr * p.grad_sj + x0 * p.grad_sd;
  SP_UNROLL4 for (i64 i = lo; i < hi; ++i) {  // increasing sample order within the task: a fixed order
    const i64 b = p.order != 0 ? cptr<std::int64_t>(p.order)[i] : i;
    if (b < 0 || b >= p.B) continue;
    const Tg* src = gbase + b * p.grad_sb + insert_of(p, b) * p.grad_sj;
    float v[VEC];
    if (vec_src) {
      load_group<Tg, VEC>(src, v);
    } else {
      SP_UNROLL for (int q = 0; q < VEC; ++q) v[q] = q < ncols ? to_f32(src[q * p.grad_sd]) : 0.f;
    }
    SP_UNROLL for (int q = 0; q < VEC; ++q) acc[q] += v[q];
  }

  const i64 off = ((k * p.T + t) * p.P + pr) * p.D + x0;  // k == 0 when there is one chunk
  const bool vec_dst = p.vec_out != 0 && ncols == VEC;
  if (p.nchunks > 1) {
    float* dst = mptr<float>(p.dprompt) + off;
    if (vec_dst) {
      store_group<float, VEC>(dst, acc);
    } else {
      SP_UNROLL for (int q = 0; q < VEC; ++q) {  // unrolled: acc stays in registers
        if (q < ncols) dst[q] = acc[q];
      }
    }
  } else {
    Pt* dst = mptr<Pt>(p.dprompt) + off;
    if (vec_dst) {
      store_group<Pt, VEC>(dst, acc);
    } else {
      SP_UNROLL for (int q = 0; q < VEC; ++q) {
        if (q < ncols) dst[q] = from_f32<Pt>(acc[q]);
      }
    }
  }
}

// ---- kernels: grid-stride loops over the items ------------------------------------------------------------------

template <typename Pt, typename Tt>
__global__ void __launch_bounds__(kThreads) sp_fwd_kernel(const SpArgs a, i64 n) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;  // a multiple of 32: a row's lanes stay together
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    sp_fwd_item<Pt, Tt>(a, i);
  }
}

template <typename Tg>
__global__ void __launch_bounds__(kThreads) sp_bwd_embeds_kernel(const SpArgs a, i64 n) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    sp_bwd_embeds_item<Tg>(a, i);
  }
}

template <typename Pt, typename Tg>
__global__ void __launch_bounds__(kThreads) sp_bwd_prompt_kernel(const SpArgs a, i64 n) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    sp_bwd_prompt_item<Pt, Tg>(a, i);
  }
}

// ---- launchers ---------------------------------------------------------------------------------------------------

bool aligned(std::uintptr_t ptr, i64 bytes) { return ptr % static_cast<std::uintptr_t>(bytes) == 0; }

// The caller's vector flag for rows of S read in groups of VEC (= 16 bytes of the output type T): a pack-aligned
// base, unit feature stride, every row stride a whole number of packs.
template <typename S, typename T>
bool rows_vectorisable(std::uintptr_t ptr, i64 sd, i64 s1, i64 s2) {
  constexpr i64 K = pack_elems<S, vec_of<T>()>();
  return aligned(ptr, K * static_cast<i64>(sizeof(S))) && sd == 1 && s1 % K == 0 && s2 % K == 0;
}

template <typename T>
bool out_vectorisable(std::uintptr_t ptr, i64 D) {
  return aligned(ptr, 16) && D % vec_of<T>() == 0;
}

// Lanes per row: enough for the row's groups, a power of two, at most a warp.
void set_lanes(SpArgs& a, i64 vec) {
  a.ngroups = (a.p.D + vec - 1) / vec;
  a.lanes = 1;
  a.lane_shift = 0;
  while (a.lanes < kMaxLanes && a.lanes < a.ngroups) {
    a.lanes *= 2;
    ++a.lane_shift;
  }
}

bool valid_index_code(std::int32_t c) { return c >= 0 && c <= 4; }

bool common_ok(const SoftPromptParams& p) {
  return p.B >= 0 && p.L >= 0 && p.P >= 0 && p.D >= 0 && p.T >= 0 && p.V >= 0 && valid_index_code(p.ids_dtype) &&
         valid_index_code(p.task_dtype) && valid_index_code(p.insert_dtype);
}

template <typename Pt, typename Tt>
int run_fwd(const SoftPromptParams& p, bool host) {
  SpArgs a{};
  a.p = p;
  a.has_scale = p.embed_scale != 1.f;
  set_lanes(a, vec_of<Tt>());
  const i64 rows = p.B * (p.P + p.L);
  if (rows == 0 || p.D == 0) return 0;
  if (p.out == 0 || (p.P > 0 && p.prompt == 0) || (p.L > 0 && (p.tokens == 0 || (p.from_ids && p.ids == 0)))) {
    return kInvalid;
  }
  if (p.vec_out && !out_vectorisable<Tt>(p.out, p.D)) return kInvalid;
  if (p.vec_prompt && !rows_vectorisable<Pt, Tt>(p.prompt, p.prompt_sd, p.prompt_st, p.prompt_sp)) return kInvalid;
  if (p.vec_tokens) {
    const bool ok = p.from_ids ? rows_vectorisable<Tt, Tt>(p.tokens, p.tok_sd, p.tok_sv, 0)
                               : rows_vectorisable<Tt, Tt>(p.tokens, p.tok_sd, p.tok_sb, p.tok_sl);
    if (!ok) return kInvalid;
  }
  const i64 n = rows << a.lane_shift;
  if (host) {
    for (i64 i = 0; i < n; ++i) sp_fwd_item<Pt, Tt>(a, i);
    return 0;
  }
  sp_fwd_kernel<Pt, Tt><<<grid_for(n, kThreads), kThreads, 0, as_stream(p.stream)>>>(a, n);
  return last_launch_error();
}

template <typename Pt, typename Tg>
int run_bwd(const SoftPromptParams& p, bool host) {
  const i64 PL = p.P + p.L;
  if (p.chunk < 1 || p.nchunks < 1) return kInvalid;
  if (p.B > 0 && PL > 0 && p.D > 0 && p.grad == 0) return kInvalid;
  if (p.vec_grad && !rows_vectorisable<Tg, Tg>(p.grad, p.grad_sd, p.grad_sb, p.grad_sj)) return kInvalid;
  // d prompt: every (chunk, task, row, group) item writes its group, zero when it owns no sample
  SpArgs ap{};
  ap.p = p;
  set_lanes(ap, vec_of<Tg>());
  const i64 n_prompt = p.dprompt != 0 ? p.nchunks * p.T * p.P * ap.ngroups : 0;
  if (n_prompt > 0) {
    const bool vec_ok = p.nchunks > 1 ? out_vectorisable<float>(p.dprompt, p.D)
                                      : aligned(p.dprompt, pack_elems<Pt, vec_of<Tg>()>() * sizeof(Pt)) &&
                                            p.D % vec_of<Tg>() == 0;
    if (p.vec_out && !vec_ok) return kInvalid;
  }
  // d inputs_embeds
  SpArgs ae = ap;
  ae.has_scale = p.embed_scale != 1.f;
  const i64 n_embeds = (p.dembeds != 0 && p.D > 0) ? (p.B * p.L) << ae.lane_shift : 0;
  if (n_embeds > 0 && p.vec_out && !out_vectorisable<Tg>(p.dembeds, p.D)) return kInvalid;
  if (host) {
    for (i64 i = 0; i < n_prompt; ++i) sp_bwd_prompt_item<Pt, Tg>(ap, i);
    for (i64 i = 0; i < n_embeds; ++i) sp_bwd_embeds_item<Tg>(ae, i);
    return 0;
  }
  const cudaStream_t stream = as_stream(p.stream);
  if (n_prompt > 0) {
    sp_bwd_prompt_kernel<Pt, Tg><<<grid_for(n_prompt, kThreads), kThreads, 0, stream>>>(ap, n_prompt);
    const int err = last_launch_error();
    if (err != 0) return err;
  }
  if (n_embeds > 0) {
    sp_bwd_embeds_kernel<Tg><<<grid_for(n_embeds, kThreads), kThreads, 0, stream>>>(ae, n_embeds);
    return last_launch_error();
  }
  return 0;
}

enum class Pass { kFwd, kBwd };

template <typename Pt, typename Tt>
int run(Pass pass, const SoftPromptParams& p, bool host) {
  return pass == Pass::kFwd ? run_fwd<Pt, Tt>(p, host) : run_bwd<Pt, Tt>(p, host);
}

template <typename Pt>
int dispatch_tok(Pass pass, const SoftPromptParams& p, bool host) {
  switch (p.tok_dtype) {
    case 0:
      return run<Pt, float>(pass, p, host);
    case 1:
      return run<Pt, __half>(pass, p, host);
    case 2:
      return run<Pt, __nv_bfloat16>(pass, p, host);
    default:
      return kInvalid;
  }
}

// Every (prompt dtype, token dtype) pair of {float32, float16, bfloat16}.
int dispatch(Pass pass, const SoftPromptParams& p, bool host) {
  if (!common_ok(p)) return kInvalid;
  switch (p.prompt_dtype) {
    case 0:
      return dispatch_tok<float>(pass, p, host);
    case 1:
      return dispatch_tok<__half>(pass, p, host);
    case 2:
      return dispatch_tok<__nv_bfloat16>(pass, p, host);
    default:
      return kInvalid;
  }
}

}  // namespace

int soft_prompt_fwd(const SoftPromptParams& params) { return dispatch(Pass::kFwd, params, false); }
int soft_prompt_bwd(const SoftPromptParams& params) { return dispatch(Pass::kBwd, params, false); }
int soft_prompt_fwd_host(const SoftPromptParams& params) { return dispatch(Pass::kFwd, params, true); }
int soft_prompt_bwd_host(const SoftPromptParams& params) { return dispatch(Pass::kBwd, params, true); }

}  // namespace reprokernels
