"""reprokernels.nn visual-prompt modules against the papers' formulas, written here in plain eager PyTorch.

Each hand-written composition below follows the published code (VP's PadPrompter / RandomPatchPrompter,
ILM-VP's ExpansiveVisualPrompt, SMM's InstancewiseVisualPrompt), not the library: F.pad / F.interpolate /
torch.cat / sigmoid / masks / normalisation in separate ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reprokernels.nn import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ExpansivePrompter,
    FullPrompter,
    PadPrompter,
    PatchPrompter,
    SampleSpecificMaskPrompter,
    freeze_backbone,
)
from tests.utils import assert_close, triton_param

BACKENDS = ["reference", triton_param("visual_prompt")]


def _norm(v: torch.Tensor, mean, std) -> torch.Tensor:
    C = v.shape[1]
    if mean is not None:
        v = v - torch.as_tensor(mean, dtype=v.dtype).expand(C).view(1, C, 1, 1)
    if std is not None:
        v = v / torch.as_tensor(std, dtype=v.dtype).expand(C).view(1, C, 1, 1)
    return v


def _tol(backend: str) -> dict:
    # the reference runs the same float32 ops as the formulas; kernels may reorder (v * 1/std, fused FMAs)
    return {} if backend == "reference" else {"rtol": 1e-5, "atol": 1e-5}


def _grads(out: torch.Tensor, g: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, params, g))


# ---------------------------------------------------------------------------------------------- VP padding


class VPPadPrompter(nn.Module):
    """VP (Bahng et al. 2022) PadPrompter, as published (square images, 3 channels)."""

    def __init__(self, image_size: int, pad_size: int) -> None:
        super().__init__()
        self.base_size = image_size - pad_size * 2
        self.pad_up = nn.Parameter(torch.randn([1, 3, pad_size, image_size]))
        self.pad_down = nn.Parameter(torch.randn([1, 3, pad_size, image_size]))
        self.pad_left = nn.Parameter(torch.randn([1, 3, image_size - pad_size * 2, pad_size]))
        self.pad_right = nn.Parameter(torch.randn([1, 3, image_size - pad_size * 2, pad_size]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = torch.zeros(1, 3, self.base_size, self.base_size, device=x.device)
        prompt = torch.cat([self.pad_left, base, self.pad_right], dim=3)
        prompt = torch.cat([self.pad_up, prompt, self.pad_down], dim=2)
        prompt = torch.cat(x.size(0) * [prompt])
        return x + prompt


def test_pad_prompter_vp_frame_count():
    m = PadPrompter(224, 30)
    assert m.num_parameters == 3 * (224 * 224 - 164 * 164) == 69_840
    assert int((m.delta != 0).sum()) == 69_840  # randn frame, zero interior
    assert m.delta.shape == (3, 224, 224) and m.delta.dtype == torch.float32
    m.delta.requires_grad_(False)
    assert m.num_parameters == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_pad_prompter_matches_vp(backend):
    S, p, B = 11, 3, 3
    torch.manual_seed(7)
    vp = VPPadPrompter(S, p)
    torch.manual_seed(7)
    m = PadPrompter(S, p, backend=backend)  # same seed -> same frame values as VP's four strips
    x = torch.randn(B, 3, S, S)
    out, ref = m(x), vp(x)
    assert out.shape == (B, 3, S, S) and out.dtype == torch.float32
    assert_close(out, ref, name="out", **_tol(backend))
    g = torch.randn_like(out)
    (dd,) = _grads(out, g, [m.delta])
    ref_grads = _grads(ref, g, [vp.pad_up, vp.pad_down, vp.pad_left, vp.pad_right])
    up, down, left, right = (t[0] for t in ref_grads)
    assert_close(dd[:, :p], up, name="d up", **_tol(backend))
    assert_close(dd[:, S - p:], down, name="d down", **_tol(backend))
    assert_close(dd[:, p:S - p, :p], left, name="d left", **_tol(backend))
    assert_close(dd[:, p:S - p, S - p:], right, name="d right", **_tol(backend))
    assert bool((dd[:, p:S - p, p:S - p] == 0).all()), "the interior of delta must get exactly zero gradient"


def test_pad_prompter_fused_normalisation_and_pairs():
    m = PadPrompter((9, 13), 2, channels=2, mean=(0.5, 0.25), std=(0.2, 0.4))
    x = torch.rand(2, 2, 9, 13)
    frame = torch.ones(9, 13)
    frame[2:7, 2:11] = 0
    ref = _norm(x, (0.5, 0.25), (0.2, 0.4)) + frame * m.delta
    assert_close(m(x), ref, name="out")
    assert m.num_parameters == 2 * (9 * 13 - 5 * 9)


# ------------------------------------------------------------------------------------- ILM-VP expansive


def ilmvp_expansive(x, program, out_size: int, mean, std):
    """ILM-VP ExpansiveVisualPrompt.forward: normalize(F.pad(x) + sigmoid(program) * mask)."""
    in_size = x.shape[-1]
    l_pad, r_pad = int((out_size - in_size + 1) / 2), int((out_size - in_size) / 2)
    mask = F.pad(torch.zeros(3, in_size, in_size), (l_pad, r_pad, l_pad, r_pad), value=1)
    v = F.pad(x, (l_pad, r_pad, l_pad, r_pad), value=0) + torch.sigmoid(program) * mask
    return _norm(v, mean, std)


def test_expansive_canvas7_image4_exact():
    m = ExpansivePrompter(7, input_size=4, mean=0.0, std=1.0)
    x = torch.rand(2, 3, 4, 4) * 0.4 + 0.55  # never 0.5
    out = m(x)
    assert out.shape == (2, 3, 7, 7)
    # top/left pad (7 - 4 + 1) // 2 = 2, bottom/right 1
    assert torch.equal(out[:, :, 2:6, 2:6], x)
    outside = torch.ones(7, 7, dtype=torch.bool)
    outside[2:6, 2:6] = False
    assert int(outside.sum()) == 33
    # delta = 0 -> sigmoid(0) = 0.5 outside, before normalisation (mean 0, std 1)
    assert bool((out[:, :, outside] == 0.5).all())
    assert ((out == 0.5).sum(dim=(-1, -2)) == 33).all()
    assert m.num_parameters == 3 * 33
    # no normalisation at all gives the same
    assert torch.equal(ExpansivePrompter(7, input_size=4, mean=None, std=None)(x), out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("S", "h"), [(11, 5), (10, 5), (9, 4)])
def test_expansive_matches_ilmvp(backend, S, h):
    m = ExpansivePrompter(S, input_size=h, backend=backend)
    with torch.no_grad():
        m.delta.normal_()
    x = torch.rand(3, 3, h, h)
    out = m(x)
    ref = ilmvp_expansive(x, m.delta, S, IMAGENET_MEAN, IMAGENET_STD)
    assert_close(out, ref, name="out", **_tol(backend))
    g = torch.randn_like(out)
    assert_close(_grads(out, g, [m.delta])[0], _grads(ref, g, [m.delta])[0], name="ddelta", **_tol(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_expansive_resize_then_pad_and_clamp(backend):
    # AutoVP-style: bilinear resize 3x3 -> 6x6, centred on a 9x9 canvas, tanh, clamp to [0, 1]
    m = ExpansivePrompter(9, input_size=3, resize=6, squash="tanh", clamp=(0.0, 1.0), mean=(0.4, 0.5, 0.6),
                          std=0.3, backend=backend)
    with torch.no_grad():
        m.delta.normal_()
    x = torch.rand(2, 3, 3, 3)
    placed = F.pad(F.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False), (2, 1, 2, 1))
    mask = F.pad(torch.zeros(6, 6), (2, 1, 2, 1), value=1)
    ref = _norm(torch.clamp(placed + torch.tanh(m.delta) * mask, 0, 1), (0.4, 0.5, 0.6), 0.3)
    out = m(x)
    assert_close(out, ref, name="out", **_tol(backend))
    g = torch.randn_like(out)
    assert_close(_grads(out, g, [m.delta])[0], _grads(ref, g, [m.delta])[0], name="ddelta", **_tol(backend))
    assert m.num_parameters == 3 * (81 - 36)


def test_expansive_non_square_and_gradient_under_image_is_zero():
    m = ExpansivePrompter((9, 12), input_size=(4, 5), mean=None, std=None)
    x = torch.rand(2, 3, 4, 5)
    out = m(x)
    top, left = (9 - 4 + 1) // 2, (12 - 5 + 1) // 2
    assert torch.equal(out[:, :, top:top + 4, left:left + 5], x)
    out.sum().backward()
    assert bool((m.delta.grad[:, top:top + 4, left:left + 5] == 0).all())
    assert_close(m.delta.grad[:, 0, 0], torch.full((3,), 2 * 0.25))  # B * sigmoid'(0)


# -------------------------------------------------------------------------------------- full watermark


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_prompter_post_norm(backend):
    m = FullPrompter(7, squash="tanh", mean=IMAGENET_MEAN, std=IMAGENET_STD, backend=backend)
    with torch.no_grad():
        m.delta.normal_()
    x = torch.rand(2, 3, 7, 7)
    ref = _norm(x, IMAGENET_MEAN, IMAGENET_STD) + torch.tanh(m.delta)
    out = m(x)
    assert_close(out, ref, name="out", **_tol(backend))
    g = torch.randn_like(out)
    assert_close(_grads(out, g, [m.delta])[0], _grads(ref, g, [m.delta])[0], name="ddelta", **_tol(backend))
    assert m.num_parameters == 3 * 49


def test_full_prompter_pre_norm_clamp_and_default():
    m = FullPrompter((5, 6), channels=1, squash="sigmoid", order="pre_norm", mean=0.5, std=0.25, clamp=(0, 1))
    with torch.no_grad():
        m.delta.normal_()
    x = torch.rand(3, 1, 5, 6)
    assert_close(m(x), (torch.clamp(x + torch.sigmoid(m.delta), 0, 1) - 0.5) / 0.25, name="out")
    plain = FullPrompter(5)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(plain(x), x)  # delta init 0, no squash, no norm
    with pytest.raises(ValueError, match="clamp"):
        FullPrompter(5, clamp=(0, 1))


# ------------------------------------------------------------------------------------------ VP patches


def vp_patch(x, patch, top, left):
    """VP's Random/FixedPatchPrompter.forward with a given position."""
    ph, pw = patch.shape[-2:]
    prompt = torch.zeros([1, x.shape[1], x.shape[2], x.shape[3]])
    prompt[:, :, top:top + ph, left:left + pw] = patch
    return x + prompt


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_prompter_matches_vp(backend):
    m = PatchPrompter(9, 3, seed=0, backend=backend)
    x = torch.randn(2, 3, 9, 9)
    for _ in range(3):
        out = m(x)
        top, left = m.last_position
        ref = vp_patch(x, m.delta, top, left)
        assert_close(out, ref, name="out", **_tol(backend))
        g = torch.randn_like(out)
        assert_close(_grads(out, g, [m.delta])[0], _grads(ref, g, [m.delta])[0], name="ddelta", **_tol(backend))
    assert m.num_parameters == 27


def test_patch_prompter_reproducible_positions():
    def positions(m, n=8):
        return [m(torch.zeros(1, 3, 11, 11)) is not None and m.last_position for _ in range(n)]

    a, b, c = (PatchPrompter(11, (3, 4), seed=s) for s in (123, 123, 9))
    pa = positions(a)
    assert pa == positions(b)
    assert pa != positions(c)
    a.manual_seed(123)
    assert positions(a) == pa
    # seeded from the global RNG when no seed is given
    torch.manual_seed(5)
    d = PatchPrompter(11, (3, 4))
    torch.manual_seed(5)
    e = PatchPrompter(11, (3, 4))
    assert positions(d) == positions(e) and torch.equal(d.delta, e.delta)
    # VP's randn draw for the patch
    torch.manual_seed(5)
    assert torch.equal(d.delta, torch.randn(1, 3, 3, 4)[0])
    # every position where the patch fits is reachable, nothing outside
    many = positions(a, 400)
    tops, lefts = {t for t, _ in many}, {l for _, l in many}
    assert tops == set(range(11 - 3 + 1)) and lefts == set(range(11 - 4 + 1))


def test_patch_prompter_fixed_position_in_eval():
    m = PatchPrompter(8, 2, seed=1)
    x = torch.randn(2, 3, 8, 8)
    m.eval()
    out = m(x)
    assert m.last_position == (0, 0)
    assert_close(out, vp_patch(x, m.delta, 0, 0), name="out")
    fixed = PatchPrompter(8, 2, random_position=False, position=(3, 5))
    fixed(x)
    assert fixed.last_position == (3, 5)
    with pytest.raises(ValueError, match="position"):
        PatchPrompter(8, 2, position=(7, 0))


# ----------------------------------------------------------------------------------------------- SMM


def smm_formula(x, program, mask_net, out_size: int, patch_size: int, mean, std):
    """SMM: normalize(r(x) + program * patchwise_interpolation(f_mask(r(x))))."""
    r = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False) \
        if x.shape[-1] != out_size else x
    att = mask_net(r)
    att = F.interpolate(att, scale_factor=patch_size, mode="nearest").expand(-1, x.shape[1], -1, -1)
    return _norm(r + program * att, mean, std)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("S", "h", "k", "mc"), [(12, 5, 4, 3), (9, 9, 1, 3), (8, 3, 2, 1)])
def test_smm_matches_formula(backend, S, h, k, mc):
    m = SampleSpecificMaskPrompter(S, input_size=h, patch_size=k, mask_channels=mc, layers=3, backend=backend)
    with torch.no_grad():
        m.delta.normal_()  # at init (delta = 0) the CNN gets no gradient: d out / d mask = delta
    x = torch.rand(3, 3, h, h)
    out = m(x)
    assert out.shape == (3, 3, S, S)
    ref = smm_formula(x, m.delta, m.mask_generator, S, k, IMAGENET_MEAN, IMAGENET_STD)
    assert_close(out, ref, name="out", **_tol(backend))
    g = torch.randn_like(out)
    params = [m.delta, *m.mask_generator.parameters()]
    got, want = _grads(out, g, params), _grads(ref, g, params)
    for i, (p, a, b) in enumerate(zip(params, got, want, strict=True)):
        # conv biases in front of a BatchNorm have a zero gradient in exact arithmetic (noise here)
        assert p.dim() == 1 or a.abs().sum() > 0, f"parameter {i} got no gradient"
        assert_close(a, b, name=f"grad of parameter {i}", rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-4)


def test_smm_default_shapes_and_parameters():
    m = SampleSpecificMaskPrompter(32, input_size=16, patch_size=8)
    x = torch.rand(2, 3, 16, 16)
    assert m.mask_generator(m.resize_input(x)).shape == (2, 3, 4, 4)
    out = m(x)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    cnn = sum(p.numel() for p in m.mask_generator.parameters())
    assert m.num_parameters == 3 * 32 * 32 + cnn
    # delta = 0 at init: the output is the normalised resized image
    assert_close(out, _norm(m.resize_input(x), IMAGENET_MEAN, IMAGENET_STD), name="out")
    with pytest.raises(ValueError, match="power of two"):
        SampleSpecificMaskPrompter(24, patch_size=6)
    with pytest.raises(ValueError, match="divide"):
        SampleSpecificMaskPrompter(20, patch_size=8)


# ------------------------------------------------------------------------------------- common behaviour


def _all_modules(backend: str = "auto") -> list[tuple[nn.Module, int, int]]:
    """(module, input size, canvas size)."""
    return [
        (PadPrompter(9, 2, backend=backend), 9, 9),
        (ExpansivePrompter(9, input_size=5, backend=backend), 5, 9),
        (FullPrompter(9, squash="sigmoid", order="pre_norm", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      backend=backend), 9, 9),
        (PatchPrompter(9, 3, seed=0, backend=backend), 9, 9),
        (SampleSpecificMaskPrompter(8, input_size=5, patch_size=2, layers=3, backend=backend), 5, 8),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_gradients(dtype):
    for m, h, S in _all_modules():
        name = type(m).__name__
        with torch.no_grad():
            m.delta.normal_()
        x = torch.rand(2, 3, h, h).to(dtype)
        out = m(x)
        assert out.dtype == dtype and out.shape == (2, 3, S, S) and out.is_contiguous(), name
        out.float().square().sum().backward()
        assert m.delta.grad is not None and m.delta.grad.dtype == torch.float32, name
        assert m.delta.grad.abs().sum() > 0, name
        if isinstance(m, SampleSpecificMaskPrompter):
            weights = [p for p in m.mask_generator.parameters() if p.dim() > 1]
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights), name
        # in eval mode (fixed patch position, BN running stats) x's precision agrees with float32
        m.eval()
        assert_close(m(x).float(), m(x.float()), dtype=dtype, scale=4, name=name)


def test_float64_on_reference():
    for m, h, S in _all_modules("reference"):
        m.double()
        out = m(torch.rand(2, 3, h, h, dtype=torch.float64))
        assert out.dtype == torch.float64 and out.shape == (2, 3, S, S)


def test_state_dict_and_buffers():
    m = ExpansivePrompter(9, input_size=5)
    assert set(m.state_dict()) == {"delta"}  # mean/std are constants of the recipe
    assert m.mean.dtype == torch.float32 and m.mean.tolist() == pytest.approx(IMAGENET_MEAN)
    n = ExpansivePrompter(9, input_size=5)
    with torch.no_grad():
        m.delta.normal_()
    n.load_state_dict(m.state_dict())
    x = torch.rand(1, 3, 5, 5)
    assert torch.equal(m(x), n(x))
    s = SampleSpecificMaskPrompter(8, patch_size=2, layers=3)
    assert "delta" in s.state_dict() and any(k.startswith("mask_generator.") for k in s.state_dict())


def test_freeze_backbone_and_training_step():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    backbone(torch.zeros(1, 3, 9, 9))  # materialise the lazy layer
    assert freeze_backbone(backbone) is backbone
    assert all(not p.requires_grad for p in backbone.parameters())
    assert backbone.training  # mode untouched
    prompter = ExpansivePrompter(9, input_size=5)
    opt = torch.optim.SGD(prompter.parameters(), lr=1.0)
    before = prompter.delta.detach().clone()
    loss = F.cross_entropy(backbone(prompter(torch.rand(4, 3, 5, 5))), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in backbone.parameters())
    assert not torch.equal(prompter.delta, before)


def test_input_errors():
    with pytest.raises(ValueError, match=r"x: expected images of image_size \(9, 9\)"):
        PadPrompter(9, 2)(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="C=3"):
        PadPrompter(9, 2)(torch.rand(1, 1, 9, 9))
    with pytest.raises(ValueError, match="pad_size"):
        PadPrompter(9, 5)
    with pytest.raises(ValueError, match="backend"):
        PadPrompter(9, 2, backend="nope")
    with pytest.raises(ValueError, match="input_size"):
        ExpansivePrompter(9, input_size=5)(torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="larger than"):
        ExpansivePrompter(9, resize=10)
    with pytest.raises(ValueError, match="std"):
        ExpansivePrompter(9, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="mean"):
        FullPrompter(9, mean=(0.1, 0.2))


def test_auto_backend_follows_use_backend():
    from reprokernels import use_backend

    m = ExpansivePrompter(9, input_size=5)
    x = torch.rand(2, 3, 5, 5)
    with use_backend("reference"):
        a = m(x)
    assert torch.equal(a, ExpansivePrompter(9, input_size=5, backend="reference")(x))


def test_module_compiles_fullgraph():
    m = ExpansivePrompter(12, input_size=5, backend="reference")
    with torch.no_grad():
        m.delta.normal_()
    x = torch.rand(2, 3, 5, 5)
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    out = compiled(x)
    (got,) = torch.autograd.grad(out, [m.delta], torch.ones_like(out))
    ref = m(x)
    (want,) = torch.autograd.grad(ref, [m.delta], torch.ones_like(ref))
    assert_close(out, ref, name="out")
    assert_close(got, want, name="ddelta")
