"""Shared input validation: every error names the argument, what was expected and what came."""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
    lo, hi = torch.stack([t.min(), t.max()]).tolist()
    return int(lo), int(hi)
