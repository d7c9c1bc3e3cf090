"""What every CUDA launcher shares: dtype codes, device checks, the launch itself (device or host emulation).

``emulate=True`` runs a kernel's very per-thread C++ functions in CPU loops over CPU tensors (the ``*_host``
entry points of the extension): how kernel code is tested without a GPU. The op layer never passes it, and
without it CPU tensors are refused, so ``backend="cuda"`` on CPU tensors never falls back to the emulation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _cuda

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def check_devices(emulate: bool, **tensors: torch.Tensor | None) -> None:
    """Every tensor on a CUDA device (or, emulating, on the CPU)."""
    want = "cpu" if emulate else "cuda"
    for name, t in tensors.items():
        if t is not None and t.device.type != want:
            how = "its host emulation (emulate=True)" if emulate else "the cuda backend"
            raise ValueError(f"{name}: {how} needs {want} tensors, got a tensor on {t.device}")


def float_code(t: torch.Tensor, name: str) -> int:
    if t.dtype not in DTYPE_CODES:
        raise ValueError(f"{name}: the cuda backend supports float32, float16 and bfloat16, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def entry(name: str, emulate: bool) -> Callable[[object], int]:
    """The extension's launcher ``name``, or its host emulation."""
    return getattr(_cuda.extension(), name + "_host" if emulate else name)


def launch(name: str, p: object, device: torch.device, emulate: bool) -> None:
    """Run launcher ``name`` with params ``p``; a non-zero CUDA error code becomes a RuntimeError."""
    fn = entry(name, emulate)
    if emulate:
        _cuda.check(fn(p), name + "_host")
        return
    with torch.cuda.device(device):  # the launch goes to the current device: make it the tensors'
        _cuda.check(fn(p), name)
