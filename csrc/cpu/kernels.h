// Parameter blocks and entry points of the CPU kernels (reprokernels._cpu). Plain C++: Python gives a params
// struct's fields as a dict (param_dict.h) from tensors it validated (reprokernels/cpu/*.py). Pointers are
// integers, sizes and strides int64 in elements, dtype codes as in common.h. Every entry returns 0 on success or
// 1 for parameters it cannot serve (an unknown code, a missing pointer), so nothing is run on bad input, or, where
// the launcher asked for it (check_index = 1), kIndexError + i when the i-th index tensor the entry reads holds a
// value outside its range (checked before anything is written; reprokernels/_cpu.py names the tensor).
//
// Determinism: every output element is produced by one thread, and every reduction (over a row, over the batch)
// runs in a fixed order that does not depend on the thread count: the same bits for any `threads`.
#pragma once
#include <cstdint>

namespace rkcpu {

// The range check of the index tensors a kernel reads, done in the launch itself: the op layer's own check was a
// second pybind11 call and Python per tensor (5-8 us a call at small batches, as much as the kernel).
constexpr int kIndexError = 10;

struct LabelMapParams {
  std::uintptr_t x = 0, mapping = 0, w = 0, out = 0, lse = 0, grad = 0, dx = 0, dw = 0;
  std::int64_t B = 0, K = 0, T = 0, M = 0;
  std::int64_t x_sb = 0, x_sk = 0, map_st = 0, map_sm = 0, w_sk = 0, w_st = 0, grad_sb = 0, grad_st = 0;
  std::int32_t x_dtype = 0, out_dtype = 0, grad_dtype = 0, dw_dtype = 0, map_dtype = 0;
  std::int32_t input = 0;   // 0 logits, 1 probs, 2 log_probs
  std::int32_t reduce = 0;  // 0 mean, 1 sum
  std::int32_t check_index = 0;  // label_map_fwd: kIndexError for a mapping entry outside [-1, K - 1]
  std::int32_t threads = 1;
};
// Index mapping (T, M): out (B, T) contiguous (x dtype for logits, else float32), lse (B, 2) float32.
int label_map_fwd(const LabelMapParams& p);
// Index mapping backward: dx (B, K) contiguous in x dtype; out is the saved float32 output (probs).
int label_map_bwd(const LabelMapParams& p);
// Dense mapping (K, T), w float32: out (B, T) in out_dtype; lse as above.
int label_map_dense_fwd(const LabelMapParams& p);
// Dense backward: dx (B, K) in x dtype and/or dw (K, T) in dw_dtype (non-zero pointers), lse read.
int label_map_dense_bwd(const LabelMapParams& p);

struct SoftPromptParams {
  std::uintptr_t prompt = 0, ids = 0, tokens = 0, task = 0, insert = 0, out = 0, grad = 0, dprompt = 0,
                 dembeds = 0;
  std::int64_t B = 0, L = 0, P = 0, D = 0, T = 1, V = 0;
  std::int64_t prompt_st = 0, prompt_sp = 0, prompt_sd = 0;
  std::int64_t ids_sb = 0, ids_sl = 0;
  std::int64_t tok_sv = 0, tok_sb = 0, tok_sl = 0, tok_sd = 0;  // table (V, D) or inputs_embeds (B, L, D)
  std::int64_t task_s = 0, insert_s = 0;
  std::int64_t grad_sb = 0, grad_sj = 0, grad_sd = 0;
  std::int32_t prompt_dtype = 0, tok_dtype = 0, grad_dtype = 0, ids_dtype = 0, task_dtype = 0, insert_dtype = 0;
  std::int32_t from_ids = 0;
  float embed_scale = 1.0f;
  // soft_prompt_fwd: kIndexError + 0 / 1 / 2 for ids outside [0, V - 1], task outside [0, T - 1], insert outside
  // [0, L]
  std::int32_t check_index = 0;
  std::int32_t threads = 1;
};
// out (B, P + L, D) contiguous in tok_dtype.
int soft_prompt_fwd(const SoftPromptParams& p);
// dprompt (T, P, D) contiguous in prompt_dtype (summed over the batch in sample order, float32), dembeds
// (B, L, D) contiguous in grad_dtype.
int soft_prompt_bwd(const SoftPromptParams& p);

// The per-token tensors of a soft-prompted batch laid out like soft_prompt_fwd's output, (B, P + L) contiguous:
// mask_out (mask's dtype: 1 at prompt positions), labels_out (labels' dtype: -100 there) and position_ids (int64:
// the running count of non-zero mask entries minus 1, 0 where the mask is 0; written with mask_out). Index codes
// as load_index (a bool mask is read and written as uint8; -100 wraps in uint8 labels, as torch's fill does).
// with_mask / with_labels: which outputs to write.
struct PromptLayoutParams {
  std::uintptr_t mask = 0, labels = 0, insert = 0, mask_out = 0, labels_out = 0, position_ids = 0;
  std::int64_t B = 0, L = 0, P = 0;
  std::int64_t mask_sb = 0, mask_sl = 0, labels_sb = 0, labels_sl = 0, insert_s = 0;
  std::int32_t mask_dtype = 0, labels_dtype = 0, insert_dtype = 0, with_mask = 0, with_labels = 0;
  std::int32_t threads = 1;
};
int soft_prompt_layout(const PromptLayoutParams& p);

struct VisualPromptParams {
  std::uintptr_t x = 0, delta = 0, mask = 0, mean = 0, stdev = 0, out = 0, grad = 0, dx = 0, ddelta = 0,
                 dmask = 0;
  std::int64_t B = 0, C = 0, h = 0, w = 0, H = 0, W = 0, top = 0, left = 0;
  std::int64_t rect_top = 0, rect_left = 0, rect_h = 0, rect_w = 0;
  std::int64_t Bm = 1, Cm = 1, Hm = 1, Wm = 1;
  std::int64_t x_sb = 0, x_sc = 0, x_sh = 0, x_sw = 0;
  std::int64_t delta_sb = 0, delta_sc = 0, delta_sh = 0, delta_sw = 0;
  std::int64_t mask_sb = 0, mask_sc = 0, mask_sh = 0, mask_sw = 0;
  std::int64_t grad_sb = 0, grad_sc = 0, grad_sh = 0, grad_sw = 0;
  std::int32_t x_dtype = 0, delta_dtype = 0;
  std::int32_t invert = 0, squash = 0, order = 0, has_clamp = 0, delta_per_sample = 0;
  float fill = 0.0f, clamp_lo = 0.0f, clamp_hi = 0.0f;
  std::int32_t threads = 1;
};
// out (B, C, H, W) contiguous in x dtype; mask float32, mean/std float32 (C,).
int visual_prompt_fwd(const VisualPromptParams& p);
// dx (B, C, h, w) contiguous in x dtype; ddelta delta's shape contiguous in delta_dtype; dmask (Bm, Cm, Hm, Wm)
// contiguous float32. Non-zero pointers are written.
int visual_prompt_bwd(const VisualPromptParams& p);

struct LabelHistogramParams {
  std::uintptr_t x = 0, targets = 0, out = 0;
  std::int64_t B = 0, K = 0, T = 0, topk = 0;
  std::int64_t x_sb = 0, x_sk = 0, t_s = 0, out_sk = 0, out_st = 0;
  std::int32_t x_dtype = 0, preds = 0, pred_dtype = 0, target_dtype = 0;
  std::int32_t weight = 0;  // 0 count, 1 prob
  std::int32_t threads = 1;
};
// out (K, T) float32, any strides, accumulated in place.
int label_histogram_accumulate(const LabelHistogramParams& p);

// prefix_attention's forward for decoding (reprokernels/cpu/prefix_attention.py): q (B, Hq, Lq, D), k / v
// (B, Hkv, Lk, D) in dtype; prefix pk / pv (T, Hkv, P, D) in p_dtype (a shared prefix: T = 1, pk_st = 0), task
// (B,) index code task_dtype or 0; the sequence keys seen: kpm (B, Lk) bytes (non-zero = seen), or kv_len (B,)
// index code len_dtype, or all of them; every row's last dim unit-stride. out (B, Hq, Lq, D) contiguous in dtype,
// lse (B, Hq, Lq) float32 (-inf where a query sees nothing). rows_per_item: batch rows that share one read of a
// shared prefix (1 with a task table). check_index: kIndexError for task outside [0, T - 1], + 1 for kv_len
// outside [0, Lk].
struct PrefixAttnParams {
  std::uintptr_t q = 0, k = 0, v = 0, pk = 0, pv = 0, task = 0, kpm = 0, kv_len = 0, out = 0, lse = 0;
  std::int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, P = 0, D = 0, T = 1;
  std::int64_t q_sb = 0, q_sh = 0, q_sl = 0, k_sb = 0, k_sh = 0, k_sl = 0, v_sb = 0, v_sh = 0, v_sl = 0;
  std::int64_t pk_st = 0, pk_sh = 0, pk_sl = 0, pv_st = 0, pv_sh = 0, pv_sl = 0;
  std::int64_t task_s = 0, kpm_sb = 0, kpm_sl = 0, len_s = 0, rows_per_item = 1;
  std::int64_t score_budget = 0;  // floats of scores a work item may hold (its rows are split beyond); 0: no limit
  std::int32_t dtype = 0, p_dtype = 0, task_dtype = 0, len_dtype = 0, causal = 0, check_index = 0;
  float scale = 1.0f;
  std::int32_t threads = 1;
};
int prefix_attention_fwd(const PrefixAttnParams& p);

// (lo, hi) of the (n0, n1) integer tensor at ptr (index code as load_index; strides in elements; a 1-D tensor is
// (n0, 1)); 1 for a null pointer, an unknown code or an empty tensor.
int index_range(std::uintptr_t ptr, std::int32_t dtype, std::int64_t n0, std::int64_t n1, std::int64_t s0,
                std::int64_t s1, std::int64_t* lo, std::int64_t* hi);
// Whether every value of the (n0, n1) integer tensor at ptr lies in [lo, hi] (true for an empty one).
bool index_within(std::uintptr_t ptr, std::int32_t dtype, std::int64_t n0, std::int64_t n1, std::int64_t s0,
                  std::int64_t s1, std::int64_t lo, std::int64_t hi);

}  // namespace rkcpu
