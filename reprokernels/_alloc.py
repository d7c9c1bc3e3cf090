"""Output allocation of the kernel launchers.

With ``REPROKERNELS_POISON_OUTPUTS=1`` (the test suite sets it) every buffer a kernel is meant to write in
full is filled with NaN first, so an element a kernel forgets to write fails the comparison instead of
passing by luck on recycled memory. Read once at import; off it costs nothing.
"""

from __future__ import annotations

import os

import torch

POISON = os.environ.get("REPROKERNELS_POISON_OUTPUTS", "0") not in ("", "0")


def empty_output(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out
