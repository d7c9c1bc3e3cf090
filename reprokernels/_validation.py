"""Shared input validation: every error names the argument, what was expected and what came."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import is_fake  # already imported by torch itself

from . import _cpu
from ._backend import BACKENDS, BackendUnavailableError, op_backends, resolve_backend

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(t: object, name: str, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    t = check_tensor(t, name)
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected a floating dtype ({_dtype_names(dtypes)}), got {t.dtype}")
    return t


def check_ndim(t: torch.Tensor, ndims: int | Sequence[int], name: str, layout: str = "") -> None:
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if t.dim() not in allowed:
        want = " or ".join(f"{n}-D" for n in allowed)
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name}: expected a {want} tensor{hint}, got shape {tuple(t.shape)}")


def check_shape(t: torch.Tensor, shape: Sequence[int | None], name: str) -> None:
    """``None`` in ``shape`` matches any size."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape, strict=True))
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def check_same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    if not present:
        return
    first_name, first = present[0]
    for n, t in present[1:]:
        if t.is_cpu and first.is_cpu:  # (the common case, without building two torch.device objects)
            continue
        if t.device != first.device:
            raise ValueError(f"{n}: expected a tensor on {first.device} (the device of {first_name}), got {t.device}")


def check_pair(value: object, name: str, *, minimum: int | None = None) -> tuple[int, int] | None:
    """None, an int (used twice) or a pair of ints -> a tuple of two ints."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        pair = tuple(int(v) for v in value)  # type: ignore[union-attr]
        ok = len(pair) == 2 and all(float(v) == p for v, p in zip(value, pair, strict=True))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if minimum is not None and min(pair) < minimum:
        raise ValueError(f"{name}: expected values >= {minimum}, got {pair}")
    return pair  # type: ignore[return-value]


def check_choice(value: object, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


def value_range(t: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor with one device-to-host sync (a range check before a launch)."""
    if t.is_cpu:  # no sync to save: read in place by the CPU module, or two scalar reads
        found = _cpu.index_range(t)
        if found is not None:
            return found
        lo, hi = torch.aminmax(t)
        return int(lo), int(hi)
    lo, hi = torch.aminmax(t)
    lo, hi = torch.stack([lo, hi]).tolist()
    return int(lo), int(hi)


# --- checks of values (index ranges, non-zero std): eager on the host, or asynchronous on the device -----------
#
# A check of *values* needs them on the host: on a CUDA tensor that is a device-to-host sync per call, which
# stalls the stream and cannot be captured in a CUDA graph. So the default is: CPU tensors are checked eagerly
# (a named ValueError before any kernel runs; no sync exists on the CPU), CUDA tensors by a device-side
# ``torch._assert_async`` (no sync; a bad value fails the stream with the same message). The kernels clamp or
# mask every index they read, so a bad value never causes an out-of-bounds access either way.
# ``REPROKERNELS_EAGER_CHECKS=1`` (or ``with reprokernels.eager_checks(True):``) restores the eager, named errors
# on CUDA tensors at the price of one sync per checked tensor; ``0`` makes CPU tensors asynchronous too.

def _eager_from_env() -> bool | None:
    value = os.environ.get("REPROKERNELS_EAGER_CHECKS", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"REPROKERNELS_EAGER_CHECKS: expected 1, 0 or auto, got {value!r}")


# None = by device (CPU eager, CUDA asynchronous). A plain module global so torch.compile can guard on it.
_eager: bool | None = _eager_from_env()


@contextmanager
def eager_checks(enabled: bool | None = True) -> Iterator[None]:
    """Check index ranges and other input *values* eagerly (named ``ValueError``, one host sync per checked
    tensor on CUDA) inside the block; ``False``: asynchronously on every device; ``None``: the default (eager on
    CPU tensors, device-side asserts on CUDA tensors). Process-wide while the block is open."""
    global _eager
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"eager_checks: expected True, False or None, got {enabled!r}")
    saved, _eager = _eager, enabled
    try:
        yield
    finally:
        _eager = saved


def checks_are_eager(device: torch.device) -> bool:
    """Whether value checks on tensors of ``device`` run eagerly on the host (see ``eager_checks``)."""
    return device.type == "cpu" if _eager is None else _eager


def _values_unreadable(t: torch.Tensor) -> bool:
    """Meta and fake tensors (model construction on the meta device, torch.compile tracing) have no values."""
    # a plain torch.Tensor is never fake: skip is_fake's subclass walk on the hot path
    return t.is_meta or torch.compiler.is_compiling() or (type(t) is not torch.Tensor and is_fake(t))


def check_index_range(t: torch.Tensor, lo: int, hi: int, name: str, what: str = "") -> int | None:
    """Every value of the integer tensor ``t`` in [lo, hi] (inclusive); returns the smallest value where the check
    read it on the host (eager, non-empty), else None.

    Eager: a ``ValueError`` naming ``name``, the range and the first offending bound. Asynchronous (CUDA by
    default): ``torch._assert_async`` with the same message, no host sync. Skipped for empty, meta and fake
    tensors and while torch.compile traces (the kernels clamp or mask indices, so nothing is read out of bounds).
    """
    if t.numel() == 0 or _values_unreadable(t):
        return None
    why = f" ({what})" if what else ""
    if checks_are_eager(t.device):
        lo_v, hi_v = value_range(t)  # (CPU tensors: read in place by the CPU module)
        if lo_v < lo or hi_v > hi:
            raise ValueError(f"{name}: expected values in [{lo}, {hi}]{why}, got {lo_v if lo_v < lo else hi_v}")
        return lo_v
    ok = (t.min() >= lo) & (t.max() <= hi)
    torch._assert_async(ok, f"{name}: expected values in [{lo}, {hi}]{why}")
    return None


def check_nonzero(t: torch.Tensor, name: str) -> None:
    """No zero in the float tensor ``t`` (eager: named ValueError; asynchronous on CUDA by default)."""
    if t.numel() == 0 or _values_unreadable(t):
        return
    if checks_are_eager(t.device):
        # a handful of CPU values (a per-channel std): reading them is cheaper than a comparison kernel
        found = 0 in t.reshape(-1).tolist() if t.device.type == "cpu" and t.numel() <= 64 else bool((t == 0).any())
        if found:
            raise ValueError(f"{name}: expected non-zero values, got {t.tolist()}")
        return
    torch._assert_async((t != 0).all(), f"{name}: expected non-zero values")


# --- argument shapes, memory layouts, meta tensors ----------------------------------------------------------

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _as_real(value: object) -> float | None:
    """float(value) for a real number (int, float, numpy scalar, one-element tensor with values), else None;
    bools and strings are not numbers here."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except Exception:  # TypeError, ValueError, a meta tensor's NotImplementedError...
        return None


def check_real(value: object, name: str) -> float:
    """A real number -> float, else a named TypeError."""
    v = _as_real(value)
    if v is None:
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    return v


def check_reals(value: object, name: str, what: str) -> list[float]:
    """A sequence of real numbers -> list of floats, else a named TypeError (never Python's own message)."""
    items = None
    if not isinstance(value, (str, bytes)):
        try:
            items = [_as_real(v) for v in value]  # type: ignore[union-attr]
        except TypeError:
            items = None
    if items is None or any(v is None for v in items):
        raise TypeError(f"{name}: expected {what}, got {value!r}")
    return items  # type: ignore[return-value]


def check_real_pair(value: object, name: str, what: str = "(lo, hi)") -> tuple[float, float]:
    """Exactly two real numbers -> (float, float), else a named TypeError (never an unpacking error)."""
    items = check_reals(value, name, f"{what}, two real numbers")
    if len(items) != 2:
        raise TypeError(f"{name}: expected {what}, two real numbers, got {value!r}")
    return items[0], items[1]


def check_index_dtype(t: torch.Tensor, name: str, dtypes: Sequence[torch.dtype] = INDEX_DTYPES,
                      what: str = "an integer tensor") -> None:
    """An integer index tensor (never bool: a mask is not an index) of one of ``dtypes``."""
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected {what} ({_dtype_names(dtypes)}), got {t.dtype}")


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` address the same memory (an expanded, stride-0 or overlapping view): such a
    tensor cannot be written element by element without losing updates. From sizes and strides only."""
    dims = sorted((abs(st), n) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1)
    extent = 1  # elements spanned by the dims of smaller stride
    for st, n in dims:
        if st < extent:
            return True
        extent = st * (n - 1) + extent
    return False


def check_writable(t: torch.Tensor, name: str) -> None:
    """An output written in place: no element may share memory with another (refused on every backend)."""
    if has_internal_overlap(t):
        raise ValueError(f"{name}: expected a tensor whose elements have distinct memory (it is written in "
                         f"place), got an expanded/overlapping view with shape {tuple(t.shape)} and strides "
                         f"{tuple(t.stride())}; pass a fresh tensor or .clone() it")


def is_meta(*tensors: torch.Tensor | None) -> bool:
    """Whether any of the tensors lives on the meta device (values absent: only shapes and dtypes flow)."""
    return any(t is not None and t.is_meta for t in tensors)


def resolve_backend_for(op: str, backend: str, device: torch.device, **kwargs: object) -> str:
    """``resolve_backend``, except that meta tensors (no values: FSDP2-style construction on the meta device)
    take the op's fake implementation whatever backend is named: a named backend is still checked to exist for
    the op (a typo fails the same everywhere), but not to be runnable here, since nothing runs."""
    if device.type != "meta":
        return resolve_backend(op, backend, device, **kwargs)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto" and backend not in op_backends(op):
        raise BackendUnavailableError(
            f"backend: {op} has no {backend!r} backend (it has: {', '.join(op_backends(op))})")
    return "reference"
