"""Loader of the compiled CUDA extension ``reprokernels._C`` and the launch-error check.

The extension is imported lazily (importing reprokernels never touches CUDA). The C++ side sees raw
pointers, sizes, strides and a stream handle; this module owns the translation from tensors and the
conversion of CUDA error codes into Python exceptions.
"""

from __future__ import annotations

import importlib
import json
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

REBUILD_HINT = ('rebuild with: pip install "setuptools>=64" wheel "pybind11>=2.10" && '
                'REPROKERNELS_BUILD_CUDA=1 pip install -e . --no-build-isolation')
_BUILD_INFO = Path(__file__).with_name("_build_info.json")


class CudaUnavailableError(RuntimeError):
    """The CUDA backend was requested but cannot run here."""


def build_info() -> dict:
    """How this install was built: {'cuda_build', 'reason', 'archs', 'nvcc'}; empty dict if unknown."""
    try:
        return json.loads(_BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def _describe_build() -> str:
    info = build_info()
    if not info:
        return "no build record found (reprokernels/_build_info.json is missing: not installed with setup.py)"
    if not info.get("cuda_build"):
        return f"the CUDA extension was {info.get('reason', 'not built')}"
    archs = ", ".join(f"sm_{a}" for a in info.get("archs", []))
    return f"the CUDA extension was built with nvcc {info.get('nvcc')} for {archs} (+PTX)"


@cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("reprokernels._C"), ""
    except ImportError as exc:  # missing file, unresolved symbol, wrong Python ABI ...
        return None, f"reprokernels._C could not be imported ({exc}); {_describe_build()}; {REBUILD_HINT}"


def extension() -> ModuleType:
    """The compiled module, or CudaUnavailableError saying how it was built and how to rebuild."""
    mod, why = _load()
    if mod is None:
        raise CudaUnavailableError(why)
    return mod


def extension_built() -> bool:
    return _load()[0] is not None


@cache
def _device_status() -> tuple[bool, str]:
    mod, why = _load()
    if mod is None:
        return False, why
    n = mod.device_count()
    if n < 0:
        return False, f"the CUDA runtime reports no usable device ({mod.error_string(-n)})"
    if n == 0:
        return False, "no CUDA device found"
    if not torch.cuda.is_available():
        return False, "torch cannot use CUDA (a CPU-only torch build?): tensors cannot live on the GPU"
    return True, ""


def cuda_available() -> bool:
    """True when ``_C`` is built *and* a CUDA device is usable from torch."""
    return _device_status()[0]


def unavailable_reason() -> str:
    """Why the CUDA backend cannot run ('' when it can)."""
    return _device_status()[1]


def runtime_version() -> str | None:
    """The CUDA runtime ``_C`` was linked with, as 'major.minor', or None when not built."""
    mod, _ = _load()
    if mod is None:
        return None
    v = mod.cuda_runtime_version()
    return f"{v // 1000}.{(v % 1000) // 10}" if v > 0 else None


def check(code: int, kernel: str) -> None:
    """Raise RuntimeError naming the kernel and the CUDA error when a launcher returned non-zero."""
    if code != 0:
        why = extension().error_string(code)
        raise RuntimeError(f"reprokernels CUDA kernel '{kernel}' failed: {why} (code {code})")


def stream_of(t: torch.Tensor) -> int:
    """The raw handle of the current CUDA stream on the tensor's device."""
    return torch.cuda.current_stream(t.device).cuda_stream


def fill_(t: torch.Tensor, value: float) -> torch.Tensor:
    """Fill a contiguous float32 CUDA tensor through the extension (exercises the launch path end to end)."""
    if t.dtype != torch.float32 or not t.is_cuda or not t.is_contiguous():
        raise ValueError(f"t: expected a contiguous float32 CUDA tensor, got {t.dtype} on {t.device}")
    check(extension().fill_f32(t.data_ptr(), t.numel(), float(value), stream_of(t)), "fill_f32")
    return t
