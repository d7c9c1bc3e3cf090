"""The test helpers themselves: the comparison must catch what it exists to catch; info and the CLI run."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

import reprokernels
from tests.utils import as_layout, assert_close, empty_poisoned, poison_


def test_assert_close_passes_on_equal_and_within_tolerance():
    x = torch.randn(5, 7)
    assert_close(x, x.clone())
    assert_close(x + 1e-7, x)


def test_assert_close_fails_on_a_planted_nan():
    x = torch.randn(4, 6)
    y = x.clone()
    y[2, 3] = float("nan")
    with pytest.raises(AssertionError) as err:
        assert_close(y, x)
    msg = str(err.value)
    assert "1 of 24 elements differ" in msg and "worst at index (2, 3)" in msg and "NaN in actual at 1" in msg


def test_assert_close_fails_on_an_off_by_one():
    x = torch.arange(30, dtype=torch.float32).reshape(5, 6)
    y = torch.roll(x, 1, dims=1)  # every row shifted one place: the classic indexing bug
    with pytest.raises(AssertionError, match=r"elements differ"):
        assert_close(y, x)
    z = x.clone()
    z[4, 5] += 1.0
    with pytest.raises(AssertionError, match=r"worst at index \(4, 5\): actual=30.0 expected=29.0"):
        assert_close(z, x)


def test_assert_close_reports_shape_mismatch_and_inf():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(3), torch.zeros(4))
    with pytest.raises(AssertionError, match="inf in actual"):
        assert_close(torch.tensor([float("inf"), 1.0]), torch.tensor([0.0, 1.0]))
    assert_close(torch.tensor([float("-inf")]), torch.tensor([float("-inf")]))


def test_dtype_scaled_tolerances():
    x = torch.randn(100)
    assert_close(x.half(), x, dtype=torch.float16)
    with pytest.raises(AssertionError):
        assert_close(x.half(), x, dtype=torch.float32)


def test_poison_and_layouts():
    t = empty_poisoned((3, 4), torch.float16)
    assert bool(torch.isnan(t).all())
    assert int(poison_(torch.zeros(2, dtype=torch.int32))[0]) == 2**31 - 1
    x = torch.randn(2, 3, 5, 7)
    for layout in ("contiguous", "strided", "channels_last", "transposed"):
        y = as_layout(x, layout)
        assert torch.equal(y, x)
    assert not as_layout(x, "strided").is_contiguous()
    assert as_layout(x, "channels_last").is_contiguous(memory_format=torch.channels_last)


def test_info_prints_versions_and_backends():
    buf = io.StringIO()
    reprokernels.info(file=buf)
    text = buf.getvalue()
    for needle in ("reprokernels", "torch", "triton", "_C", "backends:", "reference  available"):
        assert needle in text


def test_cli_info_runs():
    proc = subprocess.run([sys.executable, "-m", "reprokernels", "info"], capture_output=True, text=True,
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr
    assert "backends:" in proc.stdout


def test_triton_interpreter_smoke():
    """The harness runs Triton kernels on the CPU: a trivial kernel must compute under the interpreter."""
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1.0, mask=m)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.arange(37, dtype=torch.float32, device=dev)
    add_one[(triton.cdiv(37, 16),)](x, 37, BLOCK=16)
    assert_close(x.cpu(), torch.arange(37, dtype=torch.float32) + 1)


def test_kernel_outputs_are_poisoned_under_test():
    """conftest turns on NaN-filled kernel outputs, so an element a kernel never writes fails a comparison."""
    from reprokernels import _alloc

    assert _alloc.POISON
    assert bool(torch.isnan(_alloc.empty_output((3,), torch.float32, torch.device("cpu"))).all())

