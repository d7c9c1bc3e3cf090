// pybind11 module reprokernels._C_cpu: params structs filled field by field from Python (reprokernels/cpu/*.py),
// entry points that return 0 or 1 (parameters the kernels cannot serve). No torch headers: builds in seconds
// with the host compiler against any torch. The GIL is released while a kernel runs (no Python object touched).
#include <pybind11/pybind11.h>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace rkcpu;

#define F(S, name) .def_readwrite(#name, &S::name)

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "reprokernels CPU kernels (C++ + OpenMP on raw pointers; see reprokernels/_cpu.py)";
#ifdef _OPENMP
  m.attr("openmp") = true;
  m.def("max_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("openmp") = false;
  m.def("max_threads", []() { return 1; });
#endif
  py::class_<LabelMapParams>(m, "LabelMapParams").def(py::init<>())
      F(LabelMapParams, x) F(LabelMapParams, mapping) F(LabelMapParams, w) F(LabelMapParams, out)
      F(LabelMapParams, lse) F(LabelMapParams, grad) F(LabelMapParams, dx) F(LabelMapParams, dw)
      F(LabelMapParams, B) F(LabelMapParams, K) F(LabelMapParams, T) F(LabelMapParams, M)
      F(LabelMapParams, x_sb) F(LabelMapParams, x_sk) F(LabelMapParams, map_st) F(LabelMapParams, map_sm)
      F(LabelMapParams, w_sk) F(LabelMapParams, w_st) F(LabelMapParams, grad_sb) F(LabelMapParams, grad_st)
      F(LabelMapParams, x_dtype) F(LabelMapParams, out_dtype) F(LabelMapParams, grad_dtype)
      F(LabelMapParams, dw_dtype) F(LabelMapParams, map_dtype) F(LabelMapParams, input)
      F(LabelMapParams, reduce) F(LabelMapParams, threads);
  py::class_<SoftPromptParams>(m, "SoftPromptParams").def(py::init<>())
      F(SoftPromptParams, prompt) F(SoftPromptParams, ids) F(SoftPromptParams, tokens) F(SoftPromptParams, task)
      F(SoftPromptParams, insert) F(SoftPromptParams, out) F(SoftPromptParams, grad) F(SoftPromptParams, dprompt)
      F(SoftPromptParams, dembeds) F(SoftPromptParams, B) F(SoftPromptParams, L) F(SoftPromptParams, P)
      F(SoftPromptParams, D) F(SoftPromptParams, T) F(SoftPromptParams, V) F(SoftPromptParams, prompt_st)
      F(SoftPromptParams, prompt_sp) F(SoftPromptParams, prompt_sd) F(SoftPromptParams, ids_sb)
      F(SoftPromptParams, ids_sl) F(SoftPromptParams, tok_sv) F(SoftPromptParams, tok_sb)
      F(SoftPromptParams, tok_sl) F(SoftPromptParams, tok_sd) F(SoftPromptParams, task_s)
      F(SoftPromptParams, insert_s) F(SoftPromptParams, grad_sb) F(SoftPromptParams, grad_sj)
      F(SoftPromptParams, grad_sd) F(SoftPromptParams, prompt_dtype) F(SoftPromptParams, tok_dtype)
      F(SoftPromptParams, grad_dtype) F(SoftPromptParams, ids_dtype) F(SoftPromptParams, task_dtype)
      F(SoftPromptParams, insert_dtype) F(SoftPromptParams, from_ids) F(SoftPromptParams, embed_scale)
      F(SoftPromptParams, threads);
  py::class_<VisualPromptParams>(m, "VisualPromptParams").def(py::init<>())
      F(VisualPromptParams, x) F(VisualPromptParams, delta) F(VisualPromptParams, mask) F(VisualPromptParams, mean)
      F(VisualPromptParams, stdev) F(VisualPromptParams, out) F(VisualPromptParams, grad) F(VisualPromptParams, dx)
      F(VisualPromptParams, ddelta) F(VisualPromptParams, dmask) F(VisualPromptParams, B) F(VisualPromptParams, C)
      F(VisualPromptParams, h) F(VisualPromptParams, w) F(VisualPromptParams, H) F(VisualPromptParams, W)
      F(VisualPromptParams, top) F(VisualPromptParams, left) F(VisualPromptParams, rect_top)
      F(VisualPromptParams, rect_left) F(VisualPromptParams, rect_h) F(VisualPromptParams, rect_w)
      F(VisualPromptParams, Bm) F(VisualPromptParams, Cm) F(VisualPromptParams, Hm) F(VisualPromptParams, Wm)
      F(VisualPromptParams, x_sb) F(VisualPromptParams, x_sc) F(VisualPromptParams, x_sh) F(VisualPromptParams, x_sw)
      F(VisualPromptParams, delta_sb) F(VisualPromptParams, delta_sc) F(VisualPromptParams, delta_sh)
      F(VisualPromptParams, delta_sw) F(VisualPromptParams, mask_sb) F(VisualPromptParams, mask_sc)
      F(VisualPromptParams, mask_sh) F(VisualPromptParams, mask_sw) F(VisualPromptParams, grad_sb)
      F(VisualPromptParams, grad_sc) F(VisualPromptParams, grad_sh) F(VisualPromptParams, grad_sw)
      F(VisualPromptParams, x_dtype) F(VisualPromptParams, delta_dtype) F(VisualPromptParams, invert)
      F(VisualPromptParams, squash) F(VisualPromptParams, order) F(VisualPromptParams, has_clamp)
      F(VisualPromptParams, delta_per_sample) F(VisualPromptParams, fill) F(VisualPromptParams, clamp_lo)
      F(VisualPromptParams, clamp_hi) F(VisualPromptParams, threads);
  py::class_<LabelHistogramParams>(m, "LabelHistogramParams").def(py::init<>())
      F(LabelHistogramParams, x) F(LabelHistogramParams, targets) F(LabelHistogramParams, out)
      F(LabelHistogramParams, B) F(LabelHistogramParams, K) F(LabelHistogramParams, T) F(LabelHistogramParams, topk)
      F(LabelHistogramParams, x_sb) F(LabelHistogramParams, x_sk) F(LabelHistogramParams, t_s)
      F(LabelHistogramParams, out_sk) F(LabelHistogramParams, out_st) F(LabelHistogramParams, x_dtype)
      F(LabelHistogramParams, preds) F(LabelHistogramParams, pred_dtype) F(LabelHistogramParams, target_dtype)
      F(LabelHistogramParams, weight) F(LabelHistogramParams, threads);
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("label_map_fwd", &label_map_fwd, nogil);
  m.def("label_map_bwd", &label_map_bwd, nogil);
  m.def("label_map_dense_fwd", &label_map_dense_fwd, nogil);
  m.def("label_map_dense_bwd", &label_map_dense_bwd, nogil);
  m.def("soft_prompt_fwd", &soft_prompt_fwd, nogil);
  m.def("soft_prompt_bwd", &soft_prompt_bwd, nogil);
  m.def("visual_prompt_fwd", &visual_prompt_fwd, nogil);
  m.def("visual_prompt_bwd", &visual_prompt_bwd, nogil);
  m.def("label_histogram_accumulate", &label_histogram_accumulate, nogil);
}
