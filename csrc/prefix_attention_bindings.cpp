// pybind11 bindings of the prefix_attention (decode) and merge_attention_states launchers: the parameter blocks are
// filled field by field from Python (reprokernels/cuda/prefix_attention.py); every launcher returns a cudaError_t
// code (0 = ok).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "prefix_attention.h"

namespace py = pybind11;

namespace reprokernels {

void bind_prefix_attention(py::module_& m) {
  // No dynamic attributes: assigning a misspelt field name raises AttributeError instead of being ignored.
  py::class_<PrefixAttnParams>(m, "PrefixAttnParams",
                               "Parameter block of the prefix_attention decode kernels (see "
                               "csrc/prefix_attention.h): pointers as integers, sizes and element strides as int64.")
      .def(py::init<>())
      .def_readwrite("q", &PrefixAttnParams::q)
      .def_readwrite("k", &PrefixAttnParams::k)
      .def_readwrite("v", &PrefixAttnParams::v)
      .def_readwrite("pk", &PrefixAttnParams::pk)
      .def_readwrite("pv", &PrefixAttnParams::pv)
      .def_readwrite("rows", &PrefixAttnParams::rows)
      .def_readwrite("task_off", &PrefixAttnParams::task_off)
      .def_readwrite("kpm", &PrefixAttnParams::kpm)
      .def_readwrite("kv_len", &PrefixAttnParams::kv_len)
      .def_readwrite("part_o", &PrefixAttnParams::part_o)
      .def_readwrite("part_lse", &PrefixAttnParams::part_lse)
      .def_readwrite("out", &PrefixAttnParams::out)
      .def_readwrite("lse", &PrefixAttnParams::lse)
      .def_readwrite("stream", &PrefixAttnParams::stream)
      .def_readwrite("B", &PrefixAttnParams::B)
      .def_readwrite("Hq", &PrefixAttnParams::Hq)
      .def_readwrite("Hkv", &PrefixAttnParams::Hkv)
      .def_readwrite("Lq", &PrefixAttnParams::Lq)
      .def_readwrite("Lk", &PrefixAttnParams::Lk)
      .def_readwrite("P", &PrefixAttnParams::P)
      .def_readwrite("D", &PrefixAttnParams::D)
      .def_readwrite("T", &PrefixAttnParams::T)
      .def_readwrite("SP", &PrefixAttnParams::SP)
      .def_readwrite("pchunk", &PrefixAttnParams::pchunk)
      .def_readwrite("S", &PrefixAttnParams::S)
      .def_readwrite("kchunk", &PrefixAttnParams::kchunk)
      .def_readwrite("max_blocks", &PrefixAttnParams::max_blocks)
      .def_readwrite("q_sb", &PrefixAttnParams::q_sb)
      .def_readwrite("q_sh", &PrefixAttnParams::q_sh)
      .def_readwrite("q_sl", &PrefixAttnParams::q_sl)
      .def_readwrite("q_sd", &PrefixAttnParams::q_sd)
      .def_readwrite("k_sb", &PrefixAttnParams::k_sb)
      .def_readwrite("k_sh", &PrefixAttnParams::k_sh)
      .def_readwrite("k_sl", &PrefixAttnParams::k_sl)
      .def_readwrite("k_sd", &PrefixAttnParams::k_sd)
      .def_readwrite("v_sb", &PrefixAttnParams::v_sb)
      .def_readwrite("v_sh", &PrefixAttnParams::v_sh)
      .def_readwrite("v_sl", &PrefixAttnParams::v_sl)
      .def_readwrite("v_sd", &PrefixAttnParams::v_sd)
      .def_readwrite("pk_st", &PrefixAttnParams::pk_st)
      .def_readwrite("pk_sh", &PrefixAttnParams::pk_sh)
      .def_readwrite("pk_sl", &PrefixAttnParams::pk_sl)
      .def_readwrite("pk_sd", &PrefixAttnParams::pk_sd)
      .def_readwrite("pv_st", &PrefixAttnParams::pv_st)
      .def_readwrite("pv_sh", &PrefixAttnParams::pv_sh)
      .def_readwrite("pv_sl", &PrefixAttnParams::pv_sl)
      .def_readwrite("pv_sd", &PrefixAttnParams::pv_sd)
      .def_readwrite("kpm_sb", &PrefixAttnParams::kpm_sb)
      .def_readwrite("kpm_sl", &PrefixAttnParams::kpm_sl)
      .def_readwrite("scale", &PrefixAttnParams::scale)
      .def_readwrite("dtype", &PrefixAttnParams::dtype)
      .def_readwrite("p_dtype", &PrefixAttnParams::p_dtype)
      .def_readwrite("len_dtype", &PrefixAttnParams::len_dtype)
      .def_readwrite("causal", &PrefixAttnParams::causal);
  py::class_<MergeStatesParams>(m, "MergeStatesParams",
                                "Parameter block of the merge_attention_states kernel (see csrc/prefix_attention.h); "
                                "size and the *_s strides are lists of 4 (leading dims, outermost first).")
      .def(py::init<>())
      .def_readwrite("oa", &MergeStatesParams::oa)
      .def_readwrite("ob", &MergeStatesParams::ob)
      .def_readwrite("la", &MergeStatesParams::la)
      .def_readwrite("lb", &MergeStatesParams::lb)
      .def_readwrite("o", &MergeStatesParams::o)
      .def_readwrite("lse", &MergeStatesParams::lse)
      .def_readwrite("stream", &MergeStatesParams::stream)
      .def_readwrite("R", &MergeStatesParams::R)
      .def_readwrite("D", &MergeStatesParams::D)
      .def_readwrite("size", &MergeStatesParams::size)
      .def_readwrite("oa_s", &MergeStatesParams::oa_s)
      .def_readwrite("ob_s", &MergeStatesParams::ob_s)
      .def_readwrite("la_s", &MergeStatesParams::la_s)
      .def_readwrite("lb_s", &MergeStatesParams::lb_s)
      .def_readwrite("oa_sd", &MergeStatesParams::oa_sd)
      .def_readwrite("ob_sd", &MergeStatesParams::ob_sd)
      .def_readwrite("oa_dtype", &MergeStatesParams::oa_dtype)
      .def_readwrite("ob_dtype", &MergeStatesParams::ob_dtype)
      .def_readwrite("la_dtype", &MergeStatesParams::la_dtype)
      .def_readwrite("lb_dtype", &MergeStatesParams::lb_dtype)
      .def_readwrite("o_dtype", &MergeStatesParams::o_dtype);
  // The GIL is released: a device launch only enqueues, and the host emulation touches no Python object.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("prefix_attention_query_block", &prefix_attention_query_block, py::arg("D"),
        "Query rows per block of the partial kernel for head dim D.");
  m.def("prefix_attention_key_tile", &prefix_attention_key_tile, py::arg("D"),
        "Keys per shared-memory tile of the partial kernel for head dim D.");
  m.def("prefix_attention_partials", &prefix_attention_partials, py::arg("params"), nogil,
        "Decode partials (o, lse) of every (prefix | own-key) split on params.stream; returns a cudaError_t code.");
  m.def("prefix_attention_merge", &prefix_attention_merge, py::arg("params"), nogil,
        "Decode merge of the partials into out and lse on params.stream; returns a cudaError_t code.");
  m.def("prefix_attention_partials_host", &prefix_attention_partials_host, py::arg("params"), nogil,
        "Run the partial kernel's per-thread code in CPU loops over host pointers (testing without a GPU).");
  m.def("prefix_attention_merge_host", &prefix_attention_merge_host, py::arg("params"), nogil,
        "Run the decode merge kernel's per-thread code in CPU loops over host pointers (testing without a GPU).");
  m.def("merge_attention_states", &merge_attention_states, py::arg("params"), nogil,
        "Merge two attention states (o, lse) on params.stream; returns a cudaError_t code.");
  m.def("merge_attention_states_host", &merge_attention_states_host, py::arg("params"), nogil,
        "Run the merge kernel's per-thread code in CPU loops over host pointers (testing without a GPU).");
}

}  // namespace reprokernels
