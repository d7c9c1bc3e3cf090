"""auto's route for small CPU prefix attention: concat + SDPA as plain autograd (composite.concat_sdpa), against
the reference, forward and every gradient, and when auto takes it."""

from __future__ import annotations

import pytest
import torch

import reprokernels as rk
from reprokernels.composite import prefix_attention as comp

from .utils import assert_close

CASES = [
    dict(B=3, Hq=4, Hkv=2, Lq=7, Lk=7, P=5, d=8, causal=True),
    dict(B=2, Hq=3, Hkv=3, Lq=9, Lk=4, P=3, d=5, causal=True),  # Lq > Lk: early queries see only the prefix
    dict(B=4, Hq=2, Hkv=1, Lq=1, Lk=11, P=6, d=16, causal=True, lengths=True),  # decoding against a cache
    dict(B=3, Hq=4, Hkv=2, Lq=5, Lk=6, P=2, d=8, causal=False, padding=True),
    dict(B=5, Hq=2, Hkv=2, Lq=6, Lk=6, P=4, d=4, causal=True, padding=True, T=3),
    dict(B=2, Hq=2, Hkv=1, Lq=3, Lk=0, P=4, d=8, causal=False),  # no own keys
]


def _inputs(c: dict, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, Lq, Lk, P, d = (c[n] for n in ("B", "Hq", "Hkv", "Lq", "Lk", "P", "d"))
    T = c.get("T")
    q = torch.randn(B, Hq, Lq, d, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, d, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, d, generator=g, dtype=dtype)
    shape = (T, Hkv, P, d) if T else (Hkv, P, d)
    pk = torch.randn(*shape, generator=g, dtype=dtype)
    pv = torch.randn(*shape, generator=g, dtype=dtype)
    kw = dict(causal=c["causal"])
    if T:
        kw["task_ids"] = torch.randint(0, T, (B,), generator=g).to(torch.int16)
    if c.get("padding"):
        mask = torch.rand(B, Lk, generator=g) > 0.3
        mask[:, -1] = True
        kw["key_padding_mask"] = mask
        k[~mask.view(B, 1, Lk).expand(B, Hkv, Lk)] = float("nan")  # unseen keys may hold anything
        v[~mask.view(B, 1, Lk).expand(B, Hkv, Lk)] = float("inf")
    if c.get("lengths"):
        lengths = torch.randint(1, Lk + 1, (B,), generator=g)
        kw["kv_lengths"] = lengths
        k[:, :, lengths.min():] = torch.where(torch.arange(Lk)[lengths.min():].view(1, 1, -1, 1)
                                              >= lengths.view(B, 1, 1, 1), float("nan"), k[:, :, lengths.min():])
    return [q, k, v, pk, pv], kw


def _run(leaves, kw, backend):
    xs = [t.clone().requires_grad_() for t in leaves]
    out = rk.prefix_attention(*xs, backend=backend, **kw)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    grads = torch.autograd.grad((out * g).sum(), xs)
    return (out, *grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("i", range(len(CASES)))
def test_concat_route_matches_reference(i, dtype, monkeypatch):
    leaves, kw = _inputs(CASES[i], dtype, seed=i)
    calls = []
    real = comp.concat_sdpa
    monkeypatch.setattr(comp, "concat_sdpa", lambda *a: calls.append(1) or real(*a))
    got = _run(leaves, kw, "auto")
    assert calls, "auto did not take the concat route"
    want = _run(leaves, kw, "reference")
    for name, a, b in zip(("out", "dq", "dk", "dv", "dpk", "dpv"), got, want, strict=True):
        assert torch.isfinite(a).all(), name
        tol = 2e-5 if dtype == torch.float32 else 1e-10
        assert_close(a, b, rtol=tol, atol=tol, name=name)
    if "key_padding_mask" in kw:  # unseen keys: gradients exactly 0
        unseen = ~kw["key_padding_mask"].view(kw["key_padding_mask"].shape[0], 1, -1)
        assert (got[2].transpose(1, 2)[unseen.transpose(1, 2).expand(-1, -1, got[2].shape[1])] == 0).all()


def _route_taken(leaves, kw, monkeypatch, **extra) -> bool:
    """Whether auto takes concat + SDPA for these leaves with gradients (training; without gradients a decode-sized
    call takes the cpu decode kernel: tests/test_prefix_attention_cpu.py)."""
    calls = []
    real = comp.concat_sdpa
    monkeypatch.setattr(comp, "concat_sdpa", lambda *a: calls.append(1) or real(*a))
    rk.prefix_attention(*(t if t is None else t.detach().requires_grad_() for t in leaves), **kw, **extra)
    return bool(calls)


def test_auto_keeps_composite_where_concat_is_not_the_fast_path(monkeypatch):
    leaves, kw = _inputs(CASES[0], torch.float32, seed=0)
    assert _route_taken(leaves, kw, monkeypatch)
    assert not _route_taken(leaves, kw, monkeypatch, return_lse=True)  # the LSE: composite gives it
    assert not _route_taken(leaves, kw, monkeypatch, backend="composite")  # asked for by name
    mixed = [*leaves[:3], leaves[3].double(), leaves[4].double()]  # a prefix of another dtype: rounded once
    assert not _route_taken(mixed, kw, monkeypatch)
    assert not _route_taken([leaves[0], leaves[1], leaves[2], None, None], kw, monkeypatch)  # no prefix
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _route_taken(leaves, kw, monkeypatch)
    big = dict(CASES[0], B=2, Hkv=2, Hq=2, Lq=1, Lk=8, P=comp.CONCAT_MAX_KEYS // 16, d=8, causal=False)
    big_leaves, big_kw = _inputs(big, torch.float32, seed=1)
    assert not _route_taken(big_leaves, big_kw, monkeypatch)


def test_concat_route_under_compile_is_the_registered_op():
    """Traced calls keep the registered op (its fake implementation): the route is eager-only."""
    leaves, kw = _inputs(CASES[0], torch.float32, seed=0)
    f = torch.compile(lambda *t: rk.prefix_attention(*t, **kw), backend="eager", fullgraph=True)
    assert_close(f(*leaves), rk.prefix_attention(*leaves, backend="reference", **kw), rtol=2e-5, atol=2e-5,
                 name="out")


def test_remembered_causal_mask_serves_inference_then_training():
    """The concat route remembers its small causal masks: one made under inference_mode must still serve a later
    call whose backward saves it, and a call of another size gets its own."""
    leaves, _ = _inputs(CASES[0], torch.float32, seed=3)
    with torch.inference_mode():
        first = comp.concat_sdpa(*leaves, None, None, None, True, 0.3)
    xs = [t.clone().requires_grad_() for t in leaves]
    again = comp.concat_sdpa(*xs, None, None, None, True, 0.3)
    again.sum().backward()
    assert torch.equal(first, again.detach())
    want = rk.prefix_attention(*leaves, causal=True, scale=0.3, backend="reference")
    assert_close(again.detach(), want, rtol=2e-5, atol=2e-5, name="out")
    other, _ = _inputs(CASES[1], torch.float32, seed=4)
    assert_close(comp.concat_sdpa(*other, None, None, None, True, 0.3),
                 rk.prefix_attention(*other, causal=True, scale=0.3, backend="reference"), rtol=2e-5, atol=2e-5,
                 name="out")
