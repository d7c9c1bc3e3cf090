"""The CUDA backend of visual_prompt against the reference.

Without a GPU the kernels' own per-thread code runs through the extension's host emulation
(``reprokernels.cuda.visual_prompt.*(..., emulate=True)`` on CPU tensors): forward and every gradient, every mask
kind, squash, order, clamp, normalisation, resize mode, delta sharing, dtype, memory layout and batch chunking.
Every buffer a kernel writes is poisoned with NaN first, so an element no work item writes fails the test.
The ``gpu`` tests run the device kernels through the public ``reprokernels.visual_prompt(..., backend="cuda")``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reprokernels
from reprokernels import _cuda
from reprokernels.cuda import visual_prompt as cu
from reprokernels.ops import visual_prompt as vp_ops
from reprokernels.reference import visual_prompt as R
from reprokernels.reference.visual_prompt import VPSpec

from .utils import as_layout, assert_close

pytestmark = pytest.mark.skipif(not _cuda.extension_built(), reason="reprokernels._C is not built")


# ---- helpers ------------------------------------------------------------------------------------------------------

def spec_of(x: torch.Tensor, delta: torch.Tensor, **kwargs):
    """(mask, mean, std, spec) exactly as the public function normalises them for the backends (through the
    schema's ints/floats/modes, as the registered op receives them)."""
    mask, mean, std, spec = vp_ops.prepare(x, delta, **kwargs)
    return mask, mean, std, VPSpec.from_schema(*spec.to_schema())


def grad_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The tolerance class of a result that depends on tensors of these dtypes: the least precise kernel dtype."""
    for d in (torch.bfloat16, torch.float16):
        if d in dtypes:
            return d
    return torch.float32


def check_against_reference(x: torch.Tensor, delta: torch.Tensor, *, needs=(True, True, True), chunk=None,
                            split=None, grad_layout: str = "contiguous", **kwargs) -> None:
    """Emulated forward and backward vs the reference, on the spec the public function would build."""
    mask, mean, std, spec = spec_of(x, delta, **kwargs)
    out = cu.visual_prompt(x, delta, mask, mean, std, spec, emulate=True)
    expected = R.visual_prompt(x, delta, mask, mean, std, spec)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert_close(out, expected, dtype=x.dtype, name="out")

    grad = as_layout(torch.randn(out.shape).to(x.dtype), grad_layout)
    need_mask = needs[2] and mask is not None
    got = cu.visual_prompt_backward(grad, x, delta, mask, mean, std, spec, needs[0], needs[1], need_mask,
                                    emulate=True, chunk=chunk, split=split)
    want = R.visual_prompt_backward(grad, x, delta, mask, mean, std, spec, needs[0], needs[1], need_mask)
    for name, g, e, t, need in zip(("dx", "ddelta", "dmask"), got, want, (x, delta, mask),
                                   (needs[0], needs[1], need_mask), strict=True):
        if not need:
            assert g is None, name
            continue
        assert g.shape == t.shape and g.dtype == t.dtype, (name, g.shape, g.dtype)
        assert g.is_contiguous(), name
        # ddelta / dmask are sums over the batch (and a mask window): float32 rounding in another order
        scale = 1.0 if name == "dx" else 4.0
        assert_close(g, e, dtype=grad_dtype(x.dtype, t.dtype), scale=scale, name=name)


@st.composite
def options(draw, *, resize: bool = True, clamp: bool = True) -> dict:
    """Squash, order, clamp, normalisation and fill (everything but shapes and masks)."""
    kw: dict = {"squash": draw(st.sampled_from(R.SQUASHES)), "order": draw(st.sampled_from(R.ORDERS))}
    if clamp and kw["order"] == "pre_norm" and draw(st.booleans()):
        kw["clamp"] = draw(st.sampled_from([(0.0, 1.0), (-0.5, 0.5), (float("-inf"), 0.3), (-0.2, float("inf"))]))
    if draw(st.booleans()):
        kw["mean"] = draw(st.sampled_from([0.5, (0.485, 0.456, 0.406)]))
    if draw(st.booleans()):
        kw["std"] = draw(st.sampled_from([0.25, (0.229, 0.224, 0.225)]))
    kw["fill"] = draw(st.sampled_from([0.0, 0.5]))
    return kw


def channel_safe(kw: dict, C: int) -> dict:
    """Per-channel mean/std tuples only fit C == 3."""
    return {k: (v if not (isinstance(v, tuple) and k in ("mean", "std") and C != 3) else v[0]) for k, v in kw.items()}


def make_delta(C: int, H: int, W: int, B: int, per_sample: bool, dtype=torch.float32, layout="contiguous"):
    d = torch.randn((B, C, H, W) if per_sample else (C, H, W)).to(dtype)
    return as_layout(d, layout)


# ---- fixed masks ------------------------------------------------------------------------------------------------

MASK_KINDS = {
    "outside": {"mask": "outside"},
    "full": {"mask": "full"},
    "frame": {"mask": "frame", "mask_width": 2},
    "patch": {"mask": "patch", "patch": (1, 2, 4, 5)},
}


@pytest.mark.parametrize("kind", list(MASK_KINDS))
@settings(max_examples=8)
@given(data=st.data())
def test_fixed_masks(kind, data):
    B = data.draw(st.integers(1, 4), label="B")
    C = data.draw(st.sampled_from([1, 3]), label="C")
    h, w = data.draw(st.integers(1, 7), label="h"), data.draw(st.integers(1, 7), label="w")
    H, W = data.draw(st.integers(max(h, 9), 13), label="H"), data.draw(st.integers(max(w, 9), 13), label="W")
    per_sample = data.draw(st.booleans(), label="per_sample")
    layout = data.draw(st.sampled_from(["contiguous", "channels_last", "strided"]), label="x layout")
    kw = channel_safe(data.draw(options(), label="options"), C)
    x = as_layout(torch.rand(B, C, h, w), layout)
    check_against_reference(x, make_delta(C, H, W, B, per_sample), size=(H, W), **MASK_KINDS[kind], **kw)


def test_offset_and_odd_sizes():
    x = torch.rand(2, 3, 5, 7)
    for offset in [(0, 0), (6, 4), (3, 1)]:
        check_against_reference(x, torch.randn(3, 11, 11), offset=offset, squash="tanh", clamp=(0.0, 1.0),
                                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


# ---- tensor masks -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("mask_batch", ["shared", "per_sample"])
@pytest.mark.parametrize("mask_channels", ["shared", "per_channel"])
@settings(max_examples=3)
@given(data=st.data())
def test_tensor_masks(k, mask_batch, mask_channels, data):
    B = data.draw(st.integers(1, 5), label="B")
    C = 3
    Hm, Wm = data.draw(st.integers(2, 5), label="Hm"), data.draw(st.integers(2, 5), label="Wm")
    H, W = Hm * k, Wm * k
    h, w = data.draw(st.integers(1, H), label="h"), data.draw(st.integers(1, W), label="w")
    kw = data.draw(options(), label="options")
    mask = torch.rand(B if mask_batch == "per_sample" else 1, C if mask_channels == "per_channel" else 1, Hm, Wm)
    mask[mask < 0.2] = 0.0  # exact zeros: the kernels skip delta there in the forward
    mask = as_layout(mask, data.draw(st.sampled_from(["contiguous", "transposed"]), label="mask layout"))
    per_sample = data.draw(st.booleans(), label="per_sample delta")
    needs = data.draw(st.sampled_from([(True, True, True), (False, False, True), (False, True, False)]), label="needs")
    x = torch.rand(B, C, h, w)
    check_against_reference(x, make_delta(C, H, W, B, per_sample), mask=mask, needs=needs, **kw)


@pytest.mark.parametrize("shape", [(6, 8), (1, 6, 8), (1, 1, 3, 4)])
def test_tensor_mask_low_rank_shapes(shape):
    """2-D / 3-D masks (as a direct caller may pass them): the gradient comes back in the mask's own shape."""
    B, C, H, W = 2, 3, 12, 16
    x, delta = torch.rand(B, C, 7, 9), torch.randn(C, H, W)
    mask4, mean, std, spec = spec_of(x, delta, mask=torch.rand(shape), squash="sigmoid")
    mask = mask4.reshape(shape)
    out = cu.visual_prompt(x, delta, mask, mean, std, spec, emulate=True)
    assert_close(out, R.visual_prompt(x, delta, mask4, mean, std, spec), name="out")
    grad = torch.randn(out.shape)
    _, dd, dm = cu.visual_prompt_backward(grad, x, delta, mask, mean, std, spec, False, True, True, emulate=True)
    _, rdd, rdm = R.visual_prompt_backward(grad, x, delta, mask4, mean, std, spec, False, True, True)
    assert dm.shape == mask.shape
    assert_close(dd, rdd, scale=4, name="ddelta")
    assert_close(dm, rdm.reshape(shape), scale=4, name="dmask")


# ---- resize -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,align", [("nearest", False), ("bilinear", False), ("bilinear", True)])
@settings(max_examples=6)
@given(data=st.data())
def test_resize(mode, align, data):
    B, C = data.draw(st.integers(1, 3), label="B"), 3
    h, w = data.draw(st.integers(1, 9), label="h"), data.draw(st.integers(1, 9), label="w")
    h2, w2 = data.draw(st.integers(1, 12), label="h2"), data.draw(st.integers(1, 12), label="w2")
    H, W = data.draw(st.integers(max(h2, 5), 13), label="H"), data.draw(st.integers(max(w2, 5), 13), label="W")
    kw = data.draw(options(), label="options")
    mask = data.draw(st.sampled_from(["outside", "tensor"]), label="mask")
    if mask == "tensor":
        kw["mask"] = torch.rand(B, 1, H, W)
    layout = data.draw(st.sampled_from(["contiguous", "channels_last", "strided"]), label="x layout")
    x = as_layout(torch.rand(B, C, h, w), layout)
    check_against_reference(x, make_delta(C, H, W, B, data.draw(st.booleans(), label="per_sample")), size=(H, W),
                            resize=(h2, w2), resize_mode=mode, align_corners=align, **kw)


def test_resize_upsample_and_downsample_exact_index_paths():
    """2x (index >> 1), identity rows with resized columns, and a downsample."""
    x = torch.rand(2, 3, 6, 5)
    for resize in [(12, 10), (6, 9), (3, 4)]:
        for mode in ["nearest", "bilinear"]:
            check_against_reference(x, torch.randn(3, 16, 16), resize=resize, resize_mode=mode, clamp=(0.0, 1.0))


# ---- dtypes -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("delta_dtype", ["float32", "same"])
@settings(max_examples=5)
@given(data=st.data())
def test_low_precision(x_dtype, delta_dtype, data):
    B, C = data.draw(st.integers(1, 3), label="B"), 3
    H, W = data.draw(st.sampled_from([(8, 16), (11, 13), (16, 24)]), label="HW")  # vector and scalar column paths
    h, w = data.draw(st.integers(1, H), label="h"), data.draw(st.integers(1, W), label="w")
    kw = data.draw(options(), label="options")
    mask = data.draw(st.sampled_from(["outside", "full", "tensor"]), label="mask")
    kw["mask"] = torch.rand(B, C, H, W) if mask == "tensor" else mask
    dt = torch.float32 if delta_dtype == "float32" else x_dtype
    x = torch.rand(B, C, h, w).to(x_dtype)
    per_sample = data.draw(st.booleans(), label="per_sample")
    check_against_reference(x, make_delta(C, H, W, B, per_sample, dt), **kw)


def test_other_float_dtypes_are_cast():
    """A float64 delta / mask (legal on the public API) runs as float32; gradients come back in their dtype."""
    x = torch.rand(2, 3, 5, 6)
    check_against_reference(x, torch.randn(3, 8, 8, dtype=torch.float64), mask=torch.rand(2, 1, 4, 4).double(),
                            squash="sigmoid")
    check_against_reference(x.half(), torch.randn(3, 8, 8).bfloat16(), squash="tanh")


# ---- layouts, vector paths, chunks, empty batch -------------------------------------------------------------------

@pytest.mark.parametrize("delta_layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last", "strided"])
def test_layouts(delta_layout, grad_layout):
    B, C, H, W = 3, 3, 8, 16  # W % 8 == 0: the forward's 16-byte store / load paths where the layout allows
    x = as_layout(torch.rand(B, C, 5, 9), "channels_last")
    for per_sample in (False, True):
        delta = make_delta(C, H, W, B, per_sample, layout=delta_layout)
        check_against_reference(x, delta, grad_layout=grad_layout, mask="full", squash="sigmoid")
        check_against_reference(x.half(), delta, grad_layout=grad_layout, mask="outside", clamp=(0.0, 1.0))


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 64])
@pytest.mark.parametrize("split", [(1, 1), (2, 1), (1, 4), (4, 4)])
def test_batch_chunks_and_window_splits(chunk, split):
    """Every partial-sum path of the backward: batch chunks (a short last one, the per-sample-mask register
    path) and mask windows split into tiles, for shared and per-sample masks and deltas."""
    B, C, H, W = 7, 3, 8, 8
    x = torch.rand(B, C, 5, 5)
    max_chunk = _cuda.extension().VISUAL_PROMPT_MAX_CHUNK
    for mask in (torch.rand(1, 1, 2, 2), torch.rand(B, 1, 2, 2), torch.rand(B, C, 2, 2), torch.rand(1, C, 2, 2)):
        if mask.shape[0] == B and chunk > max_chunk:
            continue  # refused: see test_per_sample_mask_chunk_limit
        for per_sample in (False, True):
            check_against_reference(x, make_delta(C, H, W, B, per_sample), mask=mask, chunk=chunk, split=split,
                                    squash="tanh", clamp=(0.1, 0.9))
    if split == (1, 1):
        check_against_reference(x, make_delta(C, H, W, B, False), mask="outside", chunk=chunk)


def test_backward_plan():
    """Launch plans: about BWD_TARGET_ITEMS items, few chunks for a shared delta, windows split as needed."""
    plan, target = cu._backward_plan, cu.BWD_TARGET_ITEMS

    def items(B, C, H, W, mask, need_mask, chunk, sh, sw):
        cells = C * H * W if mask is None else (1 if mask.shape[1] == 1 and need_mask else C) * mask.shape[2] * \
            mask.shape[3] * sh * sw
        return -(-B // chunk) * cells

    # fixed mask, 3 x 224 x 224 pixels: two chunks reach the target
    assert plan(256, 3, 224, 224, None, False, True, 2) == (128, 1, 1)
    # small canvas: the chunks of a shared delta's gradient are capped (16 partials for 256 float16 samples)
    assert plan(256, 3, 32, 32, None, False, True, 2) == (16, 1, 1)
    chunk, _, _ = plan(256, 3, 32, 32, None, False, False, 2)  # per-sample delta: no partials, no cap
    assert items(256, 3, 32, 32, None, False, chunk, 1, 1) >= target
    # shared patch mask (14 x 14 cells of 16 x 16): without dmask one pixel per item; with it split to fill
    m = torch.rand(1, 1, 14, 14)
    assert plan(256, 3, 224, 224, m, False, True, 2) == (128, 16, 16)
    chunk, sh, sw = plan(256, 3, 224, 224, m, True, True, 2)
    assert -(-256 // chunk) <= 16 and items(256, 3, 224, 224, m, True, chunk, sh, sw) >= target
    # per-sample mask with its gradient: chunks of at most VISUAL_PROMPT_MAX_CHUNK samples
    assert plan(64, 3, 32, 32, torch.rand(64, 1, 8, 8), True, True, 4) == (8, 4, 4)


def test_invalid_split_is_refused():
    x, delta = torch.rand(2, 3, 4, 4), torch.randn(3, 8, 8)
    mask, mean, std, spec = spec_of(x, delta, mask=torch.rand(1, 1, 2, 2))
    with pytest.raises(RuntimeError, match="visual_prompt_bwd_host' failed"):  # 3 does not divide the window 4
        cu.visual_prompt_backward(torch.randn(2, 3, 8, 8), x, delta, mask, mean, std, spec, False, True, True,
                                  emulate=True, split=(3, 1))


def test_per_sample_mask_chunk_limit():
    x, delta = torch.rand(9, 3, 4, 4), torch.randn(3, 8, 8)
    mask, mean, std, spec = spec_of(x, delta, mask=torch.rand(9, 1, 8, 8))
    grad = torch.randn(9, 3, 8, 8)
    with pytest.raises(RuntimeError, match="visual_prompt_bwd_host' failed"):
        cu.visual_prompt_backward(grad, x, delta, mask, mean, std, spec, False, False, True, emulate=True, chunk=9)


@pytest.mark.parametrize("mask", ["outside", "tensor"])
def test_empty_batch(mask):
    x = torch.rand(0, 3, 5, 5)
    m = torch.rand(1, 1, 8, 8) if mask == "tensor" else mask
    check_against_reference(x, torch.randn(3, 8, 8), mask=m, squash="sigmoid")
    check_against_reference(x, torch.randn(0, 3, 8, 8), mask=m)


def test_empty_image():
    """h = 0: only the canvas fill shows (x has no data pointer); dx is empty."""
    x = torch.rand(2, 3, 0, 4)
    check_against_reference(x, torch.randn(3, 6, 6), squash="sigmoid", clamp=(0.0, 1.0), fill=0.5, mean=0.5)


def test_deterministic():
    x, delta = torch.rand(20, 3, 6, 6), torch.randn(3, 8, 8)
    mask, mean, std, spec = spec_of(x, delta, mask=torch.rand(20, 1, 4, 4), squash="sigmoid")
    grad = torch.randn(20, 3, 8, 8)
    a = cu.visual_prompt_backward(grad, x, delta, mask, mean, std, spec, True, True, True, emulate=True)
    b = cu.visual_prompt_backward(grad, x, delta, mask, mean, std, spec, True, True, True, emulate=True)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


def test_unneeded_gradients_are_none():
    x, delta = torch.rand(2, 3, 4, 4), torch.randn(3, 6, 6)
    mask, mean, std, spec = spec_of(x, delta)
    grad = torch.randn(2, 3, 6, 6)
    assert cu.visual_prompt_backward(grad, x, delta, mask, mean, std, spec, False, False, True,
                                     emulate=True) == (None, None, None)
    dx, dd, dm = cu.visual_prompt_backward(grad, x, delta, mask, mean, std, spec, True, False, False, emulate=True)
    assert dd is None and dm is None and dx.shape == x.shape


# ---- the op layer end to end (autograd) through the emulation -----------------------------------------------------

def test_public_op_through_emulation(monkeypatch):
    """The registered op + autograd.Function with this module as the backend (emulated): forward and gradients."""
    class Emulated:
        @staticmethod
        def visual_prompt(*args):
            return cu.visual_prompt(*args, emulate=True)

        @staticmethod
        def visual_prompt_backward(*args):
            return cu.visual_prompt_backward(*args, emulate=True)

    kwargs = dict(size=12, resize=(8, 8), squash="sigmoid", clamp=(0.0, 1.0),
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    inputs = torch.rand(3, 3, 6, 7), torch.randn(3, 12, 12), torch.rand(3, 1, 6, 6)
    results = []
    for emulate in (True, False):
        x, delta, mask = (t.clone().requires_grad_(True) for t in inputs)
        with monkeypatch.context() as m:
            if emulate:
                m.setattr(vp_ops, "_impl", lambda backend: Emulated)
            out = reprokernels.visual_prompt(x, delta, backend="reference", mask=mask, **kwargs)
            out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        results.append((out.detach(), x.grad, delta.grad, mask.grad))
    for name, a, b in zip(("out", "dx", "ddelta", "dmask"), *results, strict=True):
        assert_close(a, b, scale=4, name=name)


# ---- errors -------------------------------------------------------------------------------------------------------

def test_cpu_tensors_need_the_emulation_switch():
    x, delta = torch.rand(1, 3, 4, 4), torch.randn(3, 6, 6)
    mask, mean, std, spec = spec_of(x, delta)
    with pytest.raises(ValueError, match=r"x: the cuda backend needs cuda tensors, got a tensor on cpu"):
        cu.visual_prompt(x, delta, mask, mean, std, spec)
    if not torch.cuda.is_available():  # backend selection refuses CPU tensors before this module is reached
        with pytest.raises(reprokernels.BackendUnavailableError, match="needs CUDA tensors"):
            reprokernels.visual_prompt(x, delta, backend="cuda")


def test_bad_inputs_name_the_argument():
    x, delta = torch.rand(1, 3, 4, 4), torch.randn(3, 6, 6)
    mask, mean, std, spec = spec_of(x, delta)
    with pytest.raises(ValueError, match=r"x: the cuda backend supports float32, float16 and bfloat16"):
        cu.visual_prompt(x.double(), delta, mask, mean, std, spec, emulate=True)
    with pytest.raises(ValueError, match=r"grad: expected shape \(1, 3, 6, 6\)"):
        cu.visual_prompt_backward(torch.randn(1, 3, 6, 5), x, delta, mask, mean, std, spec, True, True, False,
                                  emulate=True)


def test_params_block_rejects_unknown_fields():
    p = _cuda.extension().VisualPromptParams()
    p.B, p.fill = 4, float("inf")
    assert (p.B, p.fill) == (4, float("inf"))
    with pytest.raises(AttributeError):
        p.batch = 4  # a misspelt field is an error, never silently ignored


def test_invalid_params_are_refused_by_the_launcher():
    x, delta = torch.rand(1, 3, 4, 4), torch.randn(3, 6, 6)
    mask, mean, std, spec = spec_of(x, delta)
    bad = spec._replace(top=4)  # the image would leave the canvas
    with pytest.raises(RuntimeError, match=r"visual_prompt_fwd_host' failed: invalid argument"):
        cu.visual_prompt(x, delta, mask, mean, std, bad, emulate=True)


# ---- the device kernels (need a GPU) -----------------------------------------------------------------------------

def _cuda_ready() -> None:
    if not _cuda.cuda_available():
        pytest.skip(_cuda.unavailable_reason())


GPU_CASES = [
    dict(mask="outside", squash="sigmoid", clamp=(0.0, 1.0), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    dict(mask="full", squash="tanh", order="post_norm", mean=0.5, std=0.25),
    dict(mask="frame", mask_width=5, resize=(40, 36), resize_mode="bilinear"),
    dict(mask="patch", patch=(3, 4, 10, 12), resize=(20, 50), resize_mode="nearest", fill=0.5),
    dict(mask="tensor_shared", squash="sigmoid", resize=(30, 30), align_corners=True),
    dict(mask="tensor_per_sample", clamp=(0.0, 1.0)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_gpu_matches_reference(case, dtype, per_sample):
    _cuda_ready()
    kw = dict(GPU_CASES[case])
    B, C, H, W = 37, 3, 64, 64  # several backward chunks; W % 8 == 0: the 16-byte paths
    dev = "cuda"
    if kw["mask"] == "tensor_shared":
        kw["mask"] = torch.rand(1, 1, 16, 16, device=dev, requires_grad=True)
    elif kw["mask"] == "tensor_per_sample":
        kw["mask"] = torch.rand(B, C, 32, 32, device=dev, requires_grad=True)
    x = as_layout(torch.rand(B, C, 27, 31, device=dev), "channels_last").to(dtype).requires_grad_(True)
    delta = torch.randn((B, C, H, W) if per_sample else (C, H, W), device=dev, requires_grad=True)
    grad = torch.randn(B, C, H, W, device=dev).to(dtype)
    outs = {}
    for backend in ("cuda", "reference"):
        for t in (x, delta, kw["mask"]):
            if isinstance(t, torch.Tensor):
                t.grad = None
        out = reprokernels.visual_prompt(x, delta, backend=backend, **kw)
        out.backward(grad)
        m = kw["mask"]
        outs[backend] = (out.detach(), x.grad, delta.grad, m.grad if isinstance(m, torch.Tensor) else None)
    for name, a, b in zip(("out", "dx", "ddelta", "dmask"), outs["cuda"], outs["reference"], strict=True):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, dtype=grad_dtype(dtype, b.dtype), scale=1.0 if name in ("out", "dx") else 8.0, name=name)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic_and_uses_the_current_stream():
    _cuda_ready()
    dev = "cuda"
    x = torch.rand(64, 3, 24, 24, device=dev)
    delta = torch.randn(3, 32, 32, device=dev)
    mask = torch.rand(64, 1, 8, 8, device=dev)
    m4, mean, std, spec = spec_of(x, delta, mask=mask, squash="sigmoid", clamp=(0.0, 1.0))
    grad = torch.randn(64, 3, 32, 32, device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs were made on the default stream
    with torch.cuda.stream(stream):
        a = cu.visual_prompt_backward(grad, x, delta, m4, mean, std, spec, True, True, True)
        b = cu.visual_prompt_backward(grad, x, delta, m4, mean, std, spec, True, True, True)
    stream.synchronize()
    for u, v in zip(a[1:], b[1:], strict=True):  # dx goes through no reduction here; ddelta/dmask are sums
        assert torch.equal(u, v)
    assert torch.equal(a[0], b[0])
    ref = R.visual_prompt_backward(grad, x, delta, m4, mean, std, spec, True, True, True)
    for name, u, e in zip(("dx", "ddelta", "dmask"), a, ref, strict=True):
        assert_close(u, e, scale=8, name=name)


@pytest.mark.gpu
def test_gpu_large_batch_grid_stride():
    """More work items than one grid covers (the grid-stride loops), a 600 MB output."""
    _cuda_ready()
    x = torch.rand(2048, 3, 32, 32, device="cuda", dtype=torch.float16)
    delta = torch.randn(3, 224, 224, device="cuda")
    out = reprokernels.visual_prompt(x, delta, backend="cuda", squash="sigmoid")
    expected = reprokernels.visual_prompt(x[-4:], delta, backend="reference", squash="sigmoid")
    assert_close(out[-4:], expected, name="out (last samples)")
