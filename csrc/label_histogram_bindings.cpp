// pybind11 bindings of the label_histogram launchers: LabelHistogramParams is filled field by field from Python
// (reprokernels/cuda/label_histogram.py); every launcher returns a cudaError_t code (0 = ok).
#include <pybind11/pybind11.h>

#include "label_histogram.h"

namespace py = pybind11;

namespace reprokernels {

void bind_label_histogram(py::module_& m) {
  // No dynamic attributes: assigning a misspelt field name raises AttributeError instead of being ignored.
  py::class_<LabelHistogramParams>(m, "LabelHistogramParams",
                                   "Parameter block of the label_histogram kernels (see csrc/label_histogram.h): "
                                   "pointers as integers, sizes and element strides as int64, codes and flags.")
      .def(py::init<>())
      .def_readwrite("x", &LabelHistogramParams::x)
      .def_readwrite("pred", &LabelHistogramParams::pred)
      .def_readwrite("perm", &LabelHistogramParams::perm)
      .def_readwrite("starts", &LabelHistogramParams::starts)
      .def_readwrite("m", &LabelHistogramParams::m)
      .def_readwrite("inv", &LabelHistogramParams::inv)
      .def_readwrite("thr", &LabelHistogramParams::thr)
      .def_readwrite("quota", &LabelHistogramParams::quota)
      .def_readwrite("jstar", &LabelHistogramParams::jstar)
      .def_readwrite("part", &LabelHistogramParams::part)
      .def_readwrite("out", &LabelHistogramParams::out)
      .def_readwrite("stream", &LabelHistogramParams::stream)
      .def_readwrite("B", &LabelHistogramParams::B)
      .def_readwrite("K", &LabelHistogramParams::K)
      .def_readwrite("T", &LabelHistogramParams::T)
      .def_readwrite("splits", &LabelHistogramParams::splits)
      .def_readwrite("x_sb", &LabelHistogramParams::x_sb)
      .def_readwrite("x_sk", &LabelHistogramParams::x_sk)
      .def_readwrite("pred_s", &LabelHistogramParams::pred_s)
      .def_readwrite("out_sk", &LabelHistogramParams::out_sk)
      .def_readwrite("out_st", &LabelHistogramParams::out_st)
      .def_readwrite("x_dtype", &LabelHistogramParams::x_dtype)
      .def_readwrite("pred_dtype", &LabelHistogramParams::pred_dtype)
      .def_readwrite("weight", &LabelHistogramParams::weight)
      .def_readwrite("topk", &LabelHistogramParams::topk)
      .def_readwrite("threads", &LabelHistogramParams::threads);
  // The GIL is released: a device launch only enqueues, and the host emulation touches no Python object.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("label_histogram_accumulate", &label_histogram_accumulate, py::arg("params"), nogil,
        "out += the batch's joint statistic (row kernel, histogram kernel, split reduction) on params.stream; "
        "returns a cudaError_t code.");
  m.def("label_histogram_accumulate_host", &label_histogram_accumulate_host, py::arg("params"), nogil,
        "Run the kernels' per-thread code in CPU loops over host pointers (testing without a GPU).");
}

}  // namespace reprokernels
