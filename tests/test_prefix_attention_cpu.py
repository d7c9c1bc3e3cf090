"""The cpu backend of prefix_attention (the decode forward, csrc/cpu/prefix_attention.cpp) against the float64
reference: odd batch, query, key and prefix sizes, GQA / MQA, head dims 1 ... 200, a shared prefix and a per-task
table, empty own caches, ragged kv_lengths and padding masks with NaN / inf garbage in the unseen keys, causal or
not, float32 / float16 / bfloat16 beside a prefix of another dtype, every memory layout; outputs poisoned with NaN
first. Then determinism (threads, row blocking), the op layer's routing and refusals, and registration."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reprokernels as rk
from reprokernels import _cpu
from reprokernels.cpu import prefix_attention as cpa
from reprokernels.ops import prefix_attention as ops_pa

from .test_prefix_attention_cuda import DTYPES, LAYOUTS, compare, make_case
from .utils import empty_poisoned

pytestmark = pytest.mark.skipif(not _cpu.available(), reason="the CPU module is not built")

HEAD_DIMS = (1, 5, 16, 32, 64, 80, 128, 200)


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        return empty_poisoned(tuple(shape), dtype, device)

    monkeypatch.setattr(cpa, "empty_output", poisoned)


def run(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return cpa.prefix_attention(**c)


@settings(max_examples=120, deadline=None)
@given(B=st.integers(1, 5), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4]),
       Lq=st.one_of(st.sampled_from([1, 3, 16]), st.integers(1, 16)), d=st.sampled_from(HEAD_DIMS),
       P=st.sampled_from([0, 1, 7, 33, 100, 300]), Lk=st.sampled_from([0, 1, 5, 40, 150]),
       prefix=st.sampled_from([None, "shared", "table"]), tasks=st.sampled_from(["random", "one", "int32"]),
       mask=st.sampled_from([None, "len64", "len32", "padding"]), causal=st.booleans(),
       dtype=st.sampled_from(DTYPES), prefix_dtype=st.sampled_from([None, *DTYPES]),
       layout=st.tuples(*[st.sampled_from(LAYOUTS)] * 3), prefix_layout=st.tuples(*[st.sampled_from(LAYOUTS)] * 2),
       scale=st.sampled_from([None, 0.3]), seed=st.integers(0, 2**16))
def test_random_configs(B, Hkv, G, Lq, d, P, Lk, prefix, tasks, mask, causal, dtype, prefix_dtype, layout,
                        prefix_layout, scale, seed):
    g = torch.Generator().manual_seed(seed)
    c = make_case(B, Hkv * G, Hkv, Lq, Lk, P, d, g=g, dtype=dtype, prefix=prefix, mask=mask, causal=causal,
                  layout=layout, prefix_layout=prefix_layout, tasks=tasks, scale=scale, prefix_dtype=prefix_dtype)
    out, lse = run(c)
    compare(out, lse, c)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("G", [1, 4, 8])
def test_head_dims_and_groups(d, G):
    """Register tiles of 4 queries x 16 keys / features with their remainders: every head dim, groups of 1 to 8
    query heads per kv head (tiles across rows and heads), keys past one staged chunk of 64."""
    c = make_case(3, 2 * G, 2, 5, 77, 130, d, g=torch.Generator().manual_seed(d + G), mask="len64")
    compare(*run(c), c)


def test_queries_that_see_nothing():
    """No prefix, and own keys hidden by lengths 0, an all-False padding row or causal: out exactly 0, lse -inf."""
    for mask in ("len64", "padding"):
        c = make_case(4, 4, 2, 3, 6, 0, 16, g=torch.Generator().manual_seed(1), prefix=None, mask=mask)
        out, lse = run(c)
        compare(out, lse, c)
        assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    c = make_case(2, 2, 1, 8, 3, 0, 8, g=torch.Generator().manual_seed(2), prefix=None, mask=None, causal=True)
    out, lse = run(c)  # Lq > Lk: the first queries see no own key
    compare(out, lse, c)
    assert torch.isneginf(lse[:, :, :5]).all()


def test_large_scores_do_not_overflow():
    c = make_case(2, 4, 2, 3, 40, 20, 32, g=torch.Generator().manual_seed(3), magnitude=30.0)
    compare(*run(c), c, tol=8.0)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(7, 8, 2, 3), (1, 8, 1, 16)])
def test_bitwise_the_same_for_any_threads_and_blocking(threads, shape, monkeypatch):
    """Each output row's sums run in a fixed order: thread count, rows per work item and the split of an item's
    query rows (one kv head and one batch row: fewer items than threads; a score budget below the item's scores)
    change nothing."""
    B, Hq, Hkv, Lq = shape
    c = make_case(B, Hq, Hkv, Lq, 50, 90, 64, g=torch.Generator().manual_seed(4), mask="len32")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = run(c)
        torch.set_num_threads(threads)
        for rows, budget in ((1, 1 << 22), (5, 1 << 22), (64, 1 << 22), (64, 300), (64, 1)):
            # (a budget below one row's scores splits the items into single rows)
            monkeypatch.setattr(cpa, "ITEM_QUERY_ROWS", rows)
            monkeypatch.setattr(cpa, "SCORE_BUDGET", budget)
            got = run(c)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    finally:
        torch.set_num_threads(before)


def test_inputs_are_never_written():
    c = make_case(3, 4, 2, 2, 9, 5, 8, g=torch.Generator().manual_seed(5), prefix="table", mask="padding")
    snap = {n: t.clone() for n, t in c.items() if isinstance(t, torch.Tensor)}
    run(c)
    for n, t in snap.items():
        assert torch.equal(c[n], t) or (t.is_floating_point() and torch.equal(c[n].isnan(), t.isnan())), n


def test_kernel_refuses_indices_out_of_range():
    """The launcher's kernel checks task_ids and kv_lengths itself (what a compiled graph relies on)."""
    c = make_case(2, 2, 1, 1, 4, 3, 8, g=torch.Generator().manual_seed(6), prefix="table", mask="len64", T=3)
    with pytest.raises(_cpu.IndexRangeError, match="task_ids"):
        run({**c, "task_ids": torch.tensor([0, 3])})
    with pytest.raises(_cpu.IndexRangeError, match="kv_lengths"):
        run({**c, "kv_lengths": torch.tensor([5, 1])})


# ---------------------------------------------------------------- the op layer


def _op_inputs(B=3, Hq=4, Hkv=2, Lq=1, Lk=9, P=5, d=16, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(7)
    t = [torch.randn(s, generator=g).to(dtype).requires_grad_(grad) for s in
         ((B, Hq, Lq, d), (B, Hkv, Lk, d), (B, Hkv, Lk, d), (Hkv, P, d), (Hkv, P, d))]
    return t, torch.tensor([Lk, 0, 4][:B])


def test_op_backend_cpu_matches_the_reference_and_the_launcher():
    (q, k, v, pk, pv), lens = _op_inputs()
    got, lse = rk.prefix_attention(q, k, v, pk, pv, kv_lengths=lens, backend="cpu", return_lse=True)
    want, wlse = rk.prefix_attention(q, k, v, pk, pv, kv_lengths=lens, backend="reference", return_lse=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, wlse, rtol=1e-5, atol=1e-6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):  # the registered op's path
        again = rk.prefix_attention(q, k, v, pk, pv, kv_lengths=lens, backend="cpu")
    assert torch.equal(again, got)


def test_op_float64_prefix_is_rounded_like_the_reference():
    (q, k, v, pk, pv), lens = _op_inputs(dtype=torch.float16)
    pk64, pv64 = pk.double() + 1e-4, pv.double()
    got = rk.prefix_attention(q, k, v, pk64, pv64, kv_lengths=lens, backend="cpu")
    want = rk.prefix_attention(q, k, v, pk64, pv64, kv_lengths=lens, backend="reference")
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def test_op_refusals_name_what_to_use():
    (q, k, v, pk, pv), _ = _op_inputs(grad=True)
    with pytest.raises(ValueError, match=r"backend: the cpu backend .* no backward.*backend=.composite."):
        rk.prefix_attention(q, k, v, pk, pv, backend="cpu")
    (q, k, v, pk, pv), _ = _op_inputs(Lq=17)
    with pytest.raises(ValueError, match="at most 16 queries per row, got Lq=17"):
        rk.prefix_attention(q, k, v, pk, pv, backend="cpu")
    (q, k, v, pk, pv), _ = _op_inputs(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"float32, float16 and bfloat16, got torch\.float64"):
        rk.prefix_attention(q, k, v, pk, pv, backend="cpu")
    (q, k, v, pk, pv), lens = _op_inputs()
    with pytest.raises(ValueError, match=r"kv_lengths: expected values in \[0, 9\]"):
        rk.prefix_attention(q, k, v, pk, pv, kv_lengths=lens + 10, backend="cpu")


def _chosen(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = ops_pa._fwd

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(ops_pa, "_fwd", spy)
    return seen


def test_auto_takes_the_kernel_for_decoding_only(monkeypatch):
    """auto on CPU: the kernel for every call it serves (no gradients, at most 16 queries per row, kernel dtypes);
    composite (or concat + SDPA) for training, prefill and float64."""
    seen = _chosen(monkeypatch)
    (q, k, v, pk, pv), lens = _op_inputs()
    with torch.no_grad():
        rk.prefix_attention(q, k, v, pk, pv, kv_lengths=lens)
    assert seen == ["cpu"]
    seen.clear()
    (q, k, v, pk, pv), _ = _op_inputs(grad=True)
    rk.prefix_attention(q, k, v, pk, pv).sum().backward()
    (q, k, v, pk, pv), _ = _op_inputs(Lq=17)
    rk.prefix_attention(q, k, v, pk, pv)
    (q, k, v, pk, pv), _ = _op_inputs(dtype=torch.float64)
    rk.prefix_attention(q, k, v, pk, pv)
    assert "cpu" not in seen
    (q, k, v, pk, pv), _ = _op_inputs(B=1, Hq=16, Hkv=1, Lq=16)  # 256 queries per kv head: still the kernel
    with torch.no_grad():
        rk.prefix_attention(q, k, v, pk, pv)
    assert seen == ["cpu"]


def test_opcheck_and_compile():
    (q, k, v, pk, pv), lens = _op_inputs()
    args = (q, k, v, pk, pv, None, None, lens, True, 0.3, "cpu")
    torch.library.opcheck(torch.ops.reprokernels.prefix_attention_fwd, args)

    def decode(q, k, v, pk, pv, lens):
        return rk.prefix_attention(q, k, v, pk, pv, kv_lengths=lens, backend="cpu")

    with torch.no_grad():
        want = decode(q, k, v, pk, pv, lens)
        got = torch.compile(decode, fullgraph=True)(q, k, v, pk, pv, lens)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- the contract's edges, forward only


_DEGENERATE = [dict(B=0), dict(Lq=0), dict(Lk=0), dict(P=0), dict(Lk=0, P=0), dict(Hq=0), dict(B=0, T=3),
               dict(Lk=0, P=0, lengths=True), dict(P=0, lengths=True), dict(Lq=16, Lk=3, P=0)]


@pytest.mark.parametrize("cfg", _DEGENERATE, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_degenerate_sizes(cfg):
    """Empty batch, no queries, no own keys, no prefix, no query heads, rows that see nothing: the reference's
    empty results or O = 0 with LSE = -inf (tests/test_robustness_attention.py runs the differentiable backends)."""
    B, Lq, Lk, P, T = cfg.get("B", 2), cfg.get("Lq", 3), cfg.get("Lk", 5), cfg.get("P", 2), cfg.get("T")
    Hq = cfg.get("Hq", 2)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, Hq, Lq, 32, generator=gen), torch.randn(B, 1, Lk, 32, generator=gen),
               torch.randn(B, 1, Lk, 32, generator=gen))
    shape = (1, P, 32) if T is None else (T, 1, P, 32)
    pk, pv = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    kw = dict(task_ids=torch.zeros(B, dtype=torch.int64) if T is not None else None,
              kv_lengths=torch.zeros(B, dtype=torch.int32) if cfg.get("lengths") else None)
    got = rk.prefix_attention(q, k, v, pk, pv, return_lse=True, backend="cpu", **kw)
    want = rk.prefix_attention(q, k, v, pk, pv, return_lse=True, backend="reference", **kw)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(torch.isneginf(a), torch.isneginf(b)) and not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["q", "kv", "prefix", "all"])
def test_expanded_inputs(which):
    """Stride-0 inputs (expanded over the batch or heads, as a broadcast cache or a shared query would be)."""
    gen = torch.Generator().manual_seed(8)
    B, Hq, Hkv, Lq, Lk, P, d = 3, 4, 2, 2, 7, 5, 16
    q = torch.randn(B, Hq, Lq, d, generator=gen)
    k, v = torch.randn(B, Hkv, Lk, d, generator=gen), torch.randn(B, Hkv, Lk, d, generator=gen)
    pk, pv = torch.randn(Hkv, P, d, generator=gen), torch.randn(Hkv, P, d, generator=gen)
    if which in ("q", "all"):
        q = q[:1].expand(B, Hq, Lq, d)
    if which in ("kv", "all"):
        k, v = k[:, :1].expand(B, Hkv, Lk, d), v[:1].expand(B, Hkv, Lk, d)
    if which in ("prefix", "all"):
        pk, pv = pk[:, :1].expand(Hkv, P, d), pv[:1].expand(Hkv, P, d)
    lens = torch.tensor([7, 3, 0])
    got = rk.prefix_attention(q, k, v, pk, pv, kv_lengths=lens, backend="cpu")
    want = rk.prefix_attention(q, k, v, pk, pv, kv_lengths=lens, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cpu_route_leaves_index_ranges_to_the_kernel(monkeypatch):
    """The op makes no separate range pass over task_ids / kv_lengths where the cpu kernel runs (it checks them in
    its launch); other routes and empty outputs keep the op's own check, and a bad value is named either way."""
    calls: list[str] = []
    real = ops_pa.check_index_range
    monkeypatch.setattr(ops_pa, "check_index_range", lambda t, lo, hi, name, what="": calls.append(name) or
                        real(t, lo, hi, name, what))
    g = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 1, 4, 8, generator=g), torch.randn(2, 1, 4, 8)
    pk, pv = torch.randn(3, 1, 5, 8, generator=g), torch.randn(3, 1, 5, 8, generator=g)
    kw = dict(task_ids=torch.tensor([2, 0]), kv_lengths=torch.tensor([4, 1]))
    with torch.no_grad():
        rk.prefix_attention(q, k, v, pk, pv, backend="cpu", **kw)
        assert calls == []
        rk.prefix_attention(q, k, v, pk, pv, backend="reference", **kw)
        rk.prefix_attention(q[:0], k[:0], v[:0], pk, pv, backend="cpu", task_ids=kw["task_ids"][:0],
                            kv_lengths=kw["kv_lengths"][:0])
        assert calls == ["task_ids", "kv_lengths"] * 2
        with pytest.raises(ValueError, match=r"task_ids: expected values in \[0, 2\] .*got 3"):
            rk.prefix_attention(q, k, v, pk, pv, backend="cpu", task_ids=torch.tensor([3, 0]),
                                kv_lengths=kw["kv_lengths"])
