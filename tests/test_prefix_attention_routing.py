"""How prefix_attention and merge_attention_states pick the cuda backend (issue 18), testable without a GPU.

The CUDA decode kernels serve the forward of decode calls only. An explicit ``backend="cuda"`` refuses a call that
needs gradients, has more than 16 queries per row or a head dim past 512, naming what to use; ``auto`` on CUDA
takes them for decode where at most 16 queries read each prefix kv head (or there is no prefix) and falls back to
triton (composite for head dims triton lacks) otherwise. The backend choice is replaced here by one that answers
"cuda", so the op layer's decisions run on CPU tensors; the kernels themselves are tested in
tests/test_prefix_attention_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

import reprokernels as rk
from reprokernels._backend import BackendUnavailableError
from reprokernels.ops import prefix_attention as op
from reprokernels.reference import prefix_attention as R


def _inputs(B=2, Hq=4, Hkv=2, Lq=1, Lk=9, P=5, d=32, grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, d, generator=g) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    pk, pv = (torch.randn(Hkv, P, d, generator=g) for _ in range(2))
    if grad:
        q.requires_grad_(True)
    return q, k, v, pk, pv


def test_cuda_on_cpu_tensors_is_unavailable():
    q, k, v, pk, pv = _inputs()
    with pytest.raises(BackendUnavailableError, match="cuda"):
        rk.prefix_attention(q, k, v, pk, pv, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        rk.merge_attention_states(q, q[..., 0], q, q[..., 0], backend="cuda")


@pytest.mark.parametrize("case, match", [
    (dict(grad=True), r"no backward.*triton"),
    (dict(Lq=17), r"at most 16 queries per row.*Lq=17"),
    (dict(d=520), r"head dims up to 512.*d=520"),
])
def test_explicit_cuda_refuses_what_it_cannot_serve(monkeypatch, case, match):
    monkeypatch.setattr(op, "resolve_backend_for", lambda *a, **k: "cuda")
    q, k, v, pk, pv = _inputs(**case)
    with pytest.raises(ValueError, match=match):
        rk.prefix_attention(q, k, v, pk, pv, backend="cuda")


def test_explicit_cuda_refuses_float64(monkeypatch):
    monkeypatch.setattr(op, "resolve_backend_for", lambda *a, **k: "cuda")
    q, k, v, pk, pv = (t.double() for t in _inputs())
    with pytest.raises(ValueError, match="float64"):
        rk.prefix_attention(q, k, v, pk, pv, backend="cuda")


@pytest.mark.parametrize("B, Hq, Hkv, Lq, P, want", [
    (1, 32, 8, 1, 2048, True),     # 4 queries per prefix kv head
    (4, 32, 8, 1, 2048, True),     # 16
    (5, 32, 8, 1, 2048, False),    # 20: the prefix GEMM belongs on tensor cores
    (64, 32, 8, 1, 2048, False),
    (64, 32, 8, 1, 0, True),       # no prefix: own caches only, memory-bound
    (2, 8, 8, 16, 100, False),     # 32 queries
])
def test_auto_prefers_cuda_by_queries_per_prefix_head(B, Hq, Hkv, Lq, P, want):
    assert op.auto_prefers_cuda(B, Hq, Hkv, Lq, P) is want


def test_auto_falls_back_when_cuda_cannot_serve(monkeypatch):
    """auto on a training call (gradients) that the choice answered 'cuda' for runs on triton (or composite)
    instead, with the reference's result and gradient."""
    monkeypatch.setattr(op, "resolve_backend_for", lambda *a, **k: "cuda")
    seen = []
    real = op.apply_function

    def spy(fn, *args):
        seen.append(args[-1])
        return real(fn, *args)

    monkeypatch.setattr(op, "apply_function", spy)
    q, k, v, pk, pv = _inputs(grad=True)
    out = rk.prefix_attention(q, k, v, pk, pv)
    assert seen and seen[-1] in ("triton", "composite")
    ref = R.prefix_attention_values(q, k, v, pk, pv, None, None, None, True, 32 ** -0.5)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    (gq,) = torch.autograd.grad(out.sum(), q)
    (rq,) = torch.autograd.grad(ref.sum(), q)
    torch.testing.assert_close(gq, rq, rtol=1e-4, atol=1e-5)


def test_merge_auto_stays_reference_for_gradients_and_float64(monkeypatch):
    monkeypatch.setattr(op, "resolve_backend_for", lambda *a, **k: "cuda")
    oa = torch.randn(3, 4, requires_grad=True)
    la = torch.randn(3)
    o, _ = rk.merge_attention_states(oa, la, torch.randn(3, 4), torch.randn(3))
    assert o.requires_grad  # the differentiable reference ran
    with pytest.raises(ValueError, match=r"forward-only.*reference"):
        rk.merge_attention_states(oa, la, torch.randn(3, 4), torch.randn(3), backend="cuda")
    od = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        rk.merge_attention_states(od, la, od, la, backend="cuda")


# ---- registration of the cuda path: opcheck with the kernels' host emulation standing in for the device --------

def _emulating(monkeypatch):
    """The registered ops' 'cuda' backend runs the CUDA kernels' host emulation on CPU tensors."""
    from reprokernels import _cuda
    if not _cuda.extension_built():
        pytest.skip("reprokernels._C is not built")
    import functools

    from reprokernels.cuda import prefix_attention as cu
    monkeypatch.setattr(cu, "prefix_attention", functools.partial(cu.prefix_attention, emulate=True))
    monkeypatch.setattr(cu, "merge_attention_states", functools.partial(cu.merge_attention_states, emulate=True))


@pytest.mark.parametrize("tasks", [False, True])
def test_opcheck_cuda_decode_forward(monkeypatch, tasks):
    _emulating(monkeypatch)
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, Lk, P, d = 3, 4, 2, 11, 7, 32
    q = torch.randn(B, Hq, 2, d, generator=g)
    k, v = torch.randn(B, Hkv, Lk, d, generator=g), torch.randn(B, Hkv, Lk, d, generator=g)
    shape = (2, Hkv, P, d) if tasks else (Hkv, P, d)
    pk, pv = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    tid = torch.tensor([1, 0, 1]) if tasks else None
    kvl = torch.tensor([11, 0, 5])
    torch.library.opcheck(torch.ops.reprokernels.prefix_attention_fwd,
                          (q, k, v, pk, pv, tid, None, kvl, True, 0.3, "cuda"))


def test_opcheck_cuda_merge(monkeypatch):
    _emulating(monkeypatch)
    g = torch.Generator().manual_seed(2)
    oa, ob = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g).to(torch.bfloat16)
    la, lb = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    la[0, 0] = float("-inf")
    torch.library.opcheck(torch.ops.reprokernels.merge_attention_states_fwd, (oa, la, ob, lb, "cuda"))
