// pybind11 module reprokernels._C: raw pointers, sizes, strides and a stream handle in; an error code out.
#include <pybind11/pybind11.h>

#include "launchers.h"

namespace py = pybind11;
namespace rk = reprokernels;

namespace reprokernels {
void bind_visual_prompt(py::module_& m);  // visual_prompt_bindings.cpp
void bind_soft_prompt(py::module_& m);
void bind_label_map(py::module_& m);
void bind_label_histogram(py::module_& m);
void bind_prefix_attention(py::module_& m);
}  // namespace reprokernels

#ifndef REPROKERNELS_VERSION
#define REPROKERNELS_VERSION "0.1.0"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "reprokernels CUDA kernels (raw-pointer launchers; see reprokernels/_cuda.py)";
  m.attr("__version__") = REPROKERNELS_VERSION;
  m.def("cuda_runtime_version", &rk::cuda_runtime_version, "CUDA runtime version (e.g. 13000), or -error");
  m.def("device_count", &rk::device_count, "number of CUDA devices, or a negative cudaError_t");
  m.def("error_string", &rk::error_string, py::arg("code"));
  m.def("fill_f32", &rk::fill_f32, py::arg("ptr"), py::arg("n"), py::arg("value"), py::arg("stream"));
  rk::bind_visual_prompt(m);
  rk::bind_soft_prompt(m);
  rk::bind_label_map(m);
  rk::bind_label_histogram(m);
  rk::bind_prefix_attention(m);
}
