"""Reference of ``visual_prompt``: the input interface of model reprogramming, in plain PyTorch ops.

out = norm(clamp(place(x) + m * g(delta)))     order="pre_norm"
out = norm(place(x)) + m * g(delta)            order="post_norm"

``place`` resizes x (optional) and puts it on a canvas filled with ``fill`` at (top, left); ``g`` is the
squash (identity, sigmoid or tanh); ``m`` is the mask: the indicator of a rectangle (possibly inverted) or a
real-valued tensor at canvas or patch resolution (upsampled by nearest repeat); ``norm`` is
(v - mean_c) / std_c. This file is the specification every kernel is tested against.

Where the mask is exactly 0, delta does not act: the prompt term is exactly 0 there and delta's gradient is 0,
whatever delta holds (NaN and inf included: a canvas-sized delta's values under the image are never read). The
mask's own gradient there is still ``grad * g(delta)``.

Dtypes: the output has x's dtype; the arithmetic runs in float32, or float64 when x is float64. delta, a tensor
mask, mean and std may have any float dtype: they are rounded to that compute dtype first (a float64 delta with
a float32 x computes in float32), and their gradients come back in their own dtypes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

SQUASHES = ("none", "sigmoid", "tanh")
ORDERS = ("pre_norm", "post_norm")
RESIZE_MODES = ("bilinear", "nearest")


class VPSpec(NamedTuple):
    """Everything but the tensors, normalised. The same object drives every backend.

    (rect_top, rect_left, rect_h, rect_w, invert) describe a fixed mask: 1 inside the rectangle, 0 outside,
    swapped when ``invert``. With a tensor mask the rectangle is unused.
    """

    H: int
    W: int
    h2: int  # the image size on the canvas (after the optional resize)
    w2: int
    top: int
    left: int
    rect_top: int
    rect_left: int
    rect_h: int
    rect_w: int
    invert: bool
    squash: str
    order: str
    resize_mode: str  # "none" when the image is placed at its own size
    align_corners: bool
    fill: float
    clamp_lo: float  # -inf / inf when there is no clamp
    clamp_hi: float

    @property
    def has_clamp(self) -> bool:
        return self.clamp_lo != float("-inf") or self.clamp_hi != float("inf")

    def to_schema(self) -> tuple[list[int], list[float], str]:
        """(ints, floats, strings) for the torch.library schema; ``from_schema`` inverts it."""
        # infinities stay out of the schema (export serialises floats): a flag says whether to clamp
        ints = [self.H, self.W, self.h2, self.w2, self.top, self.left, self.rect_top, self.rect_left,
                self.rect_h, self.rect_w, int(self.invert), int(self.align_corners), int(self.has_clamp)]
        floats = [self.fill, *((self.clamp_lo, self.clamp_hi) if self.has_clamp else (0.0, 0.0))]
        return ints, floats, f"{self.squash},{self.order},{self.resize_mode}"

    @classmethod
    def from_schema(cls, ints: list[int], floats: list[float], strings: str) -> VPSpec:
        H, W, h2, w2, top, left, rt, rl, rh, rw, invert, align, has_clamp = (int(v) for v in ints)
        squash, order, resize_mode = strings.split(",")
        fill, lo, hi = (float(v) for v in floats)
        if not has_clamp:
            lo, hi = float("-inf"), float("inf")
        return cls(H, W, h2, w2, top, left, rt, rl, rh, rw, bool(invert), squash, order, resize_mode,
                   bool(align), fill, lo, hi)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for a float64 x, else float32: the image sets it, parameters are rounded into it (the kernels
    compute in float32 whatever delta's dtype, so a float64 delta must not change the reference's arithmetic)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def acting(m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """delta where the mask lets it act, and where it does not, delta if finite else 0: the prompt term m * g(.)
    is then exactly 0 where m == 0 (never 0 * inf = NaN), its delta gradient 0 there, and autograd's mask
    gradient there g(delta) as the kernels compute it (for a finite delta)."""
    return torch.where((m != 0) | torch.isfinite(d), d, torch.zeros((), dtype=d.dtype, device=d.device))


def squash_fn(delta: torch.Tensor, squash: str) -> torch.Tensor:
    if squash == "sigmoid":
        return torch.sigmoid(delta)
    if squash == "tanh":
        return torch.tanh(delta)
    return delta


def fixed_mask(spec: VPSpec, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H, W) 0/1 mask of a rectangle, inverted when asked."""
    m = torch.zeros(spec.H, spec.W, device=device, dtype=dtype)
    m[spec.rect_top:spec.rect_top + spec.rect_h, spec.rect_left:spec.rect_left + spec.rect_w] = 1
    return 1 - m if spec.invert else m


def expand_mask(mask: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """A (Bm, Cm, H', W') mask at canvas resolution (nearest repeat by H/H' and W/W')."""
    kh, kw = H // mask.shape[-2], W // mask.shape[-1]
    return mask.repeat_interleave(kh, dim=-2).repeat_interleave(kw, dim=-1)


def place(x: torch.Tensor, spec: VPSpec) -> torch.Tensor:
    """Resize x (B, C, h, w) to (h2, w2) if asked and pad it to the (H, W) canvas with ``fill``."""
    if spec.resize_mode != "none":
        align = spec.align_corners if spec.resize_mode == "bilinear" else None
        x = F.interpolate(x, size=(spec.h2, spec.w2), mode=spec.resize_mode, align_corners=align)
    pad = (spec.left, spec.W - spec.left - spec.w2, spec.top, spec.H - spec.top - spec.h2)
    return F.pad(x, pad, mode="constant", value=spec.fill)


def visual_prompt(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None, mean: torch.Tensor | None,
                  std: torch.Tensor | None, spec: VPSpec) -> torch.Tensor:
    """x (B, C, h, w); delta (C, H, W) or (B, C, H, W); mask None or (Bm, Cm, H', W'); mean/std (C,) or None.

    Returns (B, C, H, W) in x's dtype; computes in float32 (float64 if any input is float64). Differentiable.
    """
    cdt = _compute_dtype(x)
    xf, df = x.to(cdt), delta.to(cdt)
    canvas = place(xf, spec)
    m = fixed_mask(spec, x.device, cdt) if mask is None else expand_mask(mask.to(cdt), spec.H, spec.W)
    prompt = m * squash_fn(acting(m, df), spec.squash)
    C = x.shape[1]
    mean_ = mean.to(cdt).view(1, C, 1, 1) if mean is not None else None
    std_ = std.to(cdt).view(1, C, 1, 1) if std is not None else None

    def norm(v: torch.Tensor) -> torch.Tensor:
        if mean_ is not None:
            v = v - mean_
        if std_ is not None:
            v = v / std_
        return v

    if spec.order == "pre_norm":
        v = canvas + prompt
        if spec.has_clamp:
            v = torch.clamp(v, spec.clamp_lo, spec.clamp_hi)
        out = norm(v)
    else:
        out = norm(canvas) + prompt
    return out.to(x.dtype)


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a (B, C, H, W) gradient down to a broadcast operand's 4-D shape (incl. patch-resolution windows)."""
    Bm, Cm, Hm, Wm = shape
    B, C, H, W = t.shape
    t = t.reshape(B, C, Hm, H // Hm, Wm, W // Wm).sum(dim=(3, 5))
    if Cm == 1 and C != 1:
        t = t.sum(dim=1, keepdim=True)
    if Bm == 1 and B != 1:
        t = t.sum(dim=0, keepdim=True)
    return t


def visual_prompt_backward(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None,
                           mean: torch.Tensor | None, std: torch.Tensor | None, spec: VPSpec, need_x: bool,
                           need_delta: bool, need_mask: bool
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, ddelta, dmask) of ``visual_prompt``, each None when not needed.

    Written out rather than taken from autograd so it also runs where autograd is off (inside the registered
    op, under opcheck, compile and export); the tests check it against autograd of ``visual_prompt``.
    """
    cdt = _compute_dtype(x)
    B, C, h, w = x.shape
    go = grad.to(cdt)
    d = delta.to(cdt)
    m = fixed_mask(spec, x.device, cdt) if mask is None else expand_mask(mask.to(cdt), spec.H, spec.W)
    g = squash_fn(d, spec.squash)
    inv_std = (1 / std.to(cdt)).view(1, C, 1, 1) if std is not None else None
    if spec.order == "pre_norm":
        gv = go * inv_std if inv_std is not None else go
        if spec.has_clamp:
            v = place(x.to(cdt), spec) + torch.where(m != 0, m * g, 0)
            gv = gv * ((v >= spec.clamp_lo) & (v <= spec.clamp_hi))  # torch.clamp's pass-through rule
        gp = gt = gv
    else:
        gp = go * inv_std if inv_std is not None else go
        gt = go
    dx = dd = dm = None
    if need_x:
        dplaced = gp[:, :, spec.top:spec.top + spec.h2, spec.left:spec.left + spec.w2]
        if spec.resize_mode == "bilinear":
            dplaced = torch.ops.aten.upsample_bilinear2d_backward(
                dplaced.contiguous(), [spec.h2, spec.w2], [B, C, h, w], spec.align_corners, None, None)
        elif spec.resize_mode == "nearest":
            dplaced = torch.ops.aten.upsample_nearest2d_backward(
                dplaced.contiguous(), [spec.h2, spec.w2], [B, C, h, w], None, None)
        dx = dplaced.to(x.dtype).contiguous()
    if need_delta:
        if spec.squash == "sigmoid":
            dg = g * (1 - g)
        elif spec.squash == "tanh":
            dg = 1 - g * g
        else:
            dg = torch.ones_like(g)
        dd = torch.where(m != 0, gt * m * dg, 0)  # delta does not act (nor is read) where m == 0
        dd = (dd.sum(0) if delta.dim() == 3 else dd).to(delta.dtype)
    if need_mask and mask is not None:
        dm = _reduce_to(gt * g, mask.shape).to(mask.dtype)
    return dx, dd, dm
