"""``reprokernels.info()``: versions, devices and which backend can run here (and why not)."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from typing import TextIO

import torch

from . import _backend, _cuda


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_dict() -> dict:
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if (
        torch.cuda.is_available()) else []
    backends = {}
    for name in ("reference", "composite", "triton", "cuda"):
        dev = "cuda" if devices else "cpu"
        ok, why = _backend.backend_status(name, dev)
        if name == "cuda" and not _cuda.cuda_available():
            ok, why = False, _cuda.unavailable_reason()
        backends[name] = {"available": ok, "why_not": why, "device": dev}
    return {
        "reprokernels": _version("reprokernels"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "triton_interpreter": _backend.interpreter_enabled(),
        "cuda_extension": _cuda.build_info() or None,
        "cuda_extension_loaded": _cuda.extension_built(),
        "cuda_runtime_of_C": _cuda.runtime_version(),
        "devices": devices,
        "default_backend": _backend.default_backend(),
        "backends": backends,
        "ops": {op: list(bks) for op, bks in sorted(_backend._OPS.items())},
    }


def info(file: TextIO | None = None) -> None:
    """Print versions, devices, and for each backend whether it is available here and why not."""
    d = info_dict()
    out = file or sys.stdout
    ext = d["cuda_extension"] or {}
    lines = [
        f"reprokernels {d['reprokernels']}  (python {d['python']})",
        f"torch        {d['torch']}  (CUDA {d['torch_cuda'] or 'none'})",
        f"triton       {d['triton']}{'  (interpreter: TRITON_INTERPRET=1)' if d['triton_interpreter'] else ''}",
        f"_C           {'loaded' if d['cuda_extension_loaded'] else 'not loaded'}; "
        f"{ext.get('reason', 'no build record')}; archs {ext.get('archs') or '-'}; "
        f"CUDA runtime {d['cuda_runtime_of_C'] or '-'}",
        f"devices      {', '.join(d['devices']) or 'no CUDA device (CPU only)'}",
        f"default      backend={d['default_backend']!r}",
        "backends:",
    ]
    for name, b in d["backends"].items():
        state = "available" if b["available"] else f"unavailable: {b['why_not']}"
        lines.append(f"  {name:<10} {state}")
    lines.append("ops:" if d["ops"] else "ops: none registered yet")
    for op, bks in d["ops"].items():
        lines.append(f"  {op:<24} {', '.join(bks)}")
    print("\n".join(lines), file=out)
