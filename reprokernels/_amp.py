"""Autocast inside the ops: off.

An op computes in float32 (float64 for float64 inputs) and returns its documented dtypes whatever the ambient
``torch.autocast``. Registered op implementations otherwise run under it, which would turn the reference's and
the composite backend's matmuls into bf16/fp16 ones (or mix dtypes inside them), while the fused kernels never
see autocast: backends would disagree.
"""

from __future__ import annotations

import contextlib

import torch


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, enabled=False)`` when autocast is on for that device, else a no-op."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
