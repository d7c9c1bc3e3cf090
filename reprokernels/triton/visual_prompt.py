"""Triton kernels of ``visual_prompt``: one pass forward, one pass backward plus a tiny deterministic reduction.

Forward: one program per (sample, channel, block of canvas pixels); it samples x (direct, nearest or bilinear,
never materialising the resized image), adds the masked, squashed delta, clamps and normalises, and stores
the output once.

Backward: one program per (block of BLOCK_B samples, block of BLOCK_M mask cells). A mask cell is one pixel,
or a kh x kw window when the mask is at patch resolution; the program walks the channels and the window's
pixels, so everything that must be summed is summed in registers: the mask gradient over channels and the
window, the delta gradient over the program's samples. Shared-delta (and batch-shared mask) gradients leave
as float32 partials, one row per sample block, summed afterwards by torch (deterministic, no atomics). A few
large windows (a 14 x 14 mask on a 224 canvas) would leave most SMs idle, so the launcher splits each window
into tiles (``window_split``), one more float32 mask-gradient partial per tile.

Grids are one-dimensional (axis 0 holds 2**31 - 1 programs, axes 1 and 2 only 65535). Sample and channel
offsets are int64; pixel offsets are int32 unless some tensor's pixel extent reaches 2**31 (``IDX64``).
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
def _idx(i, IDX64: tl.constexpr):
    """A pixel coordinate as offset math needs it: int64 when some offset of the launch can pass 2**31."""
    if IDX64:
        return i.to(tl.int64)
    else:
        return i


@triton.jit
def _sample(xb, iy, ix, inside, h, w, sxh, sxw, scale_h, scale_w, RESIZE: tl.constexpr, ALIGN: tl.constexpr,
            IDX64: tl.constexpr):
    """x at (iy, ix) of the (h2, w2) image on the canvas; xb points at x[b, c]. Float32; 0 where not inside."""
    if RESIZE == 0:
        v = tl.load(xb + iy * sxh + ix * sxw, mask=inside, other=0.0).to(tl.float32)
    elif RESIZE == 1:
        # PyTorch's nearest: floor(dst * (in / out)) in float32, capped at in - 1
        sy = _idx(tl.minimum(tl.floor(iy.to(tl.float32) * scale_h).to(tl.int32), h - 1), IDX64)
        sx = _idx(tl.minimum(tl.floor(ix.to(tl.float32) * scale_w).to(tl.int32), w - 1), IDX64)
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
        ly = fy - y0.to(tl.float32)
        lx = fx - x0.to(tl.float32)
        y1 = _idx(y0 + (y0 < h - 1).to(tl.int32), IDX64)
        x1 = _idx(x0 + (x0 < w - 1).to(tl.int32), IDX64)
        y0 = _idx(y0, IDX64)
        x0 = _idx(x0, IDX64)
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
    scale_h, scale_w, fill, lo, hi, n_blocks,
    INVERT: tl.constexpr, HAS_MASK: tl.constexpr, SQUASH: tl.constexpr, PRE_NORM: tl.constexpr,
    RESIZE: tl.constexpr, ALIGN: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_MEAN: tl.constexpr,
    HAS_STD: tl.constexpr, IDX64: tl.constexpr, BLOCK: tl.constexpr,
):
    # one grid axis (B * C * n_blocks programs): axis 1 would cap B * C or the pixel blocks at 65535
    pid = tl.program_id(0)
    bc = (pid // n_blocks).to(tl.int64)
    blk = pid % n_blocks
    b = bc // C
    c = bc % C
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < H * W
    y = _idx(offs // W, IDX64)
    xx = _idx(offs % W, IDX64)
    iy = y - top
    ix = xx - left
    inside = valid & (iy >= 0) & (iy < h2) & (ix >= 0) & (ix < w2)
    p = _sample(x_ptr + b * sxb + c * sxc, iy, ix, inside, h, w, sxh, sxw, scale_h, scale_w, RESIZE, ALIGN, IDX64)
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
            # torch.clamp propagates NaN (a NaN delta on the border stays NaN); tl's default min/max drop it
            v = tl.minimum(tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)
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
    split_h, split_w, Hm, Wm, dm_tile_stride, n_mblocks,
    sdxb, sdxc, sdxh, Cm,
    scale_h, scale_w, fill, lo, hi,
    INVERT: tl.constexpr, HAS_MASK: tl.constexpr, SQUASH: tl.constexpr, PRE_NORM: tl.constexpr,
    RESIZE: tl.constexpr, ALIGN: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_MEAN: tl.constexpr,
    HAS_STD: tl.constexpr, NEED_X: tl.constexpr, NEED_D: tl.constexpr, NEED_M: tl.constexpr,
    D_SHARED: tl.constexpr, M_BSHARED: tl.constexpr, M_CSHARED: tl.constexpr, IDX64: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # A cell is a kh x kw window of canvas pixels. With a patch-resolution mask the launcher may split each mask
    # cell into split_h x split_w tiles (cells of a finer virtual grid Hc x Wc) so that a few large windows still
    # give enough programs; the mask gradient of a tile then leaves as a float32 partial in its own slab
    # (dm_tile_stride apart), summed with the others afterwards.
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    pid_b = (pid // n_mblocks).to(tl.int64)
    cells = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cvalid = cells < Hc * Wc
    cy = cells // Wc
    cx = cells % Wc
    my = cy // split_h
    mx = cx // split_w
    mcell = (my * smh + mx * smw)[None, :]
    dm_cols = ((cy % split_h) * split_w + cx % split_w).to(tl.int64) * dm_tile_stride + my * Wm + mx
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
            m = tl.load(m_ptr + b2 * smb + c64 * smc + mcell, mask=valid2, other=0.0)
            m = m.to(tl.float32)
        dm_c = tl.zeros((BLOCK_B, BLOCK_M), tl.float32)
        for ky in range(kh):
            for kx in range(kw):
                y = _idx(cy * kh + ky, IDX64)
                xx = _idx(cx * kw + kx, IDX64)
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
                                    RESIZE, ALIGN, IDX64)
                        v = tl.where(inside, p, fill) + tl.where(m != 0.0, m * g, 0.0)  # delta unread at m == 0
                        gv = tl.where((v >= lo) & (v <= hi), gv, 0.0)  # torch.clamp's pass-through rule
                    gp = gv
                    gt = gv
                else:
                    gp = go
                    if HAS_STD:
                        gp = gp * inv_std
                    gt = go
                if NEED_D:
                    # delta does not act where m == 0: its gradient is 0 there even where delta is NaN / inf
                    dd_v = tl.where(m != 0.0, gt * m * _squash_grad(g, SQUASH), 0.0)
                    _store_rows(dd_ptr + c64 * H * W, C * H * W, bs, y * W + xx, dd_v, valid2, cvalid, D_SHARED, pid_b)
                if NEED_M:
                    dm_c += gt * g
                if NEED_X:
                    # no resize: dx itself; with resize: the gradient of the placed image (B, C, h2, w2)
                    tl.store(dx_ptr + b2 * sdxb + c64 * sdxc + iy * sdxh + ix, gp, mask=inside)
        if NEED_M:
            if M_CSHARED:
                dm_tot += dm_c
            else:
                _store_rows(dm_ptr + c64 * Hm * Wm, Cm * Hm * Wm, bs, dm_cols, dm_c, valid2, cvalid, M_BSHARED,
                            pid_b)
    if NEED_M:
        if M_CSHARED:
            _store_rows(dm_ptr, Cm * Hm * Wm, bs, dm_cols, dm_tot, valid2, cvalid, M_BSHARED, pid_b)


def _scales(spec: VPSpec, h: int, w: int) -> tuple[float, float]:
    """The float32 source-index scales PyTorch's upsampling uses for (h, w) -> (h2, w2)."""
    def one(n_in: int, n_out: int) -> float:
        if spec.resize_mode == "bilinear" and spec.align_corners:
            return float(np.float32(n_in - 1) / np.float32(n_out - 1)) if n_out > 1 else 0.0
        return float(np.float32(n_in) / np.float32(n_out))

    return one(h, spec.h2), one(w, spec.w2)


# Grid axis 0 holds up to 2**31 - 1 programs (axes 1 and 2 only 65535): every launch here folds its work onto it.
MAX_PROGRAMS = 2**31 - 1
INT32_LIMIT = 2**31


def grid_1d(programs: int, what: str) -> tuple[int]:
    """A one-axis grid of ``programs`` programs, or a clear error (no launch) past axis 0's limit."""
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{what}: {programs} programs exceed a CUDA grid's {MAX_PROGRAMS} (input too large)")
    return (max(programs, 1),)


def _spatial_extent(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """The largest element offset of the last two dims (those the kernels index in int32 unless IDX64)."""
    return sum((n - 1) * abs(s) for n, s in zip(shape[-2:], strides[-2:], strict=True) if n > 0)


def needs_idx64(*tensors: tuple[tuple[int, ...], tuple[int, ...]] | None) -> bool:
    """Whether pixel offsets (coordinate x stride, sample and channel offsets are int64 anyway) can pass 2**31
    for any (shape, strides) of a launch: then the kernels do that math in int64 (a rare, slower variant)."""
    return any(t is not None and _spatial_extent(*t) >= INT32_LIMIT for t in tensors)


def _layout(t: torch.Tensor | None) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    return None if t is None else (tuple(t.shape), tuple(t.stride()))


def _common(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None, mean, std, spec: VPSpec) -> tuple:
    """Arguments shared by both kernels, and their flags."""
    if spec.H * spec.W >= INT32_LIMIT:
        # pixel indices within a plane (offs < H * W) are int32 in both kernels, IDX64 or not
        raise ValueError(f"size: the triton backend needs a canvas of fewer than 2**31 pixels, got "
                         f"{spec.H} x {spec.W} = {spec.H * spec.W}")
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
        # the canvas-sized outputs and buffers are contiguous: their plane is (H, W)
        IDX64=needs_idx64(_layout(x), _layout(delta), _layout(mask), ((spec.H, spec.W), (spec.W, 1)),
                          ((spec.h2, spec.w2), (spec.w2, 1))),
    )
    return tensors, geometry, sd, sm, (kh, kw), (scale_h, scale_w), flags


def visual_prompt(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None, mean: torch.Tensor | None,
                  std: torch.Tensor | None, spec: VPSpec) -> torch.Tensor:
    """Fused forward. Shapes as in ``reference.visual_prompt``; returns (B, C, H, W) contiguous in x's dtype."""
    B, C, h, w = x.shape
    out = empty_output((B, C, spec.H, spec.W), x.dtype, x.device)
    if out.numel() == 0:
        return out
    (m_t, mean_t, std_t), geometry, sd, sm, (kh, kw), (scale_h, scale_w), flags = _common(
        x, delta, mask, mean, std, spec)
    hw = spec.H * spec.W
    block = min(1024, triton.next_power_of_2(hw))
    n_blocks = triton.cdiv(hw, block)
    _vp_fwd_kernel[grid_1d(B * C * n_blocks, "visual_prompt")](
        out, x, delta, m_t, mean_t, std_t, C, h, w, *geometry, *x.stride(), *sd, *sm, kh, kw,
        scale_h, scale_w, spec.fill, spec.clamp_lo if spec.has_clamp else 0.0,
        spec.clamp_hi if spec.has_clamp else 0.0, n_blocks, **flags, BLOCK=block, num_warps=4,
    )
    return out


# Backward launch plan. BLOCK_B samples x BLOCK_M cells per program; a batch-shared gradient leaves one float32
# partial per block of BLOCK_B samples. A patch-resolution mask has few, large cells (14 x 14 cells of 16 x 16
# pixels at ImageNet size): its windows are split into tiles until there are about TARGET_PROGRAMS programs
# (4 per SM of an H100), as long as the extra mask-gradient partials stay below 1/PARTIAL_FRACTION of the
# incoming gradient's bytes.
BLOCK_B_MAX = 32
BLOCK_M = 64
BLOCK_M_MASK = 32
TARGET_PROGRAMS = 4 * 132
PARTIAL_FRACTION = 8


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def window_split(kh: int, kw: int, Hm: int, Wm: int, n_bblocks: int, need_mask: bool, partial_cells: int,
                 budget_cells: int, target: int = TARGET_PROGRAMS, block_m: int = BLOCK_M) -> tuple[int, int]:
    """(split_h, split_w): tiles per kh x kw mask window, dividing it. Without a mask gradient every pixel is
    its own cell (nothing to sum over a window). With one, the fewest tiles giving ``target`` programs whose
    partials (``partial_cells`` float32 values per tile) stay within ``budget_cells``; ties go to more column
    splits (adjacent programs then read adjacent pixels of a row)."""
    if not need_mask:
        return kh, kw
    fits = [(sh, sw) for sh in _divisors(kh) for sw in _divisors(kw)
            if sh * sw == 1 or sh * sw * partial_cells <= budget_cells]
    enough = [s for s in fits if triton.cdiv(Hm * s[0] * Wm * s[1], block_m) * n_bblocks >= target]
    if enough:
        return min(enough, key=lambda s: (s[0] * s[1], -s[1]))
    return max(fits, key=lambda s: (s[0] * s[1], s[1]))


def visual_prompt_backward(grad: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None,
                           mean: torch.Tensor | None, std: torch.Tensor | None, spec: VPSpec, need_x: bool,
                           need_delta: bool, need_mask: bool
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Fused backward: (dx, ddelta, dmask), each None when not needed. grad is (B, C, H, W), any strides."""
    B, C, h, w = x.shape
    dev = x.device
    need_mask = need_mask and mask is not None
    shared = delta.dim() == 3
    Hm, Wm = (mask.shape[-2], mask.shape[-1]) if mask is not None else (spec.H, spec.W)
    Bm, Cm = (mask.shape[0], mask.shape[1]) if mask is not None else (1, 1)
    kh, kw = spec.H // Hm, spec.W // Wm
    block_b = max(1, min(BLOCK_B_MAX, triton.next_power_of_2(max(B, 1))))
    n_bblocks = triton.cdiv(B, block_b)
    resized = spec.resize_mode != "none"
    dm_rows = n_bblocks if Bm == 1 else B  # rows of one tile's mask-gradient slab
    block_m = BLOCK_M_MASK if need_mask else BLOCK_M
    split_h, split_w = window_split(kh, kw, Hm, Wm, n_bblocks, need_mask, dm_rows * Cm * Hm * Wm,
                                    B * C * spec.H * spec.W * grad.element_size() // (4 * PARTIAL_FRACTION),
                                    block_m=block_m)
    n_tiles = split_h * split_w

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
        dm = (empty_output((n_tiles, dm_rows, Cm, Hm, Wm), torch.float32, dev) if Bm == 1 or n_tiles > 1
              else empty_output((B, Cm, Hm, Wm), mask.dtype, dev))

    if B > 0 and (need_x or need_delta or need_mask):
        (m_t, mean_t, std_t), geometry, sd, sm, _, (scale_h, scale_w), flags = _common(
            x, delta, mask, mean, std, spec)
        flags["IDX64"] = flags["IDX64"] or needs_idx64(_layout(grad))
        dx_t = dx if dx is not None else d_placed
        sdx = dx_t.stride()[:3] if dx_t is not None else (0, 0, 0)
        Hc, Wc = Hm * split_h, Wm * split_w
        n_mblocks = triton.cdiv(Hc * Wc, block_m)
        # float32 x with a learnable tensor mask on sm_80 with Triton 3.6 spills 32 B (stores + loads; 0 with 3.9
        # and on sm_90): accepted and budgeted in tools/aot_rules.py for this memory-bound reduction
        _vp_bwd_kernel[grid_1d(n_mblocks * n_bblocks, "visual_prompt backward")](
            grad, x, delta, m_t, mean_t, std_t,
            dx_t if dx_t is not None else x, dd if dd is not None else x, dm if dm is not None else x,
            B, C, h, w, *geometry, *grad.stride(), *x.stride(), *sd, *sm, kh // split_h, kw // split_w, Hc, Wc,
            split_h, split_w, Hm, Wm, dm_rows * Cm * Hm * Wm if n_tiles > 1 else 0, n_mblocks, *sdx, Cm,
            scale_h, scale_w, spec.fill, spec.clamp_lo if spec.has_clamp else 0.0,
            spec.clamp_hi if spec.has_clamp else 0.0, **flags,
            NEED_X=need_x, NEED_D=need_delta, NEED_M=need_mask, D_SHARED=shared, M_BSHARED=Bm == 1,
            M_CSHARED=Cm == 1, BLOCK_B=block_b, BLOCK_M=block_m, num_warps=4,
        )
    elif B == 0:  # nothing to reduce: gradients of shared parameters are zero
        if dd is not None and shared:
            dd = torch.zeros((1, C, spec.H, spec.W), dtype=torch.float32, device=dev)
        if dm is not None and Bm == 1:
            dm = torch.zeros((1, 1, Cm, Hm, Wm), dtype=torch.float32, device=dev)

    if need_x and resized:
        if spec.resize_mode == "bilinear":
            dx = torch.ops.aten.upsample_bilinear2d_backward(
                d_placed, [spec.h2, spec.w2], [B, C, h, w], spec.align_corners, None, None)
        else:
            dx = torch.ops.aten.upsample_nearest2d_backward(d_placed, [spec.h2, spec.w2], [B, C, h, w], None, None)
        dx = dx.to(x.dtype)
    # second pass over the float32 partials: torch's sum, a fixed order for given shapes (no atomics)
    if dd is not None and shared:
        dd = dd.sum(0).to(delta.dtype)
    if dm is not None and dm.dim() == 5:
        dm = (dm.sum((0, 1)).unsqueeze(0) if Bm == 1 else dm.sum(0)).to(mask.dtype)
    return dx, dd, dm
