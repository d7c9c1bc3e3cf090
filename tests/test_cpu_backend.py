"""The cpu backend (reprokernels._C_cpu, csrc/cpu/) against the reference: every op, options, forward and every
gradient, odd shapes, non-contiguous and stride-0 inputs, float32/float16/bfloat16, 1 vs 2 threads bitwise
equal, opcheck, torch.compile(fullgraph=True), bad input, and how auto routes."""

from __future__ import annotations

import itertools

import pytest
import torch

import reprokernels as rk
from reprokernels import _backend, _cpu
from reprokernels._backend import BackendUnavailableError, resolve_backend
from tests.utils import as_layout, assert_close, grads_match_compiled, with_threads

pytestmark = pytest.mark.skipif(not _cpu.available(), reason=f"cpu backend not built: {_cpu.unavailable_reason()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "strided", "transposed"]
CPU = torch.device("cpu")


def _tol(dtype, scale=1.0):
    # vs a float32 reference: the 16-bit rounding of an output dominates; float32 differs only in exp/sum order
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * scale


def _bitwise_same_1_vs_2(fn):
    a, b = with_threads(1, fn), with_threads(2, fn)
    for x, y in zip(a, b, strict=True):
        if x is not None:
            assert torch.equal(x.view(torch.uint8) if x.dtype != torch.bool else x,
                               y.view(torch.uint8) if y.dtype != torch.bool else y)


def _run(fn, params, backend):
    """Forward and gradients of sum(out * weights) w.r.t. every tensor in params that requires grad."""
    ps = [p.detach().clone().requires_grad_(p.requires_grad) if p.is_floating_point() else p for p in params]
    out = fn(*ps, backend)
    g = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    diff = [p for p in ps if p.requires_grad]
    grads = torch.autograd.grad((out.float() * g).sum(), diff, allow_unused=True) if diff else ()
    return (out, *grads)


def _compare(fn, params, dtype, scale=1.0, names=()):
    got = _run(fn, params, "cpu")
    ref_params = [p.float() if p.is_floating_point() else p for p in params]
    want = _run(fn, [p.detach().requires_grad_(q.requires_grad) if p.is_floating_point() else p
                     for p, q in zip(ref_params, params, strict=True)], "reference")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        tol = _tol(dtype, scale)
        mag = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
        assert_close(a.float(), b.float(), rtol=tol, atol=tol * mag, name=(names[i] if i < len(names) else str(i)))
    _bitwise_same_1_vs_2(lambda: _run(fn, params, "cpu"))


# ---------------------------------------------------------------- label_map

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("input", ["logits", "probs", "log_probs"])
# (many_sparse: 6 entries in 53 columns, E * 8 < K, the backward's sparse path with -1 entries and a repeat)
@pytest.mark.parametrize("kind", ["one", "many_mean", "many_sum", "many_sparse", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_label_map_matches_reference(dtype, input, kind, layout):
    g = torch.Generator().manual_seed(hash((str(dtype), input, kind, layout)) % 1000)
    B, K = 7, 53
    x = as_layout((torch.randn(B, K, generator=g) * 3).to(dtype), layout).requires_grad_()
    if kind == "one":
        mapping, reduce = torch.randint(0, K, (5,), generator=g), "mean"
    elif kind == "dense":
        mapping, reduce = torch.rand(K, 4, generator=g).requires_grad_(), "mean"
    elif kind == "many_sparse":
        mapping, reduce = torch.randint(0, K, (2, 3), generator=g), "mean"
        mapping[0, 1] = -1
        mapping[1, 2] = mapping[1, 0]  # a repeated entry
    else:
        mapping = torch.randint(-1, K, (6, 3), generator=g)
        mapping[2] = -1
        mapping[3, 1] = mapping[3, 0]  # a repeated entry
        reduce = "mean" if kind == "many_mean" else "sum"

    def fn(x, mapping, backend):
        return rk.label_map(x, mapping, reduce=reduce, input=input, backend=backend)

    _compare(fn, [x, mapping], dtype, scale=4 if kind == "dense" else 1)


def test_label_map_stride0_grad_and_logits():
    x = torch.randn(1, 40).expand(5, 40).requires_grad_()
    mapping = torch.tensor([[3, 7], [39, -1]])

    def fn(x, mapping, backend):
        return rk.label_map(x, mapping, input="log_probs", backend=backend)

    _compare(fn, [x, mapping], torch.float32)


def test_label_map_vocab_row_bitwise_threads():
    x = torch.randn(6, 128_256)
    idx = torch.randint(0, 128_256, (10,))
    _bitwise_same_1_vs_2(lambda: rk.label_map(x, idx, input="log_probs", backend="cpu").unsqueeze(0))
    assert_close(rk.label_map(x, idx, input="log_probs", backend="cpu"), torch.log_softmax(x, -1)[:, idx],
                 rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- soft_prompt_concat

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ids", [True, False])
@pytest.mark.parametrize("table", [False, True])
@pytest.mark.parametrize("insert", [False, True])
@pytest.mark.parametrize("B", [5, 3])  # a float32 prompt with 16-bit tokens: rounded once (B > T) or per row
def test_soft_prompt_matches_reference(dtype, ids, table, insert, B):
    g = torch.Generator().manual_seed(3)
    L, P, D, V, T = 7, 3, 13, 11, 4
    prompt = torch.randn(*((T,) if table else ()), P, D, generator=g).requires_grad_()
    task_ids = torch.randint(0, T, (B,), generator=g, dtype=torch.int32) if table else None
    insert_at = torch.randint(0, L + 1, (B,), generator=g) if insert else None
    if ids:
        weight = torch.randn(V, D, generator=g).to(dtype)
        input_ids = torch.randint(0, V, (B, L), generator=g).to(torch.int16)
        tokens = [input_ids, weight]
    else:
        tokens = [as_layout(torch.randn(B, L, D, generator=g).to(dtype), "strided").requires_grad_()]

    def fn(prompt, *rest):
        *tok, backend = rest
        if ids:
            kw = dict(input_ids=tok[0], embedding_weight=tok[1])
        else:
            kw = dict(inputs_embeds=tok[0])
        return rk.soft_prompt_concat(prompt, task_ids=task_ids, insert_at=insert_at, embed_scale=1.5, backend=backend,
                                     **kw).inputs_embeds

    _compare(fn, [prompt, *tokens], dtype)


def test_soft_prompt_stride0_prompt_and_grad():
    prompt = torch.randn(1, 8).expand(4, 8).requires_grad_()
    emb = torch.randn(2, 1, 8).expand(2, 5, 8).requires_grad_()

    def fn(prompt, emb, backend):
        return rk.soft_prompt_concat(prompt, inputs_embeds=emb, backend=backend).inputs_embeds

    _compare(fn, [prompt, emb], torch.float32)


# ---------------------------------------------------------------- visual_prompt

VP_CASES = [
    dict(),
    dict(mask="full", squash="sigmoid"),
    dict(mask="frame", mask_width=2, squash="tanh", clamp=(0.1, 0.9), mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4]),
    dict(mask="patch", patch=(1, 2, 4, 5), order="post_norm", mean=0.5, std=0.25),
    dict(offset=(0, 3), fill=0.5, clamp=(0.0, 1.0)),
    dict(mask="tensor_patch"),
    dict(mask="tensor_sample", squash="sigmoid"),
    dict(per_sample=True, squash="tanh"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(VP_CASES)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_visual_prompt_matches_reference(dtype, case, layout):
    kw = dict(VP_CASES[case])
    g = torch.Generator().manual_seed(case)
    B, C, h, w, H, W = 3, 3, 5, 6, 11, 12
    x = as_layout(torch.rand(B, C, h, w, generator=g).to(dtype), layout).requires_grad_()
    delta = torch.randn(*((B,) if kw.pop("per_sample", False) else ()), C, H, W, generator=g).requires_grad_()
    params = [x, delta]
    if kw.get("mask") == "tensor_patch":
        params.append(torch.rand(1, C, H // 11, W // 4, generator=g).requires_grad_())
    elif kw.get("mask") == "tensor_sample":
        params.append(torch.rand(B, 1, H, W, generator=g).requires_grad_())

    def fn(x, delta, *rest):
        *m, backend = rest
        opts = dict(kw)
        if m:
            opts["mask"] = m[0]
        return rk.visual_prompt(x, delta, backend=backend, **opts)

    _compare(fn, params, dtype, scale=2, names=("out", "dx", "ddelta", "dmask"))


def test_visual_prompt_stride0_delta():
    x = torch.rand(2, 3, 4, 4).requires_grad_()
    delta = torch.randn(3, 1, 1).expand(3, 8, 8).requires_grad_()

    def fn(x, delta, backend):
        return rk.visual_prompt(x, delta, squash="sigmoid", backend=backend)

    _compare(fn, [x, delta], torch.float32)


def test_visual_prompt_resize_is_unsupported():
    x, delta = torch.rand(2, 3, 4, 4), torch.zeros(3, 12, 12)
    with pytest.raises(BackendUnavailableError, match="resize: the cpu backend does not implement"):
        rk.visual_prompt(x, delta, resize=8, backend="cpu")
    assert "resize='bilinear'" in _backend.cpu_supports("visual_prompt", ("dtype=float32", "resize=bilinear"))


def test_visual_prompt_masked_delta_is_never_read():
    """Where the mask is exactly 0, delta is not read (NaN / inf there change nothing) and its gradient is 0; a
    tensor mask's own gradient there is still grad * g(delta) (contract: docs/contracts.md)."""
    x = torch.rand(2, 3, 4, 4)
    for squash in ("none", "sigmoid", "tanh"):
        for delta_dtype in (torch.float32, torch.float16):
            delta = torch.randn(3, 8, 8)
            delta[:, 2:6, 2:6] = float("inf")  # under the image: mask 0 for "outside"
            delta[:, 3, 3] = float("nan")
            delta = delta.to(delta_dtype).requires_grad_()
            out = rk.visual_prompt(x, delta, squash=squash, clamp=(0.0, 1.0), backend="cpu")
            out.backward(torch.ones_like(out))
            assert torch.isfinite(out).all() and torch.isfinite(delta.grad).all()
            assert not delta.grad[:, 2:6, 2:6].any()
            want = rk.visual_prompt(x, delta.detach(), squash=squash, clamp=(0.0, 1.0), backend="reference")
            assert_close(out, want)
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 0, :] = 0.0
    delta = torch.randn(3, 8, 8)
    delta[:, 0, :] = -float("inf")
    delta.requires_grad_()
    m = mask.clone().requires_grad_()
    out = rk.visual_prompt(x, delta, mask=m, squash="sigmoid", backend="cpu")
    out.backward(torch.ones_like(out))
    assert torch.isfinite(out).all() and not delta.grad[:, 0].any()
    assert torch.equal(m.grad[..., 0, :], torch.zeros_like(m.grad[..., 0, :]))  # sigmoid(-inf) = 0: grad * 0


@pytest.mark.parametrize("case", ["B=0", "C=0", "h=0", "w=0"])
def test_visual_prompt_degenerate_sizes(case):
    B, C, h, w = (0 if f"{n}=0" == case else v for n, v in zip(("B", "C", "h", "w"), (2, 3, 4, 4), strict=True))
    x, delta = torch.rand(B, C, h, w).requires_grad_(), torch.randn(C, 8, 8).requires_grad_()
    outs = []
    for backend in ("cpu", "reference"):
        xx, dd = x.detach().clone().requires_grad_(), delta.detach().clone().requires_grad_()
        out = rk.visual_prompt(xx, dd, squash="sigmoid", backend=backend)
        out.backward(torch.ones_like(out))
        outs.append((out, xx.grad, dd.grad))
    for a, b in zip(*outs, strict=True):
        assert a.shape == b.shape
        assert_close(a, b)


@pytest.mark.parametrize("case", ["B=0", "L=0", "P=0", "D=0", "V=0"])
def test_soft_prompt_degenerate_sizes(case):
    B, L, P, D, V = (0 if f"{n}=0" == case else v for n, v in zip("BLPDV", (3, 5, 2, 4, 10), strict=True))
    L = 0 if case == "V=0" else L
    prompt, emb = torch.randn(P, D).requires_grad_(), torch.randn(V, D)
    ids, embeds = torch.randint(0, max(V, 1), (B, L)), torch.randn(B, L, D)
    for backend_out in (
        lambda b: rk.soft_prompt_concat(prompt, input_ids=ids, embedding_weight=emb, backend=b).inputs_embeds,
        lambda b: rk.soft_prompt_concat(prompt, inputs_embeds=embeds, backend=b).inputs_embeds,
    ):
        got, want = backend_out("cpu"), backend_out("reference")
        assert got.shape == want.shape
        assert_close(got, want)
        (g,) = torch.autograd.grad(got.sum(), prompt, allow_unused=True, materialize_grads=True)
        (r,) = torch.autograd.grad(want.sum(), prompt, allow_unused=True, materialize_grads=True)
        assert_close(g, r)


def test_label_map_degenerate_sizes():
    x = torch.randn(5, 7, requires_grad=True)
    for mapping in (torch.zeros(0, 2, dtype=torch.long), torch.zeros(3, 0, dtype=torch.long), torch.rand(7, 0)):
        for input in ("logits", "probs", "log_probs"):
            got = rk.label_map(x, mapping, input=input, backend="cpu")
            want = rk.label_map(x, mapping, input=input, backend="reference")
            assert got.shape == want.shape and got.dtype == want.dtype
            assert_close(got, want)
            (gx,) = torch.autograd.grad(got.sum(), x)
            assert_close(gx, torch.zeros_like(gx))
    got = rk.label_map(torch.randn(0, 7), torch.tensor([1, 2]), input="probs", backend="cpu")
    assert got.shape == (0, 2)


# ---------------------------------------------------------------- label_histogram

@pytest.mark.parametrize("layout", ["transposed", "contiguous"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight,topk", [("count", None), ("prob", None), ("prob", 3), ("prob", 1)])
def test_label_histogram_matches_reference(dtype, weight, topk, layout):
    g = torch.Generator().manual_seed(5)
    x = as_layout(torch.randn(41, 17, generator=g).to(dtype), layout)
    x[3, 4] = x[3, 5] = x[3].max() + 1  # ties
    y = torch.randint(0, 5, (41,), generator=g)
    start = torch.rand(17, 5)
    got = rk.label_histogram(x, y, 17, 5, weight=weight, topk=topk, out=start.clone(), backend="cpu")
    want = rk.label_histogram(x, y, 17, 5, weight=weight, topk=topk, out=start.clone(), backend="reference")
    assert_close(got, want, rtol=1e-6, atol=1e-6)
    _bitwise_same_1_vs_2(lambda: (rk.label_histogram(x, y, 17, 5, weight=weight, topk=topk, backend="cpu"),))


def test_label_histogram_integer_predictions():
    preds, y = torch.randint(0, 9, (100,), dtype=torch.int32), torch.randint(0, 4, (100,))
    assert torch.equal(rk.label_histogram(preds, y, 9, 4, backend="cpu"),
                       rk.label_histogram(preds, y, 9, 4, backend="reference"))


# ---------------------------------------------------------------- registration, compile, errors, routing

def test_opcheck():
    x = torch.randn(4, 33)
    for mapping in (torch.tensor([[1, 5, -1], [0, 0, 32]]), torch.rand(33, 3)):
        for input in ("logits", "probs", "log_probs"):
            torch.library.opcheck(torch.ops.reprokernels.label_map_fwd, (x, mapping, "mean", input, "cpu"))
            out, lse = torch.ops.reprokernels.label_map_fwd(x, mapping, "mean", input, "cpu")
            torch.library.opcheck(torch.ops.reprokernels.label_map_bwd,
                                  (torch.randn_like(out), x, mapping, out, lse, "mean", input,
                                   [True, mapping.is_floating_point()], "cpu"))
    prompt, emb = torch.randn(3, 8), torch.randn(2, 5, 8)
    torch.library.opcheck(torch.ops.reprokernels.soft_prompt_concat_fwd,
                          (prompt, None, emb, None, None, torch.tensor([0, 2]), 1.0, "cpu"))
    torch.library.opcheck(torch.ops.reprokernels.soft_prompt_concat_bwd,
                          (torch.randn(2, 8, 8), prompt, None, torch.tensor([0, 2]), 5, 1.0, [True, True], "cpu"))
    out = torch.zeros(6, 3)
    torch.library.opcheck(torch.ops.reprokernels.label_histogram_accumulate,
                          (out, torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1]), 2, "prob", "cpu"))


def test_visual_prompt_opcheck():
    from reprokernels.ops.visual_prompt import prepare
    x, delta = torch.rand(2, 3, 4, 4), torch.randn(3, 8, 8)
    mask, mean, std, spec = prepare(x, delta, squash="sigmoid", mean=0.5, std=0.2, clamp=(0, 1))
    ints, floats, modes = spec.to_schema()
    torch.library.opcheck(torch.ops.reprokernels.visual_prompt_fwd,
                          (x, delta, mask, mean, std, ints, floats, modes, "cpu"))
    torch.library.opcheck(torch.ops.reprokernels.visual_prompt_bwd,
                          (torch.randn(2, 3, 8, 8), x, delta, mask, mean, std, ints, floats, modes,
                           [True, True, False], "cpu"))


def test_torch_compile_fullgraph():
    mapping = torch.tensor([[1, 5, -1], [0, 0, 32]])
    x = torch.randn(4, 33, requires_grad=True)

    def loss_fn(x):
        return torch.nn.functional.cross_entropy(rk.label_map(x, mapping, input="log_probs", backend="cpu"),
                                                 torch.tensor([0, 1, 1, 0]))

    grads_match_compiled(loss_fn, x)


def test_float64_is_refused_by_name():
    with pytest.raises(TypeError, match="logits"):
        rk.label_map(torch.randn(2, 5, dtype=torch.float64), torch.tensor([1]), backend="cpu")
    with pytest.raises(BackendUnavailableError, match="x: the cpu backend supports float32"):
        from reprokernels.cpu import visual_prompt as vp
        from reprokernels.reference.visual_prompt import VPSpec
        vp.visual_prompt(torch.rand(1, 1, 2, 2, dtype=torch.float64), torch.zeros(1, 2, 2), None, None, None,
                         VPSpec(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, True, "none", "pre_norm", "none", False, 0.0,
                                float("-inf"), float("inf")))


def test_explicit_cpu_on_cuda_like_device_is_refused():
    ok, why = _backend.backend_status("cpu", "cuda")
    assert not ok and "needs CPU tensors" in why


def test_auto_routes_to_cpu_only_for_a_supported_case():
    for op in _backend.CPU_LAUNCHERS:
        assert resolve_backend(op, "auto", CPU) in ("reference", "composite")  # no case: today's choice
    lm = ("mapping=index", "mapping_dtype=torch.int64", "input=log_probs")
    assert resolve_backend("label_map", "auto", CPU, case=("dtype=torch.float32", *lm)) == "cpu"
    assert resolve_backend("label_map", "auto", CPU, case=("dtype=torch.float64", *lm)) == "reference"
    assert resolve_backend("label_map", "auto", CPU, case=("dtype=torch.bfloat16", *lm)) == "cpu"
    assert resolve_backend("label_map", "auto", CPU, case=("dtype=torch.float32", "mapping=index",
                                                           "mapping_dtype=torch.int64", "input=logits")) == "cpu"
    assert resolve_backend("label_map", "auto", CPU, case=("dtype=torch.float32", "mapping=dense",
                                                           "mapping_dtype=torch.float32", "input=probs")) == "reference"
    vp = ("resize=none", "mask=fixed", "delta=shared")
    assert resolve_backend("visual_prompt", "auto", CPU, case=("dtype=torch.float32", *vp)) == "cpu"
    assert resolve_backend("visual_prompt", "auto", CPU, case=("dtype=torch.bfloat16", *vp)) == "cpu"
    assert resolve_backend("visual_prompt", "auto", CPU, case=("dtype=torch.float64", *vp)) == "reference"
    assert resolve_backend("visual_prompt", "auto", CPU,
                           case=("dtype=torch.float32", "resize=nearest", "mask=fixed", "delta=shared")) == "reference"
    assert resolve_backend("visual_prompt", "auto", CPU,
                           case=("dtype=torch.float32", "resize=none", "mask=tensor", "delta=shared")) == "cpu"
    assert resolve_backend("visual_prompt", "auto", CPU,
                           case=("dtype=torch.float16", "resize=none", "mask=tensor", "delta=per_sample")) == "cpu"
    assert resolve_backend("label_histogram", "auto", CPU, case=("dtype=torch.float32", "weight=count")) == "cpu"
    assert resolve_backend("label_histogram", "auto", CPU, case=("dtype=torch.float32", "weight=prob")) == "cpu"
    assert resolve_backend("label_histogram", "auto", CPU, case=("dtype=torch.int64", "weight=count")) == "reference"
    assert resolve_backend("label_histogram", "auto", CPU, case=("dtype=torch.float16", "weight=count")) == "cpu"
    assert resolve_backend("soft_prompt_concat", "auto", CPU,
                           case=("prompt_dtype=torch.float32", "tokens_dtype=torch.float32")) == "cpu"
    assert resolve_backend("soft_prompt_concat", "auto", CPU,
                           case=("prompt_dtype=torch.float32", "tokens_dtype=torch.float64")) == "reference"
    assert resolve_backend("soft_prompt_concat", "auto", CPU,
                           case=("prompt_dtype=torch.float32", "tokens_dtype=torch.bfloat16")) == "cpu"


def test_auto_through_the_ops_picks_what_was_measured():
    """The ops pass their case: auto runs the cpu kernels on the measured cases and the reference elsewhere."""
    import unittest.mock as um

    from reprokernels.cpu import label_map as clm
    from reprokernels.cpu import visual_prompt as cvp
    x = torch.randn(4, 9)
    with um.patch.object(clm, "label_map", wraps=clm.label_map) as spy:
        rk.label_map(x, torch.tensor([1, 3]), input="log_probs")
        assert spy.call_count == 1
        rk.label_map(x, torch.rand(9, 2), input="probs")  # dense: not measured faster, the reference serves it
        assert spy.call_count == 1
    with um.patch.object(cvp, "visual_prompt", wraps=cvp.visual_prompt) as spy:
        rk.visual_prompt(torch.rand(2, 3, 4, 4), torch.zeros(3, 8, 8), mask="frame", mask_width=2)
        assert spy.call_count == 1
        rk.visual_prompt(torch.rand(2, 3, 4, 4), torch.zeros(3, 8, 8), mask=torch.rand(1, 1, 8, 8))
        assert spy.call_count == 2  # tensor masks: measured faster too
        rk.visual_prompt(torch.rand(2, 3, 4, 4), torch.zeros(3, 8, 8), resize=2)  # resize: the reference
        assert spy.call_count == 2


def test_info_reports_the_cpu_module():
    import io
    buf = io.StringIO()
    rk.info(file=buf)
    text = buf.getvalue()
    assert "_C_cpu" in text and "cpu " in text


@pytest.mark.parametrize("op,kw", list(itertools.product(["label_map"], [{}])))
def test_bad_input_names_the_argument(op, kw):
    with pytest.raises(ValueError, match="backend: expected one of auto, reference, triton, cuda, composite, cpu"):
        rk.label_map(torch.randn(2, 5), torch.tensor([1]), backend="fast")


# T: one partial tile (1, 15), one full (16), full + tail (17), every tile width of the AVX-512 set (40, 70) and
# more columns than one pass of tiles takes (130); B: rows in no multiple of the tile's 2 or 6
@pytest.mark.parametrize("T", [1, 15, 16, 17, 40, 70, 130])
@pytest.mark.parametrize("input", ["logits", "probs", "log_probs"])
def test_label_map_dense_tiles_match_reference(T, input):
    g = torch.Generator().manual_seed(T)
    B, K = 13, 37
    x = (torch.randn(B, K, generator=g) * 3).requires_grad_()
    mapping = torch.randn(K, T, generator=g)

    def fn(x, mapping, backend):
        return rk.label_map(x, mapping, input=input, backend=backend)

    _compare(fn, [x, mapping], torch.float32, scale=4)


# The packed, blocked GEMM (gemm_tile.h: gemm_blocked): K over several blocks of the inner dimension (blocks of 64
# to 1024 sources: sums continued from C), 1, 2 and 3 rows (fewer row tiles than threads: the panels split too), a row
# count in no multiple of the tile, T in no multiple of 16; float32 in place and bf16 / strided rows converted per
# block, softmax inputs transformed per block from the row statistics.
# (the backward: dx = grad W^T, blocks of columns of K; T > 1024: several blocks of its inner dimension too)
@pytest.mark.parametrize("B,K,T", [(1, 700, 100), (3, 1500, 130), (29, 2100, 5), (8, 1000, 33), (2, 1300, 1030)])
@pytest.mark.parametrize("dtype,layout,input", [(torch.float32, "contiguous", "logits"),
                                                (torch.bfloat16, "contiguous", "log_probs"),
                                                (torch.float32, "transposed", "probs")])
def test_label_map_dense_blocked_gemm_matches_reference(B, K, T, dtype, layout, input):
    g = torch.Generator().manual_seed(B * K + T)
    x = as_layout((torch.randn(B, K, generator=g) * 3).to(dtype), layout).requires_grad_()
    mapping = torch.randn(K, T, generator=g) / K ** 0.5

    def fn(x, mapping, backend):
        return rk.label_map(x, mapping, input=input, backend=backend)

    _compare(fn, [x, mapping], dtype, scale=4)


def test_label_map_dense_blocked_gemm_with_a_call_local_partial_sum_buffer():
    """More than 8 MiB of partial sums (rows x padded targets, kept between blocks of K): the call's own buffer."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2100, 1100, generator=g)
    w = torch.randn(1100, 1030, generator=g) / 33
    got = rk.label_map(x, w, backend="cpu")
    assert_close(got, rk.label_map(x, w, backend="reference"), rtol=1e-4, atol=1e-4)
    _bitwise_same_1_vs_2(lambda: [rk.label_map(x, w, backend="cpu")])


@pytest.mark.parametrize("tiles", ["1", "wide"])
def test_label_map_dense_portable_tiles_match_reference(tiles):
    """The baseline (SSE2) tiles, forced in a fresh process: what a CPU without AVX2 runs; "wide": the same tiles 64
    columns wide, the AVX-512 set's panel width (packed panels of 64, partial panels of 16-48 columns, B read in
    place in 16-column groups at few rows), which this suite cannot otherwise run on a CPU without AVX-512."""
    import os
    import subprocess
    import sys
    code = (
        "import torch, reprokernels as rk\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for B, K, T, inp in ((7, 29, 3, 'log_probs'), (7, 29, 16, 'logits'), (3, 29, 21, 'probs'),\n"
        "                     (9, 1500, 130, 'log_probs'), (2, 700, 70, 'logits'), (5, 300, 1030, 'probs')):\n"
        "    x = torch.randn(B, K, generator=g, dtype=torch.float32).to(torch.bfloat16).requires_grad_()\n"
        "    w = torch.randn(K, T, generator=g) / K ** 0.5\n"
        "    out = rk.label_map(x, w, input=inp, backend='cpu')\n"
        "    want = rk.label_map(x.float(), w, input=inp, backend='reference')\n"
        "    assert torch.allclose(out.float(), want, rtol=1e-2, atol=1e-2), (B, K, T, (out - want).abs().max())\n"
        "    dy = torch.randn(out.shape, generator=g)\n"
        "    (a,) = torch.autograd.grad(out, x, dy.to(out.dtype))\n"
        "    (b,) = torch.autograd.grad(want, x, dy)\n"
        "    assert torch.allclose(a.float(), b.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2), (B, K, T)\n"
        "print('ok')\n")
    env = dict(os.environ, REPROKERNELS_CPU_PORTABLE_TILES=tiles)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_auto_runs_skinny_dense_maps_of_many_logits_on_the_cpu_kernel():
    """dense_serves: few targets and many logits in eager mode take the kernel; else the reference (a GEMM)."""
    import unittest.mock as um

    from reprokernels.cpu import label_map as clm
    big = torch.randn(clm.DENSE_MIN_LOGITS // 64, 64)
    with um.patch.object(clm, "label_map", wraps=clm.label_map) as spy:
        w = torch.rand(64, clm.DENSE_MAX_TARGETS)
        assert_close(rk.label_map(big, w), big @ w, rtol=1e-5, atol=1e-4)
        assert spy.call_count == 1
        rk.label_map(big, torch.rand(64, clm.DENSE_MAX_TARGETS + 1))  # more targets: the GEMM
        rk.label_map(big[:-1], w)  # fewer logits
        rk.label_map(big, w.clone().requires_grad_())  # a learnable map: d mapping is the GEMM's
        rk.label_map(big.double(), w)  # float64: the reference's
        rows = clm.DENSE_MIN_ROWS - 1
        cols = clm.DENSE_MIN_LOGITS // rows + 1
        rk.label_map(torch.randn(rows, cols), torch.rand(cols, 3))  # few rows (of enough logits)
        long_rows = torch.randn(clm.DENSE_MIN_ROWS, clm.DENSE_SOFTMAX_MAX_SOURCES + 1)
        rk.label_map(long_rows, torch.rand(long_rows.shape[1], 3), input="probs")  # softmax input, long rows
        assert spy.call_count == 1
        rk.label_map(long_rows, torch.rand(long_rows.shape[1], 3))  # the same rows as logits: the kernel
        assert spy.call_count == 2


def test_auto_runs_dense_maps_of_very_many_logits_with_a_gradient_on_the_cpu_kernel(monkeypatch):
    """dense_serves' second rule: any number of targets where the logits get a gradient and are very many (the
    threshold lowered here, so the test stays small); without a gradient the reference serves."""
    import unittest.mock as um

    from reprokernels.cpu import label_map as clm
    monkeypatch.setattr(clm, "DENSE_GRAD_MIN_LOGITS", 64 * 50)
    monkeypatch.setattr(clm, "DENSE_GRAD_MIN_ROWS", 49)
    x = torch.randn(50, 64, requires_grad=True)
    w = torch.rand(64, 40)  # (more targets than the first rule takes)
    g = torch.randn(50, 40)
    with um.patch.object(clm, "label_map_backward", wraps=clm.label_map_backward) as spy:
        (dx,) = torch.autograd.grad(rk.label_map(x, w, input="log_probs"), x, g)
        assert spy.call_count == 1
        (want,) = torch.autograd.grad(rk.label_map(x, w, input="log_probs", backend="reference"), x, g)
        assert_close(dx, want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            rk.label_map(x, w)  # no gradient: the reference
        rk.label_map(x[:-1], w).sum().backward()  # fewer logits
        monkeypatch.setattr(clm, "DENSE_GRAD_MIN_ROWS", 51)
        rk.label_map(x, w).sum().backward()  # fewer rows
        assert spy.call_count == 1


def test_use_backend_overrides_the_eager_shortcuts():
    """use_backend(name) makes auto mean name: neither label_map's column gather nor its dense size rule runs."""
    import unittest.mock as um

    from reprokernels.cpu import label_map as clm
    big = torch.randn(clm.DENSE_MIN_LOGITS // 64, 64)
    w = torch.rand(64, 3)
    with um.patch.object(torch, "index_select", wraps=torch.index_select) as gather, \
            um.patch.object(clm, "label_map", wraps=clm.label_map) as kernel:
        rk.label_map(big, torch.tensor([5, 0]))
        rk.label_map(big, w)
        assert gather.call_count == 1 and kernel.call_count == 1
        with rk.use_backend("reference"):
            assert torch.equal(rk.label_map(big, torch.tensor([5, 0])), big[:, [5, 0]])
            assert_close(rk.label_map(big, w), big @ w, rtol=1e-5, atol=1e-4)
        assert gather.call_count == 1 and kernel.call_count == 1


def test_dense_size_rule_keeps_forward_ad():
    """Under a forward-AD dual level a skinny dense map stays plain autograd (the op's Function has no jvp)."""
    import torch.autograd.forward_ad as fwAD

    from reprokernels.cpu import label_map as clm
    x = torch.randn(clm.DENSE_MIN_LOGITS // 64, 64)
    w, t = torch.rand(64, 4), torch.randn_like(x)
    with fwAD.dual_level():
        out = rk.label_map(fwAD.make_dual(x, t), w)
        primal, tangent = fwAD.unpack_dual(out)
    assert_close(primal, x @ w, rtol=1e-5, atol=1e-4)
    assert_close(tangent, t @ w, rtol=1e-5, atol=1e-4)
