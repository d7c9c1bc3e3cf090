"""``label_histogram``: the joint (source prediction, target label) statistic the label-mapping estimators use,
accumulated batch by batch into one float32 tensor on the device.

One registered op, ``reprokernels::label_histogram_accumulate``, mutates its ``out`` argument in place (schema
``Tensor(a!) out``) and returns nothing: a running statistic over a dataset is updated without a second
(K_src, K_tgt) buffer or an extra pass over it per batch. It is a statistic, not a differentiable function:
there is no autograd formula, and the public function detaches its input.

Backends: ``reference``, ``triton`` and ``cuda`` (csrc/label_histogram.cu: the Triton backend's algorithm in CUDA;
``auto`` picks it on CUDA tensors where the extension is built, else Triton).
"""

from __future__ import annotations

import torch

from .._apply import backend_module, direct_call
from .._backend import register_op
from .._validation import (
    KERNEL_DTYPES,
    check_choice,
    check_float,
    check_index_dtype,
    check_index_range,
    check_same_device,
    check_tensor,
    check_writable,
    resolve_backend_for,
)
from ..reference.label_histogram import WEIGHTS, effective_topk

OP = "label_histogram"
register_op(OP, ("reference", "triton", "cuda", "cpu"))

_MODULES = {
    "reference": "reprokernels.reference.label_histogram",
    "triton": "reprokernels.triton.label_histogram",
    "cuda": "reprokernels.cuda.label_histogram",
    "cpu": "reprokernels.cpu.label_histogram",
}
# what the kernels read in place; narrower integer indices are widened to int32 first (B integers, no host sync)
KERNEL_INDEX_DTYPES = (torch.int64, torch.int32)

torch.library.define(
    "reprokernels::label_histogram_accumulate",
    "(Tensor(a!) out, Tensor x, Tensor targets, int topk, str weight, str backend) -> ()",
)


def _accumulate(out, x, targets, topk, weight, backend):
    backend_module(_MODULES, backend).label_histogram_accumulate(out, x, targets, topk, weight)


torch.library.impl("reprokernels::label_histogram_accumulate", ["CPU", "CUDA"])(_accumulate)


@torch.library.register_fake("reprokernels::label_histogram_accumulate")
def _accumulate_fake(out, x, targets, topk, weight, backend):
    return None


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _kernel_index(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in KERNEL_INDEX_DTYPES else t.to(torch.int32)


def _check_range(t: torch.Tensor, hi: int, name: str) -> None:
    """Integer labels in [0, hi), checked before any kernel reads memory (skipped while torch.compile traces)."""
    check_index_range(t, 0, hi - 1, name)


def label_histogram(logits_or_preds: torch.Tensor, targets: torch.Tensor, num_source: int, num_target: int, *,
                    topk: int | None = None, weight: str = "count", out: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Joint statistic D[s, t] of (source prediction s, target label t) over a batch, added into ``out``.

    Args:
        logits_or_preds: (..., K_src) float logits of the frozen model (float32/float16/bfloat16; float64 on the
            reference backend; any strides), or integer predictions (...) in [0, K_src) (``weight="count"``; any
            integer dtype as for targets).
        targets: (...) integer target labels in [0, K_tgt) (int64/int32/int16/int8/uint8, any strides, stride 0
            included), the leading shape of the logits.
        num_source, num_target: K_src and K_tgt.
        topk: ``weight="prob"`` only: keep the k largest probabilities of each sample (ties at the k-th value:
            lowest source index first); None (or k >= K_src) keeps all of them. BLM+ uses
            ``max(1, int(0.15 * K_tgt))``.
        weight: ``"count"``: D[argmax_s logits[b], y_b] += 1 (FLM/ILM/BAR/BLM; argmax as ``torch.argmax``: first
            maximal index, NaN counts as the maximum); ``"prob"``: D[s, y_b] += softmax(logits[b])[s] for the
            kept s (BLM+).
        out: a running (K_src, K_tgt) float32 statistic on the logits' device to accumulate into; it is the
            one tensor the op writes, in place, and it is returned; it may hold values (they are added to) and
            have any non-overlapping strides, the same on every backend; an expanded / overlapping view is
            refused (ValueError naming ``out``). None: a fresh zero tensor.

    Returns:
        ``out``: (K_src, K_tgt) float32. Counts are exact integers up to 2**24 per cell; accumulating batch by
        batch gives exactly the counts of one big batch (for probabilities, equal up to float32 rounding). The
        result is deterministic (Triton and CUDA: per-block partials and an ordered reduction, no atomics). Not
        differentiable.
    """
    check_choice(weight, WEIGHTS, "weight")
    _check_int(num_source, "num_source", 1)
    _check_int(num_target, "num_target", 1)
    x = check_tensor(logits_or_preds, "logits_or_preds")
    check_tensor(targets, "targets")
    check_index_dtype(targets, "targets", what="an integer tensor of target labels")
    if topk is not None:
        if weight != "prob":
            raise ValueError(f"topk: only used with weight='prob', got topk={topk!r} with weight={weight!r}")
        _check_int(topk, "topk", 1)
    if x.is_floating_point():
        check_float(x, "logits_or_preds")
        if x.dim() < 1 or x.shape[-1] != num_source:
            raise ValueError(f"logits_or_preds: expected logits (..., K_src={num_source}), got shape {tuple(x.shape)}")
        lead = tuple(x.shape[:-1])
    else:
        check_index_dtype(x, "logits_or_preds", what="float logits or integer predictions")
        if weight != "count":
            raise ValueError("logits_or_preds: weight='prob' needs float logits, got integer predictions")
        lead = tuple(x.shape)
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets: expected shape {lead} (the leading shape of logits_or_preds), "
                         f"got {tuple(targets.shape)}")
    if out is not None:
        check_tensor(out, "out")
    check_same_device(("logits_or_preds", x), ("targets", targets), ("out", out))
    if out is None:
        out = torch.zeros((num_source, num_target), dtype=torch.float32, device=x.device)
    else:
        if out.dtype != torch.float32:
            raise TypeError(f"out: expected a float32 running statistic, got {out.dtype}")
        if tuple(out.shape) != (num_source, num_target):
            raise ValueError(f"out: expected shape ({num_source}, {num_target}) = (num_source, num_target), "
                             f"got {tuple(out.shape)}")
        if out.requires_grad:
            raise ValueError("out: a statistic is written in place; it must not require grad")
        # an expanded view would have several cells add into one memory location (lost or doubled counts)
        check_writable(out, "out")
    _check_range(targets, num_target, "targets")
    if not x.is_floating_point():
        _check_range(x, num_source, "logits_or_preds")
    chosen = resolve_backend_for(OP, backend, x.device, case=(f"dtype={x.dtype}", f"weight={weight}"))
    if chosen != "reference" and x.is_floating_point():
        check_float(x, "logits_or_preds", KERNEL_DTYPES)
    if x.is_floating_point():
        flat = x.detach().reshape(-1, num_source)
    else:
        flat = _kernel_index(x.reshape(-1))
    k = effective_topk(topk, num_source) if weight == "prob" else 0
    t_flat = _kernel_index(targets.reshape(-1))
    if direct_call(chosen, out, flat, t_flat):
        _accumulate(out, flat, t_flat, k, weight, chosen)
        torch.autograd.graph.increment_version(out)  # what the registered op's (a!) does for autograd's checks
    else:
        torch.ops.reprokernels.label_histogram_accumulate(out, flat, t_flat, k, weight, chosen)
    return out
