"""``label_map``: map the frozen model's source-class outputs to the task's target classes in one pass."""

from __future__ import annotations

import torch

from .. import _cpu
from .._amp import no_autocast
from .._apply import (
    PLAIN_TYPES,
    backend_module,
    direct_call,
    in_forward_ad,
    op_outputs,
    plain_eager,
    run_function,
)
from .._backend import default_backend, register_op
from .._cpu import IndexRangeError
from .._validation import (
    INDEX_DTYPES,
    KERNEL_DTYPES,
    check_choice,
    check_float,
    check_index_range,
    check_same_device,
    check_tensor,
    resolve_backend_for,
    value_range,
)
from ..cpu import label_map as _cpu_label_map
from ..reference.label_map import INPUTS, REDUCES, label_map_values, out_dtype

OP = "label_map"
register_op(OP, ("reference", "triton", "cuda", "cpu"))

_MODULES = {
    "reference": "reprokernels.reference.label_map",
    "triton": "reprokernels.triton.label_map",
    "cuda": "reprokernels.cuda.label_map",
    "cpu": "reprokernels.cpu.label_map",
}
# what the kernels read in place; narrower integer mappings are widened to int32 first (a K_tgt x m copy)
KERNEL_INDEX_DTYPES = (torch.int64, torch.int32)

torch.library.define(
    "reprokernels::label_map_fwd",
    "(Tensor logits, Tensor mapping, str reduce, str input, str backend) -> (Tensor, Tensor)",
)
torch.library.define(
    "reprokernels::label_map_bwd",
    "(Tensor grad, Tensor logits, Tensor mapping, Tensor out, Tensor lse, str reduce, str input, bool[] needs, "
    "str backend) -> (Tensor, Tensor)",
)


def _kernel_mapping(mapping: torch.Tensor, backend: str) -> torch.Tensor:
    """The kernels read float32/float16/bfloat16 dense weights: a float64 one is rounded to float32, as the
    reference rounds every mapping to its compute dtype (float32 unless the logits are float64)."""
    if backend != "reference" and mapping.dtype == torch.float64:
        return mapping.to(torch.float32)
    return mapping


def _fwd(logits, mapping, reduce, input, backend):
    with no_autocast(logits.device):
        return backend_module(_MODULES, backend).label_map(logits, _kernel_mapping(mapping, backend), reduce, input)


torch.library.impl("reprokernels::label_map_fwd", ["CPU", "CUDA"])(_fwd)


@torch.library.register_fake("reprokernels::label_map_fwd")
def _fwd_fake(logits, mapping, reduce, input, backend):
    k_tgt = mapping.shape[1] if mapping.is_floating_point() else mapping.shape[0]
    out = logits.new_empty((logits.shape[0], k_tgt), dtype=out_dtype(logits, input))
    lse = logits.new_empty((logits.shape[0], 2) if input != "logits" else (0,), dtype=torch.float32)
    return out, lse


def _bwd(grad, logits, mapping, out, lse, reduce, input, needs, backend):
    mod = backend_module(_MODULES, backend)
    with no_autocast(logits.device):
        dx, dw = mod.label_map_backward(grad, logits, _kernel_mapping(mapping, backend), out, lse, reduce, input,
                                        *needs)
    if dw is not None:
        dw = dw.to(mapping.dtype)
    return dx, dw


def _bwd_op(grad, logits, mapping, out, lse, reduce, input, needs, backend):
    return op_outputs(grad, _bwd(grad, logits, mapping, out, lse, reduce, input, needs, backend))


torch.library.impl("reprokernels::label_map_bwd", ["CPU", "CUDA"])(_bwd_op)


@torch.library.register_fake("reprokernels::label_map_bwd")
def _bwd_fake(grad, logits, mapping, out, lse, reduce, input, needs, backend):
    dx = logits.new_empty(logits.shape) if needs[0] else grad.new_empty((0,))
    dw = mapping.new_empty(mapping.shape) if needs[1] else grad.new_empty((0,))
    return dx, dw


class LabelMapFunction(torch.autograd.Function):
    """``direct``: call the backend's Python implementation instead of the registered op (see ``direct_call``)."""

    @staticmethod
    def forward(logits, mapping, reduce, input, backend, direct):
        fwd = _fwd if direct else torch.ops.reprokernels.label_map_fwd
        return fwd(logits, mapping, reduce, input, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, mapping, ctx.reduce, ctx.input, ctx.backend, ctx.direct = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, mapping, out, lse)

    @staticmethod
    def backward(ctx, grad, _grad_lse):
        logits, mapping, out, lse = ctx.saved_tensors
        needs = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]) and mapping.is_floating_point()]
        bwd = _bwd if ctx.direct else torch.ops.reprokernels.label_map_bwd
        dx, dw = bwd(grad, logits, mapping, out, lse, ctx.reduce, ctx.input, needs, ctx.backend)
        return dx if needs[0] else None, dw if needs[1] else None, None, None, None, None


def _check_mapping(mapping: torch.Tensor, k_src: int) -> torch.Tensor:
    """An index mapping as (K_tgt, m), or a dense (K_src, K_tgt) one (an index mapping's values:
    ``_check_sources``)."""
    check_tensor(mapping, "mapping")
    if mapping.is_floating_point():
        if mapping.dim() != 2 or mapping.shape[0] != k_src:
            raise ValueError(f"mapping: a dense (float) mapping must be (K_src={k_src}, K_tgt), "
                             f"got shape {tuple(mapping.shape)}")
        return mapping
    if mapping.dtype not in INDEX_DTYPES:  # (bool included: a mask is not a mapping)
        raise TypeError(f"mapping: expected integer source indices (int64/int32/int16/int8/uint8) or a float "
                        f"(K_src, K_tgt) matrix, got {mapping.dtype}")
    if mapping.dim() not in (1, 2):
        raise ValueError(f"mapping: an index mapping must be (K_tgt,) or (K_tgt, m), got shape {tuple(mapping.shape)}")
    m2 = mapping.unsqueeze(1) if mapping.dim() == 1 else mapping
    return m2 if m2.dtype in KERNEL_INDEX_DTYPES else m2.to(torch.int32)


def _check_sources(mapping: torch.Tensor, k_src: int) -> None:
    check_index_range(mapping, -1, k_src - 1, "mapping", "source indices, or -1 for none")


def _restore_lead(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B, K_tgt) back to the logits' leading dims (a 2-D input: no view to make)."""
    return out if logits.dim() == 2 else out.reshape(*logits.shape[:-1], out.shape[-1])


def _column_gather(logits: torch.Tensor, mapping: object, input: str, backend: str) -> torch.Tensor | None:
    """auto on CPU in eager mode, logits as they are, one source per target (FLM / ILM-VP): the op is a column
    gather, which ``torch.index_select`` does at a fraction of the checked path's cost (and of the eager chain's
    advanced indexing: 3.6 against 15 us at B256 1000->10; its backward is ``index_add_``). It refuses any index
    outside [0, K_src) itself, so no range check runs first: a -1 (no source) or a bad index returns None and
    the checked path handles or names it. float64 logits included: the reference's result is the same gather."""
    if (backend != "auto" or default_backend() != "auto" or input != "logits" or type(mapping) not in PLAIN_TYPES
            or mapping.dtype not in KERNEL_INDEX_DTYPES or not logits.is_cpu):
        return None
    if mapping.dim() == 2 and mapping.shape[1] == 1:
        mapping = mapping[:, 0]
    # (autocast_free: autocast leaves index_select alone)
    if mapping.dim() != 1 or not plain_eager(logits, mapping, autocast_free=True):
        return None
    flat = logits if logits.dim() == 2 else logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16) and flat.requires_grad and torch.is_grad_enabled():
        # 16-bit logits that need a gradient: advanced indexing, whose backward (index_put_ with accumulate) beat
        # index_select's (index_add_) by 1.2x in 16 bits; it wraps negative indices, so the range is read first
        if not mapping.is_cpu:
            return None
        lo, hi = value_range(mapping) if mapping.numel() else (0, 0)
        if lo < 0 or hi >= flat.shape[1]:
            return None
        out = flat[:, mapping]
    else:
        try:
            out = torch.index_select(flat, 1, mapping)
        except (RuntimeError, IndexError):  # out of [0, K_src), or on another device: the checked path decides
            return None
    return _restore_lead(out, logits)


def _dense_kernel_serves(flat: torch.Tensor, mapping: torch.Tensor, input: str) -> bool:
    """auto in eager mode, a dense mapping that auto's case rule leaves to the reference: whether the cpu kernel
    is faster here (``cpu.label_map.dense_serves``: few targets and many logits, or a gradient of very many
    logits; a size rule, so it cannot live in the case, which holds no sizes and is what torch.compile guards
    on). A learnable mapping keeps the reference, whose d mapping is a BLAS GEMM; so does a forward-AD dual level
    (plain autograd has the jvp, the op has none)."""
    # (the caller has checked that mapping is dense and flat a CPU tensor)
    needs_grad = flat.requires_grad and torch.is_grad_enabled()
    return (_cpu_label_map.dense_serves(flat.shape[0], flat.shape[1], mapping.shape[1], needs_grad, input != "logits")
            and not mapping.requires_grad and flat.dtype in KERNEL_DTYPES and not in_forward_ad()
            and _cpu.available())


def label_map(logits: torch.Tensor, mapping: torch.Tensor, *, reduce: str = "mean", input: str = "logits",
              backend: str = "auto") -> torch.Tensor:
    """Map source-class outputs to target classes.

    Args:
        logits: (..., K_src) the frozen model's outputs, float32/float16/bfloat16 (float64 on the reference
            backend), any strides; leading dims are flattened and restored.
        mapping: (K_tgt,) integer one-to-one; (K_tgt, m) integer many-to-one (-1 = no source, skipped; entries
            may repeat; int64/int32/int16/int8/uint8, any strides); or (K_src, K_tgt) float dense weights
            (BLM/BLM+ omega, any fixed or learnable linear map; any float dtype on every backend, rounded to the
            compute dtype, its gradient returned in its own dtype).
        reduce: "mean" | "sum" over a target's real sources (index mappings; a target with none gives 0).
        input: "logits" (as they are), "probs" (softmax over K_src first) or "log_probs" (log-softmax first).
            Index mappings never materialise the softmax: one pass for the row's max / log-sum-exp, then
            only the mapped columns are read.

    Returns:
        (..., K_tgt): float32 for probs/log_probs, else the logits' dtype (float64 logits: float64 always).
        Computed in float32, or float64 for float64 logits (reference backend only). Differentiable in logits
        and in a dense mapping. K_src = 0 is refused (ValueError naming ``logits``).
    """
    check_float(logits, "logits")
    if logits.dim() < 1:
        raise ValueError("logits: expected a (..., K_src) tensor, got a scalar")
    check_choice(reduce, REDUCES, "reduce")
    check_choice(input, INPUTS, "input")
    k_src = logits.shape[-1]
    if k_src == 0:  # softmax, max and mean over no source class are undefined: refused on every backend
        raise ValueError(f"logits: expected at least one source class (K_src >= 1), got shape {tuple(logits.shape)}")
    out = _column_gather(logits, mapping, input, backend)
    if out is not None:
        return out
    m2 = _check_mapping(mapping, k_src)
    check_same_device(("logits", logits), ("mapping", mapping))
    flat = logits if logits.dim() == 2 else logits.reshape(-1, k_src)  # (a 2-D input: no view to make)
    if (backend == "auto" and m2.is_floating_point() and flat.is_cpu and default_backend() == "auto"
            and plain_eager(flat, m2)):
        # a dense map on CPU in eager mode: auto's case rule keeps the reference (a BLAS GEMM) unless the size rule
        # (_dense_kernel_serves) finds the cpu kernel faster
        chosen = "cpu" if _dense_kernel_serves(flat, m2, input) else "reference"
        plain = chosen == "reference"
    else:
        chosen = resolve_backend_for(OP, backend, logits.device, case=(
            f"dtype={logits.dtype}", f"mapping={'dense' if m2.is_floating_point() else 'index'}",
            f"mapping_dtype={m2.dtype}", f"input={input}"))
        plain = chosen == "reference" and backend == "auto" and plain_eager(flat, m2)
    if not m2.is_floating_point() and (chosen != "cpu" or flat.shape[0] == 0):
        _check_sources(mapping, k_src)  # before any kernel reads through it (the cpu kernel checks it itself)
    if plain:  # auto's reference as plain autograd (see plain_eager: autocast is off here, so no guard is needed)
        if input == "logits" and m2.dtype == torch.float32 and flat.dtype in KERNEL_DTYPES:
            # label_map_values without its calls that change nothing here (as many us as a B8 GEMM): the eager
            # chain's own float32 GEMM; float32 logits skip even the no-op conversion calls (3.4 us at B8)
            out = flat @ m2 if flat.dtype == torch.float32 else (flat.float() @ m2).to(flat.dtype)
        else:
            out = label_map_values(flat, m2, reduce, input)
        return _restore_lead(out, logits)
    if chosen != "reference":
        check_float(logits, "logits", KERNEL_DTYPES)
    try:
        out, _ = run_function(LabelMapFunction, _fwd, flat, m2, reduce, input, chosen,
                              direct=direct_call(chosen, flat, m2))
    except IndexRangeError:
        _check_sources(mapping, k_src)  # raises, naming the value
        raise
    return _restore_lead(out, logits)
