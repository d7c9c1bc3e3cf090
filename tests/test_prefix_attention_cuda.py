"""The CUDA decode path of prefix_attention and merge_attention_states against the reference.

Without a GPU the kernels' own code runs through the extension's host emulation
(``reprokernels.cuda.prefix_attention.*(..., emulate=True)`` on CPU tensors: every lane of every block in CPU
loops, the warp shuffles in the device's order) and is compared with the float64 reference: odd batch, query,
key and prefix sizes, GQA / MQA, head dims 1 ... 512, a shared prefix and a per-task table (empty tasks, one task
for all rows, int32 / int64 ids), empty own caches (Lk = 0), ragged ``kv_lengths`` (0 and Lk included, int64 /
int32), key-padding masks
(all-False rows), causal or not, NaN / inf garbage in the unseen keys and values, queries that see nothing,
float32 / float16 / bfloat16 activations beside a prefix of another dtype, every memory layout (transposed,
stepped, misaligned, stride 0), explicit prefix / own-key splits (empty chunks included) and capped grids (the
grid-stride loop), determinism, the split heuristic, the two-partition merge with its limits (+-inf, NaN, huge
LSE) and the launcher's refusals. Every buffer a kernel writes (partials and outputs) is poisoned with NaN first,
so an element nobody writes fails the test. The ``gpu`` tests run the device kernels, directly and through the
public ops with ``backend="cuda"``, eagerly, without host syncs and from a captured CUDA graph.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reprokernels as rk
from reprokernels import _cuda
from reprokernels.reference import prefix_attention as R

from .utils import assert_close, empty_poisoned, poison_, tolerances

pytestmark = pytest.mark.skipif(not _cuda.extension_built(), reason="reprokernels._C is not built")

if _cuda.extension_built():
    from reprokernels.cuda import prefix_attention as cu
else:  # the module imports fine; its functions need the extension
    cu = None

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F16, BF16)
HEAD_DIMS = (1, 5, 32, 64, 80, 96, 128, 200, 256, 300, 512)
GARBAGE = (float("nan"), float("inf"), -float("inf"), float("nan"), 3e38)


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        return empty_poisoned(tuple(shape), dtype, device)

    monkeypatch.setattr(cu, "empty_output", poisoned)


def _sentinel_outputs(monkeypatch, value: float = 1234.5) -> None:
    """Outputs pre-filled with a finite sentinel instead of NaN: for tests where NaN is a legitimate result, an
    unwritten element still shows up (as the sentinel)."""
    def filled(shape, dtype, device):
        return torch.full(tuple(shape), value, dtype=dtype, device=device)

    monkeypatch.setattr(cu, "empty_output", filled)


# ---- inputs -------------------------------------------------------------------------------------------------------

def relayout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout; the unused elements of a larger buffer hold NaN."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "swap":  # the two dims before the last swapped in memory ((B, L, H, d) storage of (B, H, L, d))
        return t.transpose(-3, -2).contiguous().transpose(-3, -2)
    if kind == "d_major":  # last dim not unit stride
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "d_step":  # every other element along d
        big = poison_(torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype))
        view = big[..., ::2]
    elif kind == "misaligned":  # rows of d + 1 elements, starting one element past an aligned base
        big = poison_(torch.empty((*t.shape[:-1], t.shape[-1] + 1), dtype=t.dtype))
        view = big[..., 1:]
    elif kind == "l_step":  # every third row along the sequence dim
        big = poison_(torch.empty((*t.shape[:-2], 3 * t.shape[-2], t.shape[-1]), dtype=t.dtype))
        view = big[..., 1::3, :]
    else:
        raise AssertionError(kind)
    view.copy_(t)
    return view


LAYOUTS = ("contiguous", "swap", "d_major", "d_step", "misaligned", "l_step")


def plant_garbage(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, H, Lk, d) with NaN / +-inf / huge values at the keys ``valid`` (B, Lk) marks unseen."""
    if valid is None:
        return t
    junk = torch.tensor(GARBAGE, dtype=torch.float32).repeat(t.numel() // len(GARBAGE) + 1)[:t.numel()]
    junk = junk.view(t.shape).to(t.dtype)
    return torch.where(valid.view(valid.shape[0], 1, valid.shape[1], 1), t, junk)


def make_case(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, P: int, d: int, *, g: torch.Generator,
              dtype: torch.dtype = F32, prefix: str | None = "shared", T: int = 3,
              prefix_dtype: torch.dtype | None = None, mask: str | None = "len64", causal: bool = True,
              scale: float | None = None, layout: str | tuple = "contiguous", prefix_layout: str | tuple = "contiguous",
              tasks: str = "random", garbage: bool = True,
              magnitude: float = 1.0, lengths: list[int] | None = None) -> dict:
    """Keyword arguments of ``cu.prefix_attention`` (without emulate/split). ``mask``: None, "len64", "len32"
    (ragged kv_lengths, 0 and Lk included when B allows) or "padding" (a bool mask, an all-False row and an
    all-True row when B allows). ``prefix``: None, "shared" (Hkv, P, d) or "table" (T, Hkv, P, d) with task_ids
    ("random", "one": every row the last task, or "int32": random int32 ids). ``lengths``: explicit kv_lengths.
    ``layout``: one for q, k and v or a tuple of three; ``prefix_layout``: one or a (prefix_k, prefix_v) pair."""
    def rnd(*shape, dt=dtype):
        return (torch.randn(shape, generator=g) * magnitude).to(dt)

    q, k, v = rnd(B, Hq, Lq, d), rnd(B, Hkv, Lk, d), rnd(B, Hkv, Lk, d)
    kv_lengths = kpm = valid = None
    if mask in ("len64", "len32"):
        lens = torch.randint(0, Lk + 1, (B,), generator=g)
        if B >= 2:
            lens[0], lens[-1] = 0, Lk
        if B >= 4:
            lens[1] = min(1, Lk)
        if lengths is not None:
            lens = torch.tensor(lengths, dtype=torch.int64)
        kv_lengths = lens.to(torch.int64 if mask == "len64" else torch.int32)
        valid = torch.arange(Lk).view(1, Lk) < lens.view(B, 1)
    elif mask == "padding":
        kpm = torch.rand(B, Lk, generator=g) < 0.6
        if B >= 2:
            kpm[0] = False
            kpm[-1] = True
        valid = kpm
    elif mask is not None:
        raise AssertionError(mask)
    if garbage:
        k, v = plant_garbage(k, valid), plant_garbage(v, valid)
    pk = pv = task_ids = None
    pdt = prefix_dtype or dtype
    if prefix == "shared":
        pk, pv = rnd(Hkv, P, d, dt=pdt), rnd(Hkv, P, d, dt=pdt)
    elif prefix == "table":
        pk, pv = rnd(T, Hkv, P, d, dt=pdt), rnd(T, Hkv, P, d, dt=pdt)
        if tasks == "one":
            task_ids = torch.full((B,), T - 1, dtype=torch.int64)
        else:
            task_ids = torch.randint(0, T, (B,), generator=g)
            task_ids = task_ids.to(torch.int32 if tasks == "int32" else torch.int64)
    elif prefix is not None:
        raise AssertionError(prefix)
    lq, lk, lv = (layout,) * 3 if isinstance(layout, str) else layout
    lpk, lpv = (prefix_layout,) * 2 if isinstance(prefix_layout, str) else prefix_layout
    if pk is not None:
        pk, pv = relayout(pk, lpk), relayout(pv, lpv)
    return dict(q=relayout(q, lq), k=relayout(k, lk), v=relayout(v, lv), prefix_k=pk, prefix_v=pv,
                task_ids=task_ids, key_padding_mask=kpm, kv_lengths=kv_lengths, causal=causal,
                scale=1.0 / math.sqrt(d) if scale is None else scale)


def reference(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference in float64: activations upcast exactly, the prefix rounded to q's dtype first (as the
    reference does for a prefix of another dtype) and then upcast."""
    q = c["q"]

    def pre(t):
        return None if t is None else t.to(q.dtype).double()

    return R.prefix_attention(q.double(), c["k"].double(), c["v"].double(), pre(c["prefix_k"]), pre(c["prefix_v"]),
                              c["task_ids"], c["key_padding_mask"], c["kv_lengths"], c["causal"], c["scale"])


def run(c: dict, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return cu.prefix_attention(**c, emulate=True, **kw)


def compare(out: torch.Tensor, lse: torch.Tensor, c: dict, tol: float = 4.0, what: str = "") -> None:
    q = c["q"]
    B, Hq, Lq, d = q.shape
    assert out.shape == (B, Hq, Lq, d) and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (B, Hq, Lq) and lse.dtype == F32 and lse.is_contiguous()
    assert torch.isfinite(out).all(), f"{what}out: non-finite values"
    assert not torch.isnan(lse).any() and not (lse == float("inf")).any(), f"{what}lse: NaN or +inf"
    wo, wl = reference(c)
    mag = max(1.0, float(wo.abs().max())) if wo.numel() else 1.0
    rtol, atol = tolerances(q.dtype, tol)
    assert_close(out, wo, rtol=rtol, atol=atol * mag, name=f"{what}out")
    blind = torch.isneginf(wl)
    assert torch.equal(torch.isneginf(lse), blind), f"{what}lse: -inf at other queries than the reference's"
    assert (out[blind] == 0).all(), f"{what}out: a query that sees nothing is not exactly 0"
    finite = wl[~blind]
    lmag = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    assert_close(lse, wl, rtol=2e-5 * tol, atol=2e-5 * tol * lmag, name=f"{what}lse")


def check(c: dict, tol: float = 4.0, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Emulated forward against the float64 reference; returns (out, lse)."""
    out, lse = run(c, **kw)
    compare(out, lse, c, tol)
    return out, lse


def _cost(B, Hq, Lq, Lk, P, d):
    return B * Hq * Lq * max(d, 16) * (Lk + P + 32)


BUDGET = 30_000_000  # emulated multiply-adds per example (about B Hq Lq d (P + Lk)): about 0.05 s each


def random_split(d: int, P: int, Lk: int, pk_tiles: int, k_tiles: int, extra: int) -> tuple[int, int, int, int]:
    """A valid (SP, pchunk, S, kchunk): chunks of whole key tiles, ``extra`` empty chunks past P and past Lk."""
    tile = cu.key_tile(d)
    pchunk, kchunk = tile * pk_tiles, tile * k_tiles
    while True:
        SP = -(-P // pchunk) + extra if P else 0
        S = max(1, -(-Lk // kchunk)) + extra
        if SP + S <= cu.MAX_PARTS:
            return SP, pchunk, S, kchunk
        pchunk, kchunk = 2 * pchunk, 2 * kchunk


# ---- every form against the reference ----------------------------------------------------------------------------

@settings(max_examples=150)
@given(B=st.integers(1, 5), Hkv=st.integers(1, 3), G=st.sampled_from([1, 2, 3, 4]),
       Lq=st.one_of(st.sampled_from([1, 3, 16]), st.integers(1, 16)), d=st.sampled_from(HEAD_DIMS),
       P=st.sampled_from([0, 1, 7, 33, 100, 300]), Lk=st.sampled_from([0, 1, 5, 40, 300]),
       prefix=st.sampled_from([None, "shared", "table"]), tasks=st.sampled_from(["random", "one", "int32"]),
       mask=st.sampled_from([None, "len64", "len32", "padding"]), causal=st.booleans(),
       dtype=st.sampled_from(DTYPES), layout=st.tuples(*[st.sampled_from(LAYOUTS)] * 3),
       prefix_layout=st.tuples(*[st.sampled_from(LAYOUTS)] * 2), scale=st.sampled_from([None, 0.3]),
       split=st.one_of(st.none(), st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(0, 2))),
       max_blocks=st.sampled_from([0, 0, 1, 3, 7]), seed=st.integers(0, 2**16))
def test_random_configs(B, Hkv, G, Lq, d, P, Lk, prefix, tasks, mask, causal, dtype, layout, prefix_layout, scale,
                        split, max_blocks, seed):
    # shrink the batch, then the heads, then the queries until the emulation is cheap (large d: tiny B / H / L)
    while _cost(B, Hkv * G, Lq, Lk, P, d) > BUDGET and B > 1:
        B -= 1
    while _cost(B, Hkv * G, Lq, Lk, P, d) > BUDGET and Hkv > 1:
        Hkv -= 1
    while _cost(B, Hkv * G, Lq, Lk, P, d) > BUDGET and G > 1:
        G -= 1
    while _cost(B, Hkv * G, Lq, Lk, P, d) > BUDGET and Lq > 1:
        Lq = max(1, Lq // 2)
    g = torch.Generator().manual_seed(seed)
    c = make_case(B, Hkv * G, Hkv, Lq, Lk, P, d, g=g, dtype=dtype, prefix=prefix, mask=mask, causal=causal,
                  layout=layout, prefix_layout=prefix_layout, tasks=tasks, scale=scale)
    P_eff = P if prefix else 0
    check(c, split=None if split is None else random_split(d, P_eff, Lk, *split), max_blocks=max_blocks)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims(d):
    """Every head-dim tile (d <= 128: 16 queries x 32 keys; <= 256: 8 x 16; <= 512: 4 x 8) and odd d, with a
    prefix and own keys both longer than a tile, ragged lengths and GQA."""
    g = torch.Generator().manual_seed(d)
    small = d > 128
    c = make_case(1 if small else 2, 2, 1, 3 if small else 5, 40, 33, d, g=g, mask="len64")
    check(c)
    c = make_case(1, 1, 1, 16, 5, 7, d, g=g, mask="padding", causal=False, prefix="table", T=2)
    check(c)


@pytest.mark.parametrize("G", [1, 2, 3, 4])
@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_groups(Hkv, G):
    """Query head h reads kv head h // G; a block's queries span several heads (and rows) of the group."""
    g = torch.Generator().manual_seed(10 * Hkv + G)
    for Lq in (1, 3, 16):
        c = make_case(3, Hkv * G, Hkv, Lq, 40, 33, 64, g=g, prefix="table", T=2, mask="len32")
        check(c)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "len64", "len32", "padding"])
def test_masks(mask, causal):
    """Causal is bottom-right aligned (query i sees own keys <= Lk - Lq + i); with Lq > Lk the first queries see
    only the prefix, or nothing."""
    g = torch.Generator().manual_seed(3)
    for Lq, Lk, P in ((1, 40, 7), (3, 40, 0), (16, 40, 33), (16, 5, 1), (16, 5, 0), (3, 1, 0)):
        check(make_case(4, 4, 2, Lq, Lk, P, 32, g=g, mask=mask, causal=causal))


def test_causal_alignment_explicit():
    """One key per position with a distinct value: query i of Lq must average exactly the keys 0 .. Lk - Lq + i
    (scale 0: uniform weights)."""
    Lq, Lk, d = 4, 6, 2
    q = torch.zeros(1, 1, Lq, d)
    k = torch.zeros(1, 1, Lk, d)
    v = torch.arange(Lk, dtype=F32).view(1, 1, Lk, 1).expand(1, 1, Lk, d).contiguous()
    out, lse = cu.prefix_attention(q, k, v, None, None, None, None, None, True, 1.0, emulate=True)
    for i in range(Lq):
        n = Lk - Lq + i + 1
        assert torch.allclose(out[0, 0, i], torch.full((d,), (n - 1) / 2)), (i, out[0, 0, i])
        assert abs(float(lse[0, 0, i]) - math.log(n)) < 1e-6


@pytest.mark.parametrize("T", [1, 2, 5])
def test_task_tables(T):
    """(T, Hkv, P, d) tables: rows of a task scattered over the batch, tasks with no row, every row one task,
    int32 and int64 ids; the same table as a shared prefix when every row picks one task."""
    g = torch.Generator().manual_seed(T)
    for B, tasks in ((5, "random"), (5, "int32"), (4, "one"), (1, "random")):
        for P in (1, 33, 100):
            check(make_case(B, 4, 2, 3, 5, P, 32, g=g, prefix="table", T=T, tasks=tasks, mask="len64"))
    c = make_case(5, 4, 2, 3, 5, 33, 32, g=g, prefix="table", T=T)
    c["task_ids"] = torch.tensor([T - 1, 0, T - 1, 0, T - 1], dtype=torch.int64)  # rows interleaved by task
    out, lse = check(c)
    shared = dict(c, prefix_k=c["prefix_k"][T - 1], prefix_v=c["prefix_v"][T - 1], task_ids=None)
    o2, l2 = run(shared)
    rows = [0, 2, 4]
    assert_close(out[rows], o2[rows], rtol=1e-6, atol=1e-6, name="table vs shared")
    assert_close(lse[rows], l2[rows], rtol=1e-6, atol=1e-6, name="table vs shared lse")


def test_task_ids_strided():
    g = torch.Generator().manual_seed(2)
    c = make_case(4, 2, 1, 2, 5, 7, 32, g=g, prefix="table", T=3)
    c["task_ids"] = torch.tensor([2, 9, 0, 9, 2, 9, 1, 9], dtype=torch.int64)[::2]
    check(c)


@pytest.mark.parametrize("P", [0, 1, 7, 33, 100])
@pytest.mark.parametrize("Lk", [0, 1, 5, 40])
def test_prefix_and_key_lengths(P, Lk):
    g = torch.Generator().manual_seed(100 * P + Lk)
    check(make_case(3, 3, 1, 2, Lk, P, 96, g=g, mask="len64"))
    check(make_case(2, 2, 2, 1, Lk, P, 5, g=g, mask="padding", causal=False, prefix="table", T=2))


# ---- garbage, queries that see nothing ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", ["len64", "len32", "padding"])
def test_garbage_in_unseen_keys_never_leaks(mask, dtype):
    """NaN, +-inf and 3e38 in the keys and values past kv_lengths or under a False padding entry: outputs finite
    and equal to the reference (which zeroes them), for every tile size."""
    g = torch.Generator().manual_seed(4)
    for d, Lk in ((32, 40), (200, 40), (300, 17)):
        for P in (0, 7):
            c = make_case(4, 2, 1, 3, Lk, P, d, g=g, dtype=dtype, mask=mask, causal=bool(P))
            valid = (c["key_padding_mask"] if mask == "padding"
                     else torch.arange(Lk).view(1, Lk) < c["kv_lengths"].view(-1, 1).long())
            assert not torch.isfinite(c["k"][~valid.view(4, 1, Lk).expand(4, 1, Lk)]).all()
            check(c)
            check(c, split=(2 if P else 0, cu.key_tile(d), -(-Lk // cu.key_tile(d)), cu.key_tile(d)))


def test_queries_that_see_nothing():
    """No prefix and no own key (kv_lengths 0, an all-False mask, Lk = 0, causal with Lq > Lk): out exactly 0, lse
    -inf, never NaN; the other rows are unaffected."""
    g = torch.Generator().manual_seed(5)
    for d in (1, 64, 300):
        for mask in ("len64", "padding"):
            c = make_case(3, 2, 1, 3, 5, 0, d, g=g, mask=mask, prefix=None)
            out, lse = check(c)
            assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
            assert torch.isfinite(lse[-1]).all()
            c["prefix_k"] = torch.empty(1, 0, d)  # an empty prefix is no prefix
            c["prefix_v"] = torch.empty(1, 0, d)
            check(c)
        out, lse = check(make_case(1, 1, 1, 6, 2, 0, d, g=g, mask=None, prefix=None, causal=True))
        assert torch.isneginf(lse[0, 0, :4]).all() and torch.isfinite(lse[0, 0, 4:]).all()
        assert (out[0, 0, :4] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "len64", "padding"])
@pytest.mark.parametrize("prefix", [None, "shared", "table"])
def test_empty_own_cache(prefix, mask, causal):
    """Lk = 0 (a prefix-only step, or nothing at all): empty k / v (whose data_ptr() is 0) are legal inputs; the
    queries see the prefix only, or nothing (out 0, lse -inf)."""
    g = torch.Generator().manual_seed(22)
    for d in (1, 64, 300):
        out, lse = check(make_case(2, 2, 1, 4, 0, 7, d, g=g, mask=mask, prefix=prefix, causal=causal))
        if prefix is None:
            assert torch.isneginf(lse).all() and (out == 0).all()


def test_empty_sizes():
    g = torch.Generator().manual_seed(6)
    for B, Lq in ((0, 3), (2, 0)):
        c = make_case(B, 2, 1, Lq, 5, 7, 32, g=g, mask=None)
        out, lse = run(c)
        assert out.shape == (B, 2, Lq, 32) and lse.shape == (B, 2, Lq)


# ---- dtypes ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["shared", "table"])
@pytest.mark.parametrize("pdt", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_mixed_prefix(dtype, pdt, prefix):
    """16-bit activations (float32 accumulation, one rounding at the store); a prefix of another dtype is rounded
    once to q's dtype before any product: bit for bit the result of passing it already rounded."""
    g = torch.Generator().manual_seed(7)
    for d in (64, 200):
        c = make_case(3, 4, 2, 3, 40, 33, d, g=g, dtype=dtype, prefix_dtype=pdt, prefix=prefix, T=2,
                      magnitude=2.0)
        out, lse = check(c)
        rounded = dict(c, prefix_k=c["prefix_k"].to(dtype), prefix_v=c["prefix_v"].to(dtype))
        o2, l2 = run(rounded)
        assert torch.equal(out, o2) and torch.equal(lse, l2), "the prefix is not rounded once to q's dtype"


def test_large_scores_do_not_overflow():
    """Scores in the hundreds (a peaked softmax): the running maximum keeps exp in range."""
    g = torch.Generator().manual_seed(8)
    for dtype in DTYPES:
        c = make_case(2, 2, 1, 3, 40, 33, 32, g=g, dtype=dtype, magnitude=6.0, scale=1.0)
        check(c, tol=16.0)


# ---- layouts ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_layouts(layout, dtype):
    """Transposed head/sequence dims, a non-unit d stride, stepped slices and misaligned rows (no 16-byte loads):
    the same values give the same results as contiguous inputs (within rounding) and the reference."""
    g = torch.Generator().manual_seed(9)
    for d in (8, 64, 130):
        base = make_case(3, 4, 2, 3, 40, 33, d, g=g, dtype=dtype, prefix="table", T=2, mask="len32")
        c = dict(base)
        for key in ("q", "k", "v", "prefix_k", "prefix_v"):
            c[key] = relayout(base[key], layout)
        out, lse = check(c)
        o2, l2 = run(base)
        assert_close(out, o2, dtype=dtype, name="layout vs contiguous")
        assert_close(lse, l2, name="layout vs contiguous lse")


def test_every_tensor_its_own_layout():
    """q, k, v, prefix_k and prefix_v each in a different layout (a stride of one tensor read for another shows)."""
    g = torch.Generator().manual_seed(10)
    for d in (8, 64, 130, 300):
        for i in range(len(LAYOUTS)):
            lay = [LAYOUTS[(i + j) % len(LAYOUTS)] for j in range(5)]
            c = make_case(2, 2, 1, 2, 40, 33, d, g=g, prefix="table", T=2, layout=tuple(lay[:3]),
                          prefix_layout=tuple(lay[3:]), mask="len64")
            check(c)


def test_expanded_prefix_and_masks():
    """Stride-0 prefixes (one key repeated over P, one head over Hkv, one task over T, a broadcast d), and an
    expanded or transposed padding mask."""
    g = torch.Generator().manual_seed(11)
    Hkv, P, d, T = 2, 33, 64, 3
    c = make_case(4, 4, Hkv, 3, 40, P, d, g=g, mask="padding")
    for pk, pv in ((torch.randn(Hkv, 1, d, generator=g).expand(Hkv, P, d),
                    torch.randn(Hkv, 1, d, generator=g).expand(Hkv, P, d)),
                   (torch.randn(1, P, d, generator=g).expand(Hkv, P, d),
                    torch.randn(1, P, d, generator=g).expand(Hkv, P, d)),
                   (torch.randn(Hkv, P, 1, generator=g).expand(Hkv, P, d),
                    torch.randn(Hkv, P, 1, generator=g).expand(Hkv, P, d)),
                   (torch.randn(()).expand(Hkv, P, d), torch.randn(()).expand(Hkv, P, d))):
        check(dict(c, prefix_k=pk, prefix_v=pv))
    table = dict(c, prefix_k=torch.randn(1, Hkv, P, d, generator=g).expand(T, Hkv, P, d),
                 prefix_v=torch.randn(1, Hkv, P, d, generator=g).expand(T, Hkv, P, d),
                 task_ids=torch.tensor([2, 0, 0, 1]))
    check(table)
    kpm = c["key_padding_mask"]
    check(dict(c, key_padding_mask=kpm.t().contiguous().t()))
    row = torch.rand(1, 40, generator=g) < 0.5
    c2 = make_case(4, 4, Hkv, 3, 40, P, d, g=g, mask=None, garbage=False)
    check(dict(c2, key_padding_mask=row.expand(4, 40)))
    # expanded activations: one query / key row repeated over the batch and the sequence
    q = torch.randn(1, 4, 1, d, generator=g).expand(4, 4, 3, d)
    k = torch.randn(1, Hkv, 1, d, generator=g).expand(4, Hkv, 40, d)
    check(dict(c2, q=q, k=k, v=torch.randn(4, Hkv, 40, d, generator=g)))


def test_kv_lengths_other_forms():
    """Non-contiguous and narrower integer kv_lengths (the launcher converts them)."""
    g = torch.Generator().manual_seed(12)
    c = make_case(4, 2, 1, 2, 40, 7, 32, g=g, mask="len64")
    lens = c["kv_lengths"]
    wide = torch.stack([lens, lens + 100], 1)
    check(dict(c, kv_lengths=wide[:, 0]))
    for dt in (torch.int32, torch.int16, torch.uint8):
        check(dict(c, kv_lengths=lens.to(dt)))


# ---- splits, grid-stride loop, determinism --------------------------------------------------------------------------

def _split_cases(d):
    tile = cu.key_tile(d)
    P, Lk = 100, 70
    sp_min, s_min = -(-P // tile), -(-Lk // tile)
    cases = [(1, sp_min * tile, 1, s_min * tile),  # one chunk each
             (sp_min, tile, s_min, tile)]  # one tile per chunk
    if sp_min + s_min + 2 <= 32:
        cases.append((sp_min + 1, tile, s_min + 1, tile))  # a chunk past P and one past Lk: empty
    cases.append((2, -(-P // (2 * tile)) * tile, 3, -(-Lk // (3 * tile)) * tile))
    cases.append((1, sp_min * tile + 5 * tile, 4, s_min * tile))  # chunks much larger than needed
    return [(a, b, c, e) for a, b, c, e in cases if a + c <= 32]


@pytest.mark.parametrize("d", [32, 200, 300])
def test_explicit_splits(d):
    """The prefix and the own keys cut into several chunks (some entirely past kv_lengths, past Lk or past P:
    empty partials with lse -inf); capped grids (blocks loop over the work items) give the same bits."""
    g = torch.Generator().manual_seed(13)
    B, Lq = (3, 3) if d <= 128 else (2, 2)
    for prefix in ("shared", "table"):
        c = make_case(B, 2, 1, Lq, 70, 100, d, g=g, prefix=prefix, T=3, mask="len64", lengths=[0, 70, 9][:B])
        default, _ = run(c)
        for split in _split_cases(d):
            out, lse = check(c, split=split)
            assert_close(out, default, rtol=1e-5, atol=1e-5, name=f"split {split} vs default")
            for mb in (1, 3):
                o2, l2 = run(c, split=split, max_blocks=mb)
                assert torch.equal(out, o2) and torch.equal(lse, l2), f"max_blocks={mb} changed bits ({split})"


def test_split_limits():
    """32 slots at most; a split that does not cover P or Lk is refused."""
    g = torch.Generator().manual_seed(14)
    d = 300  # tile 8
    c = make_case(1, 1, 1, 1, 40, 100, d, g=g)
    check(c, split=(16, 8, 16, 8))
    check(c, split=(27, 8, 5, 8))
    for bad in ((17, 8, 16, 8), (12, 8, 5, 8), (13, 8, 4, 8), (13, 8, 0, 8), (0, 8, 5, 8)):
        with pytest.raises(ValueError, match="split"):
            run(c, split=bad)


def test_default_splits_cross_chunks():
    """Long prefixes and caches at a small batch: the default heuristic cuts them into several chunks."""
    g = torch.Generator().manual_seed(15)
    P, Lk = 800, 600
    SP, _, S, _ = cu.splits(1, 1, 1, 1, Lk, P, 1, 8)
    assert SP > 1 and S > 1
    c = make_case(1, 1, 1, 1, Lk, P, 8, g=g, mask="len64", lengths=[300])  # the last own-key chunks: no valid key
    check(c)
    check(c, max_blocks=1)


def test_deterministic():
    g = torch.Generator().manual_seed(16)
    c = make_case(5, 4, 2, 16, 40, 100, 64, g=g, prefix="table", T=3, mask="padding", dtype=BF16)
    for kw in ({}, {"split": (4, 32, 2, 32)}, {"split": (4, 32, 2, 32), "max_blocks": 3}):
        a, b = run(c, **kw), run(c, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_inputs_are_never_written():
    g = torch.Generator().manual_seed(17)
    c = make_case(3, 2, 1, 3, 5, 7, 32, g=g, prefix="table", mask="len32")
    before = {key: t.clone() for key, t in c.items() if isinstance(t, torch.Tensor)}
    run(c)
    for key, t in before.items():
        assert torch.equal(t.nan_to_num(), c[key].nan_to_num()), key


@settings(max_examples=300)
@given(B=st.integers(1, 4096), Hkv=st.integers(1, 64), G=st.integers(1, 8), Lq=st.integers(1, 16),
       Lk=st.one_of(st.integers(0, 300), st.integers(0, 1 << 20)),
       P=st.one_of(st.integers(0, 300), st.integers(0, 1 << 20)), T=st.integers(1, 64),
       d=st.one_of(st.sampled_from(HEAD_DIMS), st.integers(1, 512)))
def test_splits_heuristic(B, Hkv, G, Lq, Lk, P, T, d):
    SP, pchunk, S, kchunk = cu.splits(B, Hkv * G, Hkv, Lq, Lk, P, T, d)
    tile = cu.key_tile(d)
    assert tile in (8, 16, 32) and cu.query_block(d) in (4, 8, 16)
    assert SP + S <= cu.MAX_PARTS == 32
    assert pchunk % tile == 0 and kchunk % tile == 0 and pchunk > 0 and kchunk > 0
    assert S >= 1 and S * kchunk >= Lk and (S - 1) * kchunk < max(Lk, 1)
    if P == 0:
        assert SP == 0
    else:
        assert SP >= 1 and SP * pchunk >= P and (SP - 1) * pchunk < P
        if SP > 1:
            assert pchunk >= cu.MIN_SPLIT_KEYS
    if S > 1:
        assert kchunk >= cu.MIN_SPLIT_KEYS


# ---- merge_attention_states ---------------------------------------------------------------------------------------

def merge_reference(o_a, lse_a, o_b, lse_b):
    return R.merge_attention_states(o_a.double(), lse_a.double(), o_b.double(), lse_b.double())


def merge_check(o_a, lse_a, o_b, lse_b, tol: float = 4.0):
    o, lse = cu.merge_attention_states(o_a, lse_a, o_b, lse_b, emulate=True)
    odt = torch.promote_types(o_a.dtype, o_b.dtype)
    assert o.dtype == odt and o.shape == o_a.shape and o.is_contiguous()
    assert lse.dtype == F32 and lse.shape == o_a.shape[:-1] and lse.is_contiguous()
    wo, wl = merge_reference(o_a, lse_a, o_b, lse_b)
    fin = wo[torch.isfinite(wo)]
    mag = max(1.0, float(fin.abs().max())) if fin.numel() else 1.0
    rtol, atol = tolerances(odt, tol)
    assert_close(o, wo, rtol=rtol, atol=atol * mag, name="merged o", equal_nan=True)
    lfin = wl[torch.isfinite(wl)]
    lmag = min(max(1.0, float(lfin.abs().max())), 1e3) if lfin.numel() else 1.0  # huge lse: rtol covers them
    assert_close(lse, wl.float().double(), rtol=2e-5 * tol, atol=2e-5 * tol * lmag, name="merged lse",
                 equal_nan=True)
    return o, lse


def merge_layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if kind == "permuted" and t.dim() >= 2:  # leading dims reversed in memory
        perm = list(range(t.dim()))[::-1]
        inv = [perm.index(i) for i in range(t.dim())]
        return t.permute(perm).contiguous().permute(inv)
    if kind == "stepped":  # every other element of the outermost dim
        big = poison_(torch.empty((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype))
        view = big[::2]
        view.copy_(t)
        return view
    if kind == "last_strided" and t.dim() >= 1:
        big = poison_(torch.empty((*t.shape[:-1], 3 * t.shape[-1]), dtype=t.dtype))
        view = big[..., 1::3]
        view.copy_(t)
        return view
    return t.contiguous()


MERGE_LAYOUTS = ("contiguous", "permuted", "stepped", "last_strided")


@settings(max_examples=100)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=4), d=st.sampled_from([1, 3, 64, 130]),
       dta=st.sampled_from(DTYPES), dtb=st.sampled_from(DTYPES),
       lsa=st.sampled_from(DTYPES), lsb=st.sampled_from(DTYPES),
       lay=st.tuples(*[st.sampled_from(MERGE_LAYOUTS)] * 4), spread=st.sampled_from([0.1, 3.0, 30.0]),
       seed=st.integers(0, 2**16))
def test_merge_random(lead, d, dta, dtb, lsa, lsb, lay, spread, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, d)
    o_a = merge_layout(torch.randn(shape, generator=g).to(dta), lay[0])
    o_b = merge_layout(torch.randn(shape, generator=g).to(dtb), lay[1])
    lse_a = merge_layout((torch.randn(lead, generator=g) * spread).to(lsa), lay[2])
    lse_b = merge_layout((torch.randn(lead, generator=g) * spread).to(lsb), lay[3])
    merge_check(o_a, lse_a, o_b, lse_b)


def test_merge_limits(monkeypatch):
    """-inf partitions (their o NaN / inf, never read), +inf on one or both sides, NaN lse and NaN o with weight
    propagating, huge finite lse without overflow. Outputs pre-filled with a finite sentinel, so a NaN out is the
    kernel's."""
    _sentinel_outputs(monkeypatch)
    inf, nan = float("inf"), float("nan")
    pairs = [(-inf, 0.5), (0.5, -inf), (-inf, -inf), (inf, 0.0), (0.0, inf), (inf, inf), (inf, -inf),
             (-inf, inf), (nan, 0.0), (0.0, nan), (nan, -inf), (nan, inf), (3e38, 3e38), (3e38, -3e38),
             (-3e38, -3e38), (3e38, 0.0), (-3e38, 1.0), (80.0, -80.0), (0.0, -200.0), (1.0, 1.0)]
    d = 5
    la = torch.tensor([a for a, _ in pairs])
    lb = torch.tensor([b for _, b in pairs])
    g = torch.Generator().manual_seed(18)
    o_a = torch.randn(len(pairs), d, generator=g)
    o_b = torch.randn(len(pairs), d, generator=g)
    o_a[la == -inf] = nan  # a weight-0 partition's o may hold anything
    o_b[lb == -inf] = inf
    o_a[-1, 2] = nan  # a NaN o with weight 1/2 propagates
    o, lse = merge_check(o_a, la, o_b, lb)
    assert torch.isneginf(lse[2]) and (o[2] == 0).all()
    assert torch.equal(o[0], o_b[0]) and torch.equal(o[1], o_a[1])
    assert (lse[3:8] == inf).all() and torch.equal(o[3], o_a[3]) and torch.equal(o[4], o_b[4])
    assert_close(o[5], (o_a[5] + o_b[5]) / 2, name="two +inf")
    assert torch.isnan(lse[8:10]).all() and torch.isnan(o[8:10]).all()
    assert torch.isfinite(lse[12:19]).all() and torch.isfinite(o[:8]).all() and torch.isfinite(o[12:19]).all()
    assert torch.isnan(o[-1, 2]) and torch.isfinite(o[-1, [0, 1, 3, 4]]).all()
    # the same rows in 16-bit: o_a / o_b fp16 and bf16, the lse in 16 bits (3e38 becomes inf there)
    for dt in (F16, BF16):
        merge_check(o_a.to(dt), la.to(F32), o_b.to(F16), lb.to(dt))
        merge_check(o_a.to(BF16), la.to(dt), o_b.to(dt), lb.to(F32))


@pytest.mark.parametrize("case", ["expanded", "five_leading", "transposed_rows", "mixed_coalescing"])
def test_merge_layouts(case):
    """Stride-0 operands (a partition broadcast over the batch), more leading dims than the kernel walks (the
    launcher coalesces or copies), and operands whose leading dims coalesce differently."""
    g = torch.Generator().manual_seed(19)
    if case == "expanded":
        o_a = torch.randn(1, 3, 7, 64, generator=g).expand(4, 3, 7, 64)
        lse_a = torch.randn(1, 3, 7, generator=g).expand(4, 3, 7)
        o_b = torch.randn(4, 3, 7, 64, generator=g).to(BF16)
        lse_b = torch.randn(4, 1, 1, generator=g).expand(4, 3, 7)
        merge_check(o_a, lse_a, o_b, lse_b)
        merge_check(o_a, lse_a, torch.randn(()).expand(4, 3, 7, 64), torch.randn(()).expand(4, 3, 7))
        # all four expanded alike: the rows coalesce the same way, walked with stride 0 (no copy)
        o_b = torch.randn(1, 3, 7, 64, generator=g).to(F16).expand(4, 3, 7, 64)
        merge_check(o_a, lse_a, o_b, torch.randn(1, 3, 7, generator=g).expand(4, 3, 7))
        merge_check(torch.randn(()).expand(4, 3, 7, 64), torch.randn(()).expand(4, 3, 7),
                    torch.randn(()).expand(4, 3, 7, 64), torch.randn(()).expand(4, 3, 7))
    elif case == "five_leading":
        shape = (2, 3, 1, 2, 3, 5, 3)
        o_a = torch.randn(shape, generator=g)
        o_b = torch.randn(shape, generator=g).to(F16)
        lse_a = torch.randn(shape[:-1], generator=g)
        lse_b = torch.randn(shape[:-1], generator=g)
        merge_check(o_a, lse_a, o_b, lse_b)
        merge_check(merge_layout(o_a, "permuted"), merge_layout(lse_a, "stepped"), merge_layout(o_b, "stepped"),
                    merge_layout(lse_b, "permuted"))
    elif case == "transposed_rows":
        o_a = torch.randn(5, 4, 130, generator=g).transpose(0, 1)
        o_b = torch.randn(4, 5, 130, generator=g)
        lse_a = torch.randn(5, 4, generator=g).t()
        lse_b = torch.randn(4, 5, generator=g)
        merge_check(o_a, lse_a, o_b, lse_b)
    else:  # o coalesces into one row dim, lse does not (and the reverse)
        o_a = torch.randn(6, 4, 3, generator=g)
        lse_a = torch.randn(6, 8, generator=g)[:, ::2]
        o_b = torch.randn(4, 6, 3, generator=g).transpose(0, 1)
        lse_b = torch.randn(6, 4, generator=g)
        merge_check(o_a, lse_a, o_b, lse_b)


def test_merge_empty():
    o, lse = cu.merge_attention_states(torch.randn(0, 3, 4), torch.randn(0, 3), torch.randn(0, 3, 4),
                                       torch.randn(0, 3), emulate=True)
    assert o.shape == (0, 3, 4) and lse.shape == (0, 3)


def test_merge_matches_prefix_attention_split():
    """Attention over [prefix | own keys] equals the merge of attention over each part (the identity the decode
    kernel's partials rely on)."""
    g = torch.Generator().manual_seed(20)
    c = make_case(3, 4, 2, 3, 40, 33, 64, g=g, mask="len64")
    full, full_lse = run(c)
    only_prefix = dict(c, kv_lengths=torch.zeros(3, dtype=torch.int64))
    only_keys = dict(c, prefix_k=None, prefix_v=None)
    oa, la = run(only_prefix)
    ob, lb = run(only_keys)
    o, lse = cu.merge_attention_states(oa, la, ob, lb, emulate=True)
    assert_close(o, full, rtol=1e-5, atol=1e-5, name="merged vs full")
    assert_close(lse, full_lse, rtol=1e-5, atol=1e-5, name="merged lse vs full")


# ---- refusals -----------------------------------------------------------------------------------------------------

def test_refusals():
    g = torch.Generator().manual_seed(21)
    c = make_case(1, 1, 1, 17, 5, 3, 32, g=g)
    with pytest.raises(ValueError, match=r"^q: .*Lq=17"):
        run(c)
    c = make_case(1, 1, 1, 2, 5, 3, 513, g=g)
    with pytest.raises(ValueError, match=r"^q: .*d=513"):
        run(c)
    c = make_case(1, 1, 1, 2, 5, 3, 32, g=g)
    with pytest.raises(ValueError, match="needs cuda tensors"):
        cu.prefix_attention(**c)
    with pytest.raises(ValueError, match="needs cuda tensors"):
        cu.merge_attention_states(torch.randn(2, 3), torch.randn(2), torch.randn(2, 3), torch.randn(2))
    with pytest.raises(ValueError, match="float32, float16 and bfloat16"):
        run(dict(c, q=c["q"].double(), k=c["k"].double(), v=c["v"].double()))
    assert cu.unsupported(torch.empty(1, 1, 16, 512), torch.empty(1, 1, 1, 512)) == ""
    assert "Lq=17" in cu.unsupported(torch.empty(1, 1, 17, 8), torch.empty(1, 1, 1, 8))


# ---- on a GPU: the device kernels ---------------------------------------------------------------------------------

def _cuda_case(c: dict) -> dict:
    return {key: (t.cuda() if isinstance(t, torch.Tensor) else t) for key, t in c.items()}


def _gpu_cases():
    g = torch.Generator().manual_seed(30)
    yield make_case(5, 8, 2, 1, 40, 100, 128, g=g, prefix="table", T=3, mask="len64")
    yield make_case(3, 4, 4, 16, 300, 33, 64, g=g, prefix="shared", mask="len32", dtype=BF16, prefix_dtype=F32)
    yield make_case(2, 6, 2, 3, 1000, 600, 256, g=g, prefix="table", T=2, mask="padding", dtype=F16)
    yield make_case(4, 4, 1, 2, 77, 7, 80, g=g, prefix="shared", mask="len64", layout="swap", causal=False)
    yield make_case(1, 2, 1, 4, 40, 33, 512, g=g, prefix="table", T=2, mask=None, layout="misaligned")
    yield make_case(8, 8, 2, 1, 2048, 256, 128, g=g, prefix="shared", mask="len64", dtype=BF16)  # default splits


@pytest.mark.gpu
def test_gpu_matches_reference():
    for c in _gpu_cases():
        dc = _cuda_case(c)
        out, lse = cu.prefix_attention(**dc)
        compare(out.cpu(), lse.cpu(), c, tol=8.0, what="device ")
        with torch.no_grad():
            o2, l2 = rk.prefix_attention(dc["q"], dc["k"], dc["v"], dc["prefix_k"], dc["prefix_v"],
                                         task_ids=dc["task_ids"], causal=dc["causal"],
                                         key_padding_mask=dc["key_padding_mask"], kv_lengths=dc["kv_lengths"],
                                         scale=dc["scale"], return_lse=True, backend="cuda")
        compare(o2.cpu(), l2.cpu(), c, tol=8.0, what="public op ")
        a, b = cu.prefix_attention(**dc), cu.prefix_attention(**dc)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
def test_gpu_splits_and_emulation_agree():
    g = torch.Generator().manual_seed(31)
    c = make_case(3, 4, 2, 3, 70, 100, 64, g=g, prefix="table", T=3, mask="len64")
    host, _ = run(c)
    dc = _cuda_case(c)
    for split in (None, (4, 32, 3, 32), (1, 128, 1, 96)):
        for mb in (0, 1, 3):
            out, lse = cu.prefix_attention(**dc, split=split, max_blocks=mb)
            compare(out.cpu(), lse.cpu(), c, what=f"split {split} max_blocks {mb} ")
            assert_close(out.cpu(), host, rtol=1e-5, atol=1e-5, name="device vs emulation")


@pytest.mark.gpu
def test_gpu_merge():
    g = torch.Generator().manual_seed(32)
    inf, nan = float("inf"), float("nan")
    o_a = torch.randn(4, 8, 3, 130, generator=g)
    o_b = torch.randn(4, 8, 3, 130, generator=g).to(BF16)
    lse_a = torch.randn(4, 8, 3, generator=g) * 5
    lse_b = torch.randn(4, 8, 3, generator=g).to(F16)
    lse_a[0, 0] = torch.tensor([-inf, inf, 3e38])
    lse_b[0, 0] = torch.tensor([-inf, inf, 0.0])
    o_a[0, 0, 0] = nan
    o_b[0, 0, 0] = nan
    want_o, want_l = merge_reference(o_a, lse_a, o_b, lse_b)
    args = [t.cuda() for t in (o_a, lse_a, o_b, lse_b)]
    for o, lse in (cu.merge_attention_states(*args),
                   rk.merge_attention_states(*args, backend="cuda"),
                   cu.merge_attention_states(args[0].transpose(0, 1), args[1].transpose(0, 1),
                                             args[2].transpose(0, 1), args[3].transpose(0, 1))):
        if o.shape[0] == 8:
            o, lse = o.transpose(0, 1), lse.transpose(0, 1)
        assert o.dtype == F32 and lse.dtype == F32
        assert_close(o.cpu(), want_o, rtol=3e-2, atol=3e-2, name="device merge o")
        assert_close(lse.cpu(), want_l, rtol=1e-4, atol=1e-4, name="device merge lse")


def _gpu_step():
    g = torch.Generator().manual_seed(33)
    c = _cuda_case(make_case(6, 8, 2, 2, 300, 100, 64, g=g, prefix="table", T=3, mask="len32", dtype=BF16))

    def step():
        o1, l1 = cu.prefix_attention(**c)
        o2, l2 = rk.prefix_attention(c["q"], c["k"], c["v"], c["prefix_k"], c["prefix_v"], task_ids=c["task_ids"],
                                     kv_lengths=c["kv_lengths"], causal=c["causal"], return_lse=True,
                                     backend="cuda")
        o3, l3 = rk.merge_attention_states(o1, l1, o2.float(), l2, backend="cuda")
        return [o1, l1, o2, l2, o3, l3]

    inputs = [c["q"], c["k"], c["v"], c["prefix_k"], c["prefix_v"], c["task_ids"], c["kv_lengths"]]
    return step, inputs


@pytest.mark.gpu
def test_gpu_no_host_sync_and_graph_replay():
    step, inputs = _gpu_step()
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
        for _ in range(2):
            for t in inputs:  # new values of the same kind, in place
                if t.is_floating_point():
                    t.copy_(torch.randn_like(t))
                else:
                    t.copy_(t.flatten()[torch.randperm(t.numel(), device=t.device)].view_as(t))
            expected = [t.clone() for t in step()]
            graph.replay()
            torch.cuda.synchronize()
            for got, want in zip(static, expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
