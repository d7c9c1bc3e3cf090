"""prefix_attention and merge_attention_states: the reference's semantics (exact identities), the composite
backend against it (forward, LSE, all five gradients), registration (opcheck, compile, export), errors, and the
composite's memory plan (nothing of size B * P * d allocated)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import reprokernels as rk
from reprokernels.composite import prefix_attention as comp
from reprokernels.reference import prefix_attention as ref
from tests.utils import assert_close, grads_match_compiled

BACKENDS = ["reference", "composite"]
NAMES = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")


def _make(B=2, Hq=4, Hkv=2, Lq=5, Lk=7, P=3, d=8, T=None, dtype=torch.float64, seed=0, pad=None, layout="contiguous"):
    """Inputs as a dict of keyword arguments to prefix_attention (q, k, v, prefix_k, prefix_v, task_ids, masks)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q = rnd(B, Hq, Lq, d)
    k, v = rnd(B, Hkv, Lk, d), rnd(B, Hkv, Lk, d)
    if layout == "transposed":  # the (B, L, H, d) projections of a real model, viewed as (B, H, L, d)
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    kw: dict = dict(q=q, k=k, v=v, prefix_k=None, prefix_v=None)
    if P is not None:
        shape = (Hkv, P, d) if T is None else (T, Hkv, P, d)
        kw.update(prefix_k=rnd(*shape), prefix_v=rnd(*shape))
        if T is not None:
            kw["task_ids"] = torch.randint(0, T, (B,), generator=g)
    if pad == "mask":
        kw["key_padding_mask"] = torch.rand(B, Lk, generator=g) > 0.3
    elif pad == "lengths":
        kw["kv_lengths"] = torch.randint(0, Lk + 1, (B,), generator=g)
    return kw


def _run(backend, kw, *, causal=True, scale=None, grad_seed=1):
    """(out, lse, dq, dk, dv, dprefix_k, dprefix_v) with a fixed output gradient."""
    leaves = {n: kw[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")
              if kw.get(n) is not None}
    args = {**kw, **leaves}
    out, lse = rk.prefix_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("prefix_k"),
                                   args.pop("prefix_v"), causal=causal, scale=scale, return_lse=True,
                                   backend=backend, **args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    if out.numel():
        out.backward(g)
    grads = [leaves[n].grad if n in leaves else None for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    return out, lse, *grads


def _compare(got, want, dtype=None, scale=1.0):
    for name, a, b in zip(("out", "lse", *NAMES), got, want, strict=True):
        if b is None or b.numel() == 0:
            continue
        assert a is not None, name
        if dtype is None:
            assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert not torch.isnan(a).any(), f"{name} has NaN"
        assert_close(a, b.to(a.dtype) if dtype is None else b, dtype=dtype, scale=scale, name=name)


def _sdpa_bottom_right(q, k, v, causal, keep=None, scale=None):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    Lq, Lk = q.shape[2], k.shape[2]
    mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) if causal else torch.ones(Lq, Lk, dtype=torch.bool)
    if keep is not None:
        mask = mask & keep[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# ---------------------------------------------------------------- reference: its own backward, identities


@pytest.mark.parametrize("cfg", [
    dict(), dict(T=3), dict(P=None), dict(P=0), dict(pad="mask", Lq=9, Lk=4), dict(pad="lengths", Hq=3, Hkv=1),
])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_backward_is_autograd_of_the_forward(cfg, causal):
    kw = _make(**cfg)
    names = [n for n in ("q", "k", "v", "prefix_k", "prefix_v") if kw[n] is not None]
    leaves = {n: kw[n].clone().requires_grad_() for n in names}
    args = [leaves.get(n, kw[n]) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    extra = [kw.get(n) for n in ("task_ids", "key_padding_mask", "kv_lengths")]
    out, lse = ref.prefix_attention_values(*args, *extra, causal, 0.3)
    g = torch.randn(out.shape, dtype=out.dtype)
    want = torch.autograd.grad(out, [leaves[n] for n in names], g, materialize_grads=True)
    got = ref.prefix_attention_backward(g, *[kw[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")], *extra,
                                        out, lse, causal, 0.3, True, True, True, True, True)
    got = [t for t in got if t is not None]
    for name, a, b in zip(names, got, want, strict=True):
        assert_close(a, b, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Lq,Lk", [(5, 5), (3, 8), (8, 3), (1, 6)])
def test_no_prefix_equals_sdpa_with_bottom_right_causal_mask(backend, Lq, Lk):
    kw = _make(Lq=Lq, Lk=Lk, P=None)
    out = rk.prefix_attention(kw["q"], kw["k"], kw["v"], backend=backend)
    want = _sdpa_bottom_right(kw["q"], kw["k"], kw["v"], True)
    if Lq > Lk:  # the first Lq - Lk queries see no key: 0, where SDPA gives NaN
        assert torch.equal(out[:, :, : Lq - Lk], torch.zeros_like(out[:, :, : Lq - Lk]))
        out, want = out[:, :, Lq - Lk:], want[:, :, Lq - Lk:]
    assert_close(out, want)
    empty = {**kw, "prefix_k": kw["prefix_k"], "prefix_v": kw["prefix_v"]}
    empty = _make(Lq=Lq, Lk=Lk, P=0)  # P = 0 is the same as no prefix
    assert_close(rk.prefix_attention(**empty, backend=backend), rk.prefix_attention(kw["q"], kw["k"], kw["v"],
                                                                                    backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_merge_of_prefix_part_and_sequence_part_is_full_attention(backend, causal):
    kw = _make(B=3, Hq=4, Hkv=2, Lq=4, Lk=6, P=5, pad="mask")
    q, k, v, pk, pv = kw["q"], kw["k"], kw["v"], kw["prefix_k"], kw["prefix_v"]
    o_seq, l_seq = rk.prefix_attention(q, k, v, causal=causal, key_padding_mask=kw["key_padding_mask"],
                                       return_lse=True, backend=backend)
    # the prefix part alone: the prefix as the sequence's keys, no causal mask
    B = q.shape[0]
    o_pre, l_pre = rk.prefix_attention(q, pk.expand(B, *pk.shape), pv.expand(B, *pv.shape), causal=False,
                                       return_lse=True, backend=backend)
    o, lse = rk.merge_attention_states(o_pre, l_pre, o_seq, l_seq)
    want, want_lse = rk.prefix_attention(**kw, causal=causal, return_lse=True, backend="reference")
    assert_close(o, want)
    assert_close(lse, want_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_prefix_rescales_the_plain_attention(backend):
    kw = _make(B=2, Hq=2, Hkv=2, Lq=4, Lk=4, P=6)
    q, k, v = kw["q"], kw["k"], kw["v"]
    zeros = torch.zeros_like(kw["prefix_k"])
    out, lse = rk.prefix_attention(q, k, v, zeros, zeros, return_lse=True, backend=backend)
    o0, l0 = rk.prefix_attention(q, k, v, return_lse=True, backend=backend)
    P = zeros.shape[1]
    e = torch.exp(l0)
    assert_close(out, o0 * (e / (e + P)).unsqueeze(-1))
    assert_close(lse, torch.log(e + P))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [None, 2])
def test_decode_with_kv_lengths_equals_the_last_row_of_training(backend, T):
    B, Lmax = 3, 9
    kw = _make(B=B, Hq=4, Hkv=1, Lq=Lmax, Lk=Lmax, P=5, T=T)
    lengths = torch.tensor([9, 4, 1])
    q_last = torch.stack([kw["q"][b, :, n - 1] for b, n in enumerate(lengths.tolist())]).unsqueeze(2)
    dec = {**kw, "q": q_last, "kv_lengths": lengths}
    out = rk.prefix_attention(**dec, backend=backend)
    for b, n in enumerate(lengths.tolist()):
        row = {key: (t[b:b + 1] if key in ("q", "k", "v", "task_ids") else t) for key, t in kw.items()
               if t is not None}
        row["q"], row["k"], row["v"] = row["q"][:, :, :n], row["k"][:, :, :n], row["v"][:, :, :n]
        train = rk.prefix_attention(**row, backend="reference")
        assert_close(out[b, :, 0], train[0, :, -1], name=f"row {b}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_invariance(backend):
    kw = _make(B=4, Lq=3, Lk=6, P=4, T=3, pad="lengths", dtype=torch.float32)
    out = rk.prefix_attention(**kw, backend=backend)
    for b in range(4):
        one = {key: (t[b:b + 1] if key in ("q", "k", "v", "task_ids", "kv_lengths") else t)
               for key, t in kw.items() if t is not None}
        assert_close(rk.prefix_attention(**one, backend=backend)[0], out[b], name=f"row {b}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("P", [None, 3])
def test_fully_padded_row_gives_zeros_not_nan(backend, P):
    kw = _make(B=2, Lq=3, Lk=5, P=P, pad="mask", dtype=torch.float32)
    kw["key_padding_mask"][0] = False
    res = _run(backend, kw, causal=False)
    out, lse = res[0], res[1]
    for t in res:
        if t is not None:
            assert not torch.isnan(t).any()
    if P is None:
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert bool((lse[0] == -math.inf).all())
        assert torch.equal(res[2][0], torch.zeros_like(res[2][0]))  # dq of a query that sees nothing
    else:
        assert torch.isfinite(lse).all()
    want = _run("reference", kw, causal=False)
    _compare(res, want, scale=5)


# ---------------------------------------------------------------- composite against the reference


@st.composite
def configs(draw):
    Hq, Hkv = draw(st.sampled_from([(1, 1), (4, 2), (8, 1)]))
    T = draw(st.sampled_from([None, None, 3]))
    P = draw(st.integers(0, 40)) if T is None else draw(st.integers(1, 40))
    return dict(B=draw(st.integers(0, 3)), Hq=Hq, Hkv=Hkv, Lq=draw(st.integers(1, 70)), Lk=draw(st.integers(1, 70)),
                P=draw(st.sampled_from([None, P])) if T is None else P, d=draw(st.sampled_from([4, 8, 16, 32])), T=T,
                pad=draw(st.sampled_from([None, "mask", "lengths"])),
                layout=draw(st.sampled_from(["contiguous", "transposed"])))


@settings(max_examples=40)
@given(cfg=configs(), causal=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_composite_matches_reference(cfg, causal, seed, dtype):
    kw = _make(**cfg, seed=seed, dtype=dtype)
    got = _run("composite", kw, causal=causal)
    want = _run("reference", kw, causal=causal)
    _compare(got, want, scale=5 if dtype == torch.float32 else 100)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_composite_half_precision_against_float32_reference(dtype):
    kw = _make(B=2, Hq=4, Hkv=2, Lq=9, Lk=13, P=7, d=16, pad="lengths", dtype=dtype)
    kw["prefix_k"], kw["prefix_v"] = kw["prefix_k"].float(), kw["prefix_v"].float()  # float32 master weights
    got = _run("composite", kw)
    want = _run("reference", {n: (t.float() if torch.is_tensor(t) and t.is_floating_point() else t)
                              for n, t in kw.items()})
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[5].dtype == torch.float32
    _compare(got, want, dtype=dtype, scale=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [dict(pad="mask", T=2), dict(pad="lengths", Lq=4, Lk=2), dict(P=None, Lq=2, Lk=3)])
def test_gradcheck_float64(backend, cfg):
    kw = _make(**{"B": 2, "Hq": 2, "Hkv": 1, "Lq": 3, "Lk": 4, "d": 4, "P": 2, **cfg})
    names = [n for n in ("q", "k", "v", "prefix_k", "prefix_v") if kw[n] is not None]
    rest = {n: t for n, t in kw.items() if n not in names}

    def f(*xs):
        return rk.prefix_attention(**dict(zip(names, xs, strict=True)), **rest, backend=backend)

    torch.autograd.gradcheck(f, [kw[n].clone().requires_grad_() for n in names])


def test_empty_sizes():
    for cfg in (dict(B=0), dict(Lq=0), dict(Lk=0), dict(Lk=0, P=None)):
        kw = _make(**cfg)
        want = _run("reference", kw, causal=False)
        got = _run("composite", kw, causal=False)
        assert got[0].shape == want[0].shape
        _compare(got, want)


def test_frozen_prefix_and_frozen_backbone_get_no_gradient():
    kw = _make()
    q = kw["q"].clone().requires_grad_()
    out = rk.prefix_attention(q, kw["k"], kw["v"], kw["prefix_k"], kw["prefix_v"], backend="composite")
    out.sum().backward()
    assert q.grad is not None and kw["prefix_k"].grad is None and kw["k"].grad is None


# ---------------------------------------------------------------- merge_attention_states


def test_merge_gradcheck_with_inf_partitions():
    g = torch.Generator().manual_seed(0)
    o_a, o_b = torch.randn(2, 5, 3, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, generator=g,
                                                                                   dtype=torch.float64)
    l_a, l_b = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g,
                                                                                 dtype=torch.float64)
    l_a[0, :2] = -math.inf
    l_b[0, 1:3] = -math.inf  # [0, 1]: both -inf
    xs = [t.clone().requires_grad_() for t in (o_a, l_a, o_b, l_b)]

    def f(*xs):
        o, lse = rk.merge_attention_states(*xs)
        return o, torch.where(torch.isinf(lse), 0.0, lse)  # finite differences of -inf are NaN

    torch.autograd.gradcheck(f, xs)
    o, lse = rk.merge_attention_states(*xs)
    assert torch.equal(o[0, 1], torch.zeros(3, dtype=torch.float64)) and lse[0, 1] == -math.inf
    (o.sum() + lse[torch.isfinite(lse)].sum()).backward()
    for x in xs:
        assert not torch.isnan(x.grad).any()
    assert_close(o[0, 0], o_b[0, 0])  # a -inf partition has weight 0
    assert_close(lse[1], torch.logaddexp(l_a[1], l_b[1]))


# ---------------------------------------------------------------- memory plan of the composite backend


class _AllocRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("T", [None, 3])
def test_composite_never_allocates_the_expanded_prefix(T):
    B, Hq, Hkv, Lq, Lk, P, d = 16, 2, 2, 1, 3, 40, 64  # decode: B * P * d dwarfs every legitimate tensor
    kw = _make(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, P=P, d=d, T=T, pad="lengths", dtype=torch.float32)
    args = [kw.get(n) for n in ("q", "k", "v", "prefix_k", "prefix_v", "task_ids", "key_padding_mask", "kv_lengths")]
    with _AllocRecorder() as rec:
        out, lse = comp.prefix_attention(*args, True, 0.125)
        comp.prefix_attention_backward(torch.ones_like(out), *args, out, lse, True, 0.125, True, True, True, True,
                                       True)
    biggest = max(rec.sizes, key=lambda s: s[1])
    limit = B * P * d  # the batch's copy of one kv head's prefix
    assert biggest[1] < limit, f"{biggest[0]} allocated {biggest[1]} elements (B*P*d = {limit})"
    with _AllocRecorder() as rec:  # the reference does materialise it: the recorder sees it
        ref.prefix_attention(*args, True, 0.125)
    assert max(s for _, s in rec.sizes) >= limit


class _StorageRecorder(_AllocRecorder):
    """Records the storage size (elements) of every op output: a stride-0 ``expand`` view allocates nothing."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.untyped_storage().nbytes() // max(t.element_size(), 1)))
        return out


@pytest.mark.parametrize("T", [None, 3])
def test_composite_flash_plan_never_allocates_the_expanded_prefix(T):
    # G * Lq = 64 query rows per batch row: the prefix goes through the flash kernel (stride-0 expanded prefix
    # forward, one backward call per batch row); B * P * d still dwarfs every legitimate tensor
    B, Hq, Hkv, Lq, Lk, P, d = 16, 1, 1, 64, 3, 512, 8
    kw = _make(B=B, Hq=Hq, Hkv=Hkv, Lq=Lq, Lk=Lk, P=P, d=d, T=T, pad="lengths", dtype=torch.float32)
    args = [kw.get(n) for n in ("q", "k", "v", "prefix_k", "prefix_v", "task_ids", "key_padding_mask", "kv_lengths")]
    assert comp._flash_prefix(kw["q"], kw["prefix_k"])
    with _StorageRecorder() as rec:
        out, lse = comp.prefix_attention(*args, True, 0.125)
        comp.prefix_attention_backward(torch.ones_like(out), *args, out, lse, True, 0.125, True, True, True, True,
                                       True)
    biggest = max(rec.sizes, key=lambda s: s[1])
    assert biggest[1] < B * P * d, f"{biggest[0]} allocated {biggest[1]} elements (B*P*d = {B * P * d})"


# ---------------------------------------------------------------- composite: query chunks and the flash plan


def test_composite_splits_short_causal_attention_into_query_chunks():
    q = torch.zeros(2, 4, 256, 8)
    chunks = comp._seq_chunks(q, 256, None, None, True)  # the CPU training target: Lq = Lk = 256
    assert [(c.a, c.b, c.kend, c.is_causal, c.mask is None) for c in chunks] == [
        (0, 64, 64, True, True), (64, 128, 128, False, False), (128, 256, 256, False, False)]
    assert len(comp._seq_chunks(q, 1024, None, None, True)) == 1  # > 512 keys: the kernel skips blocks itself
    assert len(comp._seq_chunks(q, 256, None, None, False)) == 1
    # Lq > Lk: the first Lq - Lk queries see no key; the chunks start after them, the first one square
    assert [(c.a, c.b, c.kend, c.is_causal) for c in comp._seq_chunks(q[:, :, :200], 150, None, None, True)] == [
        (50, 125, 75, True), (125, 200, 150, False)]
    assert comp._flash_prefix(q, torch.zeros(4, 3, 8)) and not comp._flash_prefix(q[:, :, :15], torch.zeros(4, 3, 8))
    assert not comp._flash_prefix(q.half(), torch.zeros(4, 3, 8))  # mixed dtypes: the GEMM plan


@pytest.mark.parametrize("cfg", [
    dict(), dict(pad="mask"), dict(pad="lengths"), dict(T=3), dict(T=3, pad="mask", Hq=4, Hkv=1),
    dict(Lq=131, Lk=160), dict(Lq=160, Lk=131, pad="lengths"), dict(P=None, pad="mask"), dict(P=None, Lq=150, Lk=130),
    dict(Hq=4, Hkv=2), dict(Hq=4, Hkv=1, T=2, layout="transposed"),
])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_composite_chunked_causal_and_flash_prefix_match_reference(cfg, causal, dtype):
    # real sizes: Lq >= 128 and Lk <= 512 split causal attention into query chunks; G * Lq >= 64 takes the flash plan
    kw = _make(**{"B": 3, "Hq": 2, "Hkv": 2, "Lq": 130, "Lk": 130, "P": 5, "d": 8, "dtype": dtype, **cfg})
    if kw.get("key_padding_mask") is not None:
        kw["key_padding_mask"][0] = False  # a row that sees no key of the sequence
    got = _run("composite", kw, causal=causal)
    want = _run("reference", kw, causal=causal)
    _compare(got, want, scale=5 if dtype == torch.float32 else 100)


@pytest.mark.parametrize("cfg", [
    dict(), dict(pad="mask", Lq=9, Lk=4), dict(pad="lengths", Hq=4, Hkv=1), dict(T=3, pad="mask"), dict(P=None),
    dict(Lq=3, Lk=11, T=2, layout="transposed"), dict(Lq=12, Lk=5),
])
@pytest.mark.parametrize("causal", [True, False])
def test_composite_every_shape_through_chunks_and_flash_plan(monkeypatch, cfg, causal):
    monkeypatch.setattr(comp, "_CHUNK_MIN_QUERIES", 2)
    monkeypatch.setattr(comp, "_FLASH_PREFIX_MIN_ROWS", 1)
    kw = _make(**{"Lq": 8, "Lk": 8, **cfg})
    got = _run("composite", kw, causal=causal)
    want = _run("reference", kw, causal=causal)
    _compare(got, want, scale=100)


def test_composite_flash_plan_is_deterministic():
    kw = _make(B=3, Hq=4, Hkv=2, Lq=130, Lk=130, P=7, d=16, T=2, pad="lengths", dtype=torch.float32)
    first, second = _run("composite", kw), _run("composite", kw)
    for name, a, b in zip(("out", "lse", *NAMES), first, second, strict=True):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    kw = _make(B=2, Hq=4, Hkv=2, Lq=3, Lk=5, P=2, d=8, T=2, pad="lengths", dtype=torch.float32)
    args = [kw.get(n) for n in ("q", "k", "v", "prefix_k", "prefix_v", "task_ids", "key_padding_mask", "kv_lengths")]
    torch.library.opcheck(torch.ops.reprokernels.prefix_attention_fwd, (*args, True, 0.3, backend))
    out, lse = torch.ops.reprokernels.prefix_attention_fwd(*args, True, 0.3, backend)
    torch.library.opcheck(torch.ops.reprokernels.prefix_attention_bwd,
                          (torch.randn_like(out), *args, out, lse, True, 0.3, [True] * 5, backend))
    torch.library.opcheck(torch.ops.reprokernels.prefix_attention_bwd,
                          (torch.randn_like(out), *args, out, lse, True, 0.3, [True, False, False, True, False],
                           backend))
    plain = _make(B=2, Lq=4, Lk=4, P=None, pad="mask", dtype=torch.float32)
    args = [plain.get(n) for n in ("q", "k", "v", "prefix_k", "prefix_v", "task_ids", "key_padding_mask",
                                   "kv_lengths")]
    torch.library.opcheck(torch.ops.reprokernels.prefix_attention_fwd, (*args, False, 0.3, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    kw = _make(B=2, Lq=3, Lk=5, P=2, d=8, dtype=torch.float32, pad="lengths")
    pk = kw["prefix_k"].clone().requires_grad_()

    def step(pk):
        return (rk.prefix_attention(kw["q"], kw["k"], kw["v"], pk, kw["prefix_v"], kv_lengths=kw["kv_lengths"],
                                    backend=backend) ** 2).sum()

    grads_match_compiled(step, pk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export(backend):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pk = torch.nn.Parameter(torch.randn(2, 3, 8))
            self.pv = torch.nn.Parameter(torch.randn(2, 3, 8))

        def forward(self, q, k, v):
            return rk.prefix_attention(q, k, v, self.pk, self.pv, backend=backend)

    kw = _make(B=2, Lq=3, Lk=5, d=8, dtype=torch.float32)
    m = M()
    ep = torch.export.export(m, (kw["q"], kw["k"], kw["v"]))
    assert_close(ep.module()(kw["q"], kw["k"], kw["v"]), m(kw["q"], kw["k"], kw["v"]))


def test_auto_is_composite_on_cpu():
    from reprokernels._backend import resolve_backend

    assert resolve_backend("prefix_attention", "auto", torch.device("cpu")) == "composite"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("change,exc,msg", [
    (dict(k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 8)), ValueError, "multiple of the kv heads"),
    (dict(v=torch.randn(2, 2, 6, 8)), ValueError, "v: expected the shape of k"),
    (dict(k=torch.randn(2, 2, 7, 4), v=torch.randn(2, 2, 7, 4)), ValueError, "k: expected (B=2"),
    (dict(prefix_v=None), ValueError, "prefix_k/prefix_v: expected both or neither"),
    (dict(prefix_k=torch.randn(3, 3, 8), prefix_v=torch.randn(3, 3, 8)), ValueError, "prefix_k: expected (Hkv=2"),
    (dict(prefix_k=torch.randn(2, 2, 3, 8), prefix_v=torch.randn(2, 2, 3, 8)), ValueError, "task_ids: a (T, Hkv"),
    (dict(task_ids=torch.tensor([0, 1])), ValueError, "task_ids: only used with"),
    (dict(key_padding_mask=torch.ones(2, 7)), TypeError, "key_padding_mask: expected a bool"),
    (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "key_padding_mask: expected shape"),
    (dict(kv_lengths=torch.tensor([3, 8])), ValueError, "kv_lengths: expected values in [0, 7]"),
    (dict(kv_lengths=torch.tensor([3, 3]), key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError,
     "at most one"),
    (dict(q=torch.randn(2, 4, 5)), ValueError, "q: expected a 4-D tensor"),
    (dict(k=torch.randn(2, 2, 7, 8, dtype=torch.float64), v=torch.randn(2, 2, 7, 8, dtype=torch.float64)),
     TypeError, "expected q's dtype"),
    (dict(q=torch.ones(2, 4, 5, 8, dtype=torch.long)), TypeError, "q: expected a floating dtype"),
])
def test_errors_name_the_argument(change, exc, msg):
    kw = _make(dtype=torch.float32)
    kw.update(change)
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace("[", r"\[")):
        rk.prefix_attention(**kw)


def test_explicit_unavailable_backend_raises():
    kw = _make(dtype=torch.float32)
    with pytest.raises(rk.BackendUnavailableError):
        rk.prefix_attention(**kw, backend="cuda")


def test_merge_errors():
    o, lse = torch.randn(2, 3, 4), torch.randn(2, 3)
    with pytest.raises(ValueError, match="lse_b: expected shape"):
        rk.merge_attention_states(o, lse, o, torch.randn(2, 4))
    with pytest.raises(ValueError, match="o_b: expected the shape of o_a"):
        rk.merge_attention_states(o, lse, torch.randn(2, 3, 5), lse)


# ---------------------------------------------------------------- the fused Triton backend through the op


@pytest.mark.skipif(not rk._backend.triton_installed(), reason="triton is not installed")
@pytest.mark.parametrize("cfg", [
    dict(), dict(T=3, pad="mask"), dict(P=None, Lq=9, Lk=4), dict(pad="lengths", Hq=4, Hkv=1, Lq=1),
    dict(B=0), dict(P=17, Lk=33, Lq=20, layout="transposed"),
])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_through_the_op_matches_reference(cfg, causal):
    kw = _make(**{"d": 32, "dtype": torch.float32, **cfg})
    _compare(_run("triton", kw, causal=causal), _run("reference", kw, causal=causal), scale=4.0)


@pytest.mark.skipif(not rk._backend.triton_installed(), reason="triton is not installed")
def test_triton_opcheck():
    kw = _make(d=32, dtype=torch.float32, T=2, pad="mask")
    args = (kw["q"], kw["k"], kw["v"], kw["prefix_k"], kw["prefix_v"], kw["task_ids"], kw["key_padding_mask"], None)
    torch.library.opcheck(torch.ops.reprokernels.prefix_attention_fwd, (*args, True, 0.3, "triton"))
    out, lse = torch.ops.reprokernels.prefix_attention_fwd(*args, True, 0.3, "triton")
    torch.library.opcheck(torch.ops.reprokernels.prefix_attention_bwd,
                          (torch.randn_like(out), *args, out, lse, True, 0.3, [True] * 5, "triton"))


def test_triton_rejects_unsupported_head_dims_clearly():
    kw = _make(d=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q: the triton backend supports head dims \(32, 64, 80, 96, 128, 256\), "
                                         r"got d=8"):
        rk.prefix_attention(kw["q"], kw["k"], kw["v"], kw["prefix_k"], kw["prefix_v"], backend="triton")


def test_op_and_kernels_agree_on_the_supported_head_dims():
    pytest.importorskip("triton")
    from reprokernels.ops.prefix_attention import TRITON_HEAD_DIMS
    from reprokernels.triton.prefix_attention import SUPPORTED_HEAD_DIMS

    assert tuple(TRITON_HEAD_DIMS) == tuple(SUPPORTED_HEAD_DIMS)
