"""Backend choice: ``"auto" | "reference" | "triton" | "cuda" | "composite" | "cpu"``.

Precedence: an op's explicit ``backend=`` argument; else the innermost ``use_backend(...)`` block; else the
``REPROKERNELS_BACKEND`` environment variable (read at import); else ``"auto"``. ``auto`` picks, on CUDA
tensors, ``cuda`` where the extension is built and the op has a CUDA kernel, else ``triton``; on CPU
tensors ``cpu`` where the CPU module is built, the op has a cpu kernel and the call's *case* (dtypes and
options, passed by the op as ``case=``) is one the kernel implements and was measured at least as fast as the
eager chain users write and torch.compile of it (the launcher's ``supports(case)``; docs/cpu-backend.md);
otherwise ``composite`` where the op has one (attention),
else ``reference``. An op that passes no case keeps the latter choice: auto never routes a call to a kernel
that has not declared it can serve it. An explicitly requested backend that cannot run raises
:class:`BackendUnavailableError`; nothing silently falls back.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import _cpu, _cuda

BACKENDS = ("auto", "reference", "triton", "cuda", "composite", "cpu")
_OPS: dict[str, tuple[str, ...]] = {}
# The launcher module of each op's cpu backend: its ``supports(case) -> str`` ("" = served and faster) is what
# auto consults. Module names, imported on demand (the launchers sit above this module).
CPU_LAUNCHERS = {
    "label_map": "reprokernels.cpu.label_map",
    "soft_prompt_concat": "reprokernels.cpu.soft_prompt",
    "visual_prompt": "reprokernels.cpu.visual_prompt",
    "label_histogram": "reprokernels.cpu.label_histogram",
}


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
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the cpu backend needs CPU tensors, got {device_type} tensors"
        if not _cpu.available():
            return False, _cpu.unavailable_reason()
        return True, ""
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the cuda backend needs CUDA tensors, got {device_type} tensors"
        if not _cuda.cuda_available():
            return False, _cuda.unavailable_reason()
        return True, ""
    return False, f"unknown backend {backend!r}"


@functools.lru_cache(maxsize=4096)  # a pure function of (op, case): parsed once per distinct call signature
def cpu_supports(op: str, case: tuple | None) -> str:
    """Why auto does not pick the cpu backend for ``op`` on this case ("" when it does)."""
    if case is None:
        return "the op passed no case, so it cannot be checked against what the cpu kernels implement"
    mod = CPU_LAUNCHERS.get(op)
    if mod is None:
        return f"{op} has no cpu launcher"
    return importlib.import_module(mod).supports(tuple(case))


def _resolve(op: str, requested: str, default: str, device_type: str, case: tuple | None = None) -> str:
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
        if "cpu" in implemented and backend_status("cpu", device_type)[0] and not cpu_supports(op, case):
            return "cpu"
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


def resolve_backend(op: str, backend: str, device: torch.device, case: tuple | None = None) -> str:
    """The concrete backend for ``op`` on ``device`` (see the module docstring for the rules).

    ``case``: a tuple of hashable constants describing the call (``"key=value"`` strings: dtypes, options; no
    sizes, so a compiled graph does not re-guard on shapes), which the cpu launcher's ``supports`` reads.
    """
    return _resolve(op, backend, _default, device.type, None if case is None else tuple(case))
