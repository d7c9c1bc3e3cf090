"""The fused Triton backend of prefix_attention against a local float64 oracle (under TRITON_INTERPRET=1 on CPU).

The oracle is deliberately the naive formulation: expand / gather the prefix to the batch, concatenate it
before the sequence's keys, repeat kv heads for GQA, build the explicit boolean mask (prefix always visible,
bottom-right causal, padding mask, kv_lengths), softmax in float64 with rows that see nothing set to 0, and
autograd for all five gradients. Shapes stay small: the interpreter runs one program after another.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from reprokernels import _alloc

from .utils import assert_close, traffic_counter

pa = pytest.importorskip("reprokernels.triton.prefix_attention")

HEADS = ((1, 1), (4, 2), (8, 1))
odd_len = st.integers(min_value=0, max_value=19).map(lambda i: 2 * i + 1)  # 1, 3, ..., 39


def oracle(q, k, v, pk, pv, task_ids, kpm, kvl, causal, scale):
    """(out, lse) in float64, differentiable w.r.t. every floating input."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if pk is None:
        P = 0
        PK = PV = torch.zeros((B, Hkv, 0, D), dtype=torch.float64)
    else:
        P = pk.shape[-2]
        if pk.dim() == 3:
            PK, PV = pk.double().expand(B, -1, -1, -1), pv.double().expand(B, -1, -1, -1)
        else:
            PK, PV = pk.double()[task_ids], pv.double()[task_ids]
    G = Hq // Hkv
    K = torch.cat([PK, k.double()], 2).repeat_interleave(G, 1)
    V = torch.cat([PV, v.double()], 2).repeat_interleave(G, 1)
    i = torch.arange(Lq)[:, None]
    j = torch.arange(Lk)[None, :]
    seen = torch.ones((B, 1, Lq, Lk), dtype=torch.bool)
    if causal:
        seen = seen & (j <= Lk - Lq + i)
    if kpm is not None:
        seen = seen & kpm[:, None, None, :]
    if kvl is not None:
        seen = seen & (j[None, None] < kvl[:, None, None, None])
    mask = torch.cat([torch.ones((B, 1, Lq, P), dtype=torch.bool), seen], -1)
    s = (q.double() @ K.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(mask, torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]), 0.0)
    return p @ V, lse


def make_case(B, Hq, Hkv, Lq, Lk, P, D, *, prefix="shared", T=3, padding="none", dtype=torch.float32,
              strided=False, gen=None):
    g = gen or torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(shape, generator=g).to(dtype)

    if strided:  # (B, L, H, d) storage seen as (B, H, L, d): the layout of a fused QKV projection
        q = rnd(B, Lq, Hq, D).transpose(1, 2)
        k = rnd(B, Lk, Hkv, D).transpose(1, 2)
        v = rnd(B, Lk, Hkv, D).transpose(1, 2)
    else:
        q, k, v = rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    pk = pv = task_ids = kpm = kvl = None
    if prefix == "shared":
        pk, pv = rnd(Hkv, P, D), rnd(Hkv, P, D)
    elif prefix == "task":
        pk, pv = rnd(T, Hkv, P, D), rnd(T, Hkv, P, D)
        task_ids = torch.randint(0, T, (B,), generator=g)
    if padding == "mask":
        kpm = torch.rand((B, Lk), generator=g) > 0.3
    elif padding == "lengths":
        kvl = torch.randint(0, Lk + 1, (B,), generator=g)
    return dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv, task_ids=task_ids, key_padding_mask=kpm,
                kv_lengths=kvl)


def run_triton(case, causal, scale, grad_out, need=(True,) * 5):
    c = case
    out, lse = pa.prefix_attention(c["q"], c["k"], c["v"], c["prefix_k"], c["prefix_v"], c["task_ids"],
                                   c["key_padding_mask"], c["kv_lengths"], causal, scale)
    grads = pa.prefix_attention_backward(grad_out, c["q"], c["k"], c["v"], c["prefix_k"], c["prefix_v"],
                                         c["task_ids"], c["key_padding_mask"], c["kv_lengths"], out, lse, causal,
                                         scale, *need)
    return out, lse, grads


def run_oracle(case, causal, scale, grad_out):
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    leaves = {n: (case[n].detach().double().requires_grad_() if case[n] is not None else None) for n in names}
    out, lse = oracle(leaves["q"], leaves["k"], leaves["v"], leaves["prefix_k"], leaves["prefix_v"],
                      case["task_ids"], case["key_padding_mask"], case["kv_lengths"], causal, scale)
    (out * grad_out.double()).sum().backward()
    grads = tuple(None if leaves[n] is None else leaves[n].grad for n in names)
    return out, lse, grads


def check(case, causal, *, dtype=torch.float32, scale_tol=1.0, gen=None):
    q = case["q"]
    D = q.shape[-1]
    scale = D ** -0.5
    g = gen or torch.Generator().manual_seed(1)
    grad_out = torch.randn(q.shape, generator=g).to(dtype)
    out, lse, grads = run_triton(case, causal, scale, grad_out)
    r_out, r_lse, r_grads = run_oracle(case, causal, scale, grad_out)
    assert out.dtype == dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    # fp16: inputs are exact in the oracle, the error is the kernel's fp16 rounding of P, dS and the output
    tol = dict(rtol=2e-4 * scale_tol, atol=2e-4 * scale_tol) if dtype == torch.float32 else \
        dict(rtol=1e-2 * scale_tol, atol=1e-2 * scale_tol)
    assert_close(out, r_out, name="out", **tol)
    assert_close(lse, r_lse, name="lse", **tol)  # -inf rows must match exactly (same_inf)
    for name, a, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, r_grads, strict=True):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == r.shape, name
        assert not torch.isnan(a).any(), name
        assert_close(a, r, name=name, **tol)
    return out, lse, grads


# --------------------------------------------------------------------------------------------------- property


@given(
    B=st.integers(0, 3), heads=st.sampled_from(HEADS), Lq=odd_len, Lk=odd_len, P=st.integers(0, 40),
    D=st.sampled_from([32, 80]), causal=st.booleans(), prefix=st.sampled_from(["none", "shared", "task"]),
    padding=st.sampled_from(["none", "mask", "lengths"]), strided=st.booleans(), seed=st.integers(0, 2**16),
)
def test_matches_oracle_float32(B, heads, Lq, Lk, P, D, causal, prefix, padding, strided, seed):
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    case = make_case(B, Hq, Hkv, Lq, Lk, P, D, prefix=prefix, padding=padding, strided=strided, gen=g)
    check(case, causal, gen=g)


# --------------------------------------------------------------------------------------------------- fixed cases


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,P,D,causal,prefix,padding", [
    (2, 4, 2, 33, 21, 17, 32, True, "task", "mask"),    # Lq > Lk: the first queries see only the prefix
    (3, 8, 1, 1, 37, 40, 80, True, "shared", "lengths"),  # decode: MQA, Lq = 1, kv_lengths
    (2, 1, 1, 19, 35, 0, 32, True, "shared", "none"),   # P = 0 with a prefix tensor: plain attention
    (1, 4, 2, 9, 9, 3, 96, False, "none", "mask"),      # padded BLOCK_D (96 -> 128), no prefix
])
def test_fixed_cases_float32(B, Hq, Hkv, Lq, Lk, P, D, causal, prefix, padding):
    check(make_case(B, Hq, Hkv, Lq, Lk, P, D, prefix=prefix, padding=padding), causal)


@pytest.mark.parametrize("causal,Lq,padding", [(True, 21, "mask"), (False, 21, "mask"), (True, 5, "lengths")])
def test_float16(causal, Lq, padding):
    case = make_case(2, 4, 2, Lq, 27, 13, 32, prefix="task", padding=padding, dtype=torch.float16)
    check(case, causal, dtype=torch.float16)


@pytest.mark.parametrize("prefix", ["shared", "task"])
def test_decode_path(prefix, monkeypatch):
    """The decode path (prefix-state GEMM stage + sequence pass from that state) against the oracle and the
    general path; GQA packs 4 heads x 3 queries x the task's rows into one M tile."""
    g = torch.Generator().manual_seed(3)
    case = make_case(3, 8, 2, 3, 29, 37, 32, prefix=prefix, T=2, padding="lengths", gen=g)
    case["key_padding_mask"] = torch.rand((3, 29), generator=g) > 0.2
    assert pa.use_decode_path(3, 37, case["kv_lengths"])
    out, lse, _ = check(case, True)
    monkeypatch.setattr(pa, "DECODE_MAX_LQ", 0)
    assert not pa.use_decode_path(3, 37, case["kv_lengths"])
    out2, lse2, _ = run_triton(case, True, 32 ** -0.5, torch.zeros_like(case["q"]), need=(False,) * 5)
    assert_close(out, out2, rtol=1e-5, atol=1e-5, name="out")
    assert_close(lse, lse2, rtol=1e-5, atol=1e-5, name="lse")



# --------------------------------------------------------------------------------------------------- decode path


def force_split(mp):
    """Split decode pass 2 whenever the own cache is longer than one key block (BLOCK_N = 16 here)."""
    mp.setattr(pa, "DECODE_SPLIT_MIN_PROGRAMS", 10**9)
    mp.setattr(pa, "DECODE_SPLIT_MIN_KEYS", 1)


def force_prefix_split(mp, min_keys=1):
    """Split decode stage 1 over the prefix into chunks of max(min_keys, BLOCK_N = 16 here) keys (rounded up to a
    multiple of 16) whenever P holds two of them."""
    mp.setattr(pa, "DECODE_PREFIX_SPLIT_MIN_PROGRAMS", 10**9)
    mp.setattr(pa, "DECODE_PREFIX_SPLIT_MIN_KEYS", min_keys)


def spy_splits(mp):
    """Record the (splits, chunk) the launcher picks: {"prefix": [(SP, chunk), ...], "own": [(S, chunk), ...]}."""
    seen = {"prefix": [], "own": []}
    for key, name in (("prefix", "decode_prefix_splits"), ("own", "decode_splits")):
        orig = getattr(pa, name)

        def spy(*args, _orig=orig, _key=key):
            res = _orig(*args)
            seen[_key].append(res)
            return res

        mp.setattr(pa, name, spy)
    return seen


def decode_case(B, Hq, Hkv, Lq, Lk, P, *, prefix, D=32, dtype=torch.float32, strided=False, seed=0):
    """A decode case whose kv_lengths hold both extremes: row 0 sees its whole cache, row 1 none of it."""
    g = torch.Generator().manual_seed(seed)
    case = make_case(B, Hq, Hkv, Lq, Lk, P, D, prefix=prefix, T=2, padding="lengths", dtype=dtype,
                     strided=strided, gen=g)
    case["kv_lengths"][0] = Lk
    if B > 1:
        case["kv_lengths"][1] = 0
    assert pa.use_decode_path(Lq, P, case["kv_lengths"])
    return case


def run_fwd(case, causal, scale):
    c = case
    return pa.prefix_attention(c["q"], c["k"], c["v"], c["prefix_k"], c["prefix_v"], c["task_ids"],
                               c["key_padding_mask"], c["kv_lengths"], causal, scale)


@given(
    B=st.integers(1, 3), heads=st.sampled_from(((4, 2), (8, 1))), Lq=st.integers(1, 16), Lk=odd_len,
    P=st.integers(1, 40), prefix=st.sampled_from(["shared", "task"]), causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]), split=st.booleans(), prefix_split=st.booleans(),
    strided=st.booleans(), seed=st.integers(0, 2**16),
)
def test_decode_matches_oracle(B, heads, Lq, Lk, P, prefix, causal, dtype, split, prefix_split, strided, seed):
    """Forward of the decode path (stage 1 split over 16-key prefix chunks or not, GQA-packed pass 2 split into
    own-key chunks + reduce or not) against the float64 oracle. Queries of a row whose own keys are all cut
    (kv_lengths 0, or causal with Lq > Lk) see the prefix."""
    Hq, Hkv = heads
    case = decode_case(B, Hq, Hkv, Lq, Lk, P, prefix=prefix, dtype=dtype, strided=strided, seed=seed)
    scale = 32 ** -0.5
    with pytest.MonkeyPatch.context() as mp:
        if split:
            force_split(mp)
        if prefix_split:
            force_prefix_split(mp)
        out, lse = run_fwd(case, causal, scale)
    r_out, r_lse = oracle(case["q"], case["k"], case["v"], case["prefix_k"], case["prefix_v"], case["task_ids"],
                          None, case["kv_lengths"], causal, scale)
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close(out, r_out, name="out", **tol)
    assert_close(lse, r_lse, name="lse", **tol)


@pytest.mark.parametrize("Hq,Hkv,prefix", [(4, 2, "task"), (8, 1, "shared")])
def test_decode_split_k(Hq, Hkv, prefix, monkeypatch):
    """A forced split (3 key chunks, G * Lq = 64 / 128 rows over several M blocks) equals the unsplit pass up to
    float32 rounding, is bitwise deterministic, and matches the oracle (float32 and float16)."""
    Lk, Lq = 45, 16
    case = decode_case(3, Hq, Hkv, Lq, Lk, 23, prefix=prefix)
    scale = 32 ** -0.5
    out1, lse1 = run_fwd(case, True, scale)
    force_split(monkeypatch)
    assert pa.decode_splits(3 * Hkv, Lk, 16) == (3, 16)
    out, lse = run_fwd(case, True, scale)
    out_again, lse_again = run_fwd(case, True, scale)
    assert torch.equal(out, out_again) and torch.equal(lse, lse_again)
    assert_close(out, out1, rtol=1e-5, atol=1e-5, name="out vs unsplit")
    assert_close(lse, lse1, rtol=1e-5, atol=1e-5, name="lse vs unsplit")
    r_out, r_lse = oracle(case["q"], case["k"], case["v"], case["prefix_k"], case["prefix_v"], case["task_ids"],
                          None, case["kv_lengths"], True, scale)
    assert_close(out, r_out, rtol=2e-4, atol=2e-4, name="out")
    assert_close(lse, r_lse, rtol=2e-4, atol=2e-4, name="lse")
    half = {n: (t.half() if torch.is_tensor(t) and t.is_floating_point() else t) for n, t in case.items()}
    out16, lse16 = run_fwd(half, True, scale)
    assert out16.dtype == torch.float16
    assert_close(out16, r_out, rtol=1e-2, atol=1e-2, name="out fp16")
    assert_close(lse16, r_lse, rtol=1e-2, atol=1e-2, name="lse fp16")



def test_decode_through_the_op_equals_reference(monkeypatch):
    """The public op (which takes kv_lengths but never with key_padding_mask) on the split decode path against
    backend="reference"."""
    import reprokernels as rk

    c = decode_case(3, 8, 2, 2, 33, 17, prefix="task", seed=7)
    force_split(monkeypatch)
    args = (c["q"], c["k"], c["v"], c["prefix_k"], c["prefix_v"])
    kw = dict(task_ids=c["task_ids"], kv_lengths=c["kv_lengths"], return_lse=True)
    out, lse = rk.prefix_attention(*args, backend="triton", **kw)
    r_out, r_lse = rk.prefix_attention(*args, backend="reference", **kw)
    assert_close(out, r_out, rtol=2e-4, atol=2e-4, name="out")
    assert_close(lse, r_lse, rtol=2e-4, atol=2e-4, name="lse")
    with pytest.raises(ValueError, match="at most one"):
        rk.prefix_attention(*args, backend="triton", key_padding_mask=torch.ones(3, 33, dtype=torch.bool), **kw)

def test_decode_empty_own_cache_and_padding_mask(monkeypatch):
    """Lk = 0 (only the prefix), and the kernel-level key_padding_mask + kv_lengths combination (the op rejects
    it, the kernels honour both) with a forced split."""
    case = decode_case(2, 4, 2, 2, 0, 5, prefix="shared")
    check(case, True)
    g = torch.Generator().manual_seed(5)
    case = decode_case(2, 4, 2, 3, 37, 9, prefix="task", seed=5)
    case["key_padding_mask"] = torch.rand((2, 37), generator=g) > 0.3
    force_split(monkeypatch)
    out, lse = run_fwd(case, True, 0.2)
    r_out, r_lse = oracle(case["q"], case["k"], case["v"], case["prefix_k"], case["prefix_v"], case["task_ids"],
                          case["key_padding_mask"], case["kv_lengths"], True, 0.2)
    assert_close(out, r_out, rtol=2e-4, atol=2e-4, name="out")
    assert_close(lse, r_lse, rtol=2e-4, atol=2e-4, name="lse")


def test_decode_splits_trigger():
    """GPU defaults at the issue's decode shapes (Hkv = 8, G * Lq = 4 -> one M block, BLOCK_N = 128): only B = 16
    (128 programs < 264) with a 1024-key cache splits; 128-key caches and B >= 64 never do."""
    assert pa.decode_splits(16 * 8, 1024, 128) == (3, 384)
    assert pa.decode_splits(16 * 8, 128, 128) == (1, 128)
    assert pa.decode_splits(64 * 8, 1024, 128) == (1, 1024)
    assert pa.decode_splits(1 * 8, 1024, 128) == (4, 256)  # B = 1: one program per 256 keys
    assert pa.decode_splits(8, 0, 128) == (1, 0)


def test_decode_prefix_splits_trigger():
    """GPU defaults at the issue's decode shapes (Hq = 32, Hkv = 8, Lq = 1, d = 128: 16-bit stage 1 BLOCK_M = 64,
    BLOCK_N = 64): stage 1 has 8 / 32 / 128 programs at B = 16 / 64 / 256 and splits the prefix towards 264."""
    cfg = pa._GPU_CONFIGS[("stage1", 16, 128)]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    assert (bm, bn) == (64, 64)
    assert [pa.decode_stage1_programs(B, 4, 1, 8, 1, bm) for B in (16, 64, 256)] == [8, 32, 128]
    plan = {(B, P): pa.decode_prefix_splits(pa.decode_stage1_programs(B, 4, 1, 8, 1, bm), P, bn)
            for B in (16, 64, 256) for P in (512, 2048, 8192)}
    assert plan == {
        (16, 512): (2, 256), (16, 2048): (8, 256), (16, 8192): (32, 256),
        (64, 512): (2, 256), (64, 2048): (8, 256), (64, 8192): (9, 960),
        (256, 512): (2, 256), (256, 2048): (3, 704), (256, 8192): (3, 2752),
    }
    assert pa.decode_prefix_splits(8, 511, 64) == (1, 511)  # shorter than two minimum chunks
    assert pa.decode_prefix_splits(264, 8192, 64) == (1, 8192)  # enough programs already
    # per-task prefixes: one partial M block per task at most, so 16 single-row tasks give 16 blocks per kv head
    assert pa.decode_stage1_programs(16, 4, 1, 8, 16, 128) == 128
    assert pa.decode_stage1_programs(2, 4, 1, 8, 16, 128) == 16  # never more tasks than rows
    for n_prog, P in ((1, 1), (3, 37), (7, 1000), (1, 4096), (100, 3000)):
        sp, chunk = pa.decode_prefix_splits(n_prog, P, 64)
        assert sp == 1 or (chunk % 64 == 0 and (sp - 1) * chunk < P <= sp * chunk), (n_prog, P)


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,P,prefix,dtype,min_keys,own_split,plan", [
    (5, 8, 2, 1, 21, 37, "task", torch.float32, 1, True, (3, 16)),     # GQA 4, chunks 16 + 16 + 5, both splits
    (2, 8, 1, 16, 45, 40, "shared", torch.float16, 1, True, (3, 16)),  # MQA 8, Lq 16: 16 M blocks of stage 1
    (4, 4, 2, 7, 33, 48, "task", torch.float32, 24, False, (2, 32)),   # chunks 32 + 16, pass 2 unsplit
    (3, 8, 2, 3, 29, 30, "task", torch.float16, 32, True, (1, 30)),    # P shorter than two 32-key chunks
])
def test_decode_prefix_split(B, Hq, Hkv, Lq, Lk, P, prefix, dtype, min_keys, own_split, plan, monkeypatch):
    """Stage 1 split over the prefix (with pass 2 split over the own keys as well or not): the launcher picks the
    split, the result equals backend="reference" through the public op and the unsplit kernels, and is bitwise
    the same in two runs. kv_lengths hold Lk (row 0) and 0 (row 1, which sees only the prefix)."""
    import reprokernels as rk

    case = decode_case(B, Hq, Hkv, Lq, Lk, P, prefix=prefix, dtype=dtype, seed=B + P)
    args = (case["q"], case["k"], case["v"], case["prefix_k"], case["prefix_v"])
    kw = dict(task_ids=case["task_ids"], kv_lengths=case["kv_lengths"], scale=32 ** -0.5, return_lse=True)
    out1, lse1 = rk.prefix_attention(*args, backend="triton", **kw)  # unsplit: far below the GPU thresholds
    force_prefix_split(monkeypatch, min_keys)
    if own_split:
        force_split(monkeypatch)
    seen = spy_splits(monkeypatch)
    out, lse = rk.prefix_attention(*args, backend="triton", **kw)
    assert seen["prefix"] == [plan]
    (s_own, _), = seen["own"]
    assert (s_own > 1) == own_split
    out_again, lse_again = rk.prefix_attention(*args, backend="triton", **kw)
    assert torch.equal(out, out_again) and torch.equal(lse, lse_again), "not deterministic"
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    assert_close(out, out1, name="out vs unsplit", **tol)
    assert_close(lse, lse1, name="lse vs unsplit", **tol)
    r_out, r_lse = rk.prefix_attention(*args, backend="reference", **kw)
    assert_close(out, r_out, name="out vs reference", **tol)
    assert_close(lse, r_lse, name="lse vs reference", **tol)


def loaded_bytes(traffic, t: torch.Tensor) -> tuple[int, int]:
    """(loaded, distinct loaded) bytes that fall inside t's storage. Reads the counter's recorded addresses
    (tagged as address * 16 + element size, see tests/traffic.py, the project's own counter)."""
    tagged = np.concatenate(traffic._load_addrs) if traffic._load_addrs else np.zeros(0, np.uint64)
    addr = tagged // np.uint64(16)
    lo = t.untyped_storage().data_ptr()
    sel = tagged[(addr >= lo) & (addr < lo + t.untyped_storage().nbytes())]
    return int((sel % np.uint64(16)).sum()), int((np.unique(sel) % np.uint64(16)).sum())


@pytest.mark.parametrize("split", [False, True])
def test_decode_reads_own_keys_once_per_kv_head(split, monkeypatch):
    """Decode pass 2 packs the GQA group into the M tile: each own key and value of a row, up to kv_lengths, is
    loaded exactly once (split or not) -- the per-q-head kernel loaded them G = 4 times. The prefix is loaded
    once per M block of stage 1 (here one: B * G * Lq = 16 queries per kv head)."""
    B, Hq, Hkv, Lq, Lk, P, D = 4, 8, 2, 1, 64, 64, 32
    case = decode_case(B, Hq, Hkv, Lq, Lk, P, prefix="shared", D=D)
    case["kv_lengths"] = torch.tensor([64, 0, 40, 64])
    once = int(case["kv_lengths"].sum()) * Hkv * D * 4  # float32 bytes of the live own keys, read once
    if split:
        force_split(monkeypatch)
    with traffic_counter() as t:
        run_fwd(case, True, 0.2)
    for name in ("k", "v"):
        assert loaded_bytes(t, case[name]) == (once, once), name
    for name in ("prefix_k", "prefix_v"):
        assert loaded_bytes(t, case[name]) == (Hkv * P * D * 4,) * 2, name
    monkeypatch.setattr(pa, "DECODE_MAX_LQ", 0)  # the general kernel, one program per (row, q head)
    with traffic_counter() as t_general:
        run_fwd(case, True, 0.2)
    assert loaded_bytes(t_general, case["k"])[0] >= (Hq // Hkv) * once

def test_decode_prefix_split_reads_prefix_once_per_query_block(monkeypatch):
    """Stage 1 split over the prefix (3 chunks: 16 + 16 + 5 keys) loads every prefix key and value exactly once per
    M block of its task, as the unsplit stage does: 16 queries (2 rows x G = 4 x Lq = 2) of task 0 make one
    block, 24 of task 1 two. Every output and partial state is stored once: the (SP, R, d + 2) float32 states
    and O, LSE. Only q is read once per chunk."""
    B, Hq, Hkv, Lq, Lk, P, D = 5, 8, 2, 2, 20, 37, 32
    case = decode_case(B, Hq, Hkv, Lq, Lk, P, prefix="task", D=D)
    case["task_ids"] = torch.tensor([1, 0, 1, 1, 0])
    per_block = Hkv * P * D * 4  # float32 bytes of one task's prefix keys (or values)
    expect = ((1 + 2) * per_block, 2 * per_block)  # (loaded, distinct)
    R = B * Hq * Lq
    with traffic_counter() as t1:
        run_fwd(case, True, 0.2)
    force_prefix_split(monkeypatch)
    seen = spy_splits(monkeypatch)
    with traffic_counter() as t:
        run_fwd(case, True, 0.2)
    assert seen["prefix"] == [(3, 16)] and seen["own"] == [(1, Lk)]
    for name in ("prefix_k", "prefix_v"):
        assert loaded_bytes(t1, case[name]) == expect, f"{name} unsplit"
        assert loaded_bytes(t, case[name]) == expect, name
    for name in ("k", "v"):
        assert loaded_bytes(t, case[name]) == loaded_bytes(t1, case[name]), name
    # each chunk's program loads its queries (pass 2 once more): q is the only input read more often
    assert loaded_bytes(t1, case["q"]) == (2 * R * D * 4, R * D * 4)
    assert loaded_bytes(t, case["q"]) == ((3 + 1) * R * D * 4, R * D * 4)
    assert t1.stored == t1.stored_unique == R * (D + 2) * 4 + R * (D + 1) * 4
    assert t.stored == t.stored_unique == 3 * R * (D + 2) * 4 + R * (D + 1) * 4


def test_fully_padded_rows_are_zero_not_nan():
    # row 0: every sequence key padded and no prefix -> it sees nothing; row 1: kv_length 0; causal with
    # Lq > Lk leaves the first queries of every row with nothing as well.
    case = make_case(3, 4, 2, 13, 7, 0, 32, prefix="none")
    kpm = torch.ones((3, 7), dtype=torch.bool)
    kpm[0] = False
    case["key_padding_mask"] = kpm
    out, lse, grads = check(case, True)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert torch.all(out[:, :, :6] == 0) and torch.all(lse[:, :, :6] == float("-inf"))
    assert torch.all(grads[0][0] == 0) and torch.all(grads[1][0] == 0) and torch.all(grads[2][0] == 0)
    case2 = make_case(2, 1, 1, 5, 9, 0, 32, prefix="none")
    case2["kv_lengths"] = torch.tensor([0, 4])
    out2, lse2, _ = check(case2, False)
    assert torch.all(out2[0] == 0) and torch.all(lse2[0] == float("-inf")) and torch.isfinite(lse2[1]).all()


def test_decode_equals_last_row_of_training():
    """Lq = 1 with kv_lengths (the KV-cache decode call) equals the last query of a full causal call on the
    sequence truncated to that length."""
    full = make_case(1, 4, 2, 23, 23, 11, 32, prefix="shared")
    scale = 32 ** -0.5
    out_full, lse_full = pa.prefix_attention(full["q"], full["k"], full["v"], full["prefix_k"], full["prefix_v"],
                                             None, None, None, True, scale)
    cache_k = torch.cat([full["k"], torch.randn(1, 2, 9, 32)], 2)  # a cache longer than the sequence
    cache_v = torch.cat([full["v"], torch.randn(1, 2, 9, 32)], 2)
    out_dec, lse_dec = pa.prefix_attention(full["q"][:, :, -1:], cache_k, cache_v, full["prefix_k"],
                                           full["prefix_v"], None, None, torch.tensor([23]), True, scale)
    assert_close(out_dec, out_full[:, :, -1:], rtol=1e-5, atol=1e-5, name="out")
    assert_close(lse_dec, lse_full[:, :, -1:], rtol=1e-5, atol=1e-5, name="lse")


def test_prefix_grads_deterministic_and_per_task():
    case = make_case(3, 4, 2, 15, 11, 21, 32, prefix="task", T=2, padding="mask")
    case["task_ids"] = torch.tensor([1, 0, 1])
    grad_out = torch.randn(case["q"].shape)
    _, _, g1 = run_triton(case, True, 0.2, grad_out)
    _, _, g2 = run_triton(case, True, 0.2, grad_out)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)
    # each task's prefix grad is the sum over its own rows alone
    rows1 = {n: (t[[0, 2]] if torch.is_tensor(t) and t.shape[0] == 3 else t) for n, t in case.items()}
    rows1["task_ids"] = torch.tensor([0, 0])
    rows1["prefix_k"], rows1["prefix_v"] = case["prefix_k"][1:], case["prefix_v"][1:]
    _, _, g_sub = run_triton(rows1, True, 0.2, grad_out[[0, 2]])
    assert_close(g1[3][1], g_sub[3][0], rtol=1e-5, atol=1e-5, name="dprefix_k task 1")
    assert_close(g1[4][1], g_sub[4][0], rtol=1e-5, atol=1e-5, name="dprefix_v task 1")


def test_need_flags_and_empty_batch():
    case = make_case(2, 4, 2, 7, 9, 5, 32, prefix="shared")
    grad_out = torch.randn(case["q"].shape)
    _, _, grads = run_triton(case, True, 0.3, grad_out, need=(False, True, False, False, True))
    assert grads[0] is None and grads[2] is None and grads[3] is None
    _, _, full = run_triton(case, True, 0.3, grad_out)
    assert torch.equal(grads[1], full[1]) and torch.equal(grads[4], full[4])
    # B = 0: empty outputs, prefix grads exist and are zero
    empty = make_case(0, 4, 2, 7, 9, 5, 32, prefix="task")
    out, lse, g = run_triton(empty, True, 0.3, torch.randn(0, 4, 7, 32))
    assert out.shape == (0, 4, 7, 32) and lse.shape == (0, 4, 7)
    assert torch.all(g[3] == 0) and torch.all(g[4] == 0) and g[3].shape == (3, 2, 5, 32)


def test_outputs_are_poisoned_before_the_kernel_writes():
    assert _alloc.POISON, "conftest sets REPROKERNELS_POISON_OUTPUTS=1: unwritten elements must show up as NaN"


def test_unsupported_head_dim():
    case = make_case(1, 1, 1, 3, 3, 2, 48)
    with pytest.raises(ValueError, match=r"d=48.*\(32, 64, 80, 96, 128, 256\)"):
        run_triton(case, True, 0.1, torch.randn(case["q"].shape))


def test_allocates_nothing_of_batch_times_prefix():
    """Neither pass allocates a buffer as large as the batch-expanded prefix (B * P * d per kv head)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            if func.is_view or func._schema.is_mutable:  # aliases and in-place writes allocate nothing
                return res
            for t in res if isinstance(res, (tuple, list)) else (res,):
                if torch.is_tensor(t):
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
            return res

    B, P, D = 3, 40, 32
    case = make_case(B, 1, 1, 3, 3, P, D, prefix="shared")
    grad_out = torch.randn(case["q"].shape)
    with Sizes() as sizes:
        run_triton(case, True, 0.2, grad_out)
    assert 0 < sizes.largest < B * P * D * 4  # bytes; the prefix grads themselves are P * d * 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision(dtype):
    torch.manual_seed(0)
    case = make_case(2, 8, 2, 67, 131, 37, 128, prefix="task", padding="mask", dtype=dtype)
    case = {n: (t.cuda() if torch.is_tensor(t) else t) for n, t in case.items()}
    scale = 128 ** -0.5
    grad_out = torch.randn(case["q"].shape, device="cuda").to(dtype)
    out, lse, grads = run_triton(case, True, scale, grad_out)
    cpu = {n: (t.cpu() if torch.is_tensor(t) else t) for n, t in case.items()}
    r_out, r_lse, r_grads = run_oracle(cpu, True, scale, grad_out.cpu())
    assert_close(out.cpu(), r_out, dtype=dtype, scale=2.0, name="out")
    assert_close(lse.cpu(), r_lse, rtol=1e-2, atol=1e-2, name="lse")
    for name, a, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, r_grads, strict=True):
        assert_close(a.cpu(), r, dtype=dtype, scale=4.0 * max(1.0, r.abs().max().item()), name=name)


def test_mixed_dtypes_float16_activations_float32_prefix():
    case = make_case(2, 4, 2, 11, 13, 9, 32, prefix="shared", padding="mask", dtype=torch.float16)
    case["prefix_k"], case["prefix_v"] = case["prefix_k"].float(), case["prefix_v"].float()
    grad_out = torch.randn(case["q"].shape).half()
    out, lse, grads = run_triton(case, True, 0.2, grad_out)
    r_out, r_lse, r_grads = run_oracle(case, True, 0.2, grad_out)
    assert out.dtype == torch.float16 and grads[3].dtype == torch.float32
    assert_close(out, r_out, rtol=1e-2, atol=1e-2, name="out")
    assert_close(lse, r_lse, rtol=1e-3, atol=1e-3, name="lse")
    for name, a, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, r_grads, strict=True):
        assert_close(a, r, rtol=1e-2, atol=1e-2, name=name)


# --------------------------------------------------------------------------------------------------- split prefix grads


def force_prefix_grad_split(mp, min_items=1):
    """Split the prefix dK/dV pass into shares of max(min_items, 1) work items whenever there are two."""
    mp.setattr(pa, "PREFIX_GRAD_SPLIT_MIN_PROGRAMS", 10**9)
    mp.setattr(pa, "PREFIX_GRAD_SPLIT_MIN_ITEMS", min_items)


def spy_grad_splits(mp):
    """Record the number of shares the launcher picks for the prefix gradient."""
    seen = []
    orig = pa.prefix_grad_splits

    def spy(*args):
        seen.append(orig(*args))
        return seen[-1]

    mp.setattr(pa, "prefix_grad_splits", spy)
    return seen


@given(
    B=st.integers(1, 3), heads=st.sampled_from(HEADS), Lq=odd_len, Lk=odd_len, P=st.integers(1, 40),
    D=st.sampled_from([32, 80]), causal=st.booleans(), prefix=st.sampled_from(["shared", "task"]),
    padding=st.sampled_from(["none", "mask", "lengths"]), min_items=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_split_prefix_grads_match_oracle(B, heads, Lq, Lk, P, D, causal, prefix, padding, min_items, seed):
    """The prefix dK/dV pass split into shares of (row, q head, query block) items + the fixed-order sum of the
    float32 partials, against the float64 oracle (every gradient; tasks may own no row)."""
    Hq, Hkv = heads
    g = torch.Generator().manual_seed(seed)
    case = make_case(B, Hq, Hkv, Lq, Lk, P, D, prefix=prefix, padding=padding, gen=g)
    with pytest.MonkeyPatch.context() as mp:
        force_prefix_grad_split(mp, min_items)
        seen = spy_grad_splits(mp)
        check(case, causal, gen=g)
    items = -(-B // (min(3, B) if prefix == "task" else 1)) * (Hq // Hkv) * -(-Lq // 16)
    assert seen == [max(1, items // min_items)]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,P,prefix,task_ids", [
    (5, 4, 2, 37, 21, "task", [2, 0, 2, 2, 0]),  # task 1 owns no row: its gradient is 0, written by the sum
    (3, 8, 1, 19, 40, "shared", None),           # MQA: a share crosses heads and rows
    (2, 2, 2, 33, 16, "shared", None),           # one key block, shares inside one head
])
def test_split_prefix_grads_deterministic(B, Hq, Hkv, Lq, P, prefix, task_ids, monkeypatch):
    """Split: bitwise the same in two runs, equal to the unsplit pass up to float32 rounding, and an unused task
    gets exactly 0."""
    case = make_case(B, Hq, Hkv, Lq, 23, P, 32, prefix=prefix, padding="mask")
    if task_ids is not None:
        case["task_ids"] = torch.tensor(task_ids)
    grad_out = torch.randn(case["q"].shape, generator=torch.Generator().manual_seed(2))
    need = (False, False, False, True, True)
    _, _, g1 = run_triton(case, True, 0.2, grad_out, need)
    force_prefix_grad_split(monkeypatch)
    seen = spy_grad_splits(monkeypatch)
    _, _, gs = run_triton(case, True, 0.2, grad_out, need)
    _, _, gs2 = run_triton(case, True, 0.2, grad_out, need)
    assert len(seen) == 2 and seen[0] > 1
    for i, name in ((3, "dprefix_k"), (4, "dprefix_v")):
        assert torch.equal(gs[i], gs2[i]), f"{name} not deterministic"
        assert_close(gs[i], g1[i], rtol=1e-5, atol=1e-5, name=f"{name} split vs unsplit")
        if task_ids is not None:
            assert torch.all(gs[i][1] == 0), name


# --------------------------------------------------------------------------------------------------- mixed dtypes


@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefix,split", [("shared", False), ("task", True), ("shared", True)])
def test_mixed_16bit_activations_float32_prefix(act, prefix, split, monkeypatch):
    """16-bit q/k/v with a float32 prefix (float32 master weights): the prefix tiles are cast to the activation
    dtype for the dots (float16 here; bfloat16 computes in float32 under the interpreter), its gradients
    accumulate in float32 and come back float32. Every output against the float64 oracle, tolerances scaled to
    the activation dtype; split or not."""
    case = make_case(3, 4, 2, 21, 19, 23, 32, prefix=prefix, padding="mask", dtype=act)
    case["prefix_k"], case["prefix_v"] = case["prefix_k"].float(), case["prefix_v"].float()
    if split:
        force_prefix_grad_split(monkeypatch)
    grad_out = torch.randn(case["q"].shape, generator=torch.Generator().manual_seed(4)).to(act)
    out, lse, grads = run_triton(case, True, 32 ** -0.5, grad_out)
    r_out, r_lse, r_grads = run_oracle(case, True, 32 ** -0.5, grad_out)
    assert out.dtype == act and grads[3].dtype == grads[4].dtype == torch.float32
    assert grads[0].dtype == grads[1].dtype == grads[2].dtype == act
    assert_close(out, r_out, dtype=act, scale=2.0, name="out")
    assert_close(lse, r_lse, dtype=act, name="lse")
    for name, a, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, r_grads, strict=True):
        assert_close(a, r, dtype=act, scale=2.0 * max(1.0, r.abs().max().item()), name=name)


@pytest.mark.parametrize("act", [torch.float16, torch.bfloat16])
def test_mixed_decode(act, monkeypatch):
    """The decode path (both splits forced) with 16-bit activations and a float32 prefix table."""
    case = decode_case(3, 8, 2, 2, 37, 40, prefix="task", dtype=act, seed=9)
    case["prefix_k"], case["prefix_v"] = case["prefix_k"].float(), case["prefix_v"].float()
    force_split(monkeypatch)
    force_prefix_split(monkeypatch)
    out, lse = run_fwd(case, True, 0.2)
    r_out, r_lse = oracle(case["q"], case["k"], case["v"], case["prefix_k"], case["prefix_v"], case["task_ids"],
                          None, case["kv_lengths"], True, 0.2)
    assert out.dtype == act
    assert_close(out, r_out, dtype=act, scale=2.0, name="out")
    assert_close(lse, r_lse, dtype=act, name="lse")
