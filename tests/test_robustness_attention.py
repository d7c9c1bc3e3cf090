"""Robustness of prefix_attention, merge_attention_states and nn.PrefixKV (issue 16), on every backend that runs
on the CPU (reference, composite, triton under the interpreter, auto): any strides (stride 0 included) for float,
index and mask inputs; every integer index dtype; NaN/inf planted where keys are unseen; the defined limits of
merge_attention_states; mixed dtypes under the one promotion rule; meta and fake tensors; degenerate sizes.
The contract these tests hold the code to: docs/contracts-attention.md."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import reprokernels as rk
from reprokernels.nn import PrefixKV
from tests.utils import assert_close, triton_param

BACKENDS = ["reference", "composite", triton_param("prefix_attention"), "auto"]
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
NAMES = ("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v")
D = 32  # the smallest head dim the triton kernels serve: every backend runs every case
FLT_MAX = torch.finfo(torch.float32).max


def _run(backend, q, k, v, pk=None, pv=None, *, causal=True, grad_seed=1, **kw):
    """(out, lse, dq, dk, dv, d prefix_k, d prefix_v) for a fixed output gradient; the inputs are made leaves as
    they are (strides kept: an expanded input gets the gradient of its expanded view)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (q, k, v, pk, pv)]
    out, lse = rk.prefix_attention(*leaves, causal=causal, return_lse=True, backend=backend, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    if out.numel():
        out.backward(g)
    return (out.detach(), lse, *(None if t is None else t.grad for t in leaves))


def _compare(got, want, dtype=None):
    for name, a, b in zip(NAMES, got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert not torch.isnan(a).any(), f"{name} has NaN"
        assert_close(a, b, dtype=dtype, name=name)


def _dense(t):
    return None if t is None else t.detach().contiguous()


# ---------------------------------------------------------------- strides (float, index and mask inputs)


@st.composite
def _float_layout(draw, shape, gen):
    """A float32 tensor of ``shape`` with a drawn layout: dense, expanded (stride 0 along one dim), strided (every
    other element of a larger tensor) or permuted; values from ``gen``."""
    kind = draw(st.sampled_from(["dense", "expanded", "sliced", "permuted"]))
    dims = [i for i, n in enumerate(shape) if n > 1]
    if kind == "dense" or not dims:
        return torch.randn(shape, generator=gen)
    dim = draw(st.sampled_from(dims))
    if kind == "expanded":
        small = list(shape)
        small[dim] = 1
        return torch.randn(small, generator=gen).expand(shape)
    if kind == "sliced":
        big = list(shape)
        big[dim] *= 2
        return torch.randn(big, generator=gen).narrow(dim, 0, 2 * shape[dim]).unflatten(
            dim, (shape[dim], 2)).select(dim + 1, 1)
    perm = list(range(len(shape)))
    perm[dim], perm[-1] = perm[-1], perm[dim]
    return torch.randn([shape[p] for p in perm], generator=gen).permute(perm)


@st.composite
def _index_layout(draw, values: torch.Tensor):
    """(B,) integer tensor with these values, a drawn integer dtype and a drawn layout (stride 0 when all values
    are equal, else every other element of a longer tensor, or dense)."""
    dtype = draw(st.sampled_from(INDEX_DTYPES))
    B = values.shape[0]
    kind = draw(st.sampled_from(["dense", "sliced"] + (["expanded"] if B and bool((values == values[0]).all())
                                                          else [])))
    if kind == "expanded":
        return values[:1].to(dtype).expand(B)
    if kind == "sliced":
        return torch.stack([values, values.flip(0)], 1).reshape(-1)[::2].to(dtype)
    return values.to(dtype)


@st.composite
def _mask_layout(draw, keep: torch.Tensor):
    kind = draw(st.sampled_from(["dense", "expanded", "transposed", "sliced"]))
    B, Lk = keep.shape
    if kind == "expanded":
        return keep[:1].expand(B, Lk)
    if kind == "transposed":
        return keep.t().contiguous().t()
    if kind == "sliced":
        return torch.stack([keep, ~keep], 2).reshape(B, 2 * Lk)[:, ::2]
    return keep


@st.composite
def strided_cases(draw):
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Lq, Lk, P = draw(st.integers(1, 5)), draw(st.integers(1, 20)), draw(st.integers(0, 4))
    T = draw(st.sampled_from([None, 3]))
    Hq = Hkv * G
    q = draw(_float_layout((B, Hq, Lq, D), gen))
    k = draw(_float_layout((B, Hkv, Lk, D), gen))
    v = draw(_float_layout((B, Hkv, Lk, D), gen))
    pshape = (Hkv, P, D) if T is None else (T, Hkv, P, D)
    pk, pv = draw(_float_layout(pshape, gen)), draw(_float_layout(pshape, gen))
    kw = {}
    if T is not None:
        ids = torch.full((B,), draw(st.integers(0, T - 1))) if draw(st.booleans()) else torch.randint(0, T, (B,),
                                                                                                     generator=gen)
        kw["task_ids"] = draw(_index_layout(ids))
    pad = draw(st.sampled_from([None, "mask", "lengths"]))
    if pad == "lengths":  # equal lengths make an expanded layout possible
        same = draw(st.booleans())
        lens = torch.full((B,), draw(st.integers(0, Lk))) if same else torch.randint(0, Lk + 1, (B,), generator=gen)
        kw["kv_lengths"] = draw(_index_layout(lens))
    elif pad == "mask":
        kw["key_padding_mask"] = draw(_mask_layout(torch.rand(B, Lk, generator=gen) > 0.4))
    return (q, k, v, pk, pv), kw, draw(st.booleans())


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=8)
@given(case=strided_cases())
def test_any_strides_match_the_reference_on_dense_copies(backend, case):
    """Stride 0 (expanded), strided and permuted float inputs, index tensors of every integer dtype with stride 0
    or 2, and strided padding masks all read as the dense tensors with the same values."""
    tensors, kw, causal = case
    want = _run("reference", *(_dense(t) for t in tensors), causal=causal,
                **{n: t.contiguous().long() if t.dtype != torch.bool else t.contiguous() for n, t in kw.items()})
    got = _run(backend, *tensors, causal=causal, **kw)
    for name, a, b, x in zip(NAMES[2:], got[2:], want[2:], tensors, strict=True):
        if x is not None and x.stride() != x.contiguous().stride():  # an expanded leaf: sum over its copies
            assert a.shape == b.shape, name
    _compare(got, want)


def test_expanded_kv_lengths_on_the_decode_path():
    """The decode kernels (kv_lengths, Lq <= 16, P > 0) read kv_lengths[b]: an expanded one must not be read as a
    dense (B,) array (the failure the adversarial run found in the triton backend)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 2, 1, D, generator=gen), torch.randn(3, 1, 20, D, generator=gen), \
        torch.randn(3, 1, 20, D, generator=gen)
    pk, pv = torch.randn(1, 4, D, generator=gen), torch.randn(1, 4, D, generator=gen)
    lens = torch.tensor([5], dtype=torch.int16).expand(3)
    want = _run("reference", q, k, v, pk, pv, kv_lengths=torch.tensor([5, 5, 5]))
    for backend in ("composite", "triton", "auto"):
        _compare(_run(backend, q, k, v, pk, pv, kv_lengths=lens), want)


# ---------------------------------------------------------------- index dtypes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INDEX_DTYPES)
def test_every_integer_index_dtype(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 2, 4, D, generator=gen), torch.randn(3, 2, 9, D, generator=gen), \
        torch.randn(3, 2, 9, D, generator=gen)
    pk, pv = torch.randn(2, 2, 3, D, generator=gen), torch.randn(2, 2, 3, D, generator=gen)
    ids, lens = torch.tensor([1, 0, 1]), torch.tensor([9, 0, 4])
    want = _run("reference", q, k, v, pk, pv, task_ids=ids, kv_lengths=lens)
    got = _run(backend, q, k, v, pk, pv, task_ids=ids.to(dtype), kv_lengths=lens.to(dtype))
    _compare(got, want)


@pytest.mark.parametrize(("name", "value", "exc", "msg"), [
    ("kv_lengths", torch.tensor([True, False]), TypeError, r"kv_lengths: expected an integer tensor .*got torch.bool"),
    ("kv_lengths", torch.tensor([1.0, 2.0]), TypeError, r"kv_lengths: expected an integer tensor .*got torch.float32"),
    ("kv_lengths", torch.tensor([255, 1], dtype=torch.uint8), ValueError, r"kv_lengths: expected values in \[0, 4\]"),
    ("kv_lengths", torch.tensor([-1, 1], dtype=torch.int8), ValueError, r"kv_lengths: expected values in \[0, 4\]"),
    ("task_ids", torch.tensor([True, False]), TypeError, r"task_ids: expected an integer tensor .*got torch.bool"),
    ("task_ids", torch.tensor([2, 0], dtype=torch.uint8), ValueError, r"task_ids: expected values in \[0, 1\]"),
    ("key_padding_mask", torch.ones(2, 4, dtype=torch.uint8), TypeError, "key_padding_mask: expected a bool tensor"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_index_inputs_are_refused_by_name(backend, name, value, exc, msg):
    q, k, v = torch.randn(2, 2, 3, D), torch.randn(2, 1, 4, D), torch.randn(2, 1, 4, D)
    pk = torch.randn(2, 1, 2, D) if name == "task_ids" else torch.randn(1, 2, D)
    with pytest.raises(exc, match=msg):
        rk.prefix_attention(q, k, v, pk, pk.clone(), backend=backend, **{name: value})


# ---------------------------------------------------------------- NaN / inf where keys are unseen


@st.composite
def garbage_cases(draw):
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Lq = draw(st.sampled_from([1, 2, 5, 17]))  # <= 16 with kv_lengths and a prefix: the triton decode path
    Lk, P = draw(st.integers(1, 24)), draw(st.sampled_from([0, 3]))
    q = torch.randn(B, Hkv * G, Lq, D, generator=gen)
    k, v = torch.randn(B, Hkv, Lk, D, generator=gen), torch.randn(B, Hkv, Lk, D, generator=gen)
    pk, pv = (torch.randn(Hkv, P, D, generator=gen), torch.randn(Hkv, P, D, generator=gen)) if P else (None, None)
    if draw(st.booleans()):
        kw = dict(kv_lengths=torch.randint(0, Lk + 1, (B,), generator=gen))
        keep = torch.arange(Lk).view(1, Lk) < kw["kv_lengths"].view(B, 1)
    else:
        keep = torch.rand(B, Lk, generator=gen) > 0.5
        kw = dict(key_padding_mask=keep)
    fill = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, "mixed"]))
    kg, vg = k.clone(), v.clone()
    hide = (~keep).view(B, 1, Lk, 1).expand_as(k)
    if fill == "mixed":
        junk = torch.tensor([math.nan, math.inf, -math.inf, 3e38])[torch.randint(0, 4, k.shape, generator=gen)]
        kg, vg = torch.where(hide, junk, k), torch.where(hide, junk.flip(-1), v)
    else:
        kg[hide], vg[hide] = fill, -fill if fill == fill else fill
    return (q, k, v, pk, pv), (q, kg, vg, pk, pv), kw, keep, draw(st.booleans())


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=10)
@given(case=garbage_cases())
def test_garbage_in_unseen_keys_never_reaches_an_output_or_gradient(backend, case):
    """NaN, inf and huge values in K/V positions beyond kv_lengths or under a False padding mask (a KV cache's
    unused slots): the results equal those with clean values there, and those positions' gradients are exactly
    0."""
    clean, dirty, kw, keep, causal = case
    want = _run("reference", *clean, causal=causal, **kw)
    got = _run(backend, *dirty, causal=causal, **kw)
    _compare(got, want)
    hidden = ~keep.view(keep.shape[0], 1, keep.shape[1], 1).expand_as(got[3])
    assert torch.all(got[3][hidden] == 0) and torch.all(got[4][hidden] == 0)


def test_garbage_reference_is_the_spec():
    """The reference zeroes unseen keys before any product (not only their scores), also through autograd."""
    from reprokernels.reference import prefix_attention as ref

    q, k, v = torch.randn(2, 2, 3, 4, dtype=torch.float64), torch.randn(2, 1, 6, 4, dtype=torch.float64), \
        torch.randn(2, 1, 6, 4, dtype=torch.float64)
    lens = torch.tensor([2, 0])
    kg, vg = k.clone().requires_grad_(), v.clone()
    with torch.no_grad():
        kg[:, :, 2:] = math.nan
        vg[:, :, 2:] = math.inf
    vg.requires_grad_()
    out, lse = ref.prefix_attention_values(q, kg, vg, None, None, None, None, lens, False, 0.5)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.equal(lse[1], torch.full_like(lse[1], -math.inf))
    assert torch.all(kg.grad[:, :, 2:] == 0) and torch.all(vg.grad[:, :, 2:] == 0)
    assert torch.isfinite(kg.grad).all() and torch.isfinite(vg.grad).all()


# ---------------------------------------------------------------- merge_attention_states: limits and dtypes


_LSE_VALUES = [-math.inf, math.inf, 0.0, 2.5, -40.0, 80.0, FLT_MAX, -FLT_MAX, 0.9 * FLT_MAX]


def _merge_spec(oa, la, ob, lb):
    """The documented limits, element by element in Python floats (float64)."""
    o = torch.zeros(oa.shape, dtype=torch.float64)
    lse = torch.zeros(la.shape, dtype=torch.float64)
    for i in range(la.numel()):
        a, b = float(la.view(-1)[i]), float(lb.view(-1)[i])
        xa, xb = oa.reshape(-1, oa.shape[-1])[i].double(), ob.reshape(-1, ob.shape[-1])[i].double()
        if math.inf in (a, b):
            wa, wb, lse.view(-1)[i] = float(a == math.inf), float(b == math.inf), math.inf
        elif a == b == -math.inf:
            wa = wb = 0.0
            lse.view(-1)[i] = -math.inf
        else:
            m = max(a, b)
            wa, wb = math.exp(a - m), math.exp(b - m)
            lse.view(-1)[i] = m + math.log(wa + wb)
        s = wa + wb
        row = torch.zeros_like(xa)
        if wa:
            row = row + xa * (wa / s)
        if wb:
            row = row + xb * (wb / s)
        o.view(-1, o.shape[-1])[i] = row
    return o, lse


@settings(max_examples=30)
@given(la=st.lists(st.sampled_from(_LSE_VALUES), min_size=6, max_size=6),
       lb=st.lists(st.sampled_from(_LSE_VALUES), min_size=6, max_size=6), seed=st.integers(0, 100))
def test_merge_limits_forward_and_backward(la, lb, seed):
    gen = torch.Generator().manual_seed(seed)
    la, lb = torch.tensor(la).view(2, 3), torch.tensor(lb).view(2, 3)
    oa, ob = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    # a -inf partition's output is never read: plant NaN / inf there
    oa[la == -math.inf] = math.nan
    ob[lb == -math.inf] = math.inf
    want_o, want_lse = _merge_spec(oa, la, ob, lb)
    xs = [t.clone().requires_grad_() for t in (oa, la, ob, lb)]
    o, lse = rk.merge_attention_states(*xs)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(o, want_o.float(), name="o")
    assert_close(lse, want_lse.float(), name="lse")
    (o * torch.randn(o.shape, generator=gen)).sum().add(torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    for name, x in zip(("o_a", "lse_a", "o_b", "lse_b"), xs, strict=True):
        assert torch.isfinite(x.grad).all(), f"{name}.grad: {x.grad}"
    assert torch.all(xs[0].grad[la == -math.inf] == 0) and torch.all(xs[2].grad[lb == -math.inf] == 0)


def test_merge_documented_limits_exactly():
    oa, ob = torch.tensor([[1.0, 2.0]] * 4), torch.tensor([[3.0, 6.0]] * 4)
    la = torch.tensor([math.inf, math.inf, -math.inf, FLT_MAX])
    lb = torch.tensor([0.0, math.inf, -math.inf, FLT_MAX])
    o, lse = rk.merge_attention_states(oa, la, ob, lb)
    assert torch.equal(o[0], oa[0]) and lse[0] == math.inf  # +inf beside finite: that partition
    assert torch.equal(o[1], (oa[1] + ob[1]) / 2) and lse[1] == math.inf  # two +inf: equal weights
    assert torch.equal(o[2], torch.zeros(2)) and lse[2] == -math.inf  # nothing seen
    assert torch.equal(o[3], (oa[3] + ob[3]) / 2) and lse[3] == FLT_MAX  # no overflow at the float32 maximum


def test_merge_nan_lse_propagates():
    o, lse = rk.merge_attention_states(torch.ones(1, 2), torch.tensor([math.nan]), torch.ones(1, 2),
                                       torch.tensor([0.0]))
    assert torch.isnan(lse).all() and torch.isnan(o).all()


_DT = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("o_dt", [(a, b) for a in _DT for b in _DT][::3])
@pytest.mark.parametrize("l_dt", [(torch.float32, torch.float32), (torch.float16, torch.bfloat16),
                                  (torch.float32, torch.float64)])
def test_merge_mixed_dtypes_follow_the_rule(o_dt, l_dt):
    oa, ob = torch.randn(3, 2, 4).to(o_dt[0]), torch.randn(3, 2, 4).to(o_dt[1])
    la, lb = torch.randn(3, 2).to(l_dt[0]), torch.randn(3, 2).to(l_dt[1])
    o, lse = rk.merge_attention_states(oa, la, ob, lb)
    assert o.dtype == torch.promote_types(*o_dt)
    assert lse.dtype == (torch.float64 if torch.float64 in l_dt else torch.float32)
    want_o, want_lse = _merge_spec(oa.double(), la.double(), ob.double(), lb.double())
    assert_close(o, want_o.to(o.dtype), dtype=o.dtype, name="o")
    assert_close(lse, want_lse.to(lse.dtype), dtype=lse.dtype, name="lse")


def test_merge_on_meta_and_fake_tensors():
    shapes = ((2, 5, 3), (2, 5), (2, 5, 3), (2, 5))
    o, lse = rk.merge_attention_states(*(torch.empty(s, device="meta") for s in shapes))
    assert o.device.type == "meta" and o.shape == (2, 5, 3) and lse.shape == (2, 5)
    with FakeTensorMode():
        o, lse = rk.merge_attention_states(*(torch.empty(s) for s in shapes))
        assert o.shape == (2, 5, 3) and lse.shape == (2, 5)


# ---------------------------------------------------------------- mixed dtypes: one promotion rule


_MIXED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float64),
          (torch.float16, torch.float64), (torch.float32, torch.bfloat16), (torch.float64, torch.float32)]


@pytest.mark.parametrize(("q_dt", "p_dt"), _MIXED)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_follow_one_rule(backend, q_dt, p_dt):
    """out in q's dtype, LSE float32 (float64 for float64 q), each gradient in its input's dtype; the prefix is
    rounded to q's dtype before the products on every backend, so every backend matches the reference within
    q's dtype tolerance."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(s, generator=gen).to(q_dt) for s in ((2, 2, 5, D), (2, 1, 7, D), (2, 1, 7, D)))
    pk, pv = torch.randn(1, 3, D, generator=gen).to(p_dt), torch.randn(1, 3, D, generator=gen).to(p_dt)
    lens = torch.tensor([7, 3])
    if backend == "triton" and q_dt == torch.float64:
        with pytest.raises(TypeError, match="q: expected a floating dtype"):
            rk.prefix_attention(q, k, v, pk, pv, backend=backend)
        return
    got = _run(backend, q, k, v, pk, pv, kv_lengths=lens)
    want = _run("reference", q, k, v, pk, pv, kv_lengths=lens)
    assert got[0].dtype == q_dt and got[1].dtype == (torch.float64 if q_dt == torch.float64 else torch.float32)
    assert [g.dtype for g in got[2:]] == [q_dt] * 3 + [p_dt] * 2
    coarse = {torch.float16: 2, torch.bfloat16: 3, torch.float32: 1, torch.float64: 0}
    for name, a, b in zip(NAMES, got, want, strict=True):
        # the tolerance of the coarser of q's dtype (the products) and the result's own dtype (its rounding)
        tol = max(q_dt if q_dt != torch.float64 else p_dt, a.dtype, key=coarse.__getitem__)
        assert_close(a, b, dtype=tol, scale=2.0, name=name)


def test_reference_rounds_the_prefix_to_q_dtype_once():
    """The rule's definition: a float32 prefix beside bf16 q gives the values of the bf16-rounded prefix, and its
    gradient is not rounded to bf16 on the way back (float32, straight through)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(s, generator=gen).bfloat16() for s in ((1, 2, 3, 8), (1, 2, 4, 8), (1, 2, 4, 8)))
    pk, pv = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    a = _run("reference", q, k, v, pk, pv)
    b = _run("reference", q, k, v, pk.bfloat16(), pv.bfloat16())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[5].dtype == torch.float32
    assert_close(a[5], b[5].float(), dtype=torch.bfloat16, name="dprefix_k")
    assert not torch.equal(a[5], a[5].bfloat16().float())  # float32 accumulation, not rounded to bf16


# ---------------------------------------------------------------- meta and fake tensors


@pytest.mark.parametrize("backend", ["reference", "composite", "triton", "auto"])
@pytest.mark.parametrize("extra", ["none", "tasks", "mask", "lengths"])
def test_meta_tensors_give_shapes(backend, extra):
    dev = "meta"
    q = torch.empty(2, 4, 3, 5, device=dev, requires_grad=True)  # d = 5: no backend refuses meta over it
    k, v = torch.empty(2, 2, 7, 5, device=dev), torch.empty(2, 2, 7, 5, device=dev, dtype=torch.float32)
    pk = torch.empty(3, 2, 4, 5, device=dev, requires_grad=True) if extra == "tasks" else \
        torch.empty(2, 4, 5, device=dev, dtype=torch.float64, requires_grad=True)
    pv = torch.empty(pk.shape, device=dev, dtype=pk.dtype, requires_grad=True)
    kw = dict(task_ids=torch.empty(2, dtype=torch.uint8, device=dev).expand(2)) if extra == "tasks" else \
        dict(key_padding_mask=torch.empty(2, 7, dtype=torch.bool, device=dev)) if extra == "mask" else \
        dict(kv_lengths=torch.empty(1, dtype=torch.int16, device=dev).expand(2)) if extra == "lengths" else {}
    out, lse = rk.prefix_attention(q, k, v, pk, pv, return_lse=True, backend=backend, **kw)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (2, 4, 3) and lse.dtype == torch.float32
    out.sum().backward()
    assert q.grad.shape == q.shape and pk.grad.shape == pk.shape and pk.grad.dtype == pk.dtype


def test_fake_tensors_give_shapes():
    with FakeTensorMode():
        q, k, v = torch.randn(2, 4, 3, D), torch.randn(2, 2, 7, D), torch.randn(2, 2, 7, D)
        out, lse = rk.prefix_attention(q, k, v, torch.randn(2, 4, D), torch.randn(2, 4, D),
                                       kv_lengths=torch.tensor([7, 2]), return_lse=True)
        assert out.shape == q.shape and lse.shape == (2, 4, 3)


# ---------------------------------------------------------------- degenerate sizes


_DEGENERATE = [dict(B=0), dict(Lq=0), dict(Lk=0), dict(P=0), dict(Lk=0, P=0), dict(Hq=0), dict(B=0, T=3),
               dict(Lk=0, P=0, lengths=True), dict(P=0, lengths=True), dict(Lq=20, Lk=3, P=0)]


@pytest.mark.parametrize("cfg", _DEGENERATE, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_sizes(backend, cfg):
    """Empty batch, no queries, no own keys, no prefix, no query heads, rows that see nothing: empty results or
    O = 0 with LSE = -inf, zero (never NaN) gradients, and the same on every backend."""
    B, Lq, Lk, P, T = cfg.get("B", 2), cfg.get("Lq", 3), cfg.get("Lk", 5), cfg.get("P", 2), cfg.get("T")
    Hq, Hkv = cfg.get("Hq", 2), 1
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(B, Hq, Lq, D, generator=gen), torch.randn(B, Hkv, Lk, D, generator=gen), \
        torch.randn(B, Hkv, Lk, D, generator=gen)
    shape = (Hkv, P, D) if T is None else (T, Hkv, P, D)
    pk, pv = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    kw = {}
    if T is not None:
        kw["task_ids"] = torch.zeros(B, dtype=torch.int64)
    if cfg.get("lengths"):
        kw["kv_lengths"] = torch.zeros(B, dtype=torch.int32)
    got = _run(backend, q, k, v, pk, pv, **kw)
    want = _run("reference", q, k, v, pk, pv, **kw)
    assert got[0].shape == q.shape and got[1].shape == q.shape[:3]
    _compare(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_head_dim_is_refused_by_name(backend):
    with pytest.raises(ValueError, match=r"q: expected a head dim d >= 1"):
        rk.prefix_attention(torch.randn(1, 1, 2, 0), torch.randn(1, 1, 2, 0), torch.randn(1, 1, 2, 0),
                            backend=backend)


@pytest.mark.parametrize("d", [1, 3, 5, 33])
@pytest.mark.parametrize("backend", ["reference", "composite", "auto", triton_param("prefix_attention")])
def test_head_dim_edges(backend, d):
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 2, 3, d, generator=gen), torch.randn(2, 1, 4, d, generator=gen), \
        torch.randn(2, 1, 4, d, generator=gen)
    pk, pv = torch.randn(1, 2, d, generator=gen), torch.randn(1, 2, d, generator=gen)
    if backend == "triton":
        with pytest.raises(ValueError, match=rf"q: the triton backend supports head dims .* got d={d}"):
            rk.prefix_attention(q, k, v, pk, pv, backend=backend)
        return
    _compare(_run(backend, q, k, v, pk, pv), _run("reference", q, k, v, pk, pv))


# ---------------------------------------------------------------- nn.PrefixKV with edge inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_kv_edges(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 2, 1, D, generator=gen), torch.randn(2, 1, 6, D, generator=gen), \
        torch.randn(2, 1, 6, D, generator=gen)
    lens = torch.tensor([3], dtype=torch.uint8).expand(2)
    kg, vg = k.clone(), v.clone()
    kg[:, :, 3:], vg[:, :, 3:] = math.nan, math.inf
    for m in (PrefixKV(2, 1, D, 0), PrefixKV(2, 1, D, 4), PrefixKV(2, 1, D, 4, num_tasks=2)):
        kw = dict(kv_lengths=lens, backend=backend)
        if m.num_tasks > 1:
            kw["task_ids"] = torch.tensor([1, 0], dtype=torch.int8)
        out = m.attend(1, q.bfloat16(), kg.bfloat16(), vg.bfloat16(), **kw)  # float32 parameters, bf16 model
        out.float().sum().backward()
        assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
        assert m.prefix.grad.dtype == torch.float32 and torch.isfinite(m.prefix.grad).all()


def test_prefix_kv_on_the_meta_device():
    with torch.device("meta"):
        m = PrefixKV(2, 2, 8, 5, num_tasks=2)
        mp = PrefixKV(2, 2, 8, 5, projection_hidden=4)
        q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    out = m.attend(1, q, k, v, task_ids=torch.zeros(2, dtype=torch.uint8, device="meta"))
    out.sum().backward()
    assert out.device.type == "meta" and out.shape == q.shape and m.prefix.grad.shape == m.prefix.shape
    assert mp.attend(0, q, k, v).shape == q.shape


def test_prefix_kv_refuses_bad_arguments_by_name():
    with pytest.raises(ValueError, match="projection_hidden: expected None or a positive int, got True"):
        PrefixKV(2, 2, 8, 5, projection_hidden=True)
    with pytest.raises(TypeError, match=r"keys\[0\]: expected a floating dtype"):
        PrefixKV.from_kv_cache(torch.zeros(2, 2, 5, 8, dtype=torch.long), torch.zeros(2, 2, 5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"values\[1\]: expected the dtype and device of keys\[0\]"):
        PrefixKV.from_kv_cache(torch.randn(2, 2, 5, 8), [torch.randn(2, 5, 8), torch.randn(2, 5, 8).half()])


def test_prefix_kv_from_a_float64_cache():
    keys, values = torch.randn(2, 1, 4, D, dtype=torch.float64), torch.randn(2, 1, 4, D, dtype=torch.float64)
    m = PrefixKV.from_kv_cache(keys, values)
    q, k, v = torch.randn(1, 2, 3, D), torch.randn(1, 1, 3, D), torch.randn(1, 1, 3, D)
    want = rk.prefix_attention(q, k, v, keys[1].float(), values[1].float(), backend="reference")
    for backend in ("composite", "triton", "auto"):
        assert_close(m.attend(1, q, k, v, backend=backend), want, name=backend)
