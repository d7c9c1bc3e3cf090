"""visual_prompt: the reference's exact semantics, the Triton kernels against it, registration, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import reprokernels as rk
from reprokernels import BackendUnavailableError
from reprokernels.reference.visual_prompt import SQUASHES
from tests.utils import as_layout, assert_close, grads_match_compiled, traffic_counter

triton_backends = ["triton"] if rk._backend.triton_installed() else []


def _grad_like(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)


def _run(backend: str, x, delta, mask, *, need_x=True, grad_seed=1, **kw):
    """Forward, then backward with a fixed random grad: (out, dx, ddelta, dmask)."""
    x = x.detach().clone().requires_grad_(need_x) if need_x else x
    d = delta.detach().clone().requires_grad_(True)
    m = mask.detach().clone().requires_grad_(True) if isinstance(mask, torch.Tensor) else mask
    out = rk.visual_prompt(x, d, mask=m, backend=backend, **kw)
    out.backward(_grad_like(out, grad_seed))
    return out, (x.grad if need_x else None), d.grad, (m.grad if isinstance(m, torch.Tensor) else None)


def _compare(got, want, dtype=torch.float32, scale=4.0):
    for name, a, e in zip(("out", "dx", "ddelta", "dmask"), got, want, strict=True):
        if e is None:
            assert a is None, name
            continue
        # gradients sum over the batch and windows: tolerances scale with what they accumulate
        assert_close(a, e, dtype=dtype, scale=scale if name == "out" else 4 * scale, name=name)


# ---------------------------------------------------------------- the reference's exact semantics


def test_centred_placement_and_outside_count():
    x = torch.ones(1, 1, 4, 4)
    delta = torch.zeros(1, 7, 7)
    out = rk.visual_prompt(x, delta, backend="reference")
    inside = (out[0, 0] == 1).nonzero()
    assert inside[:, 0].min() == 2 and inside[:, 0].max() == 5  # top pad 2, bottom pad 1
    assert inside[:, 1].min() == 2 and inside[:, 1].max() == 5
    assert int((out[0, 0] == 0).sum()) == 33  # 49 - 16 outside pixels per channel


def test_sigmoid_of_zero_delta_is_half_outside():
    x = torch.rand(2, 3, 4, 4)
    out = rk.visual_prompt(x, torch.zeros(3, 7, 7), squash="sigmoid", backend="reference")
    outside = torch.ones(7, 7, dtype=torch.bool)
    outside[2:6, 2:6] = False
    assert bool((out[:, :, outside] == 0.5).all())
    assert torch.equal(out[:, :, 2:6, 2:6], x + 0.5 * 0)  # the image itself is untouched (mask 0 there)


def test_vp_frame_of_30_on_224_has_69840_active_entries():
    x = torch.zeros(1, 3, 224, 224)
    out = rk.visual_prompt(x, torch.ones(3, 224, 224), size=224, mask="frame", mask_width=30, order="post_norm",
                           backend="reference")
    assert int(out.sum()) == 69_840


@pytest.mark.parametrize("order", ["pre_norm", "post_norm"])
def test_reference_matches_the_eager_recipe(order):
    """The reference equals the chain research code writes by hand."""
    torch.manual_seed(3)
    x, delta = torch.rand(2, 3, 5, 6), torch.randn(3, 11, 12)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.25])
    kw = dict(resize=(7, 8), squash="sigmoid", order=order, mean=mean, std=std)
    if order == "pre_norm":
        kw["clamp"] = (0.0, 1.0)
    out = rk.visual_prompt(x, delta, backend="reference", **kw)
    img = F.interpolate(x, size=(7, 8), mode="bilinear", align_corners=False)
    canvas = F.pad(img, (2, 2, 2, 2))  # (12 - 8 + 1) // 2 = 2 left, (11 - 7 + 1) // 2 = 2 top
    mask = torch.ones(11, 12)
    mask[2:9, 2:10] = 0
    prompt = mask * torch.sigmoid(delta)
    norm = lambda v: (v - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # noqa: E731
    want = norm(torch.clamp(canvas + prompt, 0, 1)) if order == "pre_norm" else norm(canvas) + prompt
    assert_close(out, want)


def test_patch_resolution_mask_is_repeated():
    x = torch.zeros(1, 1, 2, 2)
    mask = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = rk.visual_prompt(x, torch.ones(1, 4, 6), mask=mask, fill=0.0, backend="reference")
    want = torch.tensor([[1.0] * 3 + [2.0] * 3] * 2 + [[3.0] * 3 + [4.0] * 3] * 2)
    assert torch.equal(out[0, 0], want)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("mask_shape", [None, (1, 1, 4, 3), (2, 2, 8, 6), (2, 1, 2, 2)])
@pytest.mark.parametrize("kw", [
    dict(squash="tanh", resize=(5, 6), mean=[0.1, 0.2], std=[0.3, 0.4], clamp=(0.2, 0.7)),
    dict(squash="sigmoid", order="post_norm", resize=(4, 5), resize_mode="nearest", std=[0.5, 2.0]),
    dict(squash="none", mask="frame", mask_width=2, offset=(0, 1)),
    dict(squash="sigmoid", resize=(7, 4), align_corners=True, mask="patch", patch=(1, 2, 3, 4)),
])
def test_reference_backward_is_autograd_of_the_forward(per_sample, mask_shape, kw):
    """The written-out reference backward equals autograd through the reference forward (float64)."""
    from reprokernels.reference import visual_prompt as ref

    torch.manual_seed(0)
    x = torch.rand(2, 2, 3, 4, dtype=torch.float64)
    d = torch.randn(*((2,) if per_sample else ()), 2, 8, 6, dtype=torch.float64)
    kw = dict(kw)
    fixed = {k: kw.pop(k) for k in ("mask", "mask_width", "patch") if k in kw}
    if mask_shape:
        mask = torch.rand(mask_shape, dtype=torch.float64)
    else:
        mask = fixed.pop("mask", "outside")
        kw.update(fixed)
    got = _run("reference", x, d, mask, size=(8, 6), **kw)  # through the registered op: written-out backward
    from reprokernels.ops.visual_prompt import prepare

    m4, mean, std, spec = prepare(x, d, mask=mask, size=(8, 6), **kw)
    xs, ds = x.clone().requires_grad_(), d.clone().requires_grad_()
    ms = mask.clone().requires_grad_() if isinstance(mask, torch.Tensor) else None
    out = ref.visual_prompt(xs, ds, ms.reshape(m4.shape) if ms is not None else None, mean, std, spec)
    wrt = [t for t in (xs, ds, ms) if t is not None]
    grads = torch.autograd.grad(out, wrt, _grad_like(out))
    want = (out, *grads, None) if ms is None else (out, *grads)
    _compare(got, want, dtype=torch.float64)


def test_reference_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.rand(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    d = torch.randn(2, 8, 8, dtype=torch.float64, requires_grad=True)
    m = torch.rand(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    for kw in (dict(squash="tanh", resize=(5, 6), mean=[0.1, 0.2], std=[0.3, 0.4]),
               dict(squash="sigmoid", order="post_norm", resize=(4, 5), resize_mode="nearest")):
        assert torch.autograd.gradcheck(lambda x, d, m, kw=kw: rk.visual_prompt(x, d, mask=m, **kw), (x, d, m))


# ---------------------------------------------------------------- Triton against the reference

MASKS = ("outside", "full", "frame", "patch", "tensor_full", "tensor_patch")


@st.composite
def configs(draw):
    B = draw(st.integers(0, 3))
    C = draw(st.integers(1, 3))
    H = draw(st.integers(4, 12))
    W = draw(st.integers(4, 12))
    resize = draw(st.sampled_from(["none", "bilinear", "nearest"]))
    h, w = draw(st.integers(1, H)), draw(st.integers(1, W))
    kw: dict = dict(squash=draw(st.sampled_from(["none", "sigmoid", "tanh"])),
                    order=draw(st.sampled_from(["pre_norm", "post_norm"])), fill=draw(st.sampled_from([0.0, 0.3])))
    if resize != "none":
        h2, w2 = draw(st.integers(1, H)), draw(st.integers(1, W))
        h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
        kw.update(resize=(h2, w2), resize_mode=resize, align_corners=draw(st.booleans()))
    else:
        h2, w2 = h, w
    if draw(st.booleans()):
        kw["offset"] = (draw(st.integers(0, H - h2)), draw(st.integers(0, W - w2)))
    if kw["order"] == "pre_norm" and draw(st.booleans()):
        kw["clamp"] = (0.1, 0.9)
    if draw(st.booleans()):
        kw["mean"] = [0.1 * (i + 1) for i in range(C)]
        kw["std"] = [0.2 + 0.1 * i for i in range(C)]
    mask_kind = draw(st.sampled_from(MASKS))
    mask: str | torch.Tensor = mask_kind
    if mask_kind == "frame":
        kw["mask_width"] = draw(st.integers(0, min(H, W) // 2))
    elif mask_kind == "patch":
        t, l = draw(st.integers(0, H - 1)), draw(st.integers(0, W - 1))
        kw["patch"] = (t, l, draw(st.integers(1, H - t)), draw(st.integers(1, W - l)))
    elif mask_kind.startswith("tensor"):
        kh = draw(st.sampled_from([k for k in (1, 2, 3) if H % k == 0])) if mask_kind == "tensor_patch" else 1
        kwd = draw(st.sampled_from([k for k in (1, 2, 4) if W % k == 0])) if mask_kind == "tensor_patch" else 1
        Bm = draw(st.sampled_from([1, B])) if B else 1
        Cm = draw(st.sampled_from([1, C]))
        mask = torch.rand(Bm, Cm, H // kh, W // kwd)
    per_sample = draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "strided", "channels_last", "transposed"]))
    return dict(B=B, C=C, h=h, w=w, H=H, W=W, per_sample=per_sample, mask=mask, kw=kw, layout=layout)


@pytest.mark.parametrize("backend", triton_backends)
@settings(max_examples=40)
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_triton_matches_reference_float32(backend, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    B, C = cfg["B"], cfg["C"]
    x = as_layout(torch.rand(B, C, cfg["h"], cfg["w"], generator=g), cfg["layout"])
    dshape = (B, C, cfg["H"], cfg["W"]) if cfg["per_sample"] else (C, cfg["H"], cfg["W"])
    delta = as_layout(torch.randn(dshape, generator=g), cfg["layout"])
    want = _run("reference", x, delta, cfg["mask"], **cfg["kw"])
    got = _run(backend, x, delta, cfg["mask"], **cfg["kw"])
    _compare(got, want)


def _mask_args(kind: str, B: int, C: int, H: int, W: int) -> tuple[str | torch.Tensor, dict]:
    if kind == "frame":
        return kind, dict(mask_width=2)
    if kind == "patch":
        return kind, dict(patch=(1, 2, 4, 3))
    if kind == "tensor_full":
        return torch.rand(B, C, H, W), {}
    if kind == "tensor_patch":
        return torch.rand(1, 1, H // 2, W // 4), {}
    return kind, {}


@pytest.mark.parametrize("backend", triton_backends)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("order", ["pre_norm", "post_norm"])
def test_triton_every_combination(backend, mask_kind, order):
    """Every mask kind x squash x order x resize (off / bilinear / nearest) x shared or per-sample delta."""
    B, C, H, W = 2, 2, 8, 8
    mask, extra = _mask_args(mask_kind, B, C, H, W)
    x = torch.rand(B, C, 3, 5)
    for squash in SQUASHES:
        for resize in ("none", "bilinear", "nearest"):
            for per_sample in (False, True):
                delta = torch.randn(*((B,) if per_sample else ()), C, H, W)
                kw = dict(extra, squash=squash, order=order, mean=[0.3, 0.6], std=[0.5, 0.25], fill=0.1)
                if resize != "none":
                    kw.update(resize=(5, 6), resize_mode=resize)
                if order == "pre_norm":
                    kw["clamp"] = (0.2, 0.8)
                _compare(_run(backend, x, delta, mask, **kw), _run("reference", x, delta, mask, **kw))


@pytest.mark.parametrize("backend", triton_backends)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_x_with_float32_delta(backend, dtype):
    x = torch.rand(3, 3, 8, 8)
    delta = torch.randn(3, 14, 14)
    mask = torch.rand(3, 1, 7, 7)
    kw = dict(squash="sigmoid", resize=(10, 9), mean=[0.48, 0.45, 0.4], std=[0.26, 0.26, 0.27], clamp=(0.0, 1.0))
    # float32 reference on the same (rounded) image, so a clamp boundary is crossed at the same pixels
    want = _run("reference", x.to(dtype).float(), delta, mask, **kw)
    got = _run(backend, x.to(dtype), delta, mask, **kw)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    _compare(got, want, dtype=dtype, scale=2.0)


@pytest.mark.parametrize("backend", triton_backends)
def test_triton_shared_delta_gradient_is_deterministic(backend):
    x, delta = torch.rand(37, 2, 5, 5), torch.randn(2, 9, 9)
    a = _run(backend, x, delta, "outside", squash="tanh")[2]
    b = _run(backend, x, delta, "outside", squash="tanh")[2]
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", *triton_backends])
def test_clamp_passes_gradient_at_its_bounds(backend):
    """torch.clamp's rule: a value exactly at lo or hi still passes the gradient."""
    x = torch.tensor([0.0, 1.0, 0.5, 2.0]).view(1, 1, 2, 2)
    got = _run(backend, x, torch.zeros(1, 2, 2), "full", clamp=(0.0, 1.0))
    g = _grad_like(got[0])
    want = g * torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    assert_close(got[1], want)
    assert_close(got[2], want[0])


@pytest.mark.parametrize("backend", ["reference", *triton_backends])
def test_inputs_are_never_written(backend):
    x, delta, mask = torch.rand(2, 3, 4, 4), torch.randn(3, 7, 7), torch.rand(2, 1, 7, 7)
    copies = [t.clone() for t in (x, delta, mask)]
    _run(backend, x, delta, mask, squash="sigmoid", clamp=(0.0, 1.0))
    for t, c in zip((x, delta, mask), copies, strict=True):
        assert torch.equal(t, c)


def test_empty_batch():
    for backend in ["reference", *triton_backends]:
        got = _run(backend, torch.rand(0, 3, 4, 4), torch.randn(3, 7, 7), "outside", squash="sigmoid")
        assert got[0].shape == (0, 3, 7, 7) and got[1].shape == (0, 3, 4, 4)
        assert torch.equal(got[2], torch.zeros(3, 7, 7))


def test_auto_is_reference_on_cpu_and_cuda_backend_refuses_cpu_tensors():
    x, delta = torch.rand(1, 3, 4, 4), torch.randn(3, 7, 7)
    assert torch.equal(rk.visual_prompt(x, delta), rk.visual_prompt(x, delta, backend="reference"))
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        rk.visual_prompt(x, delta, backend="cuda")


# ---------------------------------------------------------------- registration: opcheck, compile, export


def _op_args(backend: str):
    x = torch.rand(2, 3, 4, 5)
    delta, mask = torch.randn(3, 9, 8), torch.rand(2, 1, 9, 8)
    from reprokernels.reference.visual_prompt import VPSpec

    spec = VPSpec(9, 8, 6, 5, 1, 2, 0, 0, 0, 0, False, "sigmoid", "pre_norm", "bilinear", False, 0.0, 0.0, 1.0)
    ints, floats, modes = spec.to_schema()
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7])
    return x, delta, mask, mean, std, ints, floats, modes, backend


@pytest.mark.parametrize("backend", ["reference", *triton_backends])
def test_opcheck(backend):
    x, delta, mask, mean, std, ints, floats, modes, backend = _op_args(backend)
    torch.library.opcheck(torch.ops.reprokernels.visual_prompt_fwd,
                          (x, delta, mask, mean, std, ints, floats, modes, backend))
    grad = torch.randn(2, 3, 9, 8)
    torch.library.opcheck(torch.ops.reprokernels.visual_prompt_bwd,
                          (grad, x, delta, mask, mean, std, ints, floats, modes, [True, True, True], backend))
    torch.library.opcheck(torch.ops.reprokernels.visual_prompt_bwd,
                          (grad, x, delta, mask, mean, std, ints, floats, modes, [False, True, False], backend))


@pytest.mark.parametrize("backend", ["reference", *triton_backends])
def test_torch_compile_fullgraph(backend):
    delta = torch.randn(3, 9, 9, requires_grad=True)
    x = torch.rand(2, 3, 5, 5)

    def step(x, delta):
        out = rk.visual_prompt(x, delta, squash="sigmoid", mean=[0.4, 0.5, 0.6], std=[0.2, 0.2, 0.2],
                               backend=backend)
        return (out * out).sum()

    grads_match_compiled(lambda d: step(x, d), delta)


def test_torch_export():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.delta = torch.nn.Parameter(torch.randn(3, 9, 9))

        def forward(self, x):
            return rk.visual_prompt(x, self.delta, squash="sigmoid", backend="reference")

    m, x = M(), torch.rand(2, 3, 5, 5)
    ep = torch.export.export(m, (x,))
    assert "visual_prompt_fwd" in str(ep.graph)
    assert_close(ep.module()(x), m(x))


def test_triton_traffic_is_one_pass():
    """Forward stores each output byte once and loads x, delta (and mask) once each, nothing else."""
    x, delta, mask = torch.rand(4, 3, 8, 8), torch.randn(3, 16, 16), torch.rand(4, 1, 4, 4)
    with traffic_counter() as t:
        out = rk.visual_prompt(x, delta, mask=mask, squash="sigmoid", mean=[0.5] * 3, std=[0.25] * 3,
                               backend="triton")
    out_bytes = out.numel() * 4
    assert t.stored == out_bytes and t.stored_unique == out_bytes
    minimum = x.numel() * 4 + delta.numel() * 4 + mask.numel() * 4 + 2 * 3 * 4
    assert t.loaded_unique == minimum


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(x=torch.rand(1, 3, 9, 9)), ValueError, r"x: the image \(9, 9\) is larger than the canvas size=\(7, 7\)"),
        (dict(resize=(8, 5)), ValueError, r"x: the resized image \(8, 5\) is larger than the canvas"),
        (dict(offset=(4, 0)), ValueError, r"offset: the image \(4, 4\) at \(top, left\)=\(4, 0\) leaves the canvas"),
        (dict(mask="frame", mask_width=4), ValueError, r"mask_width: a frame of width 4 needs 2p <= the canvas"),
        (dict(mask="frame"), ValueError, "mask_width: mask='frame' needs a frame width"),
        (dict(mask_width=2), ValueError, "mask_width: only used with mask='frame'"),
        (dict(mask="patch", patch=(5, 5, 3, 3)), ValueError, "patch: .* must lie inside the canvas"),
        (dict(mask="ring"), ValueError, "mask: expected 'outside', 'full', 'frame', 'patch' or a tensor"),
        (dict(mask=torch.rand(2, 1, 7, 7)), ValueError, r"mask: expected a shape broadcastable to \(B=1"),
        (dict(mask=torch.rand(1, 2, 7, 7)), ValueError, r"mask: expected a shape broadcastable to .*C=3"),
        (dict(mask=torch.rand(1, 1, 3, 3)), ValueError, r"mask: its resolution \(3, 3\) must divide the canvas"),
        (dict(mask=torch.ones(1, 1, 7, 7, dtype=torch.long)), TypeError, "mask: expected a floating dtype"),
        (dict(mean=[0.5, 0.5]), ValueError, r"mean: expected 3 values \(one per channel of x\), got 2"),
        (dict(std=[1.0, 0.0, 1.0]), ValueError, "std: expected non-zero values"),
        (dict(clamp=(0, 1), order="post_norm"), ValueError, "clamp: only allowed with order='pre_norm'"),
        (dict(clamp=(1, 0)), ValueError, "clamp: expected .lo, hi. with lo <= hi"),
        (dict(x=torch.ones(1, 3, 4, 4, dtype=torch.int32)), TypeError, "x: expected a floating dtype"),
        (dict(delta=torch.randn(2, 7, 7)), ValueError, r"delta: expected \(C=3, H, W\) or \(B=1, C=3, H, W\)"),
        (dict(size=(8, 8)), ValueError, r"delta: its spatial size must be the canvas size \(8, 8\)"),
        (dict(squash="relu"), ValueError, "squash: expected one of 'none', 'sigmoid', 'tanh', got 'relu'"),
        (dict(order="mid"), ValueError, "order: expected one of 'pre_norm', 'post_norm'"),
        (dict(resize_mode="bicubic", resize=3), ValueError, "resize_mode: expected one of 'bilinear', 'nearest'"),
        (dict(x=torch.rand(3, 4, 4)), ValueError, r"x: expected a 4-D tensor \(B, C, h, w\), got shape \(3, 4, 4\)"),
        (dict(backend="fast"), ValueError, "backend: expected one of"),
    ],
)
def test_bad_input_errors(kwargs, error, message):
    args = dict(x=torch.rand(1, 3, 4, 4), delta=torch.randn(3, 7, 7))
    args.update(kwargs)
    x, delta = args.pop("x"), args.pop("delta")
    with pytest.raises(error, match=message):
        rk.visual_prompt(x, delta, **args)


def test_tensors_on_different_devices_error():
    meta_delta = torch.randn(3, 7, 7, device="meta")
    with pytest.raises(ValueError, match=r"delta: expected a tensor on cpu \(the device of x\), got meta"):
        rk.visual_prompt(torch.rand(1, 3, 4, 4), meta_delta)


def test_float64_needs_the_reference_backend():
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    for backend in triton_backends:
        msg = r"x: expected a floating dtype \(float32/float16/bfloat16\), got torch.float64"
        with pytest.raises(TypeError, match=msg):
            rk.visual_prompt(x, torch.randn(3, 7, 7), backend=backend)
