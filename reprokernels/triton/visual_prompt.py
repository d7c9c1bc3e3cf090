"""Triton kernels of ``visual_prompt``: one pass forward, one pass backward plus a tiny deterministic reduction.

Forward: one program per (sample, channel, block of canvas pixels); it samples x (direct, nearest or bilinear,
never materialising the resized image), adds the masked, squashed delta, clamps and normalises, and stores
the output once.

Backward: one program per (block of BLOCK_B samples, block of BLOCK_M mask cells). A mask cell is one pixel,
or a kh x kw window when the mask is at patch resolution; the program walks the channels and the window's
pixels, so everything that must be summed is summed in registers: the mask gradient over channels and the
window, the delta gradient over the program's samples. Shared-delta (and batch-shared mask) gradients leave
as float32 partials, one row per sample block, summed afterwards by torch (deterministic, no atomics).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .._alloc import empty_output
from ..reference.visual_prompt import VPSpec

_SQUASH = {"none": 0, "sigmoid": 1, "tanh": 2}
_RESIZE = {"none": 0, "nearest": 1, "bilinear": 2}


@triton.jit
def _squash(d, SQUASH: tl.constexpr):
    if SQUASH == 1:
        return tl.sigmoid(d)
    elif SQUASH == 2:
        return 2.0 * tl.sigmoid(2.0 * d) - 1.0  # tanh; the interpreter has no tl tanh
    else:
        return d


@triton.jit
def _squash_grad(g, SQUASH: tl.constexpr):
    """d g(delta) / d delta, from g itself."""
    if SQUASH == 1:
        return g * (1.0 - g)
    elif SQUASH == 2:
        return 1.0 - g * g
    else:
        return tl.full(g.shape, 1.0, tl.float32)


@triton.jit
def _sample(xb, iy, ix, inside, h, w, sxh, sxw, scale_h, scale_w, RESIZE: tl.constexpr, ALIGN: tl.constexpr):
    """x at (iy, ix) of the (h2, w2) image on the canvas; xb points at x[b, c]. Float32; 0 where not inside."""
    if RESIZE == 0:
        v = tl.load(xb + iy * sxh + ix * sxw, mask=inside, other=0.0).to(tl.float32)
    elif RESIZE == 1:
        # PyTorch's nearest: floor(dst * (in / out)) in float32, capped at in - 1
        sy = tl.minimum(tl.floor(iy.to(tl.float32) * scale_h).to(tl.int32), h - 1)
        sx = tl.minimum(tl.floor(ix.to(tl.float32) * scale_w).to(tl.int32), w - 1)
        v = tl.load(xb + sy * sxh + sx * sxw, mask=inside, other=0.0).to(tl.float32)
    else:
        # PyTorch's area_pixel_compute_source_index + upsample_bilinear2d taps and weights
        if ALIGN:
            fy = iy.to(tl.float32) * scale_h
            fx = ix.to(tl.float32) * scale_w
        else:
            fy = tl.maximum((iy.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
            fx = tl.maximum((ix.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
        fy = tl.where(inside, fy, 0.0)
        fx = tl.where(inside, fx, 0.0)
        y0 = fy.to(tl.int32)
        x0 = fx.to(tl.int32)
        y1 = y0 + (y0 < h - 1).to(tl.int32)
        x1 = x0 + (x0 < w - 1).to(tl.int32)
        ly = fy - y0.to(tl.float32)
        lx = fx - x0.to(tl.float32)
        v00 = tl.load(xb + y0 * sxh + x0 * sxw, mask=inside, other=0.0).to(tl.float32)
        v01 = tl.load(xb + y0 * sxh + x1 * sxw, mask=inside, other=0.0).to(tl.float32)
        v10 = tl.load(xb + y1 * sxh + x0 * sxw, mask=inside, other=0.0).to(tl.float32)
        v11 = tl.load(xb + y1 * sxh + x1 * sxw, mask=inside, other=0.0).to(tl.float32)
        v = (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
    return v


@triton.jit
def _fixed_mask(y, xx, rt, rl, rh, rw, INVERT: tl.constexpr):
    inr = (y >= rt) & (y < rt + rh) & (xx >= rl) & (xx < rl + rw)
    if INVERT:
        inr = inr == 0
    return tl.where(inr, 1.0, 0.0)


@triton.jit
def _vp_fwd_kernel(
    out_ptr, x_ptr, d_ptr, m_ptr, mean_ptr, std_ptr,
    C, h, w, H, W, h2, w2, top, left, rt, rl, rh, rw,
    sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw, smb, smc, smh, smw, kh, kw,
    scale_h, scale_w, fill, lo, hi,
    INVERT: tl.constexpr, HAS_MASK: tl.constexpr, SQUASH: tl.constexpr, PRE_NORM: tl.constexpr,
    RESIZE: tl.constexpr, ALIGN: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_MEAN: tl.constexpr,
    HAS_STD: tl.constexpr, BLOCK: tl.constexpr,
):
    bc = tl.program_id(0).to(tl.int64)
    b = bc // C
    c = bc % C
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < H * W
    y = offs // W
    xx = offs % W
    iy = y - top
    ix = xx - left
    inside = valid & (iy >= 0) & (iy < h2) & (ix >= 0) & (ix < w2)
    p = _sample(x_ptr + b * sxb + c * sxc, iy, ix, inside, h, w, sxh, sxw, scale_h, scale_w, RESIZE, ALIGN)
    p = tl.where(inside, p, fill)
    if HAS_MASK:
        m = tl.load(m_ptr + b * smb + c * smc + (y // kh) * smh + (xx // kw) * smw, mask=valid, other=0.0)
        m = m.to(tl.float32)
    else:
        m = _fixed_mask(y, xx, rt, rl, rh, rw, INVERT)
    # delta is read only where the mask lets it act (most of a frame prompt's canvas is not)
    d = tl.load(d_ptr + b * sdb + c * sdc + y * sdh + xx * sdw, mask=valid & (m != 0.0), other=0.0)
    t = m * _squash(d.to(tl.float32), SQUASH)
    if PRE_NORM:
        v = p + t
        if HAS_CLAMP:
            v = tl.minimum(tl.maximum(v, lo), hi)
    else:
        v = p
    if HAS_MEAN:
        v = v - tl.load(mean_ptr + c)
    if HAS_STD:
        v = v / tl.load(std_ptr + c)
    if not PRE_NORM:
        v = v + t
    tl.store(out_ptr + bc * H * W + offs, v, mask=valid)


@triton.jit
def _store_rows(ptr, row_stride, rows, cols, val, valid2, valid_cols, REDUCE: tl.constexpr, block_row):
    """Store a [BLOCK_B, BLOCK_M] tile per row, or its column sums as one partial row ``block_row``."""
    if REDUCE:
        tl.store(ptr + block_row * row_stride + cols, tl.sum(val, axis=0), mask=valid_cols)
    else:
        tl.store(ptr + rows[:, None] * row_stride + cols[None, :], val, mask=valid2)


@triton.jit
def _vp_bwd_kernel(
    g_ptr, x_ptr, d_ptr, m_ptr, mean_ptr, std_ptr, dx_ptr, dd_ptr, dm_ptr,
    B, C, h, w, H, W, h2, w2, top, left, rt, rl, rh, rw,
    sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw, smb, smc, smh, smw, kh, kw, Hc, Wc,
    sdxb, sdxc, sdxh, Cm,
    scale_h, scale_w, fill, lo, hi,
    INVERT: tl.constexpr, HAS_MASK: tl.constexpr, SQUASH: tl.constexpr, PRE_NORM: tl.constexpr,
    RESIZE: tl.constexpr, ALIGN: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_MEAN: tl.constexpr,
    HAS_STD: tl.constexpr, NEED_X: tl.constexpr, NEED_D: tl.constexpr, NEED_M: tl.constexpr,
    D_SHARED: tl.constexpr, M_BSHARED: tl.constexpr, M_CSHARED: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    cells = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cvalid = cells < Hc * Wc
    cy = cells // Wc
    cx = cells % Wc
    bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    bvalid = bs < B
    valid2 = bvalid[:, None] & cvalid[None, :]
    b2 = bs[:, None]
    dm_tot = tl.zeros((BLOCK_B, BLOCK_M), tl.float32)
    for c in range(C):
        c64 = tl.cast(c, tl.int64)
        if HAS_STD:  # (the mean shifts values, not gradients)
            inv_std = 1.0 / tl.load(std_ptr + c)
        if HAS_MASK:
            # the mask is constant over the cell's window: load it once per channel
            m = tl.load(m_ptr + b2 * smb + c64 * smc + (cy * smh + cx * smw)[None, :], mask=valid2, other=0.0)
            m = m.to(tl.float32)
        dm_c = tl.zeros((BLOCK_B, BLOCK_M), tl.float32)
        for ky in range(kh):
            for kx in range(kw):
                y = cy * kh + ky
                xx = cx * kw + kx
                if not HAS_MASK:
                    m = _fixed_mask(y, xx, rt, rl, rh, rw, INVERT)[None, :]
                go = tl.load(g_ptr + b2 * sgb + c64 * sgc + (y * sgh + xx * sgw)[None, :], mask=valid2, other=0.0)
                go = go.to(tl.float32)
                if D_SHARED:
                    d = tl.load(d_ptr + c64 * sdc + y * sdh + xx * sdw, mask=cvalid, other=0.0)[None, :]
                else:
                    d = tl.load(d_ptr + b2 * sdb + c64 * sdc + (y * sdh + xx * sdw)[None, :], mask=valid2, other=0.0)
                g = _squash(d.to(tl.float32), SQUASH)
                iy = (y - top)[None, :]
                ix = (xx - left)[None, :]
                inside = valid2 & (iy >= 0) & (iy < h2) & (ix >= 0) & (ix < w2)
                if PRE_NORM:
                    gv = go
                    if HAS_STD:
                        gv = gv * inv_std
                    if HAS_CLAMP:
                        p = _sample(x_ptr + b2 * sxb + c64 * sxc, iy, ix, inside, h, w, sxh, sxw, scale_h, scale_w,
                                    RESIZE, ALIGN)
                        v = tl.where(inside, p, fill) + m * g
                        gv = tl.where((v >= lo) & (v <= hi), gv, 0.0)  # torch.clamp's pass-through rule
                    gp = gv
                    gt = gv
                else:
                    gp = go
                    if HAS_STD:
                        gp = gp * inv_std
                    gt = go
                if NEED_D:
                    _store_rows(dd_ptr + c64 * H * W, C * H * W, bs, y * W + xx, gt * m * _squash_grad(g, SQUASH),
                                valid2, cvalid, D_SHARED, pid_b)
                if NEED_M:
                    dm_c += gt * g
                if NEED_X:
                    # no resize: dx itself; with resize: the gradient of the placed image (B, C, h2, w2)
                    tl.store(dx_ptr + b2 * sdxb + c64 * sdxc + iy * sdxh + ix, gp, mask=inside)
        if NEED_M:
            if M_CSHARED:
                dm_tot += dm_c
            else:
                _store_rows(dm_ptr + c64 * Hc * Wc, Cm * Hc * Wc, bs, cells, dm_c, valid2, cvalid, M_BSHARED, pid_b)
    if NEED_M:
        if M_CSHARED:
            _store_rows(dm_ptr, Cm * Hc * Wc, bs, cells, dm_tot, valid2, cvalid, M_BSHARED, pid_b)


def _scales(spec: VPSpec, h: int, w: int) -> tuple[float, float]:
    """The float32 source-index scales PyTorch's upsampling uses for (h, w) -> (h2, w2)."""
    def one(n_in: int, n_out: int) -> float:
        if spec.resize_mode == "bilinear" and spec.align_corners:
            return float(np.float32(n_in - 1) / np.float32(n_out - 1)) if n_out > 1 else 0.0
        return float(np.float32(n_in) / np.float32(n_out))

    return one(h, spec.h2), one(w, spec.w2)


def _common(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None, mean, std, spec: VPSpec) -> tuple:
    """Arguments shared by both kernels, and their flags."""
    h, w = x.shape[-2:]
    shared = delta.dim() == 3
    sd = (0, *delta.stride()) if shared else delta.stride()
    if mask is not None:
        Bm, Cm, Hm, Wm = mask.shape
        sm = (mask.stride(0) if Bm > 1 else 0, mask.stride(1) if Cm > 1 else 0, mask.stride(2), mask.stride(3))
        kh, kw = spec.H // Hm, spec.W // Wm
    else:
        sm, kh, kw = (0, 0, 0, 0), 1, 1
    dummy = x  # never read: the flags switch these loads off
    scale_h, scale_w = _scales(spec, h, w)
    tensors = (mask if mask is not None else dummy, mean if mean is not None else dummy,
               std if std is not None else dummy)
    geometry = (spec.H, spec.W, spec.h2, spec.w2, spec.top, spec.left, spec.rect_top, spec.rect_left,
                spec.rect_h, spec.rect_w)
    flags = dict(
        INVERT=spec.invert, HAS_MASK=mask is not None, SQUASH=_SQUASH[spec.squash],
        PRE_NORM=spec.order == "pre_norm", RESIZE=_RESIZE[spec.resize_mode], ALIGN=spec.align_corners,
        HAS_CLAMP=spec.has_clamp, HAS_MEAN=mean is not None, HAS_STD=std is not None,
    )
    return tensors, geometry, sd, sm, (kh, kw), (scale_h, scale_w), flags


def visual_prompt(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None, mean: torch.Tensor | None,
                  std: torch.Tensor | None, spec: VPSpec) -> torch.Tensor:
    """Fused forward. Shapes as in ``reference.visual_prompt``; returns (B, C, H, W) contiguous in x's dtype."""
    B, C, h, w = x.shape
    out = empty_output((B, C, spec.H, spec.W), x.dtype, x.device)
    if B == 0:
        return out
    (m_t, mean_t, std_t), geometry, sd, sm, (kh, kw), (scale_h, scale_w), flags = _common(
        x, delta, mask, mean, std, spec)
    hw = spec.H * spec.W
    block = min(1024, triton.next_power_of_2(hw))
    grid = (B * C, triton.cdiv(hw, block))
    _vp_fwd_kernel[grid](
        out, x, delta, m_t, mean_t, std_t, C, h, w, *geometry, *x.stride(), *sd, *sm, kh, kw,
        scale_h, scale_w, spec.fill, spec.clamp_lo if spec.has_clamp else 0.0,
        spec.clamp_hi if spec.has_clamp else 0.0, **flags, BLOCK=block, num_warps=4,
    )
    return out


def visual_prompt_backward(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None,
                           mean: torch.Tensor | None, std: torch.Tensor | None, spec: VPSpec, need_x: bool,
                           need_delta: bool, need_mask: bool
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Fused backward: (dx, ddelta, dmask), each None when not needed. grad is (B, C, H, W), any strides."""
    B, C, h, w = x.shape
    dev = x.device
    need_mask = need_mask and mask is not None
    shared = delta.dim() == 3
    Hc, Wc = (mask.shape[-2], mask.shape[-1]) if mask is not None else (spec.H, spec.W)
    Bm, Cm = (mask.shape[0], mask.shape[1]) if mask is not None else (1, 1)
    block_b = max(1, min(32, triton.next_power_of_2(max(B, 1))))
    block_m = 64
    n_bblocks = triton.cdiv(B, block_b)
    resized = spec.resize_mode != "none"

    dx = d_placed = None
    if need_x:
        if resized:
            d_placed = empty_output((B, C, spec.h2, spec.w2), torch.float32, dev)
        else:
            dx = empty_output((B, C, h, w), x.dtype, dev)
    dd = None
    if need_delta:
        dd = (empty_output((n_bblocks, C, spec.H, spec.W), torch.float32, dev) if shared
              else empty_output(tuple(delta.shape), delta.dtype, dev))
    dm = None
    if need_mask:
        dm = (empty_output((n_bblocks, Cm, Hc, Wc), torch.float32, dev) if Bm == 1
              else empty_output((B, Cm, Hc, Wc), mask.dtype, dev))

    if B > 0 and (need_x or need_delta or need_mask):
        (m_t, mean_t, std_t), geometry, sd, sm, (kh, kw), (scale_h, scale_w), flags = _common(
            x, delta, mask, mean, std, spec)
        dx_t = dx if dx is not None else d_placed
        sdx = dx_t.stride()[:3] if dx_t is not None else (0, 0, 0)
        grid = (triton.cdiv(Hc * Wc, block_m), n_bblocks)
        _vp_bwd_kernel[grid](
            grad, x, delta, m_t, mean_t, std_t,
            dx_t if dx_t is not None else x, dd if dd is not None else x, dm if dm is not None else x,
            B, C, h, w, *geometry, *grad.stride(), *x.stride(), *sd, *sm, kh, kw, Hc, Wc, *sdx, Cm,
            scale_h, scale_w, spec.fill, spec.clamp_lo if spec.has_clamp else 0.0,
            spec.clamp_hi if spec.has_clamp else 0.0, **flags,
            NEED_X=need_x, NEED_D=need_delta, NEED_M=need_mask, D_SHARED=shared, M_BSHARED=Bm == 1,
            M_CSHARED=Cm == 1, BLOCK_B=block_b, BLOCK_M=block_m, num_warps=4,
        )
    elif B == 0:  # nothing to reduce: gradients of shared parameters are zero
        if dd is not None and shared:
            dd = torch.zeros((1, C, spec.H, spec.W), dtype=torch.float32, device=dev)
        if dm is not None and Bm == 1:
            dm = torch.zeros((1, Cm, Hc, Wc), dtype=torch.float32, device=dev)

    if need_x and resized:
        if spec.resize_mode == "bilinear":
            dx = torch.ops.aten.upsample_bilinear2d_backward(
                d_placed, [spec.h2, spec.w2], [B, C, h, w], spec.align_corners, None, None)
        else:
            dx = torch.ops.aten.upsample_nearest2d_backward(d_placed, [spec.h2, spec.w2], [B, C, h, w], None, None)
        dx = dx.to(x.dtype)
    if dd is not None and shared:
        dd = dd.sum(0).to(delta.dtype)
    if dm is not None and Bm == 1:
        dm = dm.sum(0, keepdim=True).to(mask.dtype)
    return dx, dd, dm
