"""Hostile and edge inputs for visual_prompt, soft_prompt_concat, label_map, label_histogram and the nn modules,
on every backend that runs on a CPU: reference, triton (interpreter), cuda (host emulation), cpu (the C++/OpenMP
module, where built), auto.

Each case either gives the reference's result on every backend or an error that names the argument, the same
on every backend. The contract these tests hold the code to is written in docs/contracts.md.

The cuda backend runs through the public op: its launcher modules are swapped for shims that pass
``emulate=True`` and backend selection is told the backend is available (``emulated_cuda``).
"""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import reprokernels as rk
from reprokernels import _backend, _cpu, _cuda
from reprokernels.cuda import label_histogram as cu_lh
from reprokernels.cuda import label_map as cu_lm
from reprokernels.cuda import soft_prompt as cu_sp
from reprokernels.cuda import visual_prompt as cu_vp
from reprokernels.ops import label_histogram as lh_ops
from reprokernels.ops import label_map as lm_ops
from reprokernels.ops import soft_prompt as sp_ops
from reprokernels.ops import visual_prompt as vp_ops

from .utils import assert_close, triton_param

INDEX_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


# ---- every CPU-runnable backend through the public op -------------------------------------------------------------

def _emulating(fn):
    return lambda *a, **k: fn(*a, emulate=True, **k)


def _shim(name: str, module: types.ModuleType, functions: tuple[str, ...]) -> str:
    shim = types.ModuleType(name)
    for f in functions:
        setattr(shim, f, _emulating(getattr(module, f)))
    sys.modules[name] = shim
    return name


_SHIMS = {
    vp_ops: _shim("_rk_emulated_vp", cu_vp, ("visual_prompt", "visual_prompt_backward")),
    sp_ops: _shim("_rk_emulated_sp", cu_sp, ("soft_prompt_concat", "soft_prompt_concat_backward")),
    lm_ops: _shim("_rk_emulated_lm", cu_lm, ("label_map", "label_map_backward")),
    lh_ops: _shim("_rk_emulated_lh", cu_lh, ("label_histogram_accumulate",)),
}


@contextlib.contextmanager
def emulated_cuda():
    """backend="cuda" on CPU tensors runs the CUDA kernels' host emulation through the registered ops."""
    saved = {m: m._MODULES["cuda"] for m in _SHIMS}
    status = _backend.backend_status
    try:
        for m, name in _SHIMS.items():
            m._MODULES["cuda"] = name
        _backend.backend_status = lambda b, d: (True, "") if b == "cuda" and d == "cpu" else status(b, d)
        yield
    finally:
        _backend.backend_status = status
        for m, name in saved.items():
            m._MODULES["cuda"] = name


def _cuda_param():
    if not _cuda.extension_built():
        return pytest.param("cuda", marks=pytest.mark.skip(reason="reprokernels._C is not built"))
    return pytest.param("cuda")


def _cpu_param():
    if not _cpu.available():
        return pytest.param("cpu", marks=pytest.mark.skip(reason=f"cpu backend not built: {_cpu.unavailable_reason()}"))
    return pytest.param("cpu")


BACKENDS = ["reference", triton_param("visual_prompt"), _cuda_param(), _cpu_param(), "auto"]
BACKEND_NAMES = ["reference", "triton", "cuda", "cpu", "auto"]


def runnable(backend: str) -> bool:
    """Whether ``backend`` runs here (the cuda host emulation needs _C, the cpu backend _C_cpu)."""
    if backend == "cuda":
        return _cuda.extension_built()
    if backend == "cpu":
        return _cpu.available()
    return True


def on(backend: str, fn):
    """fn(backend) with the emulation in place (a no-op for the other backends)."""
    with emulated_cuda():
        return fn(backend)


def results(fn, backends=None):
    """{backend: fn(backend) or the exception} for every runnable backend."""
    out = {}
    for b in backends or BACKEND_NAMES:
        if not runnable(b):
            continue
        try:
            out[b] = on(b, fn)
        except Exception as e:  # compared below: the same named error everywhere
            out[b] = e
    return out


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def assert_all_match(res: dict, *, scale: float = 4.0, equal_nan: bool = True) -> None:
    ref = res["reference"]
    assert not isinstance(ref, Exception), f"reference failed: {ref!r}"
    for b, v in res.items():
        assert not isinstance(v, Exception), f"{b} failed: {v!r}"
        for i, (a, r) in enumerate(zip(_as_tuple(v), _as_tuple(ref), strict=True)):
            if r is None:
                assert a is None, f"{b} output {i}"
                continue
            assert (a.shape, a.dtype) == (r.shape, r.dtype), f"{b} output {i}: {a.shape} {a.dtype} vs {r.dtype}"
            # a float64 parameter's gradient is computed in float32 (the compute dtype) and cast
            tol = torch.float32 if a.dtype == torch.float64 else None
            assert_close(a, r, dtype=tol, scale=scale, equal_nan=equal_nan, name=f"{b} output {i}")
            assert torch.equal(a.isnan(), r.isnan()), f"{b} output {i}: NaN positions differ from the reference"


def assert_all_refuse(res: dict, error: type[Exception], pattern: str) -> None:
    import re

    for b, v in res.items():
        assert isinstance(v, error), f"{b}: expected {error.__name__} matching {pattern!r}, got {v!r}"
        assert re.search(pattern, str(v)), f"{b}: {v}"


def grad_of(out: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)


# ---- visual_prompt -------------------------------------------------------------------------------------------------

def vp_run(x, delta, mask_t=None, **kwargs):
    def run(b):
        xx, dd = x.detach().clone().requires_grad_(), delta.detach().clone().requires_grad_()
        mm = mask_t.detach().clone().requires_grad_() if mask_t is not None else None
        extra = {"mask": mm} if mm is not None else {}
        out = rk.visual_prompt(xx, dd, backend=b, **extra, **kwargs)
        out.backward(grad_of(out))
        return (out, xx.grad, dd.grad) + ((mm.grad,) if mm is not None else ())
    return run


@settings(deadline=None)
@given(x_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       delta_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       squash=st.sampled_from(["none", "sigmoid", "tanh"]), clamp=st.booleans())
def test_vp_mixed_dtypes_follow_one_rule(x_dtype, delta_dtype, squash, clamp):
    """The output has x's dtype, the arithmetic is float32 whatever delta's dtype, delta's gradient comes back in
    its own dtype: the same on every backend."""
    torch.manual_seed(0)
    x, delta = torch.rand(2, 3, 4, 5).to(x_dtype), torch.randn(3, 8, 8).to(delta_dtype)
    res = results(vp_run(x, delta, squash=squash, clamp=(0.0, 1.0) if clamp else None, mean=0.5, std=0.25))
    for v in res.values():
        out, dx, dd = v
        assert out.dtype == x_dtype and dx.dtype == x_dtype and dd.dtype == delta_dtype
    # bfloat16 under the Triton interpreter rounds float32 -> bfloat16 by truncation (a GPU rounds to nearest)
    assert_all_match(res, scale=8 if x_dtype == torch.bfloat16 else 4)


def test_vp_float64_delta_computes_in_float32_on_the_reference_too():
    x, delta = torch.rand(1, 1, 2, 2), torch.full((1, 4, 4), 1 / 3, dtype=torch.float64)
    out = rk.visual_prompt(x, delta, backend="reference", mask="full")
    expected = x.new_zeros(1, 1, 4, 4) + torch.tensor(1 / 3, dtype=torch.float32)
    expected[..., 1:3, 1:3] += x
    assert torch.equal(out, expected)


@pytest.mark.parametrize("squash", ["none", "sigmoid", "tanh"])
@pytest.mark.parametrize("mask_kind", ["outside", "frame", "tensor"])
@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)])
def test_vp_nan_inf_delta(squash, mask_kind, clamp):
    """NaN / inf in delta: where the mask acts they propagate (clamp keeps NaN, as torch.clamp); where the mask is
    0 delta is never read: output and delta gradient there are finite, on every backend."""
    torch.manual_seed(0)
    x, delta = torch.rand(2, 3, 4, 4), torch.randn(3, 8, 8)
    delta[:, 3, 3] = float("nan")   # under the image (mask 0 for "outside")
    delta[:, 4, 4] = float("inf")
    delta[0, 0, 0] = float("nan")   # on the border (mask 1)
    delta[1, 0, 1] = -float("inf")
    kwargs = dict(squash=squash, clamp=clamp)
    mask = None
    if mask_kind == "frame":
        kwargs.update(mask="frame", mask_width=1)
    elif mask_kind == "tensor":
        mask = torch.ones(1, 1, 8, 8)
        mask[..., 3:5, :] = 0.0
    res = results(vp_run(x, delta, mask, **kwargs))
    assert_all_match(res)
    ref = res["reference"]
    assert not ref[2][:, 3, 3].isnan().any() and torch.isfinite(ref[2][:, 4, 4]).all()  # no gradient where m == 0


def test_vp_fp16_overflow_is_the_same_everywhere():
    x = torch.rand(2, 3, 4, 4).half()
    for delta in (torch.full((3, 8, 8), 1e5), torch.full((3, 8, 8), 1e5).half()):
        for kwargs in ({}, {"clamp": (0.0, 1.0)}, {"std": 1e-3}):
            assert_all_match(results(lambda b, d=delta, kw=kwargs: rk.visual_prompt(x, d, backend=b, **kw)))


@pytest.mark.parametrize("case", ["C=0", "C=0 mask", "B=0", "h=0"])
def test_vp_degenerate_sizes(case):
    x, delta, mask, kwargs = torch.rand(2, 3, 4, 4), torch.randn(3, 8, 8), None, {}
    if case.startswith("C=0"):
        x, delta = torch.rand(2, 0, 4, 4), torch.randn(0, 8, 8)
        kwargs = dict(mean=[], std=[]) if case == "C=0" else {}
        mask = torch.rand(2, 1, 4, 4) if case == "C=0 mask" else None
    elif case == "B=0":
        x = torch.rand(0, 3, 4, 4)
    else:
        x = torch.rand(2, 3, 0, 4)
    assert_all_match(results(vp_run(x, delta, mask, **kwargs)))


def test_vp_stride0_inputs():
    x = torch.rand(1, 3, 1, 4).expand(2, 3, 4, 4)
    delta = torch.randn(1, 8, 8).expand(3, 8, 8)
    mask = torch.rand(1, 1, 1, 4).expand(2, 3, 4, 4)

    def run(b):
        xx, dd, mm = (t.detach().requires_grad_() for t in (x, delta, mask))
        out = rk.visual_prompt(xx, dd, mask=mm, backend=b, squash="tanh")
        out.backward(grad_of(out))
        return out, xx.grad, dd.grad, mm.grad
    assert_all_match(results(run))


@pytest.mark.parametrize(("kwargs", "error", "pattern"), [
    (dict(clamp=(0, 1, 2)), TypeError, r"clamp: expected \(lo, hi\), two real numbers, got \(0, 1, 2\)"),
    (dict(clamp=1), TypeError, r"clamp: expected \(lo, hi\)"),
    (dict(clamp="ab"), TypeError, r"clamp: expected \(lo, hi\)"),
    (dict(clamp=(None, 1)), TypeError, r"clamp: expected \(lo, hi\)"),
    (dict(clamp=(2, 1)), ValueError, r"clamp: expected \(lo, hi\) with lo <= hi"),
    (dict(size=(8, 8, 8)), TypeError, r"size: expected an int or a pair of ints, got \(8, 8, 8\)"),
    (dict(resize=(2, 2, 2)), TypeError, r"resize: expected an int or a pair of ints"),
    (dict(offset=(1, 1, 1)), TypeError, r"offset: expected an int or a pair of ints"),
    (dict(mask="patch", patch=(0, 0, 2)), ValueError, r"patch: mask='patch' needs patch=\(top, left, height"),
    (dict(mask="patch", patch=5), ValueError, r"patch: mask='patch' needs patch="),
    (dict(mean=[0.1, 0.2]), ValueError, r"mean: expected 3 values \(one per channel of x\), got 2"),
    (dict(std=[1, 2, 3, 4]), ValueError, r"std: expected 3 values"),
    (dict(std=[1, "a", 3]), TypeError, r"std: expected None, a number, a sequence of 3 numbers"),
    (dict(mean=object()), TypeError, r"mean: expected None, a number"),
    (dict(std=[1, 0, 2]), ValueError, r"std: expected non-zero values"),
    (dict(fill="a"), TypeError, r"fill: expected a real number, got 'a'"),
    (dict(fill=None), TypeError, r"fill: expected a real number, got None"),
    (dict(mask_width=1.5, mask="frame"), ValueError, r"mask_width: mask='frame' needs a frame width"),
])
def test_vp_argument_shapes_are_named(kwargs, error, pattern):
    x, delta = torch.rand(2, 3, 4, 4), torch.randn(3, 8, 8)
    assert_all_refuse(results(lambda b: rk.visual_prompt(x, delta, backend=b, **kwargs)), error, pattern)


def test_vp_meta_tensors_give_shapes_on_every_backend():
    x, delta = torch.rand(2, 3, 4, 4, device="meta"), torch.randn(3, 8, 8, device="meta", requires_grad=True)
    for b in [*BACKEND_NAMES, "bogus"]:
        if b == "bogus":
            with pytest.raises(ValueError, match="backend: expected one of"):
                rk.visual_prompt(x, delta, backend=b)
            continue
        out = rk.visual_prompt(x, delta, backend=b, mean=[0.1, 0.2, 0.3], std=torch.ones(3, device="meta"),
                               squash="sigmoid", clamp=(0, 1))
        assert out.shape == (2, 3, 8, 8) and out.device.type == "meta"
        out.sum().backward()
        assert delta.grad.shape == delta.shape
        delta.grad = None


def test_vp_triton_large_canvas_is_refused_by_name(monkeypatch):
    """Pixel offsets past 2**31 inside one tensor take the IDX64 kernels (test_prompt_gpu_fit); a canvas of 2**31
    pixels or more is refused up front by the Triton launcher, before any allocation or launch."""
    pytest.importorskip("triton")
    from reprokernels.reference.visual_prompt import VPSpec
    from reprokernels.triton import visual_prompt as tvp

    spec = VPSpec(2**16, 2**15, 1, 1, 0, 0, 0, 0, 0, 0, True, "none", "pre_norm", "none", False, 0.0,
                  float("-inf"), float("inf"))
    x, delta = torch.empty(1, 1, 1, 1, device="meta"), torch.empty(1, 2**16, 2**15, device="meta")
    with pytest.raises(ValueError, match=r"size: the triton backend needs a canvas of fewer than 2\*\*31 pixels"):
        tvp._common(x, delta, None, None, None, spec)


def test_vp_large_offsets_on_meta_give_shapes():
    """An x whose element offsets pass 2**31 (a strided view): meta tensors give the shape on every backend."""
    base = torch.empty(2**31 + 64, device="meta")
    x = base.as_strided((1, 1, 2, 2), (0, 0, 2**30 + 16, 1))
    for b in BACKEND_NAMES:
        out = rk.visual_prompt(x, torch.zeros(1, 4, 4, device="meta"), backend=b)
        assert out.shape == (1, 1, 4, 4)


# ---- soft_prompt_concat --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_sp_every_index_dtype_is_read_as_integers(index_dtype):
    """uint8 task_ids are indices, never a boolean mask; int16/int8 are accepted by the reference too."""
    torch.manual_seed(0)
    table, emb = torch.randn(3, 2, 4), torch.randn(10, 4)
    ids = torch.randint(0, 10, (4, 5)).to(index_dtype)
    tasks = torch.tensor([0, 2, 1, 2], dtype=index_dtype)
    insert = torch.tensor([0, 1, 2, 5], dtype=index_dtype)
    embeds = torch.randn(4, 5, 4)

    def run(b):
        t, e = table.clone().requires_grad_(), embeds.clone().requires_grad_()
        a = rk.soft_prompt_concat(table, input_ids=ids, embedding_weight=emb, task_ids=tasks, insert_at=insert,
                                  backend=b).inputs_embeds
        out = rk.soft_prompt_concat(t, inputs_embeds=e, task_ids=tasks, insert_at=insert, backend=b).inputs_embeds
        out.backward(grad_of(out))
        return a, out, t.grad, e.grad
    res = results(run)
    assert_all_match(res)
    rows = res["reference"][0]
    assert torch.equal(rows[3, 5:7], table[2])  # row 3: task 2's prompt after its 5 tokens


def test_sp_stride0_and_strided_indices():
    torch.manual_seed(0)
    table, emb = torch.randn(3, 2, 4), torch.randn(10, 4)
    ids = torch.randint(0, 10, (1, 5)).expand(4, 5)
    tasks = torch.tensor([2]).expand(4)
    insert = torch.tensor([3, 9, 1, 9, 0, 9, 5, 9])[::2]
    assert_all_match(results(lambda b: rk.soft_prompt_concat(
        table, input_ids=ids, embedding_weight=emb, task_ids=tasks, insert_at=insert, backend=b).inputs_embeds))

    embeds = torch.randn(4, 5, 4)

    def run(b):
        t, e = table.clone().requires_grad_(), embeds.clone().requires_grad_()
        out = rk.soft_prompt_concat(t, inputs_embeds=e, task_ids=tasks, insert_at=insert, backend=b).inputs_embeds
        out.backward(grad_of(out))
        return out, t.grad, e.grad
    assert_all_match(results(run))


@pytest.mark.parametrize(("prompt_dtype", "token_dtype"), [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float64, torch.float32),
    (torch.float64, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
])
def test_sp_mixed_dtypes_follow_one_rule(prompt_dtype, token_dtype):
    """Output in the token dtype, the prompt rounded into it once; the prompt's gradient summed in float32 and
    returned in the prompt's dtype; float64 prompts on every backend."""
    torch.manual_seed(0)
    table, emb = torch.randn(3, 2, 4).to(prompt_dtype), torch.randn(10, 4).to(token_dtype)
    ids, tasks = torch.randint(0, 10, (4, 5)), torch.tensor([0, 2, 1, 2])

    def run(b):
        t = table.clone().requires_grad_()
        out = rk.soft_prompt_concat(t, input_ids=ids, embedding_weight=emb, task_ids=tasks, backend=b).inputs_embeds
        out.backward(grad_of(out))
        return out, t.grad
    res = results(run)
    for out, dt in res.values():
        assert out.dtype == token_dtype and dt.dtype == prompt_dtype
    assert_all_match(res, scale=8)


@pytest.mark.parametrize("case", ["B=0", "L=0", "D=0", "P=0", "T=0", "V=0"])
def test_sp_degenerate_sizes(case):
    T, P, D, V, B, L = 3, 2, 4, 10, 4, 5
    T, P, D, V, B, L = (0 if f"{n}=0" == case else v for n, v in zip("TPDVBL", (T, P, D, V, B, L), strict=True))
    if case == "T=0":
        B = 0
    if case == "V=0":
        L = 0
    table, emb = torch.randn(T, P, D), torch.randn(V, D)
    ids, tasks = torch.randint(0, max(V, 1), (B, L)), torch.randint(0, max(T, 1), (B,))
    assert_all_match(results(lambda b: rk.soft_prompt_concat(
        table, input_ids=ids, embedding_weight=emb, task_ids=tasks, backend=b).inputs_embeds))


def test_sp_meta_tensors_give_shapes_on_every_backend():
    m = "meta"
    for b in BACKEND_NAMES:
        res = rk.soft_prompt_concat(torch.randn(3, 2, 4, device=m), input_ids=torch.zeros(4, 5, dtype=torch.long,
                                    device=m), embedding_weight=torch.randn(10, 4, device=m),
                                    task_ids=torch.zeros(4, dtype=torch.uint8, device=m),
                                    insert_at=torch.zeros(4, dtype=torch.int16, device=m),
                                    attention_mask=torch.ones(4, 5, device=m), backend=b)
        assert res.inputs_embeds.shape == (4, 7, 4) and res.attention_mask.shape == (4, 7)


def test_sp_bool_indices_are_refused_by_name():
    with pytest.raises(TypeError, match=r"task_ids: expected an integer tensor \(int64/int32/int16/int8/uint8\), "
                                        r"got torch.bool"):
        rk.soft_prompt_concat(torch.randn(2, 2, 4), inputs_embeds=torch.randn(2, 3, 4),
                              task_ids=torch.tensor([True, False]))


# ---- label_map -----------------------------------------------------------------------------------------------------

def lm_run(logits, mapping, **kwargs):
    def run(b):
        x = logits.detach().clone().requires_grad_()
        m = mapping.detach().clone().requires_grad_() if mapping.is_floating_point() else mapping
        out = rk.label_map(x, m, backend=b, **kwargs)
        out.backward(grad_of(out))
        return out, x.grad, (m.grad if mapping.is_floating_point() else None)
    return run


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("input", ["logits", "probs", "log_probs"])
def test_lm_every_index_dtype(index_dtype, input):
    torch.manual_seed(0)
    mapping = torch.tensor([[0, 3], [6, 2], [5, 5]], dtype=index_dtype)
    assert_all_match(results(lm_run(torch.randn(5, 7), mapping, input=input)))


@settings(deadline=None)
@given(logits_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       mapping_dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       input=st.sampled_from(["logits", "probs", "log_probs"]))
def test_lm_dense_mixed_dtypes(logits_dtype, mapping_dtype, input):
    torch.manual_seed(0)
    res = results(lm_run(torch.randn(5, 7).to(logits_dtype), torch.rand(7, 3).to(mapping_dtype), input=input))
    for out, dx, dw in res.values():
        assert dx.dtype == logits_dtype and dw.dtype == mapping_dtype
        assert out.dtype == (logits_dtype if input == "logits" else torch.float32)
    assert_all_match(res, scale=16 if logits_dtype == torch.bfloat16 else 8)


@settings(deadline=None)
@given(layout=st.sampled_from(["expanded_rows", "expanded_cols", "strided"]), dense=st.booleans())
def test_lm_strides_incl_zero(layout, dense):
    torch.manual_seed(0)
    if layout == "expanded_rows":
        logits = torch.randn(1, 7).expand(5, 7)
    elif layout == "expanded_cols":
        logits = torch.randn(5, 1).expand(5, 7)
    else:
        logits = torch.randn(5, 14)[:, ::2]
    mapping = torch.rand(7, 1).expand(7, 3) if dense else torch.tensor([[3]]).expand(4, 3)
    assert_all_match(results(lm_run(logits, mapping, input="probs")))


def test_lm_nan_inf_logits_match():
    logits = torch.randn(5, 7)
    logits[0, 1], logits[1, 2], logits[2] = float("nan"), float("inf"), -float("inf")
    for input in ("logits", "probs", "log_probs"):
        assert_all_match(results(lm_run(logits, torch.tensor([[0, 3], [6, 2]]), input=input)))
        assert_all_match(results(lm_run(logits, torch.rand(7, 3), input=input)))


def test_lm_degenerate_sizes():
    assert_all_refuse(results(lambda b: rk.label_map(torch.randn(5, 0), torch.tensor([-1]), backend=b)),
                      ValueError, r"logits: expected at least one source class \(K_src >= 1\), got shape \(5, 0\)")
    assert_all_refuse(results(lambda b: rk.label_map(torch.randn(5, 0), torch.rand(0, 3), backend=b)),
                      ValueError, r"logits: expected at least one source class")
    for mapping in (torch.zeros(0, 2, dtype=torch.long), torch.zeros(3, 0, dtype=torch.long)):
        assert_all_match(results(lm_run(torch.randn(5, 7), mapping, input="probs")))
    assert_all_match(results(lm_run(torch.randn(0, 7), torch.tensor([1, 2]), input="probs")))


def test_lm_meta_tensors_give_shapes_on_every_backend():
    for b in BACKEND_NAMES:
        for mapping in (torch.tensor([1, 2], device="meta"), torch.rand(7, 3, device="meta", dtype=torch.float64)):
            out = rk.label_map(torch.randn(2, 5, 7, device="meta"), mapping, input="probs", backend=b)
            assert out.shape == (2, 5, mapping.shape[-1] if mapping.is_floating_point() else 2)


# ---- label_histogram -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_lh_every_index_dtype(index_dtype):
    torch.manual_seed(0)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2], dtype=index_dtype)
    preds = torch.tensor([0, 4, 3, 2, 1, 1], dtype=index_dtype)
    assert_all_match(results(lambda b: rk.label_histogram(x, y, 5, 3, backend=b)))
    assert_all_match(results(lambda b: rk.label_histogram(x, y, 5, 3, weight="prob", topk=2, backend=b)))
    assert_all_match(results(lambda b: rk.label_histogram(preds, y, 5, 3, backend=b)))


def test_lh_stride0_inputs():
    torch.manual_seed(0)
    x = torch.randn(1, 5).expand(6, 5)
    assert_all_match(results(lambda b: rk.label_histogram(x, torch.tensor([2]).expand(6), 5, 3, backend=b)))
    assert_all_match(results(lambda b: rk.label_histogram(torch.tensor([4]).expand(6), torch.tensor([1, 2] * 3), 5, 3,
                                                          backend=b)))
    assert_all_match(results(lambda b: rk.label_histogram(x, torch.tensor([0, 1] * 3), 5, 3, weight="prob",
                                                          backend=b)))


@pytest.mark.parametrize("layout", ["values", "transposed", "strided"])
def test_lh_running_out_any_layout_one_behaviour(layout):
    """An ``out`` holding values is added to, in any non-overlapping layout, the same on every backend."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    start = torch.arange(15, dtype=torch.float32).reshape(5, 3)

    def run(b):
        if layout == "values":
            out = start.clone()
        elif layout == "transposed":
            out = start.t().contiguous().t()
        else:
            out = torch.zeros(10, 6)[::2, ::2]
            out.copy_(start)
        got = rk.label_histogram(x, y, 5, 3, out=out, weight="prob", backend=b)
        assert got is out
        return out.clone()
    res = results(run)
    assert_all_match(res)
    assert_close(res["reference"], start + rk.label_histogram(x, y, 5, 3, weight="prob", backend="reference"))


@pytest.mark.parametrize("out", [torch.zeros(1, 3).expand(5, 3), torch.zeros(1, 1).expand(5, 3),
                                 torch.zeros(8).as_strided((5, 3), (1, 1))])
@pytest.mark.parametrize("batch", [6, 0])
def test_lh_overlapping_out_is_refused_everywhere(out, batch):
    x, y = torch.randn(batch, 5), torch.zeros(batch, dtype=torch.long)
    assert_all_refuse(results(lambda b: rk.label_histogram(x, y, 5, 3, out=out, backend=b)), ValueError,
                      r"out: expected a tensor whose elements have distinct memory .* strides")
    assert not out.any()


def test_lh_empty_batch_leaves_out_unchanged():
    out = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    for b in BACKEND_NAMES:
        if not runnable(b):
            continue
        before = out.clone()
        on(b, lambda b: rk.label_histogram(torch.randn(0, 5), torch.zeros(0, dtype=torch.uint8), 5, 3, out=out,
                                           weight="prob", backend=b))
        assert torch.equal(out, before)


def test_lh_nan_inf_logits_match():
    x = torch.randn(6, 5)
    x[0, 2], x[1], x[2, 1] = float("nan"), -float("inf"), float("inf")
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for kwargs in ({}, {"weight": "prob"}, {"weight": "prob", "topk": 2}):
        assert_all_match(results(lambda b, kw=kwargs: rk.label_histogram(x, y, 5, 3, backend=b, **kw)))


def test_lh_and_estimators_on_meta():
    x, y = torch.randn(6, 5, device="meta"), torch.zeros(6, dtype=torch.int8, device="meta")
    for b in BACKEND_NAMES:
        D = rk.label_histogram(x, y, 5, 3, weight="prob", topk=2, backend=b)
        assert D.shape == (5, 3) and D.device.type == "meta"
    assert rk.greedy_label_mapping(D).shape == (3,)
    assert rk.greedy_label_mapping(D, 1).device.type == "meta"
    assert rk.bayesian_label_mapping(D).shape == (5, 3)


# ---- nn modules ----------------------------------------------------------------------------------------------------

def test_modules_build_and_run_on_the_meta_device():
    from reprokernels import nn as rn

    with torch.device("meta"):
        parts = [
            (rn.PadPrompter(16, 3), torch.rand(2, 3, 16, 16)),
            (rn.ExpansivePrompter(16, 8, mean=rn.IMAGENET_MEAN, std=rn.IMAGENET_STD), torch.rand(2, 3, 8, 8)),
            (rn.FullPrompter(16), torch.rand(2, 3, 16, 16)),
            (rn.PatchPrompter(16, 4), torch.rand(2, 3, 16, 16)),
            (rn.SampleSpecificMaskPrompter(16, 8), torch.rand(2, 3, 8, 8)),
        ] + [(rn.LabelMapping(10, 3, m), torch.randn(2, 10)) for m in ("flm", "random", "bar", "blm+", "linear")]
        for module, x in parts:
            out = module(x)
            assert out.device.type == "meta"
        lm = rn.LabelMapping(10, 3, "blm+")
        lm.fit([(torch.randn(4, 10), torch.zeros(4, dtype=torch.long))])
        assert lm.mapping.shape == (10, 3)
        sp = rn.SoftPrompt(4, 8, num_tasks=2)
        res = sp(input_ids=torch.zeros(2, 5, dtype=torch.long), embedding=torch.randn(50, 8),
                 task_ids=torch.tensor([0, 1]))
        assert res[0].shape == (2, 9, 8)


def test_reprogrammer_refuses_a_trainable_parameter_shared_with_the_backbone():
    from reprokernels.nn import Reprogrammer

    backbone = nn.Sequential(nn.Linear(4, 6))
    head = nn.Linear(4, 6)
    head.weight = backbone[0].weight  # tied: training it would change the frozen backbone
    with pytest.raises(ValueError, match=r"label_mapping: expected parameters of its own, got trainable "
                                         r"parameter\(s\) weight shared with the backbone"):
        Reprogrammer(backbone, label_mapping=head)
    assert backbone[0].weight.requires_grad  # refused before anything was frozen
    head.weight.requires_grad_(False)  # a fixed map built on the backbone's weights is fine
    model = Reprogrammer(backbone, label_mapping=head)
    assert [p is head.bias for p in model.trainable_parameters()] == [True]


def test_linear_label_mapping_after_fit():
    from reprokernels.nn import LabelMapping

    lm = LabelMapping(6, 3, method="linear")
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    lm.fit([(x, y)])
    assert lm.mapping.shape == (6, 3) and lm.mapping.detach().cpu().tolist()
    assert_close(lm(x), x @ lm.mapping + lm.linear.bias, rtol=1e-5, atol=1e-5)
    assert "mapping" not in lm.state_dict()
