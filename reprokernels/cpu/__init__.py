"""Launchers of the CPU kernels (reprokernels._C_cpu, sources in csrc/cpu/): one module per op.

Each module has the backend functions every backend module of its op has (see ``reprokernels/ops/<op>.py``),
plus ``supports(case) -> str``: "" when the kernels implement the call described by ``case`` (a tuple of
``"key=value"`` strings the op passes to ``resolve_backend``) and were measured faster than the reference on it,
else the reason. ``auto`` consults it; an explicit ``backend="cpu"`` on a case the kernels do not implement
raises ``BackendUnavailableError`` from the launcher, naming what is missing.
"""

from __future__ import annotations

import torch

from .._backend import BackendUnavailableError

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KERNEL_DTYPE_NAMES = ("float32", "float16", "bfloat16")


def case_dict(case: tuple) -> dict[str, str]:
    out = {}
    for item in case:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def dtype_reason(case: dict[str, str], *keys: str) -> str:
    for key in keys:
        value = case.get(key)
        if value is not None and value.replace("torch.", "") not in KERNEL_DTYPE_NAMES:
            return f"{key}: the cpu kernels take float32/float16/bfloat16, got {value}"
    return ""


def float_code(t: torch.Tensor, name: str) -> int:
    if t.dtype not in DTYPE_CODES:
        raise BackendUnavailableError(f"{name}: the cpu backend supports float32, float16 and bfloat16, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def check_cpu(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.is_cpu:  # (no torch.device object built)
            raise BackendUnavailableError(f"{name}: the cpu backend needs CPU tensors, got a tensor on {t.device}")
