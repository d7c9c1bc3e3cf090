// A kernel's parameter struct filled from a Python dict in one call (reprokernels/_cpu.py: ``run(name, p)``
// passes ``vars(p)``). Why not pybind11's def_readwrite: every attribute set through it is a full pybind11 call
// (about 0.3 us), 30 to 50 of them per launch, which was most of a small call's cost. Here each field is one hash
// lookup and one CPython conversion. An unknown name or a value of the wrong type raises (TypeError / KeyError),
// as a mistyped attribute did before; fields the dict does not name keep the struct's defaults.
#pragma once
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>

namespace rkcpu {

enum class FieldKind : std::uint8_t { kPtr, kI64, kI32, kF32 };

struct FieldInfo {
  std::size_t offset;
  FieldKind kind;
};

template <class T>
constexpr FieldKind field_kind() {
  if constexpr (std::is_same_v<T, std::uintptr_t>) return FieldKind::kPtr;
  else if constexpr (std::is_same_v<T, std::int64_t>) return FieldKind::kI64;
  else if constexpr (std::is_same_v<T, std::int32_t>) return FieldKind::kI32;
  else {
    static_assert(std::is_same_v<T, float>, "params fields are uintptr_t, int64_t, int32_t or float");
    return FieldKind::kF32;
  }
}

using FieldTable = std::unordered_map<std::string_view, FieldInfo>;

// Store one Python value into the field; false (with a Python error set) when it does not convert.
inline bool store_field(char* base, const FieldInfo& f, PyObject* v) {
  switch (f.kind) {
    case FieldKind::kPtr: {
      const unsigned long long x = PyLong_AsUnsignedLongLong(v);
      if (PyErr_Occurred()) return false;
      *reinterpret_cast<std::uintptr_t*>(base + f.offset) = static_cast<std::uintptr_t>(x);
      return true;
    }
    case FieldKind::kI64: {
      const long long x = PyLong_AsLongLong(v);
      if (x == -1 && PyErr_Occurred()) return false;
      *reinterpret_cast<std::int64_t*>(base + f.offset) = static_cast<std::int64_t>(x);
      return true;
    }
    case FieldKind::kI32: {
      const long long x = PyLong_AsLongLong(v);
      if (x == -1 && PyErr_Occurred()) return false;
      if (x < INT32_MIN || x > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "value out of the int32 range");
        return false;
      }
      *reinterpret_cast<std::int32_t*>(base + f.offset) = static_cast<std::int32_t>(x);
      return true;
    }
    case FieldKind::kF32: {
      const double x = PyFloat_AsDouble(v);  // floats and ints
      if (x == -1.0 && PyErr_Occurred()) return false;
      *reinterpret_cast<float*>(base + f.offset) = static_cast<float>(x);
      return true;
    }
  }
  return false;
}

template <class S>
S params_from_dict(const pybind11::dict& d, const FieldTable& table, const char* struct_name) {
  S s{};
  char* base = reinterpret_cast<char*>(&s);
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(d.ptr(), &pos, &key, &value)) {
    Py_ssize_t len = 0;
    const char* k = PyUnicode_Check(key) ? PyUnicode_AsUTF8AndSize(key, &len) : nullptr;
    if (k == nullptr) throw pybind11::type_error(std::string(struct_name) + ": field names must be strings");
    const auto it = table.find(std::string_view(k, static_cast<std::size_t>(len)));
    if (it == table.end()) throw pybind11::key_error(std::string(struct_name) + " has no field '" + k + "'");
    if (!store_field(base, it->second, value)) {
      PyErr_Clear();
      throw pybind11::type_error(std::string(struct_name) + "." + k + ": expected an integer" +
                                 (it->second.kind == FieldKind::kF32 ? " or a float" : "") + " in range, got " +
                                 std::string(pybind11::str(pybind11::handle(value))));
    }
  }
  return s;
}

}  // namespace rkcpu

// The field table of struct S: RK_FIELD(S, name) entries, e.g. FieldTable{RK_FIELD(S, B), RK_FIELD(S, L)}.
#define RK_FIELD(S, name)                                                                         \
  {                                                                                               \
    #name, ::rkcpu::FieldInfo { offsetof(S, name), ::rkcpu::field_kind<decltype(S::name)>() } \
  }
