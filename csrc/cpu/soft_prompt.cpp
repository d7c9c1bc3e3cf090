// soft_prompt_concat on the CPU: each output row (b, j) of D features is copied by one thread from its source
// (an embedding-table row, an inputs_embeds row, or the row's task prompt), scaled and cast on the way; the
// (B, L, D) token embedding is never materialised. The prompt gradient sums each prompt row over the batch in
// sample order (one thread per (task, prompt row)): the same bits for any thread count.
// Spec: reprokernels/reference/soft_prompt.py.
#include <algorithm>
#include <vector>

#include "common.h"
#include "half_rows.h"
#include "kernels.h"

namespace rkcpu {
namespace {

// A contiguous float32 row rounded into a 16-bit one (a float32 prompt beside a 16-bit table): the clones vectorise
// the rounding (float16: the CPU's conversion instructions); the baseline build's scalar loop was 0.7 ns an element.
template <int DST>
RK_CLONES void f32_row_to(const float* src, void* dst, std::int64_t obase, std::int64_t D) {
  if (DST == F16) {
    float_row_to_f16(src, static_cast<std::uint16_t*>(dst) + obase, D);
    return;
  }
#pragma omp simd
  for (std::int64_t d = 0; d < D; ++d) store<DST>(dst, obase + d, src[d]);
}

template <int SRC, int DST>
inline void copy_row(const void* src, std::int64_t base, std::int64_t sd, void* dst, std::int64_t obase,
                     std::int64_t D, float scale, bool scaled) {
  if constexpr (SRC == F32 && DST != F32) {
    if (sd == 1 && !scaled) {
      f32_row_to<DST>(static_cast<const float*>(src) + base, dst, obase, D);
      return;
    }
  }
  if (sd == 1) {
    if (scaled) {
#pragma omp simd
      for (std::int64_t d = 0; d < D; ++d) store<DST>(dst, obase + d, load<SRC>(src, base + d) * scale);
    } else if constexpr (SRC == DST) {
      std::memcpy(static_cast<char*>(dst) + obase * (DST == F32 ? 4 : 2),
                  static_cast<const char*>(src) + base * (SRC == F32 ? 4 : 2), D * (DST == F32 ? 4 : 2));
    } else {
#pragma omp simd
      for (std::int64_t d = 0; d < D; ++d) store<DST>(dst, obase + d, load<SRC>(src, base + d));
    }
  } else {
    for (std::int64_t d = 0; d < D; ++d) {
      const float v = load<SRC>(src, base + d * sd);
      store<DST>(dst, obase + d, scaled ? v * scale : v);
    }
  }
}

template <int PDT, int TDT>
void fwd(const SoftPromptParams& p) {
  const void* prompt = reinterpret_cast<const void*>(p.prompt);
  const void* tok = reinterpret_cast<const void*>(p.tokens);
  const void* ids = reinterpret_cast<const void*>(p.ids);
  const void* task = reinterpret_cast<const void*>(p.task);
  const void* ins = reinterpret_cast<const void*>(p.insert);
  void* out = reinterpret_cast<void*>(p.out);
  const std::int64_t PL = p.P + p.L, D = p.D;
  const bool scaled = p.embed_scale != 1.0f;
  const int nt = threads_of(p.threads);
  // A prompt in another dtype (float32 master weights beside a 16-bit table) is rounded into the output's dtype
  // once per call, (T, P, D), and then copied like a table row where the batch has more rows than the table has
  // tasks: the same single rounding, T * P * D conversions instead of B * P * D. A small batch converts its rows
  // on the way (no buffer, no extra pass).
  std::vector<unsigned char> conv;
  const void* prompt_rows = prompt;
  std::int64_t pst = p.prompt_st, psp = p.prompt_sp, psd = p.prompt_sd;
  bool rounded = PDT == TDT;
  if (PDT != TDT && p.B > p.T) {
    rounded = true;
    constexpr std::int64_t es = TDT == F32 ? 4 : 2;
    conv.resize(static_cast<std::size_t>(p.T * p.P * D * es));
#pragma omp parallel for schedule(static) num_threads(nt)
    for (std::int64_t r = 0; r < p.T * p.P; ++r)
      copy_row<PDT, TDT>(prompt, (r / p.P) * p.prompt_st + (r % p.P) * p.prompt_sp, p.prompt_sd, conv.data(),
                         r * D, D, 1.0f, false);
    prompt_rows = conv.data();
    pst = p.P * D;
    psp = D;
    psd = 1;
  }
  advise_huge(out, p.B * PL * D * (TDT == F32 ? 4 : 2));
#pragma omp parallel for schedule(static) num_threads(nt)
  for (std::int64_t r = 0; r < p.B * PL; ++r) {
    const std::int64_t b = r / PL, j = r % PL;
    std::int64_t s = ins ? load_index(p.insert_dtype, ins, b * p.insert_s) : 0;
    s = std::min(std::max<std::int64_t>(s, 0), p.L);  // range-checked by the op; never read out of bounds
    const std::int64_t obase = r * D;
    if (j >= s && j < s + p.P) {
      std::int64_t t = task ? load_index(p.task_dtype, task, b * p.task_s) : 0;
      t = std::min(std::max<std::int64_t>(t, 0), p.T - 1);
      if (rounded) copy_row<TDT, TDT>(prompt_rows, t * pst + (j - s) * psp, psd, out, obase, D, 1.0f, false);
      else copy_row<PDT, TDT>(prompt, t * pst + (j - s) * psp, psd, out, obase, D, 1.0f, false);
      continue;
    }
    const std::int64_t l = j < s ? j : j - p.P;
    std::int64_t base;
    if (p.from_ids) {
      std::int64_t v = load_index(p.ids_dtype, ids, b * p.ids_sb + l * p.ids_sl);
      v = std::min(std::max<std::int64_t>(v, 0), p.V - 1);
      base = v * p.tok_sv;
    } else {
      base = b * p.tok_sb + l * p.tok_sl;
    }
    copy_row<TDT, TDT>(tok, base, p.tok_sd, out, obase, D, p.embed_scale, scaled);
  }
}

template <int GDT>
void bwd(const SoftPromptParams& p) {
  const void* g = reinterpret_cast<const void*>(p.grad);
  const void* task = reinterpret_cast<const void*>(p.task);
  const void* ins = reinterpret_cast<const void*>(p.insert);
  const std::int64_t B = p.B, P = p.P, D = p.D, L = p.L;
  const int nt = threads_of(p.threads);
  std::vector<std::int64_t> starts(B), tasks(B);
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t s = ins ? load_index(p.insert_dtype, ins, b * p.insert_s) : 0;
    starts[b] = std::min(std::max<std::int64_t>(s, 0), L);
    tasks[b] = task ? load_index(p.task_dtype, task, b * p.task_s) : 0;
  }
  if (p.dprompt) {
    void* dp = reinterpret_cast<void*>(p.dprompt);
#pragma omp parallel num_threads(nt)
    {
      std::vector<float> acc(D), row(GDT == F16 ? D : 0);
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < p.T * P; ++r) {
        const std::int64_t t = r / P, i = r % P;
        std::fill(acc.begin(), acc.end(), 0.0f);
        float* a = acc.data();
        for (std::int64_t b = 0; b < B; ++b) {
          if (tasks[b] != t) continue;
          const std::int64_t base = b * p.grad_sb + (starts[b] + i) * p.grad_sj;
          if (GDT == F16 && p.grad_sd == 1) {  // the CPU's half conversion (half_rows.h), then a float32 sum
            f16_row_to_float(static_cast<const std::uint16_t*>(g) + base, row.data(), D);
            const float* v = row.data();
#pragma omp simd
            for (std::int64_t d = 0; d < D; ++d) a[d] += v[d];
          } else if (p.grad_sd == 1) {
#pragma omp simd
            for (std::int64_t d = 0; d < D; ++d) a[d] += load<GDT>(g, base + d);
          } else {
            for (std::int64_t d = 0; d < D; ++d) a[d] += load<GDT>(g, base + d * p.grad_sd);
          }
        }
        for (std::int64_t d = 0; d < D; ++d) store_any(p.prompt_dtype, dp, r * D + d, a[d]);
      }
    }
  }
  if (p.dembeds) {
    void* de = reinterpret_cast<void*>(p.dembeds);
    advise_huge(de, B * L * D * (GDT == F32 ? 4 : 2));
    const bool scaled = p.embed_scale != 1.0f;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (std::int64_t r = 0; r < B * L; ++r) {
      const std::int64_t b = r / L, l = r % L;
      const std::int64_t j = l < starts[b] ? l : l + P;
      copy_row<GDT, GDT>(g, b * p.grad_sb + j * p.grad_sj, p.grad_sd, de, r * D, D, p.embed_scale, scaled);
    }
  }
}

template <int PDT>
void fwd_p(const SoftPromptParams& p) {
  switch (p.tok_dtype) {
    case F32: fwd<PDT, F32>(p); break;
    case F16: fwd<PDT, F16>(p); break;
    default: fwd<PDT, BF16>(p); break;
  }
}

bool codes_ok(const SoftPromptParams& p) {
  auto f = [](std::int32_t c) { return c >= 0 && c <= 2; };
  auto i = [](std::int32_t c) { return c >= 0 && c <= 4; };
  return f(p.prompt_dtype) && f(p.tok_dtype) && f(p.grad_dtype) && i(p.ids_dtype) && i(p.task_dtype) &&
         i(p.insert_dtype) && p.B >= 0 && p.L >= 0 && p.P >= 0 && p.D >= 0 && p.T >= 1;
}

inline void store_index(std::int32_t code, void* p, std::int64_t i, std::int64_t v) {
  switch (code) {
    case 0: static_cast<std::int64_t*>(p)[i] = v; break;
    case 1: static_cast<std::int32_t*>(p)[i] = static_cast<std::int32_t>(v); break;
    case 2: static_cast<std::int16_t*>(p)[i] = static_cast<std::int16_t>(v); break;
    case 3: static_cast<std::int8_t*>(p)[i] = static_cast<std::int8_t>(v); break;
    default: static_cast<std::uint8_t*>(p)[i] = static_cast<std::uint8_t>(v); break;
  }
}

}  // namespace

int soft_prompt_layout(const PromptLayoutParams& p) {
  auto code_ok = [](std::int32_t c) { return c >= 0 && c <= 4; };
  if (!code_ok(p.mask_dtype) || !code_ok(p.labels_dtype) || !code_ok(p.insert_dtype) || p.B < 0 || p.L < 0 ||
      p.P < 0)
    return 1;
  if (p.B == 0 || p.P + p.L == 0) return 0;
  // (an empty (B, 0) input has no data pointer: with L = 0 every position is a prompt position, nothing is read)
  if ((p.with_mask && (!p.mask_out || !p.position_ids || (p.L && !p.mask))) ||
      (p.with_labels && (!p.labels_out || (p.L && !p.labels))))
    return 1;
  const void* mask = reinterpret_cast<const void*>(p.mask);
  const void* labels = reinterpret_cast<const void*>(p.labels);
  const void* ins = reinterpret_cast<const void*>(p.insert);
  void* mask_out = reinterpret_cast<void*>(p.mask_out);
  void* labels_out = reinterpret_cast<void*>(p.labels_out);
  auto* pos_out = reinterpret_cast<std::int64_t*>(p.position_ids);
  const std::int64_t PL = p.P + p.L;
  const int nt = p.B * PL >= (1 << 16) ? threads_of(p.threads) : 1;  // a handful of rows: no thread team
#pragma omp parallel for schedule(static) num_threads(nt)
  for (std::int64_t b = 0; b < p.B; ++b) {
    std::int64_t s = ins ? load_index(p.insert_dtype, ins, b * p.insert_s) : 0;
    s = std::min(std::max<std::int64_t>(s, 0), p.L);  // range-checked by the op; never read out of bounds
    std::int64_t kept = 0;
    for (std::int64_t j = 0; j < PL; ++j) {
      const bool prompt_pos = j >= s && j < s + p.P;
      const std::int64_t l = j < s ? j : j - p.P;
      const std::int64_t o = b * PL + j;
      if (p.with_mask) {
        const std::int64_t m = prompt_pos ? 1 : load_index(p.mask_dtype, mask, b * p.mask_sb + l * p.mask_sl);
        store_index(p.mask_dtype, mask_out, o, m);
        kept += m != 0;
        pos_out[o] = m != 0 ? kept - 1 : 0;
      }
      if (p.with_labels)
        store_index(p.labels_dtype, labels_out, o,
                    prompt_pos ? -100 : load_index(p.labels_dtype, labels, b * p.labels_sb + l * p.labels_sl));
    }
  }
  return 0;
}

int soft_prompt_fwd(const SoftPromptParams& p) {
  // A pointer is needed only where something is read: no prompt rows for P = 0, no tokens for L = 0 (then V may
  // be 0 too), nothing at all for an empty output.
  if (!codes_ok(p)) return 1;
  if (p.check_index) {
    if (p.from_ids && !index_within(p.ids, p.ids_dtype, p.B, p.L, p.ids_sb, p.ids_sl, 0, p.V - 1))
      return kIndexError;
    if (p.task && !index_within(p.task, p.task_dtype, p.B, 1, p.task_s, 1, 0, p.T - 1)) return kIndexError + 1;
    if (p.insert && !index_within(p.insert, p.insert_dtype, p.B, 1, p.insert_s, 1, 0, p.L)) return kIndexError + 2;
  }
  if (p.B == 0 || p.D == 0 || p.P + p.L == 0) return 0;
  if (!p.out || (p.P && !p.prompt) || (p.L && !p.tokens) || (p.L && p.from_ids && (!p.ids || p.V < 1))) return 1;
  switch (p.prompt_dtype) {
    case F32: fwd_p<F32>(p); break;
    case F16: fwd_p<F16>(p); break;
    default: fwd_p<BF16>(p); break;
  }
  return 0;
}

int soft_prompt_bwd(const SoftPromptParams& p) {
  if (!codes_ok(p) || (!p.grad && p.B * (p.P + p.L) * p.D > 0)) return 1;  // B = 0: d prompt is zeros
  switch (p.grad_dtype) {
    case F32: bwd<F32>(p); break;
    case F16: bwd<F16>(p); break;
    default: bwd<BF16>(p); break;
  }
  return 0;
}

}  // namespace rkcpu
