// pybind11 module reprokernels._C_cpu: each entry point takes its params struct's fields as one dict (filled by
// reprokernels/cpu/*.py, parsed by param_dict.h) and returns 0, or 1 for parameters the kernels cannot serve. No
// torch headers: builds in seconds with the host compiler against any torch. The GIL is released while a kernel
// runs (no Python object is touched after the dict is read).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <tuple>

#include "kernels.h"
#include "param_dict.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace rkcpu;

namespace {

// The field table of each params struct (every field of its declaration in kernels.h, by name).
#define F(name) RK_FIELD(S, name)
const FieldTable& fields(const LabelMapParams*) {
  using S = LabelMapParams;
  static const FieldTable t{
      F(x), F(mapping), F(w), F(out), F(lse), F(grad), F(dx), F(dw), F(B), F(K), F(T), F(M), F(x_sb), F(x_sk),
      F(map_st), F(map_sm), F(w_sk), F(w_st), F(grad_sb), F(grad_st), F(x_dtype), F(out_dtype), F(grad_dtype),
      F(dw_dtype), F(map_dtype), F(input), F(reduce), F(check_index), F(threads)};
  return t;
}

const FieldTable& fields(const SoftPromptParams*) {
  using S = SoftPromptParams;
  static const FieldTable t{
      F(prompt), F(ids), F(tokens), F(task), F(insert), F(out), F(grad), F(dprompt), F(dembeds), F(B), F(L), F(P),
      F(D), F(T), F(V), F(prompt_st), F(prompt_sp), F(prompt_sd), F(ids_sb), F(ids_sl), F(tok_sv), F(tok_sb),
      F(tok_sl), F(tok_sd), F(task_s), F(insert_s), F(grad_sb), F(grad_sj), F(grad_sd), F(prompt_dtype),
      F(tok_dtype), F(grad_dtype), F(ids_dtype), F(task_dtype), F(insert_dtype), F(from_ids), F(embed_scale),
      F(check_index), F(threads)};
  return t;
}

const FieldTable& fields(const PromptLayoutParams*) {
  using S = PromptLayoutParams;
  static const FieldTable t{
      F(mask), F(labels), F(insert), F(mask_out), F(labels_out), F(position_ids), F(B), F(L), F(P), F(mask_sb),
      F(mask_sl), F(labels_sb), F(labels_sl), F(insert_s), F(mask_dtype), F(labels_dtype), F(insert_dtype),
      F(with_mask), F(with_labels), F(threads)};
  return t;
}

const FieldTable& fields(const VisualPromptParams*) {
  using S = VisualPromptParams;
  static const FieldTable t{
      F(x), F(delta), F(mask), F(mean), F(stdev), F(out), F(grad), F(dx), F(ddelta), F(dmask), F(B), F(C), F(h),
      F(w), F(H), F(W), F(top), F(left), F(rect_top), F(rect_left), F(rect_h), F(rect_w), F(Bm), F(Cm), F(Hm), F(Wm),
      F(x_sb), F(x_sc), F(x_sh), F(x_sw), F(delta_sb), F(delta_sc), F(delta_sh), F(delta_sw), F(mask_sb), F(mask_sc),
      F(mask_sh), F(mask_sw), F(grad_sb), F(grad_sc), F(grad_sh), F(grad_sw), F(x_dtype), F(delta_dtype), F(invert),
      F(squash), F(order), F(has_clamp), F(delta_per_sample), F(fill), F(clamp_lo), F(clamp_hi), F(threads)};
  return t;
}

const FieldTable& fields(const LabelHistogramParams*) {
  using S = LabelHistogramParams;
  static const FieldTable t{
      F(x), F(targets), F(out), F(B), F(K), F(T), F(topk), F(x_sb), F(x_sk), F(t_s), F(out_sk), F(out_st),
      F(x_dtype), F(preds), F(pred_dtype), F(target_dtype), F(weight), F(threads)};
  return t;
}

const FieldTable& fields(const PrefixAttnParams*) {
  using S = PrefixAttnParams;
  static const FieldTable t{
      F(q), F(k), F(v), F(pk), F(pv), F(task), F(kpm), F(kv_len), F(out), F(lse), F(B), F(Hq), F(Hkv), F(Lq),
      F(Lk), F(P), F(D), F(T), F(q_sb), F(q_sh), F(q_sl), F(k_sb), F(k_sh), F(k_sl), F(v_sb), F(v_sh), F(v_sl),
      F(pk_st), F(pk_sh), F(pk_sl), F(pv_st), F(pv_sh), F(pv_sl), F(task_s), F(kpm_sb), F(kpm_sl), F(len_s),
      F(rows_per_item), F(score_budget), F(dtype), F(p_dtype), F(task_dtype), F(len_dtype), F(causal), F(check_index), F(scale),
      F(threads)};
  return t;
}

#undef F

// A kernel entry as a Python function of one dict: parse with the GIL held, run without it.
template <class S, int (*Kernel)(const S&)>
void def_kernel(py::module_& m, const char* name, const char* struct_name) {
  m.def(name, [struct_name](const py::dict& d) {
    const S p = params_from_dict<S>(d, fields(static_cast<const S*>(nullptr)), struct_name);
    py::gil_scoped_release nogil;
    return Kernel(p);
  });
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "reprokernels CPU kernels (C++ + OpenMP on raw pointers; see reprokernels/_cpu.py)";
#ifdef _OPENMP
  m.attr("openmp") = true;
  m.def("max_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("openmp") = false;
  m.def("max_threads", []() { return 1; });
#endif
  def_kernel<LabelMapParams, &label_map_fwd>(m, "label_map_fwd", "LabelMapParams");
  def_kernel<LabelMapParams, &label_map_bwd>(m, "label_map_bwd", "LabelMapParams");
  def_kernel<LabelMapParams, &label_map_dense_fwd>(m, "label_map_dense_fwd", "LabelMapParams");
  def_kernel<LabelMapParams, &label_map_dense_bwd>(m, "label_map_dense_bwd", "LabelMapParams");
  def_kernel<SoftPromptParams, &soft_prompt_fwd>(m, "soft_prompt_fwd", "SoftPromptParams");
  def_kernel<SoftPromptParams, &soft_prompt_bwd>(m, "soft_prompt_bwd", "SoftPromptParams");
  def_kernel<PromptLayoutParams, &soft_prompt_layout>(m, "soft_prompt_layout", "PromptLayoutParams");
  def_kernel<VisualPromptParams, &visual_prompt_fwd>(m, "visual_prompt_fwd", "VisualPromptParams");
  def_kernel<VisualPromptParams, &visual_prompt_bwd>(m, "visual_prompt_bwd", "VisualPromptParams");
  def_kernel<PrefixAttnParams, &prefix_attention_fwd>(m, "prefix_attention_fwd", "PrefixAttnParams");
  def_kernel<LabelHistogramParams, &label_histogram_accumulate>(m, "label_histogram_accumulate", "LabelHistogramParams");
  // (lo, hi) of an integer tensor of one or two dims, or None for parameters it cannot read
  m.def("index_range", [](std::uintptr_t ptr, std::int32_t dtype, std::int64_t n0, std::int64_t n1, std::int64_t s0,
                          std::int64_t s1) -> py::object {
    std::int64_t lo = 0, hi = 0;
    if (index_range(ptr, dtype, n0, n1, s0, s1, &lo, &hi) != 0) return py::none();
    return py::make_tuple(lo, hi);
  });
}
