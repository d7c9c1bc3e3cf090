"""``visual_prompt``: fused input-space reprogramming (place/resize + masked, squashed perturbation + clamp +
normalisation) as one registered op with a fused backward."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .._apply import backend_module, direct_call, op_outputs, plain_eager, run_function
from .._backend import register_op
from .._validation import (
    FLOAT_DTYPES,
    KERNEL_DTYPES,
    _as_real,
    check_choice,
    check_float,
    check_ndim,
    check_nonzero,
    check_pair,
    check_real,
    check_real_pair,
    check_reals,
    check_same_device,
    resolve_backend_for,
)
from ..reference.visual_prompt import ORDERS, RESIZE_MODES, SQUASHES, VPSpec
from ..reference.visual_prompt import visual_prompt as reference_visual_prompt

OP = "visual_prompt"
register_op(OP, ("reference", "triton", "cuda", "cpu"))

_MODULES = {
    "reference": "reprokernels.reference.visual_prompt",
    "triton": "reprokernels.triton.visual_prompt",
    "cuda": "reprokernels.cuda.visual_prompt",
    "cpu": "reprokernels.cpu.visual_prompt",
}


def _impl(backend: str):
    return backend_module(_MODULES, backend)


torch.library.define(
    "reprokernels::visual_prompt_fwd",
    "(Tensor x, Tensor delta, Tensor? mask, Tensor? mean, Tensor? std, int[] ints, float[] floats, str modes, "
    "str backend) -> Tensor",
)
torch.library.define(
    "reprokernels::visual_prompt_bwd",
    "(Tensor grad, Tensor x, Tensor delta, Tensor? mask, Tensor? mean, Tensor? std, int[] ints, float[] floats, "
    "str modes, bool[] needs, str backend) -> (Tensor, Tensor, Tensor)",
)


def _fwd(x, delta, mask, mean, std, ints, floats, modes, backend):
    spec = VPSpec.from_schema(ints, floats, modes)
    return _impl(backend).visual_prompt(x, delta, mask, mean, std, spec)


torch.library.impl("reprokernels::visual_prompt_fwd", ["CPU", "CUDA"])(_fwd)


@torch.library.register_fake("reprokernels::visual_prompt_fwd")
def _fwd_fake(x, delta, mask, mean, std, ints, floats, modes, backend):
    return x.new_empty((x.shape[0], x.shape[1], ints[0], ints[1]))


def _bwd(grad, x, delta, mask, mean, std, ints, floats, modes, needs, backend):
    spec = VPSpec.from_schema(ints, floats, modes)
    return _impl(backend).visual_prompt_backward(grad, x, delta, mask, mean, std, spec, *needs)


def _bwd_op(grad, x, delta, mask, mean, std, ints, floats, modes, needs, backend):
    return op_outputs(x, _bwd(grad, x, delta, mask, mean, std, ints, floats, modes, needs, backend))


torch.library.impl("reprokernels::visual_prompt_bwd", ["CPU", "CUDA"])(_bwd_op)


@torch.library.register_fake("reprokernels::visual_prompt_bwd")
def _bwd_fake(grad, x, delta, mask, mean, std, ints, floats, modes, needs, backend):
    def like(t, need):
        return t.new_empty(t.shape) if need and t is not None else x.new_empty((0,))

    return like(x, needs[0]), like(delta, needs[1]), like(mask, needs[2])


class VisualPromptFunction(torch.autograd.Function):
    """``direct``: call the backend's Python implementation instead of the registered op (see ``direct_call``)."""

    @staticmethod
    def forward(x, delta, mask, mean, std, ints, floats, modes, backend, direct):
        fwd = _fwd if direct else torch.ops.reprokernels.visual_prompt_fwd
        return fwd(x, delta, mask, mean, std, ints, floats, modes, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, delta, mask, mean, std, ctx.ints, ctx.floats, ctx.modes, ctx.backend, ctx.direct = inputs
        ctx.save_for_backward(x, delta, mask, mean, std)

    @staticmethod
    def backward(ctx, grad):
        x, delta, mask, mean, std = ctx.saved_tensors
        needs = [bool(n) for n in ctx.needs_input_grad[:3]]
        needs[2] = needs[2] and mask is not None
        bwd = _bwd if ctx.direct else torch.ops.reprokernels.visual_prompt_bwd
        dx, dd, dm = bwd(grad, x, delta, mask, mean, std, ctx.ints, ctx.floats, ctx.modes, needs, ctx.backend)
        return (dx if needs[0] else None, dd if needs[1] else None, dm if needs[2] else None,
                None, None, None, None, None, None, None)


def _filled(vals: list[float], device: torch.device) -> torch.Tensor:
    """A float32 vector of host numbers on ``device`` made by fill kernels: no host-to-device copy, so no stream
    sync, and capturable in a CUDA graph even on first use (``torch.tensor(list, device=cuda)`` is neither)."""
    if not vals or all(v == vals[0] for v in vals):  # (no channel: an empty vector)
        return torch.full((len(vals),), vals[0] if vals else 0.0, dtype=torch.float32, device=device)
    t = torch.empty(len(vals), dtype=torch.float32, device=device)
    for i, v in enumerate(vals):
        t[i].fill_(v)
    return t


def _channel_vector(value, name: str, C: int, x: torch.Tensor) -> torch.Tensor | None:
    """mean/std: None, a number, a sequence of C numbers, or a tensor of C values -> float32 (C,) on x's device."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        check_same_device((name, value), ("x", x))
        t = value.detach().to(torch.float32).reshape(-1)
        if name == "std":
            check_nonzero(t, "std")
        if t.numel() == 1 and C != 1:
            t = t.expand(C)
        if t.numel() != C:
            raise ValueError(f"{name}: expected {C} values (one per channel of x), got {t.numel()}")
        return t.contiguous()
    scalar = _as_real(value)
    items = [scalar] if scalar is not None else check_reals(
        value, name, f"None, a number, a sequence of {C} numbers or a tensor of {C} values")
    # host numbers are checked on the host (as the float32 the kernels will divide by)
    vals = [float(np.float32(v)) for v in items]
    if name == "std" and any(v == 0 for v in vals):
        raise ValueError(f"std: expected non-zero values, got {vals}")
    if len(vals) == 1 and C != 1:
        vals = vals * C
    if len(vals) != C:
        raise ValueError(f"{name}: expected {C} values (one per channel of x), got {len(vals)}")
    return _filled(vals, x.device)


def _mask_spec(mask, mask_width, patch, H: int, W: int, top: int, left: int, h2: int, w2: int):
    """(rect_top, rect_left, rect_h, rect_w, invert) of a fixed mask kind."""
    if mask != "frame" and mask_width is not None:
        raise ValueError(f"mask_width: only used with mask='frame', got mask={mask!r}")
    if mask != "patch" and patch is not None:
        raise ValueError(f"patch: only used with mask='patch', got mask={mask!r}")
    if mask == "outside":
        return top, left, h2, w2, True
    if mask == "full":
        return 0, 0, 0, 0, True
    if mask == "frame":
        if mask_width is None or isinstance(mask_width, bool) or int(mask_width) != mask_width or mask_width < 0:
            raise ValueError(f"mask_width: mask='frame' needs a frame width p >= 0, got {mask_width!r}")
        p = int(mask_width)
        if 2 * p > H or 2 * p > W:
            raise ValueError(f"mask_width: a frame of width {p} needs 2p <= the canvas size {(H, W)}, got 2p={2 * p}")
        return p, p, H - 2 * p, W - 2 * p, True
    if mask == "patch":
        try:
            t, l, ph, pw = (int(v) for v in patch)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"patch: mask='patch' needs patch=(top, left, height, width), got {patch!r}") from None
        if ph < 1 or pw < 1 or t < 0 or l < 0 or t + ph > H or l + pw > W:
            raise ValueError(f"patch: (top, left, height, width)={(t, l, ph, pw)} must lie inside the canvas {(H, W)}")
        return t, l, ph, pw, False
    raise ValueError(f"mask: expected 'outside', 'full', 'frame', 'patch' or a tensor, got {mask!r}")


def _mask_tensor(mask: torch.Tensor, B: int, C: int, H: int, W: int) -> torch.Tensor:
    check_float(mask, "mask", FLOAT_DTYPES)
    check_ndim(mask, (2, 3, 4), "mask", "broadcastable to (B, 1 or C, H', W')")
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    Bm, Cm, Hm, Wm = m.shape
    if Bm not in (1, B) or Cm not in (1, C):
        raise ValueError(f"mask: expected a shape broadcastable to (B={B}, 1 or C={C}, H', W'), "
                         f"got {tuple(mask.shape)}")
    if Hm < 1 or Wm < 1 or H % Hm or W % Wm:
        raise ValueError(f"mask: its resolution {(Hm, Wm)} must divide the canvas {(H, W)} "
                         f"(a patch-resolution mask is upsampled by an integer repeat), got {tuple(mask.shape)}")
    return m


def prepare(
    x: torch.Tensor,
    delta: torch.Tensor,
    *,
    size: int | Sequence[int] | None = None,
    resize: int | Sequence[int] | None = None,
    resize_mode: str = "bilinear",
    align_corners: bool = False,
    offset: Sequence[int] | None = None,
    mask: str | torch.Tensor = "outside",
    mask_width: int | None = None,
    patch: Sequence[int] | None = None,
    squash: str = "none",
    order: str = "pre_norm",
    clamp: Sequence[float] | None = None,
    mean: float | Sequence[float] | torch.Tensor | None = None,
    std: float | Sequence[float] | torch.Tensor | None = None,
    fill: float = 0.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, VPSpec]:
    """Validate and normalise ``visual_prompt``'s arguments: (mask 4-D or None, mean, std, spec)."""
    check_float(x, "x", FLOAT_DTYPES)
    check_ndim(x, 4, "x", "(B, C, h, w)")
    check_float(delta, "delta")
    check_ndim(delta, (3, 4), "delta", "(C, H, W) or (B, C, H, W)")
    B, C, h, w = x.shape
    if delta.shape[-3] != C or (delta.dim() == 4 and delta.shape[0] != B):
        raise ValueError(f"delta: expected (C={C}, H, W) or (B={B}, C={C}, H, W), got {tuple(delta.shape)}")
    check_same_device(("x", x), ("delta", delta), ("mask", mask if isinstance(mask, torch.Tensor) else None))
    H, W = check_pair(size, "size", minimum=1) or tuple(delta.shape[-2:])
    if tuple(delta.shape[-2:]) != (H, W):
        raise ValueError(f"delta: its spatial size must be the canvas size {(H, W)}, got {tuple(delta.shape)}")
    check_choice(resize_mode, RESIZE_MODES, "resize_mode")
    resized = check_pair(resize, "resize", minimum=1)
    h2, w2 = resized or (h, w)
    if h2 > H or w2 > W:
        what = f"the resized image {(h2, w2)}" if resized else f"the image {(h, w)}"
        raise ValueError(f"x: {what} is larger than the canvas size={(H, W)}")
    if offset is None:
        top, left = (H - h2 + 1) // 2, (W - w2 + 1) // 2
    else:
        top, left = check_pair(offset, "offset")  # type: ignore[misc]
        if top < 0 or left < 0 or top + h2 > H or left + w2 > W:
            raise ValueError(f"offset: the image {(h2, w2)} at (top, left)={(top, left)} leaves the canvas {(H, W)}")
    check_choice(squash, SQUASHES, "squash")
    check_choice(order, ORDERS, "order")
    if clamp is not None:
        if order == "post_norm":
            raise ValueError("clamp: only allowed with order='pre_norm' (post_norm adds delta after normalising)")
        lo, hi = check_real_pair(clamp, "clamp")
        if not lo <= hi:
            raise ValueError(f"clamp: expected (lo, hi) with lo <= hi, got {tuple(clamp)}")
    else:
        lo, hi = float("-inf"), float("inf")
    if isinstance(mask, torch.Tensor):
        if mask_width is not None or patch is not None:
            raise ValueError("mask: mask_width/patch are only used with mask='frame'/'patch', not a tensor mask")
        mask_t = _mask_tensor(mask, B, C, H, W)
        rect = (0, 0, 0, 0, False)
    else:
        mask_t = None
        rect = _mask_spec(mask, mask_width, patch, H, W, top, left, h2, w2)
    fill = check_real(fill, "fill")
    mean_t = _channel_vector(mean, "mean", C, x)
    std_t = _channel_vector(std, "std", C, x)
    resize_used = "none" if resized is None or (h2, w2) == (h, w) else resize_mode
    spec = VPSpec(H, W, h2, w2, top, left, *rect, squash, order, resize_used, bool(align_corners), float(fill),
                  lo, hi)
    return mask_t, mean_t, std_t, spec


def visual_prompt(
    x: torch.Tensor,
    delta: torch.Tensor,
    *,
    size: int | Sequence[int] | None = None,
    resize: int | Sequence[int] | None = None,
    resize_mode: str = "bilinear",
    align_corners: bool = False,
    offset: Sequence[int] | None = None,
    mask: str | torch.Tensor = "outside",
    mask_width: int | None = None,
    patch: Sequence[int] | None = None,
    squash: str = "none",
    order: str = "pre_norm",
    clamp: Sequence[float] | None = None,
    mean: float | Sequence[float] | torch.Tensor | None = None,
    std: float | Sequence[float] | torch.Tensor | None = None,
    fill: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Build the frozen model's input from the task's image and a learnable perturbation, in one pass.

    Args:
        x: (B, C, h, w) images, float32/float16/bfloat16 (float64 on the reference backend, which ``auto``
            picks on CPU), any strides (stride 0 included).
        delta: (C, H, W) perturbation shared by the batch, or (B, C, H, W) per sample; any float dtype on every
            backend (rounded to the compute dtype). Where the mask is 0 delta is not read: it may hold anything
            there, NaN included, and gets a zero gradient.
        size: the canvas (H, W); default delta's spatial size (which must equal it).
        resize: resize x to (h2, w2) first (``resize_mode`` bilinear/nearest, ``align_corners`` as in
            ``F.interpolate``); fused, the resized image is never materialised.
        offset: (top, left) of the image on the canvas; default centred, top pad ``(H - h2 + 1) // 2``.
        mask: where delta acts: "outside" the image, "full" canvas, "frame" of ``mask_width`` p on the border,
            "patch" ``(top, left, ph, pw)``, or a real tensor broadcastable to (B, 1 or C, H', W') with H'
            dividing H (a patch-resolution mask, repeated k = H / H' times; it may require grad).
        squash: "none" | "sigmoid" | "tanh", applied to delta before the mask multiplies it.
        order: "pre_norm": norm(clamp(place(x) + m * g(delta))); "post_norm": norm(place(x)) + m * g(delta).
        clamp: optional (lo, hi) applied before normalisation (pre_norm only).
        mean, std: per-channel normalisation (constants: no gradient flows to them).
        fill: canvas value outside the image, in pre-normalisation units.

    Returns:
        (B, C, H, W) contiguous, in x's dtype, computed in float32 (float64 when x is float64) whatever the
        dtypes of delta, mask, mean and std. Gradients flow to delta (summed over the batch when shared), to a
        tensor mask (reduced to its shape) and to x, each in its own dtype. Inputs are never written. NaN in
        delta where the mask acts propagates (``clamp`` keeps it, like ``torch.clamp``). Meta tensors give
        the output's shape on any backend. The contract: docs/contracts.md.
    """
    mask_t, mean_t, std_t, spec = prepare(
        x, delta, size=size, resize=resize, resize_mode=resize_mode, align_corners=align_corners, offset=offset,
        mask=mask, mask_width=mask_width, patch=patch, squash=squash, order=order, clamp=clamp, mean=mean, std=std,
        fill=fill)
    chosen = resolve_backend_for(OP, backend, x.device, case=(
        f"dtype={x.dtype}", f"resize={spec.resize_mode}", f"mask={'fixed' if mask_t is None else 'tensor'}",
        f"delta={'per_sample' if delta.dim() == 4 else 'shared'}"))
    if chosen != "reference":
        check_float(x, "x", KERNEL_DTYPES)
    # auto's reference as plain autograd (see plain_eager): eager's cost. Elementwise ops, pad and interpolate in
    # float32 only: autocast changes none of them, forward or backward.
    if chosen == "reference" and backend == "auto" and plain_eager(x, delta, mask_t, mean_t, std_t,
                                                                   autocast_free=True):
        return reference_visual_prompt(x, delta, mask_t, mean_t, std_t, spec)
    ints, floats, modes = spec.to_schema()
    return run_function(VisualPromptFunction, _fwd, x, delta, mask_t, mean_t, std_t, ints, floats, modes, chosen,
                        direct=direct_call(chosen, x, delta, mask_t, mean_t, std_t))
