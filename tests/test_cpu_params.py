"""The CPU module's call interface (csrc/cpu/param_dict.h, module.cpp): parameters handed over as one dict, and
the in-place index range reader the op layer's range checks use on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from reprokernels import _cpu
from reprokernels._validation import check_index_range, value_range

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="the CPU module is not built")


def test_unknown_field_raises_naming_it() -> None:
    p = _cpu.Params()
    p.B, p.no_such_field = 1, 3
    with pytest.raises(KeyError, match="SoftPromptParams has no field 'no_such_field'"):
        _cpu.run("soft_prompt_fwd", p)


@pytest.mark.parametrize("value", ["4", 2.5, None, -1])
def test_field_of_wrong_type_raises(value: object) -> None:
    p = _cpu.Params()
    p.out = value  # a pointer: a non-negative integer
    with pytest.raises(TypeError, match=r"SoftPromptParams\.out: expected an integer"):
        _cpu.run("soft_prompt_fwd", p)


def test_int32_field_out_of_range_raises() -> None:
    p = _cpu.Params()
    p.x_dtype = 1 << 40
    with pytest.raises(TypeError, match=r"LabelMapParams\.x_dtype"):
        _cpu.run("label_map_fwd", p)


def test_float_field_takes_ints_and_floats() -> None:
    ext = _cpu.extension()
    # an unknown dtype code: the kernel refuses (1) after parsing, so the parsing itself succeeded
    assert ext.soft_prompt_fwd({"embed_scale": 2, "prompt_dtype": 9}) == 1
    assert ext.soft_prompt_fwd({"embed_scale": 0.5, "prompt_dtype": 9}) == 1


def test_refusal_becomes_cpu_kernel_error() -> None:
    p = _cpu.Params()
    p.x_dtype = 9  # no such dtype code
    with pytest.raises(_cpu.CpuKernelError, match="label_map_fwd"):
        _cpu.run("label_map_fwd", p)


def _index_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        lo, hi = (0, 250) if dtype == torch.uint8 else (-100, 100)
        base = torch.randint(lo, hi, (7, 5), generator=g).to(dtype)
        out += [base, base.t(), base[:, ::2], base[1], base[:, 3], base[2:3, 1:2], torch.tensor(3, dtype=dtype)
                .expand(4, 6), base.reshape(-1)[::3]]
    return out


@pytest.mark.parametrize("i", range(40))
def test_index_range_matches_torch(i: int) -> None:
    t = _index_tensors()[i]
    want = (int(t.min()), int(t.max()))
    assert _cpu.index_range(t) == want
    assert value_range(t) == want


def test_index_range_declines_what_it_cannot_read() -> None:
    assert _cpu.index_range(torch.zeros(2, 2, 2, dtype=torch.int64)) is None  # rank 3: torch answers
    assert _cpu.index_range(torch.zeros(3, dtype=torch.bool)) is None
    assert value_range(torch.arange(8).view(2, 2, 2)) == (0, 7)


def test_range_check_names_the_offending_value() -> None:
    t = torch.tensor([[0, 4], [9, 2]], dtype=torch.int16).t()
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 8\] \(rows\), got 9"):
        check_index_range(t, 0, 8, "ids", "rows")
    with pytest.raises(ValueError, match=r"got -3"):
        check_index_range(torch.tensor([-3, 1], dtype=torch.int8), 0, 8, "ids")
    assert check_index_range(t, 0, 9, "ids") == 0
