"""Shared test helpers: dtype-scaled comparison with a useful report, output poisoning, strategies."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
from hypothesis import strategies as st


def triton_param(module: str):
    """``pytest.param("triton")`` that skips (with the reason) when ``reprokernels.triton.<module>`` cannot be
    imported (triton missing or broken), so the other backends of a parametrised test still run."""
    try:
        importlib.import_module(f"reprokernels.triton.{module}")
    except Exception as e:
        return pytest.param("triton", marks=pytest.mark.skip(reason=f"reprokernels.triton.{module} unavailable: {e!r}"))
    return pytest.param("triton")


# (rtol, atol) for comparing a result in `dtype` against a float32/float64 reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def tolerances(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    rtol, atol = TOLERANCES[dtype]
    return rtol * scale, atol * scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 rtol: float | None = None, atol: float | None = None, scale: float = 1.0,
                 name: str = "tensor", equal_nan: bool = False) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise.

    Tolerances default to those of ``dtype`` (or actual's dtype) times ``scale``. On failure the message gives
    the worst index with both values, the number of mismatches, and where either side has NaN/inf.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    d_rtol, d_atol = tolerances(dtype or actual.dtype, scale)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    both_nan = a_nan & e_nan if equal_nan else torch.zeros_like(a_nan)
    same_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs()) & ~both_nan & ~same_inf
    if not bool(bad.any()):
        return
    lines = [f"{name}: {int(bad.sum())} of {a.numel()} elements differ (rtol={rtol:g}, atol={atol:g})"]
    excess = torch.where(bad, torch.nan_to_num(diff - rtol * e.abs(), nan=float("inf"), posinf=float("inf")),
                         torch.full_like(diff, -1.0))
    worst = torch.unravel_index(torch.argmax(excess), a.shape) if a.dim() else ()
    idx = tuple(int(i) for i in worst)
    lines.append(f"  worst at index {idx}: actual={a[idx].item()!r} expected={e[idx].item()!r} "
                 f"|diff|={diff[idx].item():.3g}")
    for label, mask in (("NaN in actual", a_nan & ~both_nan), ("NaN in expected", e_nan & ~both_nan),
                        ("inf in actual", torch.isinf(a) & ~same_inf), ("inf in expected", torch.isinf(e) & ~same_inf)):
        if bool(mask.any()):
            pos = [tuple(int(i) for i in p) for p in mask.nonzero()[:5]]
            lines.append(f"  {label} at {int(mask.sum())} positions, first {pos}")
    raise AssertionError("\n".join(lines))


def with_threads(n: int, fn: Callable[[], object]) -> object:
    """fn() with torch's (and so the cpu kernels') thread count set to n, restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN (integers with their max) so an element a kernel never writes shows up."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def empty_poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    return poison_(torch.empty(shape, dtype=dtype, device=device))


LAYOUTS = ("contiguous", "strided", "channels_last", "transposed")


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (a view with non-trivial strides where asked)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "strided":  # every other element of a larger buffer along the last dim
        big = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        poison_(big)
        view = big[..., ::2]
        view.copy_(t)
        return view
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout in ("transposed", "channels_last") and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.contiguous()


odd_sizes = st.integers(min_value=1, max_value=13)
layouts = st.sampled_from(LAYOUTS)
kernel_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def traffic_counter():
    """A fresh :class:`tests.traffic.Traffic` byte counter (Triton interpreter), or skip when triton is missing."""
    pytest.importorskip("triton")
    from .traffic import Traffic

    return Traffic()


def grads_match_compiled(fn: Callable[[torch.Tensor], torch.Tensor], param: torch.Tensor) -> None:
    """``torch.compile(fn, fullgraph=True)`` gives the same loss and gradient as eager ``fn``."""
    loss = torch.compile(fn, fullgraph=True, backend="aot_eager")(param)
    (g,) = torch.autograd.grad(loss, param)
    loss_e = fn(param)
    (g_e,) = torch.autograd.grad(loss_e, param)
    assert_close(loss, loss_e, name="loss")
    assert_close(g, g_e, name="grad")
