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

const FieldTable& fields(const LabelMapParams*) {
  static const FieldTable t{
      RK_FIELD(LabelMapParams, x), RK_FIELD(LabelMapParams, mapping), RK_FIELD(LabelMapParams, w),
      RK_FIELD(LabelMapParams, out), RK_FIELD(LabelMapParams, lse), RK_FIELD(LabelMapParams, grad),
      RK_FIELD(LabelMapParams, dx), RK_FIELD(LabelMapParams, dw), RK_FIELD(LabelMapParams, B),
      RK_FIELD(LabelMapParams, K), RK_FIELD(LabelMapParams, T), RK_FIELD(LabelMapParams, M),
      RK_FIELD(LabelMapParams, x_sb), RK_FIELD(LabelMapParams, x_sk), RK_FIELD(LabelMapParams, map_st),
      RK_FIELD(LabelMapParams, map_sm), RK_FIELD(LabelMapParams, w_sk), RK_FIELD(LabelMapParams, w_st),
      RK_FIELD(LabelMapParams, grad_sb), RK_FIELD(LabelMapParams, grad_st), RK_FIELD(LabelMapParams, x_dtype),
      RK_FIELD(LabelMapParams, out_dtype), RK_FIELD(LabelMapParams, grad_dtype),
      RK_FIELD(LabelMapParams, dw_dtype), RK_FIELD(LabelMapParams, map_dtype), RK_FIELD(LabelMapParams, input),
      RK_FIELD(LabelMapParams, reduce), RK_FIELD(LabelMapParams, threads)};
  return t;
}

const FieldTable& fields(const SoftPromptParams*) {
  static const FieldTable t{
      RK_FIELD(SoftPromptParams, prompt), RK_FIELD(SoftPromptParams, ids), RK_FIELD(SoftPromptParams, tokens),
      RK_FIELD(SoftPromptParams, task), RK_FIELD(SoftPromptParams, insert), RK_FIELD(SoftPromptParams, out),
      RK_FIELD(SoftPromptParams, grad), RK_FIELD(SoftPromptParams, dprompt), RK_FIELD(SoftPromptParams, dembeds),
      RK_FIELD(SoftPromptParams, B), RK_FIELD(SoftPromptParams, L), RK_FIELD(SoftPromptParams, P),
      RK_FIELD(SoftPromptParams, D), RK_FIELD(SoftPromptParams, T), RK_FIELD(SoftPromptParams, V),
      RK_FIELD(SoftPromptParams, prompt_st), RK_FIELD(SoftPromptParams, prompt_sp),
      RK_FIELD(SoftPromptParams, prompt_sd), RK_FIELD(SoftPromptParams, ids_sb),
      RK_FIELD(SoftPromptParams, ids_sl), RK_FIELD(SoftPromptParams, tok_sv), RK_FIELD(SoftPromptParams, tok_sb),
      RK_FIELD(SoftPromptParams, tok_sl), RK_FIELD(SoftPromptParams, tok_sd), RK_FIELD(SoftPromptParams, task_s),
      RK_FIELD(SoftPromptParams, insert_s), RK_FIELD(SoftPromptParams, grad_sb),
      RK_FIELD(SoftPromptParams, grad_sj), RK_FIELD(SoftPromptParams, grad_sd),
      RK_FIELD(SoftPromptParams, prompt_dtype), RK_FIELD(SoftPromptParams, tok_dtype),
      RK_FIELD(SoftPromptParams, grad_dtype), RK_FIELD(SoftPromptParams, ids_dtype),
      RK_FIELD(SoftPromptParams, task_dtype), RK_FIELD(SoftPromptParams, insert_dtype),
      RK_FIELD(SoftPromptParams, from_ids), RK_FIELD(SoftPromptParams, embed_scale),
      RK_FIELD(SoftPromptParams, threads)};
  return t;
}

const FieldTable& fields(const PromptLayoutParams*) {
  static const FieldTable t{
      RK_FIELD(PromptLayoutParams, mask), RK_FIELD(PromptLayoutParams, labels), RK_FIELD(PromptLayoutParams, insert),
      RK_FIELD(PromptLayoutParams, mask_out), RK_FIELD(PromptLayoutParams, labels_out),
      RK_FIELD(PromptLayoutParams, position_ids), RK_FIELD(PromptLayoutParams, B), RK_FIELD(PromptLayoutParams, L),
      RK_FIELD(PromptLayoutParams, P), RK_FIELD(PromptLayoutParams, mask_sb), RK_FIELD(PromptLayoutParams, mask_sl),
      RK_FIELD(PromptLayoutParams, labels_sb), RK_FIELD(PromptLayoutParams, labels_sl),
      RK_FIELD(PromptLayoutParams, insert_s), RK_FIELD(PromptLayoutParams, mask_dtype),
      RK_FIELD(PromptLayoutParams, labels_dtype), RK_FIELD(PromptLayoutParams, insert_dtype),
      RK_FIELD(PromptLayoutParams, with_mask), RK_FIELD(PromptLayoutParams, with_labels),
      RK_FIELD(PromptLayoutParams, threads)};
  return t;
}

const FieldTable& fields(const VisualPromptParams*) {
  static const FieldTable t{
      RK_FIELD(VisualPromptParams, x), RK_FIELD(VisualPromptParams, delta), RK_FIELD(VisualPromptParams, mask),
      RK_FIELD(VisualPromptParams, mean), RK_FIELD(VisualPromptParams, stdev), RK_FIELD(VisualPromptParams, out),
      RK_FIELD(VisualPromptParams, grad), RK_FIELD(VisualPromptParams, dx), RK_FIELD(VisualPromptParams, ddelta),
      RK_FIELD(VisualPromptParams, dmask), RK_FIELD(VisualPromptParams, B), RK_FIELD(VisualPromptParams, C),
      RK_FIELD(VisualPromptParams, h), RK_FIELD(VisualPromptParams, w), RK_FIELD(VisualPromptParams, H),
      RK_FIELD(VisualPromptParams, W), RK_FIELD(VisualPromptParams, top), RK_FIELD(VisualPromptParams, left),
      RK_FIELD(VisualPromptParams, rect_top), RK_FIELD(VisualPromptParams, rect_left),
      RK_FIELD(VisualPromptParams, rect_h), RK_FIELD(VisualPromptParams, rect_w), RK_FIELD(VisualPromptParams, Bm),
      RK_FIELD(VisualPromptParams, Cm), RK_FIELD(VisualPromptParams, Hm), RK_FIELD(VisualPromptParams, Wm),
      RK_FIELD(VisualPromptParams, x_sb), RK_FIELD(VisualPromptParams, x_sc), RK_FIELD(VisualPromptParams, x_sh),
      RK_FIELD(VisualPromptParams, x_sw), RK_FIELD(VisualPromptParams, delta_sb),
      RK_FIELD(VisualPromptParams, delta_sc), RK_FIELD(VisualPromptParams, delta_sh),
      RK_FIELD(VisualPromptParams, delta_sw), RK_FIELD(VisualPromptParams, mask_sb),
      RK_FIELD(VisualPromptParams, mask_sc), RK_FIELD(VisualPromptParams, mask_sh),
      RK_FIELD(VisualPromptParams, mask_sw), RK_FIELD(VisualPromptParams, grad_sb),
      RK_FIELD(VisualPromptParams, grad_sc), RK_FIELD(VisualPromptParams, grad_sh),
      RK_FIELD(VisualPromptParams, grad_sw), RK_FIELD(VisualPromptParams, x_dtype),
      RK_FIELD(VisualPromptParams, delta_dtype), RK_FIELD(VisualPromptParams, invert),
      RK_FIELD(VisualPromptParams, squash), RK_FIELD(VisualPromptParams, order),
      RK_FIELD(VisualPromptParams, has_clamp), RK_FIELD(VisualPromptParams, delta_per_sample),
      RK_FIELD(VisualPromptParams, fill), RK_FIELD(VisualPromptParams, clamp_lo),
      RK_FIELD(VisualPromptParams, clamp_hi), RK_FIELD(VisualPromptParams, threads)};
  return t;
}

const FieldTable& fields(const LabelHistogramParams*) {
  static const FieldTable t{
      RK_FIELD(LabelHistogramParams, x), RK_FIELD(LabelHistogramParams, targets),
      RK_FIELD(LabelHistogramParams, out), RK_FIELD(LabelHistogramParams, B), RK_FIELD(LabelHistogramParams, K),
      RK_FIELD(LabelHistogramParams, T), RK_FIELD(LabelHistogramParams, topk),
      RK_FIELD(LabelHistogramParams, x_sb), RK_FIELD(LabelHistogramParams, x_sk),
      RK_FIELD(LabelHistogramParams, t_s), RK_FIELD(LabelHistogramParams, out_sk),
      RK_FIELD(LabelHistogramParams, out_st), RK_FIELD(LabelHistogramParams, x_dtype),
      RK_FIELD(LabelHistogramParams, preds), RK_FIELD(LabelHistogramParams, pred_dtype),
      RK_FIELD(LabelHistogramParams, target_dtype), RK_FIELD(LabelHistogramParams, weight),
      RK_FIELD(LabelHistogramParams, threads)};
  return t;
}

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
  def_kernel<LabelHistogramParams, &label_histogram_accumulate>(m, "label_histogram_accumulate", "LabelHistogramParams");
  // (lo, hi) of an integer tensor of one or two dims, or None for parameters it cannot read
  m.def("index_range", [](std::uintptr_t ptr, std::int32_t dtype, std::int64_t n0, std::int64_t n1, std::int64_t s0,
                          std::int64_t s1) -> py::object {
    std::int64_t lo = 0, hi = 0;
    if (index_range(ptr, dtype, n0, n1, s0, s1, &lo, &hi) != 0) return py::none();
    return py::make_tuple(lo, hi);
  });
}
