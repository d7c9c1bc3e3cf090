"""Loader of the compiled CPU module ``reprokernels._C_cpu`` (C++ + OpenMP kernels, csrc/cpu/).

Named like ``_C``: this loader is to it what ``_cuda.py`` is to ``_C`` (a module ``reprokernels._cpu`` could not
be both this file and the extension).

setup.py builds it on every install with the host compiler; a failed build does not fail the install, it is
recorded in ``_build_info.json`` (``cpu_build``, ``cpu_reason``) and reported here and by ``reprokernels info``.
The kernels take raw pointers, sizes, strides and a thread count: every launch passes
``torch.get_num_threads()``, and the results are bitwise the same for any thread count.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType

import torch

from ._cuda import build_info

REBUILD_HINT = ('rebuild with: pip install "setuptools>=64" wheel "pybind11>=2.10" && '
                'pip install -e . --no-build-isolation')


class CpuKernelError(RuntimeError):
    """A CPU kernel refused its parameters (a launcher bug: Python validates everything first)."""


# The index tensors a kernel range-checks itself when the launcher sets ``check_index`` (csrc/cpu/kernels.h:
# kIndexError + i names the i-th); the op layer then skips its own check of them (one pass and call fewer).
INDEX_ERROR = 10
_CHECKED_INDICES = {
    "soft_prompt_fwd": ("input_ids", "task_ids", "insert_at"),
    "label_map_fwd": ("mapping",),
    "prefix_attention_fwd": ("task_ids", "kv_lengths"),
}


class IndexRangeError(ValueError):
    """A kernel found a value outside its range in the index tensor ``name`` (nothing was written). The ops catch
    it and raise their own named error with the offending value; it reaches the user only from a compiled graph."""

    def __init__(self, kernel: str, name: str) -> None:
        super().__init__(f"{name}: holds a value outside its valid range (found by the cpu kernel {kernel!r})")
        self.name = name


def _describe_build() -> str:
    info = build_info()
    if "cpu_build" not in info:
        return "no build record of the CPU module (reprokernels/_build_info.json has none: an older install?)"
    return f"the CPU module was {'built' if info['cpu_build'] else 'not built'}: {info.get('cpu_reason', '?')}"


@cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("reprokernels._C_cpu"), ""
    except ImportError as exc:
        return None, f"reprokernels._C_cpu could not be imported ({exc}); {_describe_build()}; {REBUILD_HINT}"


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str:
    return _load()[1]


def extension() -> ModuleType:
    mod = _load()[0]
    if mod is None:
        from ._backend import BackendUnavailableError  # (here: _backend imports this module)

        raise BackendUnavailableError(_load()[1])
    return mod


def describe() -> str:
    """One line for ``reprokernels info``."""
    mod, why = _load()
    if mod is None:
        return f"not loaded; {why}"
    omp = "OpenMP" if mod.openmp else "no OpenMP (single-threaded)"
    return f"loaded ({omp}; threads = torch.get_num_threads() = {torch.get_num_threads()}); {_describe_build()}"


def threads() -> int:
    return max(1, torch.get_num_threads())


class Params:
    """A kernel's parameters, set as attributes (``p.B = 4``) and handed to the kernel as one dict by ``run``:
    the fields of its C++ struct (csrc/cpu/kernels.h); an unknown name or a non-numeric value raises there."""


def run(name: str, params: Params) -> None:
    """Run kernel ``name``; a refusal (code 1) becomes CpuKernelError naming it, an index out of range (with
    ``check_index`` set) IndexRangeError naming the tensor."""
    params.threads = torch.get_num_threads() or 1  # type: ignore[attr-defined]
    code = getattr(extension(), name)(params.__dict__)
    if code != 0:
        names = _CHECKED_INDICES.get(name, ())
        if INDEX_ERROR <= code < INDEX_ERROR + len(names):
            raise IndexRangeError(name, names[code - INDEX_ERROR])
        raise CpuKernelError(f"reprokernels CPU kernel '{name}' refused its parameters (code {code})")


def index_range(t: torch.Tensor) -> tuple[int, int] | None:
    """(min, max) of a non-empty CPU integer tensor of one or two dims read in place by the CPU module, or None
    where it cannot (not built, another dtype or rank): the caller then asks torch."""
    code = _INDEX_CODES.get(t.dtype)
    mod = _load()[0]
    if code is None or mod is None or t.dim() not in (1, 2):
        return None
    if t.dim() == 1:
        return mod.index_range(t.data_ptr(), code, t.shape[0], 1, t.stride(0), 1)
    return mod.index_range(t.data_ptr(), code, t.shape[0], t.shape[1], *t.stride())


_INDEX_CODES = {torch.int64: 0, torch.int32: 1, torch.int16: 2, torch.int8: 3, torch.uint8: 4}
