"""label_histogram: the reference against plain PyTorch, the Triton kernels against the reference, in-place
accumulation, determinism, registration (opcheck, compile, export), errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reprokernels as rk
from reprokernels import BackendUnavailableError
from tests.utils import as_layout, assert_close, traffic_counter

triton_backends = ["triton"] if rk._backend.triton_installed() else []
backends = ["reference", *triton_backends]


def _bincount(x: torch.Tensor, y: torch.Tensor, K: int, T: int) -> torch.Tensor:
    """What research code writes: bincount(argmax * K_tgt + y)."""
    preds = x.argmax(dim=-1) if x.is_floating_point() else x
    return torch.bincount(preds.reshape(-1) * T + y.reshape(-1), minlength=K * T).view(K, T).float()


def _topk_mass(x: torch.Tensor, y: torch.Tensor, K: int, T: int, k: int | None) -> torch.Tensor:
    """BLM+'s statistic in plain PyTorch (float64): softmax, top-k, scatter, sum into the target columns."""
    p = torch.softmax(x.reshape(-1, K).double(), dim=-1)
    if k is not None and k < K:
        vals, idx = p.topk(k, dim=-1)
        p = torch.zeros_like(p).scatter_(1, idx, vals)
    D = torch.zeros(K, T, dtype=torch.float64)
    for t in range(T):
        D[:, t] = p[y.reshape(-1) == t].sum(0)
    return D.float()


def _distinct_logits(B: int, K: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Logits without ties inside a row (a permutation of an arithmetic ramp, plus a per-row shift)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.stack([torch.randperm(K, generator=g) for _ in range(B)]).float() * (4.0 / max(K, 1))
    return (ramp + torch.randn(B, 1, generator=g)).to(dtype)


# ---------------------------------------------------------------- the reference's exact semantics


@pytest.mark.parametrize("backend", backends)
def test_count_equals_bincount_of_argmax(backend):
    x, y = torch.randn(50, 37), torch.randint(0, 6, (50,))
    D = rk.label_histogram(x, y, 37, 6, backend=backend)
    assert D.dtype == torch.float32 and D.shape == (37, 6)
    assert torch.equal(D, _bincount(x, y, 37, 6))
    assert float(D.sum()) == 50


@pytest.mark.parametrize("backend", backends)
def test_count_from_given_predictions(backend):
    preds, y = torch.randint(0, 11, (40,)), torch.randint(0, 3, (40,))
    assert torch.equal(rk.label_histogram(preds, y, 11, 3, backend=backend), _bincount(preds, y, 11, 3))
    assert torch.equal(rk.label_histogram(preds.int(), y.int(), 11, 3, backend=backend), _bincount(preds, y, 11, 3))


@pytest.mark.parametrize("backend", backends)
@pytest.mark.parametrize("k", [None, 1, 3, 19, 50])
def test_prob_equals_topk_mass_in_plain_pytorch(backend, k):
    x, y = _distinct_logits(30, 19, seed=k or 0), torch.randint(0, 4, (30,))
    D = rk.label_histogram(x, y, 19, 4, weight="prob", topk=k, backend=backend)
    assert_close(D, _topk_mass(x, y, 19, 4, k), rtol=1e-5, atol=1e-6)
    # mass conservation: without top-k every sample adds exactly 1
    if k is None or k >= 19:
        assert_close(D.sum(0), torch.bincount(y, minlength=4).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends)
def test_topk_ties_keep_the_lowest_source_indices(backend):
    x = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0], [0.0, 5.0, 1.0, 5.0, 5.0]])
    y = torch.tensor([0, 1, 0])
    D = rk.label_histogram(x, y, 5, 2, weight="prob", topk=2, backend=backend)
    p = torch.softmax(x.double(), dim=-1)
    want = torch.zeros(5, 2, dtype=torch.float64)
    want[[1, 2], 0] += p[0, [1, 2]]  # ties at 2.0: sources 1 and 2, not 3
    want[[0, 1], 1] += p[1, [0, 1]]  # all tied: the first two
    want[[1, 3], 0] += p[2, [1, 3]]  # ties at 5.0: sources 1 and 3, not 4
    assert_close(D, want.float(), rtol=1e-6, atol=1e-7)


@settings(max_examples=30)
@given(B=st.integers(1, 6), K=st.integers(1, 40), k=st.integers(1, 40), values=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_reference_topk_mask_is_the_first_k_of_a_stable_descending_sort(B, K, k, values, seed):
    from reprokernels.reference.label_histogram import topk_mask

    k = min(k, K)
    x = torch.randint(0, values, (B, K), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
    want = torch.zeros(B, K, dtype=torch.bool).scatter_(1, order, True)
    assert torch.equal(topk_mask(x, k), want)


@pytest.mark.parametrize("backend", backends)
def test_argmax_follows_torch_argmax_for_ties_nan_and_inf(backend):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, nan, 3.0, nan], [-inf, -inf, -inf, -inf], [1.0, 5.0, 5.0, 2.0], [inf, 0.0, inf, 1.0],
                      [0.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 0, 1, 1])
    assert torch.equal(rk.label_histogram(x, y, 4, 2, backend=backend), _bincount(x, y, 4, 2))


@pytest.mark.parametrize("backend", backends)
def test_out_accumulates_in_place_and_is_returned(backend):
    x, y = torch.randn(20, 9), torch.randint(0, 3, (20,))
    out = torch.full((9, 3), 2.0)
    ret = rk.label_histogram(x, y, 9, 3, out=out, backend=backend)
    assert ret is out
    assert torch.equal(out, 2.0 + _bincount(x, y, 9, 3))


@pytest.mark.parametrize("backend", backends)
@pytest.mark.parametrize(("weight", "k"), [("count", None), ("prob", None), ("prob", 2)])
def test_batches_accumulate_to_one_big_batch(backend, weight, k):
    x, y = torch.randn(70, 23), torch.randint(0, 5, (70,))
    whole = rk.label_histogram(x, y, 23, 5, weight=weight, topk=k, backend=backend)
    out = torch.zeros(23, 5)
    for lo, hi in ((0, 1), (1, 17), (17, 17), (17, 50), (50, 70)):  # including an empty batch
        rk.label_histogram(x[lo:hi], y[lo:hi], 23, 5, weight=weight, topk=k, out=out, backend=backend)
    if weight == "count":
        assert torch.equal(out, whole)
    else:
        assert_close(out, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backends)
def test_leading_dims_are_flattened(backend):
    x, y = torch.randn(3, 4, 8), torch.randint(0, 2, (3, 4))
    assert torch.equal(rk.label_histogram(x, y, 8, 2, backend=backend), _bincount(x, y, 8, 2))


@pytest.mark.parametrize("backend", backends)
def test_empty_batch_leaves_out_unchanged(backend):
    out = torch.ones(5, 3)
    rk.label_histogram(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), 5, 3, out=out, backend=backend)
    assert torch.equal(out, torch.ones(5, 3))
    assert torch.equal(rk.label_histogram(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), 5, 3,
                                          weight="prob", backend=backend), torch.zeros(5, 3))


def test_inputs_are_never_written_and_logits_get_no_gradient():
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 2, (6,))
    copies = (x.detach().clone(), y.clone())
    for backend in backends:
        D = rk.label_histogram(x, y, 5, 2, weight="prob", topk=2, backend=backend)
        assert not D.requires_grad
    assert torch.equal(x.detach(), copies[0]) and torch.equal(y, copies[1])


# ---------------------------------------------------------------- Triton against the reference


@st.composite
def configs(draw):
    K = draw(st.integers(1, 300))
    return dict(B=draw(st.integers(0, 40)), K=K, T=draw(st.integers(1, 7)),
                weight=draw(st.sampled_from(["count", "prob"])), k=draw(st.sampled_from([None, 1, 2, 5, K])),
                layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                ties=draw(st.booleans()), splits=draw(st.sampled_from([None, 1, 2, 3])))


@pytest.mark.parametrize("backend", triton_backends)
@settings(max_examples=25)
@given(cfg=configs(), seed=st.integers(0, 2**16))
def test_triton_matches_reference(backend, cfg, seed):
    from reprokernels.triton.label_histogram import label_histogram_accumulate

    B, K, T = cfg["B"], cfg["K"], cfg["T"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g)
    if cfg["ties"]:  # few distinct values: ties in argmax and at the k-th value
        x = torch.round(x)
    x = as_layout(x.to(cfg["dtype"]), cfg["layout"])
    y = torch.randint(0, T, (B,), generator=g)
    k = cfg["k"] if cfg["weight"] == "prob" else None
    want = rk.label_histogram(x, y, K, T, weight=cfg["weight"], topk=k, backend="reference")
    out = torch.zeros(K, T)
    kk = 0 if k is None or k >= K else k
    label_histogram_accumulate(out, x, y, kk, cfg["weight"], splits=cfg["splits"])  # every split count
    if cfg["weight"] == "count":
        assert torch.equal(out, want)
    else:
        assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", triton_backends)
def test_triton_split_path_with_a_strided_out(backend):
    """Split classes (per-split partials + ordered reduction) into a transposed running statistic."""
    from reprokernels.triton.label_histogram import choose_splits, label_histogram_accumulate

    x, y = torch.randn(200, 33), torch.randint(0, 2, (200,))
    assert choose_splits(33, 2, 1, 100) > 1  # the heuristic splits a few large classes on a small statistic
    for weight, k in (("count", 0), ("prob", 4)):
        want = rk.label_histogram(x, y, 33, 2, weight=weight, topk=k or None, backend="reference")
        out = torch.ones(2, 33).T  # (33, 2) with strides (1, 33)
        label_histogram_accumulate(out, x, y, k, weight, splits=5)
        assert_close(out, want + 1, rtol=1e-5, atol=1e-6, name=weight)


@pytest.mark.parametrize("backend", triton_backends)
def test_triton_is_deterministic(backend):
    x, y = torch.randn(64, 70), torch.randint(0, 3, (64,))
    runs = [rk.label_histogram(x, y, 70, 3, weight="prob", topk=7, backend=backend) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("backend", triton_backends)
def test_triton_counts_touch_only_the_batch_cells(backend):
    """Memory plan: counts read the logits once and write only the (prediction, target) cells they hit."""
    x, y = torch.randn(12, 40), torch.randint(0, 3, (12,))
    out = torch.zeros(40, 3)
    with traffic_counter() as t:
        rk.label_histogram(x, y, 40, 3, out=out, backend=backend)
    cells = int((out != 0).sum())
    assert t.stored_unique == 12 * 4 + cells * 4  # the row predictions (int32) + the touched cells of out
    assert t.loaded_unique >= x.numel() * 4  # the logits, once each
    assert t.loaded_unique <= x.numel() * 4 + 12 * (4 + 8) + 4 * 8 + cells * 4  # + preds, perm, offsets, cells


def _split_rows(mp: pytest.MonkeyPatch):
    """Row pass cut into 16-column chunks (partials + ordered combine) at test sizes."""
    from reprokernels.triton import label_histogram as tlh

    for name, value in dict(MAX_ROW_BLOCK=16, ROW_MIN_CHUNK=16, ROW_TARGET_PROGRAMS=10**6).items():
        mp.setattr(tlh, name, value)
    return tlh


@pytest.fixture
def split_rows(monkeypatch):
    return _split_rows(monkeypatch)


@pytest.mark.parametrize("backend", triton_backends)
@settings(max_examples=15)
@given(B=st.integers(1, 9), K=st.integers(33, 120), k=st.sampled_from([None, 1, 2, 5, 40]),
       values=st.sampled_from([2, 3, 1000]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_triton_split_rows_match_reference(backend, B, K, k, values, dtype, seed):
    """Few distinct values: argmax ties and top-k ties at the k-th value spread over several chunks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, values, (B, K), generator=g).to(dtype)
    y = torch.randint(0, 3, (B,), generator=g)
    with pytest.MonkeyPatch.context() as mp:
        assert _split_rows(mp).row_splits(B, K, 16)[0] > 1
        assert torch.equal(rk.label_histogram(x, y, K, 3, backend=backend), _bincount(x, y, K, 3))
        D = rk.label_histogram(x, y, K, 3, weight="prob", topk=k, backend=backend)
    assert_close(D, rk.label_histogram(x, y, K, 3, weight="prob", topk=k, backend="reference"), rtol=1e-5,
                 atol=1e-6)


@pytest.mark.parametrize("backend", triton_backends)
def test_triton_split_rows_argmax_nan_inf_and_ties_across_chunks(backend, split_rows):
    nan, inf = float("nan"), float("inf")
    K = 50
    x = torch.zeros(6, K)
    x[0, 40], x[0, 45] = nan, nan  # the first NaN wins, in a later chunk than the maximum
    x[0, 3] = 9.0
    x[1] = -inf  # all -inf: index 0
    x[2, 17], x[2, 33] = 5.0, 5.0  # a tie across chunks: the first
    x[3, 20:] = -inf  # trailing -inf chunks
    x[3, 5] = 1.0
    x[4, :] = -inf
    x[4, 49] = 2.0  # the maximum in the last, partial chunk
    x[5, 31] = inf
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    assert torch.equal(rk.label_histogram(x, y, K, 2, backend=backend), _bincount(x, y, K, 2))
    x[0, 40] = x[0, 45] = 0.0
    for k in (1, 2, 3, 30):
        assert_close(rk.label_histogram(x[2:], y[2:], K, 2, weight="prob", topk=k, backend=backend),
                     rk.label_histogram(x[2:], y[2:], K, 2, weight="prob", topk=k, backend="reference"),
                     rtol=1e-5, atol=1e-6, equal_nan=True)  # the +inf row: NaN probabilities on both sides


@pytest.mark.parametrize("backend", triton_backends)
def test_triton_split_rows_are_deterministic(backend, split_rows):
    x, y = torch.randn(7, 90), torch.randint(0, 3, (7,))
    for weight, k in (("count", None), ("prob", None), ("prob", 9)):
        runs = [rk.label_histogram(x, y, 90, 3, weight=weight, topk=k, backend=backend) for _ in range(2)]
        assert torch.equal(runs[0], runs[1])


def test_triton_out_of_range_targets_are_skipped():
    """The kernels never read or write outside out for targets outside [0, T) (on CUDA the range check is a
    device-side assert that fails the stream): valid samples are still counted exactly."""
    if not triton_backends:
        pytest.skip("triton missing")
    from reprokernels.triton.label_histogram import label_histogram_accumulate

    x, y = torch.randn(8, 6), torch.tensor([0, 1, 5, -3, 1, 0, 2**40, 2])
    ok = (y >= 0) & (y < 3)
    for weight in ("count", "prob"):
        out = torch.zeros(6, 3)
        label_histogram_accumulate(out, x, y, 0, weight)
        want = rk.label_histogram(x[ok], y[ok], 6, 3, weight=weight, backend="reference")
        assert_close(out, want, rtol=1e-6, atol=1e-7)


def test_auto_is_reference_on_cpu_and_the_cuda_backend_needs_cuda_tensors():
    x, y = torch.randn(4, 5), torch.randint(0, 2, (4,))
    assert torch.equal(rk.label_histogram(x, y, 5, 2), rk.label_histogram(x, y, 5, 2, backend="reference"))
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        rk.label_histogram(x, y, 5, 2, backend="cuda")


# ---------------------------------------------------------------- registration: opcheck, compile, export


@pytest.mark.parametrize("backend", backends)
@pytest.mark.parametrize(("x", "topk", "weight"), [
    (torch.randn(9, 6), 0, "count"), (torch.randint(0, 6, (9,)), 0, "count"), (torch.randn(9, 6), 2, "prob"),
])
def test_opcheck(backend, x, topk, weight):
    out = torch.rand(6, 3)
    y = torch.randint(0, 3, (9,))
    torch.library.opcheck(torch.ops.reprokernels.label_histogram_accumulate, (out, x, y, topk, weight, backend))


@pytest.mark.parametrize("backend", backends)
def test_torch_compile_fullgraph(backend):
    def stats(x, y, out):
        fresh = rk.label_histogram(x, y, 7, 3, weight="prob", topk=2, backend=backend)
        rk.label_histogram(x, y, 7, 3, out=out, backend=backend)
        return fresh

    x, y = torch.randn(10, 7), torch.randint(0, 3, (10,))
    out_c, out_e = torch.zeros(7, 3), torch.zeros(7, 3)
    fresh_c = torch.compile(stats, fullgraph=True, backend="aot_eager")(x, y, out_c)
    fresh_e = stats(x, y, out_e)
    assert_close(fresh_c, fresh_e)
    assert torch.equal(out_c, out_e) and float(out_c.sum()) == 10


def test_torch_export():
    class Stats(torch.nn.Module):
        def forward(self, x, y):
            return rk.label_histogram(x, y, 7, 3, backend="reference")

    x, y = torch.randn(10, 7), torch.randint(0, 3, (10,))
    ep = torch.export.export(Stats(), (x, y))
    assert "label_histogram_accumulate" in str(ep.graph)
    assert torch.equal(ep.module()(x, y), _bincount(x, y, 7, 3))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(y=torch.tensor([0, 3, 1, 0])), ValueError, r"targets: expected values in \[0, 2\], got 3"),
        (dict(y=torch.tensor([0, -1, 1, 0])), ValueError, r"targets: expected values in \[0, 2\], got -1"),
        (dict(x=torch.tensor([0, 5, 1, 0])), ValueError, r"logits_or_preds: expected values in \[0, 4\], got 5"),
        (dict(y=torch.zeros(4, 1, dtype=torch.long)), ValueError, r"targets: expected shape \(4,\)"),
        (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, r"targets: expected shape \(4,\)"),
        (dict(y=torch.zeros(4)), TypeError, r"targets: expected an integer tensor of target labels \(int64/.*float32"),
        (dict(x=torch.randn(4, 6)), ValueError, r"logits_or_preds: expected logits \(..., K_src=5\)"),
        (dict(x=torch.randn(4, 5).bool()), TypeError, r"logits_or_preds: expected float logits or integer .*bool"),
        (dict(x=torch.zeros(4, dtype=torch.long), weight="prob"), ValueError, "weight='prob' needs float logits"),
        (dict(out=torch.zeros(5, 4)), ValueError, r"out: expected shape \(5, 3\) = \(num_source, num_target\)"),
        (dict(out=torch.zeros(5, 3, dtype=torch.float64)), TypeError, "out: expected a float32 running statistic"),
        (dict(out=torch.zeros(5, 3, device="meta")), ValueError, r"out: expected a tensor on cpu"),
        (dict(out=torch.zeros(5, 3, requires_grad=True)), ValueError, "out: .* must not require grad"),
        (dict(out=[[0.0]]), TypeError, "out: expected a torch.Tensor"),
        (dict(weight="mass"), ValueError, "weight: expected one of 'count', 'prob'"),
        (dict(topk=2), ValueError, "topk: only used with weight='prob'"),
        (dict(topk=0, weight="prob"), ValueError, "topk: expected an int >= 1"),
        (dict(num_target=0), ValueError, "num_target: expected an int >= 1"),
        (dict(backend="fast"), ValueError, "backend: expected one of"),
    ],
)
def test_bad_input_errors(kwargs, error, message):
    args = dict(x=torch.randn(4, 5), y=torch.tensor([0, 2, 1, 0]), num_source=5, num_target=3)
    args.update(kwargs)
    x, y, K, T = (args.pop(k) for k in ("x", "y", "num_source", "num_target"))
    with pytest.raises(error, match=message):
        rk.label_histogram(x, y, K, T, **args)


def test_float64_needs_the_reference_backend():
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 2, (4,))
    assert torch.equal(rk.label_histogram(x, y, 5, 2, backend="reference"), _bincount(x, y, 5, 2))
    for backend in triton_backends:
        with pytest.raises(TypeError, match=r"logits_or_preds: expected a floating dtype \(float32/float16/bf"):
            rk.label_histogram(x, y, 5, 2, backend=backend)
