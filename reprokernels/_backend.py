"""Backend choice: ``"auto" | "reference" | "triton" | "cuda" | "composite"``.

Precedence: an op's explicit ``backend=`` argument; else the innermost ``use_backend(...)`` block; else the
``REPROKERNELS_BACKEND`` environment variable (read at import); else ``"auto"``. ``auto`` picks, on CUDA
tensors, ``cuda`` where the extension is built and the op has a CUDA kernel, else ``triton``; on CPU
tensors ``composite`` where the op has one (attention), else ``reference``. An explicitly requested
backend that cannot run raises :class:`BackendUnavailableError`; nothing silently falls back.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import _cuda

BACKENDS = ("auto", "reference", "triton", "cuda", "composite")
_OPS: dict[str, tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run for this op, device or install."""


def _from_env() -> str:
    value = os.environ.get("REPROKERNELS_BACKEND", "auto").strip() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"REPROKERNELS_BACKEND: expected one of {', '.join(BACKENDS)}, got {value!r}")
    return value


# A plain module global (not a thread-local) so torch.compile can guard on it.
_default: str = _from_env()


def default_backend() -> str:
    return _default


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``name`` the backend of every op called with ``backend="auto"`` inside the block.

    Not thread-local: the setting is process-wide while the block is open.
    """
    global _default
    if name not in BACKENDS:
        raise ValueError(f"use_backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    saved, _default = _default, name
    try:
        yield
    finally:
        _default = saved


def register_op(op: str, backends: tuple[str, ...]) -> None:
    """Declare which concrete backends an op implements (always including 'reference')."""
    _OPS[op] = backends


def op_backends(op: str) -> tuple[str, ...]:
    return _OPS[op]


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_status(backend: str, device_type: str) -> tuple[bool, str]:
    """Whether ``backend`` can run on tensors of ``device_type`` here, and why not."""
    if backend in ("reference", "composite"):
        return True, ""
    if backend == "triton":
        if not triton_installed():
            return False, "triton is not installed (pip install triton; wheels exist for Linux x86_64/aarch64)"
        if device_type == "cuda" or interpreter_enabled():
            return True, ""
        return False, f"Triton kernels need CUDA tensors (got {device_type}) or TRITON_INTERPRET=1 to run on the CPU"
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the cuda backend needs CUDA tensors, got {device_type} tensors"
        if not _cuda.cuda_available():
            return False, _cuda.unavailable_reason()
        return True, ""
    return False, f"unknown backend {backend!r}"


def _resolve(op: str, requested: str, default: str, device_type: str) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {requested!r}")
    implemented = _OPS[op]
    chosen = default if requested == "auto" else requested
    if chosen == "auto":
        if device_type == "cuda":
            for name in ("cuda", "triton"):
                if name in implemented and backend_status(name, device_type)[0]:
                    return name
            return "reference"
        return "composite" if "composite" in implemented else "reference"
    if chosen not in implemented:
        raise BackendUnavailableError(
            f"backend: {op} has no {chosen!r} backend (it has: {', '.join(implemented)})")
    ok, why = backend_status(chosen, device_type)
    if not ok:
        raise BackendUnavailableError(f"backend={chosen!r} cannot run {op}: {why}")
    return chosen


# What torch.compiler.assume_constant_result does (torch 2.4 ... 2.13), without the decorator's import of
# torch._dynamo (half a second, and it imports triton): dynamo calls _resolve at trace time and bakes the
# string in, so backend choice never breaks a graph.
_resolve._dynamo_marked_constant = True  # type: ignore[attr-defined]


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend for ``op`` on ``device`` (see the module docstring for the rules)."""
    return _resolve(op, backend, _default, device.type)
