// pybind11 bindings of the label_map launchers: LabelMapParams is filled field by field from Python
// (reprokernels/cuda/label_map.py); every launcher returns a cudaError_t code (0 = ok).
#include <pybind11/pybind11.h>

#include "label_map.h"

namespace py = pybind11;

namespace reprokernels {

void bind_label_map(py::module_& m) {
  // No dynamic attributes: assigning a misspelt field name raises AttributeError instead of being ignored.
  py::class_<LabelMapParams>(m, "LabelMapParams",
                             "Parameter block of the label_map kernels (see csrc/label_map.h): pointers as "
                             "integers, sizes and element strides as int64, codes and flags.")
      .def(py::init<>())
      .def_readwrite("x", &LabelMapParams::x)
      .def_readwrite("mapping", &LabelMapParams::mapping)
      .def_readwrite("w", &LabelMapParams::w)
      .def_readwrite("out", &LabelMapParams::out)
      .def_readwrite("lse", &LabelMapParams::lse)
      .def_readwrite("grad", &LabelMapParams::grad)
      .def_readwrite("tw", &LabelMapParams::tw)
      .def_readwrite("srow", &LabelMapParams::srow)
      .def_readwrite("esrc", &LabelMapParams::esrc)
      .def_readwrite("etgt", &LabelMapParams::etgt)
      .def_readwrite("ew", &LabelMapParams::ew)
      .def_readwrite("blk", &LabelMapParams::blk)
      .def_readwrite("dx", &LabelMapParams::dx)
      .def_readwrite("dw", &LabelMapParams::dw)
      .def_readwrite("stream", &LabelMapParams::stream)
      .def_readwrite("B", &LabelMapParams::B)
      .def_readwrite("K", &LabelMapParams::K)
      .def_readwrite("T", &LabelMapParams::T)
      .def_readwrite("M", &LabelMapParams::M)
      .def_readwrite("chunk", &LabelMapParams::chunk)
      .def_readwrite("nchunks", &LabelMapParams::nchunks)
      .def_readwrite("x_sb", &LabelMapParams::x_sb)
      .def_readwrite("x_sk", &LabelMapParams::x_sk)
      .def_readwrite("map_st", &LabelMapParams::map_st)
      .def_readwrite("map_sm", &LabelMapParams::map_sm)
      .def_readwrite("w_sk", &LabelMapParams::w_sk)
      .def_readwrite("w_st", &LabelMapParams::w_st)
      .def_readwrite("grad_sb", &LabelMapParams::grad_sb)
      .def_readwrite("grad_st", &LabelMapParams::grad_st)
      .def_readwrite("x_dtype", &LabelMapParams::x_dtype)
      .def_readwrite("w_dtype", &LabelMapParams::w_dtype)
      .def_readwrite("out_dtype", &LabelMapParams::out_dtype)
      .def_readwrite("grad_dtype", &LabelMapParams::grad_dtype)
      .def_readwrite("map_dtype", &LabelMapParams::map_dtype)
      .def_readwrite("input", &LabelMapParams::input)
      .def_readwrite("reduce", &LabelMapParams::reduce)
      .def_readwrite("threads", &LabelMapParams::threads);
  // The GIL is released: a device launch only enqueues, and the host emulation touches no Python object.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("label_map_fwd", &label_map_fwd, py::arg("params"), nogil,
        "Index mapping forward (out, and lse for probs/log_probs) on params.stream; returns a cudaError_t code.");
  m.def("label_map_bwd", &label_map_bwd, py::arg("params"), nogil,
        "Index mapping backward (d logits) on params.stream; returns a cudaError_t code.");
  m.def("label_map_dense_fwd", &label_map_dense_fwd, py::arg("params"), nogil,
        "Dense mapping forward (lse, then out) on params.stream; returns a cudaError_t code.");
  m.def("label_map_dense_bwd", &label_map_dense_bwd, py::arg("params"), nogil,
        "Dense mapping backward (d logits and/or d mapping) on params.stream; returns a cudaError_t code.");
  m.def("label_map_fwd_host", &label_map_fwd_host, py::arg("params"), nogil,
        "Run the index forward's per-thread code in CPU loops over host pointers (testing without a GPU).");
  m.def("label_map_bwd_host", &label_map_bwd_host, py::arg("params"), nogil,
        "Run the index backward's per-thread code in CPU loops over host pointers (testing without a GPU).");
  m.def("label_map_dense_fwd_host", &label_map_dense_fwd_host, py::arg("params"), nogil,
        "Run the dense forward's per-thread code in CPU loops over host pointers (testing without a GPU).");
  m.def("label_map_dense_bwd_host", &label_map_dense_bwd_host, py::arg("params"), nogil,
        "Run the dense backward's per-thread code in CPU loops over host pointers (testing without a GPU).");
}

}  // namespace reprokernels
