"""The cpu visual_prompt kernel's row paths (csrc/cpu/visual_prompt.cpp) and float16 row conversions
(csrc/cpu/half_rows.h): fixed-mask segments, tensor masks shared or per sample (at patch or canvas resolution, one
channel for C, one row for the whole height), per-sample deltas, clamps, strided gradients, every dtype, against
the reference; bitwise the same for 1, 2 and 3 threads (3 splits the batch into chunks on small canvases); the
vectorised sigmoid / tanh against float64; and every float16 <-> float32 conversion bit for bit against the scalar
code."""

from __future__ import annotations

import ctypes
import itertools

import numpy as np
import pytest
import torch

import reprokernels as rk
from reprokernels import _cpu
from tests.utils import assert_close, with_threads

pytestmark = pytest.mark.skipif(not _cpu.available(), reason=f"cpu backend not built: {_cpu.unavailable_reason()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 4e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}


def _run(params, kw, backend, grad_layout="contiguous", grad_dtype=None):
    ps = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    x, delta, *m = ps
    opts = dict(kw)
    if m:
        opts["mask"] = m[0]
    out = rk.visual_prompt(x, delta, backend=backend, **opts)
    # the same gradient values for every backend: rounded to the kernel's dtype first
    g = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(grad_dtype or out.dtype).to(out.dtype)
    if grad_layout == "transposed":  # a gradient that is not contiguous along W
        g = g.transpose(-1, -2).contiguous().transpose(-1, -2)
    diff = [p for p in ps if p.requires_grad]
    grads = torch.autograd.grad(out, diff, g)
    return (out, *grads)


def _check(params, kw, dtype, grad_layout="contiguous", threads=(1, 2, 3)):
    got = _run(params, kw, "cpu", grad_layout)
    # the reference computes in float32 from the same values: x as float32, delta and mask in their own dtypes
    ref_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    ref_params[0] = params[0].detach().float().requires_grad_(params[0].requires_grad)
    want = _run(ref_params, kw, "reference", grad_layout, grad_dtype=dtype)
    names = ("out", "dx", "ddelta", "dmask")
    for name, a, b in zip(names, got, want, strict=False):
        # outputs in x's dtype; gradients of float32 parameters differ by summation order only
        tol = TOL[dtype] if name in ("out", "dx") else TOL.get(a.dtype, 4e-5) * (1 + 9 * (dtype != torch.float32))
        mag = max(1.0, float(b.detach().float().abs().max())) if b.numel() else 1.0
        assert_close(a.float(), b.float(), rtol=tol, atol=tol * mag, name=name)
    runs = [with_threads(n, lambda: _run(params, kw, "cpu", grad_layout)) for n in threads]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _mask(kind, B, C, H, W, g):
    if kind == "patch_sample":  # SMM: per sample and channel, patch resolution (k = 4 x 3)
        return torch.rand(B, C, H // 4, W // 3, generator=g)
    if kind == "patch_shared":
        return torch.rand(1, C, H // 2, W // 3, generator=g)
    if kind == "one_channel_sample":  # one channel for C: the mask gradient sums the channels
        return torch.rand(B, 1, H // 2, W // 2, generator=g)
    if kind == "one_row":  # Hm = 1: a mask cell spans the whole height
        return torch.rand(1, 1, 1, W // 4, generator=g)
    if kind == "canvas_sample_zeros":  # exact zeros: delta is not read there
        m = torch.rand(B, C, H, W, generator=g)
        return torch.where(m < 0.3, torch.zeros(()), m)
    raise ValueError(kind)


MASKS = ["patch_sample", "patch_shared", "one_channel_sample", "one_row", "canvas_sample_zeros"]
OPTS = [
    dict(),
    dict(squash="sigmoid", mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4]),
    dict(squash="tanh", clamp=(0.1, 0.9)),
    dict(order="post_norm", mean=0.5, std=0.25),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("opt", range(len(OPTS)))
def test_tensor_masks(dtype, mask, opt):
    g = torch.Generator().manual_seed(opt * 7 + MASKS.index(mask))
    B, C, H, W = 3, 3, 8, 12
    x = torch.rand(B, C, H - 2, W - 3, generator=g).to(dtype).requires_grad_()
    delta = torch.randn(C, H, W, generator=g).requires_grad_()
    m = _mask(mask, B, C, H, W, g).requires_grad_()
    _check([x, delta, m], OPTS[opt], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["outside", "frame", "full", "patch_sample", "patch_shared", "one_channel_sample"])
@pytest.mark.parametrize("opt", range(len(OPTS)))
def test_per_sample_delta(dtype, mask, opt):
    g = torch.Generator().manual_seed(100 + opt)
    B, C, H, W = 3, 3, 8, 12
    x = torch.rand(B, C, 4, 6, generator=g).to(dtype).requires_grad_()
    delta = torch.randn(B, C, H, W, generator=g).requires_grad_()
    kw = dict(OPTS[opt])
    params = [x, delta]
    if mask in ("outside", "frame", "full"):
        kw["mask"] = mask
        if mask == "frame":
            kw["mask_width"] = 2
    else:
        params.append(_mask(mask, B, C, H, W, g).requires_grad_())
    _check(params, kw, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta_dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask", ["outside", "patch", "patch_sample"])
def test_delta_dtypes_strided_grad_and_delta(dtype, delta_dtype, mask):
    g = torch.Generator().manual_seed(7)
    B, C, H, W = 2, 3, 8, 12
    x = torch.rand(B, C, 5, 7, generator=g).to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    base = torch.randn(C, W, H, generator=g).to(delta_dtype)
    delta = base.transpose(-1, -2).requires_grad_()  # W-strided delta rows
    kw = dict(squash="sigmoid", clamp=(0.0, 1.0), offset=(1, 2))
    params = [x.requires_grad_(), delta]
    if mask == "patch":
        kw.update(mask="patch", patch=(1, 2, 5, 7))
    elif mask == "patch_sample":
        params.append(_mask(mask, B, C, H, W, g).requires_grad_())
    _check(params, kw, dtype, grad_layout="transposed")


@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("mask", ["outside", "patch_sample"])
def test_small_canvas_batch_chunks(B, mask):
    """C * H below a few row blocks: the forward (and a backward with no batch reduction) splits the batch into
    chunks per thread count; the bits must not change."""
    g = torch.Generator().manual_seed(B)
    C, H, W = 1, 8, 9
    x = torch.rand(B, C, 4, 3, generator=g).requires_grad_()
    delta = torch.randn(B, C, H, W, generator=g).requires_grad_()
    params = [x, delta]
    if mask == "patch_sample":
        params.append(torch.rand(B, C, 4, 3, generator=g).requires_grad_())
    _check(params, dict(squash="tanh", mask=mask) if mask == "outside" else dict(squash="tanh"), torch.float32,
           threads=(1, 2, 3, 5))


def test_nan_delta_under_zero_mask_tensor_and_per_sample():
    """Where a tensor mask (shared or per sample) is exactly 0, NaN / inf in delta change nothing and get a zero
    gradient, also through the batch sum of a shared delta under per-sample masks."""
    g = torch.Generator().manual_seed(3)
    B, C, H, W = 2, 3, 8, 8
    x = torch.rand(B, C, 4, 4, generator=g)
    for squash in ("none", "sigmoid", "tanh"):
        m = torch.rand(B, C, H // 2, W // 2, generator=g)
        m[:, :, 0] = 0.0  # canvas rows 0-1 of every sample and channel
        delta = torch.randn(C, H, W, generator=g)
        delta[:, 0, :] = float("nan")
        delta[:, 1, :] = float("inf")
        d = delta.requires_grad_()
        out = rk.visual_prompt(x, d, mask=m, squash=squash, backend="cpu")
        out.backward(torch.ones_like(out))
        assert torch.isfinite(out).all()
        assert torch.equal(d.grad[:, :2], torch.zeros_like(d.grad[:, :2]))
        want = rk.visual_prompt(x, delta.detach(), mask=m, squash=squash, backend="reference")
        assert_close(out, want)


def _squash_through_kernel(values, squash):
    """squash(values) as the kernel computes it: a full mask on an empty image (h = w = 0), so out = 0 + g."""
    n = values.numel()
    W = 256
    H = (n + W - 1) // W
    d = torch.zeros(H * W)
    d[:n] = values
    x = torch.zeros(1, 1, 0, 0)
    out = rk.visual_prompt(x, d.view(1, H, W), mask="full", squash=squash, size=(H, W), backend="cpu")
    return out.reshape(-1)[:n]


@pytest.mark.parametrize("squash", ["sigmoid", "tanh"])
def test_vectorised_squash_accuracy(squash):
    g = torch.Generator().manual_seed(0)
    v = torch.cat([torch.randn(200_000, generator=g) * s for s in (1e-6, 1e-3, 0.3, 1.0, 3.0, 10.0, 40.0)]
                  + [torch.linspace(-120, 120, 100_001), torch.linspace(-1, 1, 100_001),
                     torch.tensor([0.0, -0.0, 0.625, -0.625, 0.6249999, 88.7, -88.7, -88.8, 89.0, -104.0, 1e-40,
                                   -1e-40, float("inf"), -float("inf"), float("nan")])])
    got = _squash_through_kernel(v, squash).double()
    want = (torch.sigmoid if squash == "sigmoid" else torch.tanh)(v.double())
    finite = torch.isfinite(want)
    ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(torch.finfo(torch.float32).tiny)
    err = ((got - want).abs() / ulp)[finite & (want.abs() > 1e-30)]
    assert float(err.max()) <= 4.0, f"{squash}: {float(err.max())} ulp"
    assert float((got - want).abs()[finite].max()) <= 1e-7
    assert torch.isnan(got[torch.isnan(v)]).all()
    if squash == "sigmoid":
        assert got[v == float("inf")].item() == 1.0 and got[v == -float("inf")].item() == 0.0
    else:
        assert got[v == float("inf")].item() == 1.0 and got[v == -float("inf")].item() == -1.0


# ---------------------------------------------------------------- float16 rows (half_rows.h)

def _hook():
    lib = ctypes.CDLL(_cpu.extension().__file__)
    fn = lib.rk_half_rows_hook
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return fn


def _convert(to_half, vector, src):
    n = src.size
    dst = np.empty(n, dtype=np.float32 if not to_half else np.uint16)
    assert _hook()(to_half, vector, src.ctypes.data, dst.ctypes.data, n) == 0
    return dst


def _f16_to_f32_expected(h):
    """common.h's f16_to_float in numpy: exact, NaN bits kept (a signalling NaN stays signalling)."""
    h = h.astype(np.uint32)
    sign, em = (h & 0x8000) << 16, h & 0x7FFF
    normal_or_sub = h.astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32) & 0x7FFFFFFF
    out = np.where(em >= 0x7C00, 0x7F800000 | ((em & 0x3FF) << 13), normal_or_sub)
    return (sign | out).astype(np.uint32)


def test_half_rows_every_half_value():
    h = np.arange(65536, dtype=np.uint16)
    for n in (65536, 65535, 65521, 7, 1, 0):  # tails of every length below a vector
        src = np.ascontiguousarray(h[:n])
        vec = _convert(0, 1, src).view(np.uint32)
        sca = _convert(0, 0, src).view(np.uint32)
        assert np.array_equal(vec, sca)
        assert np.array_equal(vec, _f16_to_f32_expected(src))


def test_half_rows_floats_to_half():
    rng = np.random.default_rng(0)
    bits = [rng.integers(0, 2**32, 1_000_003, dtype=np.uint64).astype(np.uint32)]
    halves = np.arange(65536, dtype=np.uint16)
    f = halves.view(np.float16).astype(np.float32)
    f = f[np.isfinite(f)]
    f64 = np.sort(np.unique(f.astype(np.float64)))
    mids = ((f64[:-1] + f64[1:]) / 2).astype(np.float32)  # exact ties: round to even
    edges = np.array([65504, 65519.996, 65520, 65536, 1e10, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-26,
                      6.1035156e-05, 6.0975552e-05, 1e-40, 0.0, np.inf], dtype=np.float32)
    nan_bits = np.array([0x7F800001, 0x7FC00000, 0x7FBFFFFF, 0x7F802000, 0x7FFFFFFF, 0x7F801FFF], dtype=np.uint32)
    allf = np.concatenate([np.concatenate(bits).view(np.float32), mids, np.nextafter(mids, np.inf),
                           np.nextafter(mids, -np.inf), edges, nan_bits.view(np.float32)])
    allf = np.concatenate([allf, -allf])
    for n in (allf.size, allf.size - 5, 13, 3):
        src = np.ascontiguousarray(allf[:n])
        vec = _convert(1, 1, src)
        sca = _convert(1, 0, src)
        assert np.array_equal(vec, sca)
        ok = ~np.isnan(src)
        want = torch.from_numpy(src[ok].copy()).to(torch.float16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(vec[ok], want)
        u = src[~ok].view(np.uint32)
        assert np.array_equal(vec[~ok], (((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)).astype(np.uint16))


def test_float16_rows_are_exact_through_the_kernel():
    """A float16 image with every finite half value goes through the staged rows: out = x exactly (a full mask
    with delta 0, no norm), and dx = grad exactly."""
    h = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    h = h[torch.isfinite(h)].reshape(1, 1, 62, 1024)  # the 63,488 finite halves
    x = h.clone().requires_grad_()
    delta = torch.zeros(1, 62, 1024, requires_grad=True)
    out = rk.visual_prompt(x, delta, mask="full", backend="cpu")
    assert torch.equal(out.view(torch.int16)[h != 0], h.view(torch.int16)[h != 0])
    (dx,) = torch.autograd.grad(out, [x], h)
    assert torch.equal(dx.view(torch.int16), h.view(torch.int16))


def test_threads_bitwise_large_canvas_all_paths():
    g = torch.Generator().manual_seed(11)
    B, C, H, W = 4, 3, 40, 48
    for dtype, per_sample, kind in itertools.product(DTYPES, (False, True), ("outside", "patch_sample")):
        x = torch.rand(B, C, 20, 24, generator=g).to(dtype).requires_grad_()
        delta = torch.randn(*((B,) if per_sample else ()), C, H, W, generator=g).requires_grad_()
        params = [x, delta]
        kw = dict(squash="sigmoid", mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4])
        if kind == "outside":
            kw["mask"] = "outside"
        else:
            params.append(torch.rand(B, C, H // 8, W // 8, generator=g).requires_grad_())
        _check(params, kw, dtype)
