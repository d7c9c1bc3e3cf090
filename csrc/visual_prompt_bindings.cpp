// pybind11 bindings of the visual_prompt launchers: VisualPromptParams is filled field by field from Python
// (reprokernels/cuda/visual_prompt.py); every launcher returns a cudaError_t code (0 = ok).
#include <pybind11/pybind11.h>

#include "visual_prompt.h"

namespace py = pybind11;

namespace reprokernels {

void bind_visual_prompt(py::module_& m) {
  // No dynamic attributes: assigning a misspelt field name raises AttributeError instead of being ignored.
  py::class_<VisualPromptParams>(m, "VisualPromptParams",
                                 "Parameter block of the visual_prompt kernels (see csrc/visual_prompt.h): "
                                 "pointers as integers, sizes and element strides as int64, codes and flags.")
      .def(py::init<>())
      .def_readwrite("x", &VisualPromptParams::x)
      .def_readwrite("delta", &VisualPromptParams::delta)
      .def_readwrite("mask", &VisualPromptParams::mask)
      .def_readwrite("mean", &VisualPromptParams::mean)
      .def_readwrite("stdev", &VisualPromptParams::stdev)
      .def_readwrite("out", &VisualPromptParams::out)
      .def_readwrite("grad", &VisualPromptParams::grad)
      .def_readwrite("dx", &VisualPromptParams::dx)
      .def_readwrite("ddelta", &VisualPromptParams::ddelta)
      .def_readwrite("dmask", &VisualPromptParams::dmask)
      .def_readwrite("stream", &VisualPromptParams::stream)
      .def_readwrite("B", &VisualPromptParams::B)
      .def_readwrite("C", &VisualPromptParams::C)
      .def_readwrite("h", &VisualPromptParams::h)
      .def_readwrite("w", &VisualPromptParams::w)
      .def_readwrite("H", &VisualPromptParams::H)
      .def_readwrite("W", &VisualPromptParams::W)
      .def_readwrite("h2", &VisualPromptParams::h2)
      .def_readwrite("w2", &VisualPromptParams::w2)
      .def_readwrite("top", &VisualPromptParams::top)
      .def_readwrite("left", &VisualPromptParams::left)
      .def_readwrite("rect_top", &VisualPromptParams::rect_top)
      .def_readwrite("rect_left", &VisualPromptParams::rect_left)
      .def_readwrite("rect_h", &VisualPromptParams::rect_h)
      .def_readwrite("rect_w", &VisualPromptParams::rect_w)
      .def_readwrite("Bm", &VisualPromptParams::Bm)
      .def_readwrite("Cm", &VisualPromptParams::Cm)
      .def_readwrite("Hm", &VisualPromptParams::Hm)
      .def_readwrite("Wm", &VisualPromptParams::Wm)
      .def_readwrite("chunk", &VisualPromptParams::chunk)
      .def_readwrite("split_h", &VisualPromptParams::split_h)
      .def_readwrite("split_w", &VisualPromptParams::split_w)
      .def_readwrite("x_sb", &VisualPromptParams::x_sb)
      .def_readwrite("x_sc", &VisualPromptParams::x_sc)
      .def_readwrite("x_sh", &VisualPromptParams::x_sh)
      .def_readwrite("x_sw", &VisualPromptParams::x_sw)
      .def_readwrite("delta_sb", &VisualPromptParams::delta_sb)
      .def_readwrite("delta_sc", &VisualPromptParams::delta_sc)
      .def_readwrite("delta_sh", &VisualPromptParams::delta_sh)
      .def_readwrite("delta_sw", &VisualPromptParams::delta_sw)
      .def_readwrite("mask_sb", &VisualPromptParams::mask_sb)
      .def_readwrite("mask_sc", &VisualPromptParams::mask_sc)
      .def_readwrite("mask_sh", &VisualPromptParams::mask_sh)
      .def_readwrite("mask_sw", &VisualPromptParams::mask_sw)
      .def_readwrite("grad_sb", &VisualPromptParams::grad_sb)
      .def_readwrite("grad_sc", &VisualPromptParams::grad_sc)
      .def_readwrite("grad_sh", &VisualPromptParams::grad_sh)
      .def_readwrite("grad_sw", &VisualPromptParams::grad_sw)
      .def_readwrite("x_dtype", &VisualPromptParams::x_dtype)
      .def_readwrite("delta_dtype", &VisualPromptParams::delta_dtype)
      .def_readwrite("delta_per_sample", &VisualPromptParams::delta_per_sample)
      .def_readwrite("squash", &VisualPromptParams::squash)
      .def_readwrite("order", &VisualPromptParams::order)
      .def_readwrite("resize", &VisualPromptParams::resize)
      .def_readwrite("align_corners", &VisualPromptParams::align_corners)
      .def_readwrite("invert", &VisualPromptParams::invert)
      .def_readwrite("has_clamp", &VisualPromptParams::has_clamp)
      .def_readwrite("fill", &VisualPromptParams::fill)
      .def_readwrite("clamp_lo", &VisualPromptParams::clamp_lo)
      .def_readwrite("clamp_hi", &VisualPromptParams::clamp_hi);
  m.attr("VISUAL_PROMPT_MAX_CHUNK") = kVisualPromptMaxChunk;
  // The GIL is released: a device launch only enqueues, and the host emulation touches no Python object.
  m.def("visual_prompt_fwd", &visual_prompt_fwd, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "Launch the fused forward on params.stream; returns a cudaError_t code.");
  m.def("visual_prompt_bwd", &visual_prompt_bwd, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "Launch the fused backward on params.stream; returns a cudaError_t code.");
  m.def("visual_prompt_fwd_host", &visual_prompt_fwd_host, py::arg("params"),
        py::call_guard<py::gil_scoped_release>(),
        "Run the forward's per-thread code in a CPU loop over host pointers (testing without a GPU).");
  m.def("visual_prompt_bwd_host", &visual_prompt_bwd_host, py::arg("params"),
        py::call_guard<py::gil_scoped_release>(),
        "Run the backward's per-thread code in a CPU loop over host pointers (testing without a GPU).");
  m.def("visual_prompt_num_chunks", &visual_prompt_num_chunks, py::arg("params"),
        "ceil(B / chunk): the leading size of the backward's float32 partial buffers.");
}

}  // namespace reprokernels
