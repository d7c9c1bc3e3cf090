"""The CUDA backend of label_histogram against the reference.

Without a GPU the kernels' own code runs through the extension's host emulation
(``reprokernels.cuda.label_histogram.label_histogram_accumulate(..., emulate=True)`` on CPU tensors: every lane of a
warp step by step, the ballots and warp reductions in the device's order): counts from logits and from given
predictions (int64 / int32, strided), probabilities with top-k None / 1 / 3 / K-1 / K, ties spanning several 32-source
chunks, +-inf / NaN rows as the reference defines them, float16 / bfloat16 logits, every memory layout, several source
blocks per class and the split path with its ordered reduction, accumulation into a strided running ``out``, batches
adding up to one batch, an empty batch, bad parameters, and bitwise determinism. Every buffer a kernel writes besides
``out`` is poisoned first (NaN / the integer max), so an element nobody writes fails the test. The ``gpu`` tests run
the device kernels through the public ``reprokernels.label_histogram(..., backend="cuda")``.
"""

from __future__ import annotations

import pytest
import torch

import reprokernels as rk
from reprokernels import BackendUnavailableError, _cuda
from reprokernels.reference import label_histogram as R

from .utils import as_layout, assert_close, empty_poisoned

pytestmark = pytest.mark.skipif(not _cuda.extension_built(), reason="reprokernels._C is not built")

if _cuda.extension_built():
    from reprokernels.cuda import label_histogram as cu
else:  # the module imports fine; its functions need the extension
    cu = None

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
nan, inf = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _poison_kernel_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        return empty_poisoned(tuple(shape), dtype, device)

    monkeypatch.setattr(cu, "empty_output", poisoned)


# ---- helpers ------------------------------------------------------------------------------------------------------

def emulate(x, y, K, T, topk=None, weight="count", *, out=None, **kw):
    """The kernels' host emulation, called as the op calls a backend (topk normalised, out accumulated into)."""
    out = torch.zeros(K, T) if out is None else out
    cu.label_histogram_accumulate(out, x, y, R.effective_topk(topk, K) if weight == "prob" else 0, weight,
                                  emulate=True, **kw)
    return out


def reference(x, y, K, T, topk=None, weight="count"):
    xr = x.float() if x.is_floating_point() else x  # the same values: fp16/bf16 upcast exactly
    return R.label_histogram(xr, y, K, T, topk, weight)


def check(x, y, K, T, topk=None, weight="count", *, equal_nan=False, **kw):
    got = emulate(x, y, K, T, topk, weight, **kw)
    want = reference(x, y, K, T, topk, weight)
    if weight == "count":
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        assert_close(got, want, rtol=2e-5, atol=2e-6, equal_nan=equal_nan, name=f"prob topk={topk}")
    return got


def logits(B, K, seed=0, dtype=torch.float32, layout="contiguous", scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return as_layout((scale * torch.randn(B, K, generator=g)).to(dtype), layout)


def labels(B, T, seed=0, dtype=torch.int64):
    return torch.randint(0, T, (B,), generator=torch.Generator().manual_seed(seed + 100)).to(dtype)


# ---- counts -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize(("B", "K", "T"), [(1, 1, 1), (37, 5, 3), (50, 33, 7), (90, 300, 4)])
def test_count_from_logits(dtype, layout, B, K, T):
    check(logits(B, K, B + K, dtype, layout), labels(B, T, K), K, T)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_count_from_predictions(index_dtype):
    g = torch.Generator().manual_seed(1)
    preds = torch.randint(0, 41, (2 * 60,), generator=g).to(index_dtype)[::2]  # strided predictions
    y = labels(60, 6, 1, index_dtype)
    got = check(preds, y, 41, 6)
    assert float(got.sum()) == 60


def test_count_argmax_ties_nan_and_inf():
    x = torch.tensor([[1.0, nan, 3.0, nan], [-inf, -inf, -inf, -inf], [1.0, 5.0, 5.0, 2.0], [inf, 0.0, inf, 1.0],
                      [0.0, 0.0, 0.0, 0.0], [-inf, 2.0, nan, inf]])
    check(x, torch.tensor([0, 1, 0, 1, 1, 0]), 4, 2)
    # ties and NaNs across several 32-source chunks: the first maximal index / the first NaN of the row
    x = torch.zeros(4, 100)
    x[0, [40, 70, 99]] = 7.0
    x[1, [35, 90]] = nan
    x[2, :] = -inf
    x[3, [3, 64]] = inf
    check(x, torch.tensor([0, 1, 1, 0]), 100, 2)


@pytest.mark.parametrize(("splits", "threads"), [(None, 0), (1, 32), (3, 32), (7, 64), (64, 0)])
def test_count_source_blocks_and_splits(splits, threads):
    x, y = logits(300, 150, 7), labels(300, 5, 7)
    check(x, y, 150, 5, splits=splits, threads=threads)


# ---- probabilities ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("topk", [None, 1, 3, 69, 70])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_prob_topk(topk, layout):
    check(logits(45, 70, topk or 0, layout=layout), labels(45, 4, 2), 70, 4, topk, "prob")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topk", [None, 3])
def test_prob_half_logits(dtype, topk):
    check(logits(40, 37, 3, dtype), labels(40, 5, 3), 37, 5, topk, "prob")


@pytest.mark.parametrize("topk", [1, 2, 3, 5, 33, 40, 64])
def test_prob_ties_keep_the_lowest_source_indices(topk):
    """Integer logits in a tiny range: long runs of ties, the k-th value's ties spread over several 32-source
    chunks (the ballots), rows where every entry ties."""
    g = torch.Generator().manual_seed(topk)
    x = torch.randint(0, 3, (24, 70), generator=g).float()
    x[0] = 1.0
    x[1, :] = 0.0
    x[1, [5, 40, 69]] = 2.0
    check(x, labels(24, 3, topk), 70, 3, topk, "prob")
    small = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0, 3.0], [0.0, 5.0, 1.0, 5.0, 5.0]])
    if topk < 5:
        check(small, torch.tensor([0, 1, 0]), 5, 2, topk, "prob")


@pytest.mark.parametrize("topk", [None, 1, 2])
def test_prob_inf_and_nan_rows_as_the_reference(topk):
    """The reference's softmax of a row with +inf, a NaN, or only -inf is NaN everywhere (its top-k mask still
    decides which cells receive it); -inf entries of a finite row get 0."""
    x = torch.tensor([[inf, 0.0, 1.0, 2.0], [inf, inf, 0.0, -1.0], [-inf, -inf, -inf, -inf], [-inf, 0.0, 1.0, -inf],
                      [nan, 0.0, 1.0, 2.0], [0.0, nan, inf, 1.0], [1.0, 2.0, 3.0, 4.0]])
    check(x, torch.tensor([0, 1, 2, 3, 4, 2, 3]), 4, 5, topk, "prob", equal_nan=True)


# ---- accumulation, layouts of out, empty batches, determinism -------------------------------------------------------

@pytest.mark.parametrize(("weight", "topk"), [("count", None), ("prob", None), ("prob", 3)])
def test_batches_accumulate_to_one_big_batch(weight, topk):
    x, y = logits(130, 23, 5), labels(130, 5, 5)
    whole = emulate(x, y, 23, 5, topk, weight)
    out = torch.zeros(5, 23).T  # a strided running statistic
    for lo in range(0, 130, 40):
        emulate(x[lo:lo + 40], y[lo:lo + 40], 23, 5, topk, weight, out=out)
    if weight == "count":
        assert torch.equal(out, whole)
    else:
        assert_close(out, whole, rtol=1e-5, atol=1e-6)
        if not topk:  # mass conservation: every sample adds 1
            assert_close(whole.sum(0), torch.bincount(y, minlength=5).float(), rtol=1e-5, atol=1e-5)


def test_out_is_added_to_in_place_and_only_touched_cells_are_written():
    x, y = logits(20, 9, 8), labels(20, 3, 8)
    out = torch.full((9, 3), 2.0)
    out[:, 1] = nan  # a column no sample of the batch belongs to stays as it was (NaN included)
    y = (y > 0).long() * 2  # classes 0 and 2 only
    emulate(x, y, 9, 3, out=out)
    want = torch.full((9, 3), 2.0) + reference(x, y, 9, 3)
    want[:, 1] = nan
    assert torch.equal(out.nan_to_num(-1.0), want.nan_to_num(-1.0))


@pytest.mark.parametrize(("weight", "topk"), [("count", None), ("prob", 2)])
def test_empty_batch_leaves_out_unchanged(weight, topk):
    out = torch.rand(6, 3)
    before = out.clone()
    emulate(torch.empty(0, 6), torch.empty(0, dtype=torch.int64), 6, 3, topk, weight, out=out)
    assert torch.equal(out, before)


@pytest.mark.parametrize(("weight", "topk", "splits"), [("count", None, None), ("prob", None, 1), ("prob", None, 5),
                                                        ("prob", 4, 3)])
def test_deterministic_bitwise(weight, topk, splits):
    x, y = logits(400, 90, 9), labels(400, 3, 9)
    a = emulate(x, y, 90, 3, topk, weight, splits=splits)
    b = emulate(x, y, 90, 3, topk, weight, splits=splits)
    assert torch.equal(a, b)
    if splits is not None and splits > 1:  # the split path and the direct one agree up to float32 rounding
        assert_close(a, emulate(x, y, 90, 3, topk, weight, splits=1), rtol=1e-5, atol=1e-6)


def test_heuristic_splits_small_statistics_only():
    assert cu.choose_splits(10, 2, 1, 10_000) > 1
    assert cu.choose_splits(1000, 1000, 4, 10_000) == 1
    assert cu.choose_splits(10, 2, 1, 64) == 1
    assert cu.choose_splits(50_000, 1000, 196, 1 << 20) == 1


def test_bad_parameters_raise():
    x, y = logits(4, 5), labels(4, 2)
    with pytest.raises(RuntimeError, match="label_histogram_accumulate_host"):
        emulate(x, y, 5, 2, threads=48)  # not a multiple of 32
    with pytest.raises(ValueError, match="needs cpu tensors"):
        cu.label_histogram_accumulate(torch.zeros(5, 2), x.to("meta"), y, 0, "count", emulate=True)


def test_public_cuda_backend_needs_cuda_tensors():
    with pytest.raises(BackendUnavailableError, match="cuda"):
        rk.label_histogram(torch.randn(4, 5), torch.randint(0, 2, (4,)), 5, 2, backend="cuda")


# ---- on a GPU -------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("weight", "topk"), [("count", None), ("prob", None), ("prob", 1), ("prob", 3),
                                              ("prob", 150)])
def test_gpu_matches_reference(dtype, weight, topk):
    for B, K, T, layout in ((1, 1, 1, "contiguous"), (70, 33, 7, "transposed"), (3000, 150, 2, "contiguous"),
                            (513, 1000, 100, "strided"), (64, 50_257, 3, "contiguous")):
        x, y = logits(B, K, B, dtype, layout), labels(B, T, B)
        out = torch.rand(K, T)
        got = rk.label_histogram(x.cuda(), y.cuda(), K, T, topk=topk, weight=weight, out=out.cuda(),
                                 backend="cuda")
        want = out + reference(x, y, K, T, topk if topk is None or topk < K else None, weight)
        if weight == "count":
            assert torch.equal(got.cpu(), want)
        else:
            assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5, name=f"B={B} K={K} T={T}")


@pytest.mark.gpu
def test_gpu_auto_picks_cuda_and_predictions_work():
    x, y = torch.randn(200, 30, device="cuda"), torch.randint(0, 4, (200,), device="cuda")
    assert torch.equal(rk.label_histogram(x, y, 30, 4).cpu(), reference(x.cpu(), y.cpu(), 30, 4))
    preds = torch.randint(0, 30, (200,), device="cuda", dtype=torch.int32)
    got = rk.label_histogram(preds, y, 30, 4, backend="cuda")
    assert torch.equal(got.cpu(), reference(preds.cpu(), y.cpu(), 30, 4))


@pytest.mark.gpu
@pytest.mark.parametrize(("weight", "topk"), [("count", None), ("prob", None), ("prob", 5)])
def test_gpu_emulation_agrees_with_device_and_is_deterministic(weight, topk):
    x, y = logits(700, 300, 11), labels(700, 3, 11)
    host = emulate(x, y, 300, 3, topk, weight)
    for splits in (None, 1, 6):
        a = torch.zeros(300, 3, device="cuda")
        b = torch.zeros(300, 3, device="cuda")
        k = R.effective_topk(topk, 300) if weight == "prob" else 0
        cu.label_histogram_accumulate(a, x.cuda(), y.cuda(), k, weight, splits=splits)
        cu.label_histogram_accumulate(b, x.cuda(), y.cuda(), k, weight, splits=splits)
        assert torch.equal(a, b)
        assert_close(a.cpu(), host, rtol=1e-5, atol=1e-6, name=f"device vs emulation, splits={splits}")


@pytest.mark.gpu
def test_gpu_nan_inf_rows_and_opcheck():
    x = torch.tensor([[inf, 0.0, 1.0, 2.0], [-inf, -inf, -inf, -inf], [nan, 0.0, 1.0, 2.0], [1.0, 2.0, 2.0, 4.0]])
    y = torch.tensor([0, 1, 2, 3])
    for topk in (None, 1, 2):
        got = rk.label_histogram(x.cuda(), y.cuda(), 4, 5, topk=topk, weight="prob", backend="cuda")
        assert_close(got.cpu(), reference(x, y, 4, 5, topk, "prob"), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.equal(rk.label_histogram(x.cuda(), y.cuda(), 4, 5, backend="cuda").cpu(), reference(x, y, 4, 5))
    out = torch.rand(6, 3, device="cuda")
    for args in ((torch.randn(9, 6, device="cuda"), 0, "count"), (torch.randint(0, 6, (9,), device="cuda"), 0, "count"),
                 (torch.randn(9, 6, device="cuda"), 2, "prob")):
        torch.library.opcheck(torch.ops.reprokernels.label_histogram_accumulate,
                              (out, args[0], torch.randint(0, 3, (9,), device="cuda"), args[1], args[2], "cuda"))
