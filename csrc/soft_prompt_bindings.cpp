// pybind11 bindings of the soft_prompt_concat launchers: SoftPromptParams is filled field by field from Python
// (reprokernels/cuda/soft_prompt.py); every launcher returns a cudaError_t code (0 = ok).
#include <pybind11/pybind11.h>

#include "soft_prompt.h"

namespace py = pybind11;

namespace reprokernels {

void bind_soft_prompt(py::module_& m) {
  // No dynamic attributes: assigning a misspelt field name raises AttributeError instead of being ignored.
  py::class_<SoftPromptParams>(m, "SoftPromptParams",
                               "Parameter block of the soft_prompt_concat kernels (see csrc/soft_prompt.h): "
                               "pointers as integers, sizes and element strides as int64, codes and flags.")
      .def(py::init<>())
      .def_readwrite("prompt", &SoftPromptParams::prompt)
      .def_readwrite("tokens", &SoftPromptParams::tokens)
      .def_readwrite("ids", &SoftPromptParams::ids)
      .def_readwrite("task", &SoftPromptParams::task)
      .def_readwrite("insert", &SoftPromptParams::insert)
      .def_readwrite("out", &SoftPromptParams::out)
      .def_readwrite("grad", &SoftPromptParams::grad)
      .def_readwrite("order", &SoftPromptParams::order)
      .def_readwrite("offsets", &SoftPromptParams::offsets)
      .def_readwrite("dprompt", &SoftPromptParams::dprompt)
      .def_readwrite("dembeds", &SoftPromptParams::dembeds)
      .def_readwrite("stream", &SoftPromptParams::stream)
      .def_readwrite("B", &SoftPromptParams::B)
      .def_readwrite("L", &SoftPromptParams::L)
      .def_readwrite("P", &SoftPromptParams::P)
      .def_readwrite("D", &SoftPromptParams::D)
      .def_readwrite("T", &SoftPromptParams::T)
      .def_readwrite("V", &SoftPromptParams::V)
      .def_readwrite("chunk", &SoftPromptParams::chunk)
      .def_readwrite("nchunks", &SoftPromptParams::nchunks)
      .def_readwrite("prompt_st", &SoftPromptParams::prompt_st)
      .def_readwrite("prompt_sp", &SoftPromptParams::prompt_sp)
      .def_readwrite("prompt_sd", &SoftPromptParams::prompt_sd)
      .def_readwrite("tok_sv", &SoftPromptParams::tok_sv)
      .def_readwrite("tok_sb", &SoftPromptParams::tok_sb)
      .def_readwrite("tok_sl", &SoftPromptParams::tok_sl)
      .def_readwrite("tok_sd", &SoftPromptParams::tok_sd)
      .def_readwrite("ids_sb", &SoftPromptParams::ids_sb)
      .def_readwrite("ids_sl", &SoftPromptParams::ids_sl)
      .def_readwrite("task_s", &SoftPromptParams::task_s)
      .def_readwrite("insert_s", &SoftPromptParams::insert_s)
      .def_readwrite("grad_sb", &SoftPromptParams::grad_sb)
      .def_readwrite("grad_sj", &SoftPromptParams::grad_sj)
      .def_readwrite("grad_sd", &SoftPromptParams::grad_sd)
      .def_readwrite("prompt_dtype", &SoftPromptParams::prompt_dtype)
      .def_readwrite("tok_dtype", &SoftPromptParams::tok_dtype)
      .def_readwrite("ids_dtype", &SoftPromptParams::ids_dtype)
      .def_readwrite("task_dtype", &SoftPromptParams::task_dtype)
      .def_readwrite("insert_dtype", &SoftPromptParams::insert_dtype)
      .def_readwrite("from_ids", &SoftPromptParams::from_ids)
      .def_readwrite("embed_scale", &SoftPromptParams::embed_scale)
      .def_readwrite("vec_out", &SoftPromptParams::vec_out)
      .def_readwrite("vec_prompt", &SoftPromptParams::vec_prompt)
      .def_readwrite("vec_tokens", &SoftPromptParams::vec_tokens)
      .def_readwrite("vec_grad", &SoftPromptParams::vec_grad);
  // The GIL is released: a device launch only enqueues, and the host emulation touches no Python object.
  m.def("soft_prompt_fwd", &soft_prompt_fwd, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "Launch the fused forward on params.stream; returns a cudaError_t code.");
  m.def("soft_prompt_bwd", &soft_prompt_bwd, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "Launch the backward (d prompt and/or d inputs_embeds) on params.stream; returns a cudaError_t code.");
  m.def("soft_prompt_fwd_host", &soft_prompt_fwd_host, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "Run the forward's per-thread code in a CPU loop over host pointers (testing without a GPU).");
  m.def("soft_prompt_bwd_host", &soft_prompt_bwd_host, py::arg("params"), py::call_guard<py::gil_scoped_release>(),
        "Run the backward's per-thread code in a CPU loop over host pointers (testing without a GPU).");
}

}  // namespace reprokernels
