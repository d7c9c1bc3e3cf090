"""GPU fit of the label_map / label_histogram Triton launchers, checked without a GPU.

The launches the public ops make at the benchmark shapes are captured (the kernel's ``run`` records the grid instead
of running), with the launchers' GPU configurations (the interpreter switch off): every grid keeps axes 1 and 2
within CUDA's 65,535, and fills at least one wave of an H100 (132 SMs) except the few small kernels that are small
by design (they combine per-split partials). The torch pre-steps run for real under a dispatch mode that counts
the aten ops that would make the host wait on CUDA (item, nonzero, unique, boolean-mask indexing, blocking copies
of Python lists), which must be zero with device-side value checks.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import reprokernels as rk
import reprokernels._validation as rv

pytest.importorskip("triton")

from reprokernels.triton import label_histogram as tlh
from reprokernels.triton import label_map as tlm

SMS = 132
MAX_AXIS12 = 65535
# combine kernels: a few partials per row or per output cell, work far below one wave by design
SMALL_BY_DESIGN = {"_lm_stats_combine_kernel", "_lm_sum_splits_kernel", "_row_combine_kernel"}
_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "unique_consecutive", "_unique2", "masked_select",
             "lift_fresh", "bincount"}


class _SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if func.namespace == "reprokernels":
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {}))
        if name in _SYNC_OPS:
            self.syncs[name] += 1
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.syncs["boolean mask"] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def captured(monkeypatch):
    """Launches recorded as (kernel name, grid) instead of run, with the GPU tile configurations."""
    launches: list[tuple[str, tuple[int, int, int]]] = []
    kernel_type = type(tlm._lm_index_fwd_kernel)

    def fake_run(self, *args, grid, warmup, **kwargs):
        g = tuple(int(v) for v in grid) + (1,) * (3 - len(grid))
        launches.append((self.fn.__name__ if hasattr(self, "fn") else self.__name__, g))

    monkeypatch.setattr(kernel_type, "run", fake_run)
    monkeypatch.setattr(tlm, "_interpret", lambda: False)
    monkeypatch.setattr(rv, "_eager", False)  # device-side value checks, as on CUDA
    return launches


def _check(launches, syncs):
    assert launches
    for name, (g0, g1, g2) in launches:
        assert g1 <= MAX_AXIS12 and g2 <= MAX_AXIS12, (name, (g0, g1, g2))
        if name not in SMALL_BY_DESIGN:
            assert g0 * g1 * g2 >= SMS, (name, (g0, g1, g2))
    assert not syncs, syncs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("kind", "input"), [("one1000", "logits"), ("many10", "log_probs"), ("many10", "probs"),
                                             ("dense10", "probs"), ("dense10", "logits")])
def test_label_map_benchmark_shapes_fill_a_wave_without_syncs(captured, dtype, kind, input):
    B, K = 64, 128256
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(B, K, dtype=dtype, requires_grad=True)
    mapping = {"one1000": torch.randperm(K, generator=g)[:1000],
               "many10": torch.randint(0, K, (10, 16), generator=g),
               "dense10": torch.zeros(K, 10, requires_grad=True)}[kind]
    counter = _SyncCounter()
    with counter:
        out = rk.label_map(x, mapping, input=input, backend="triton")
        out.backward(torch.zeros_like(out))
    _check(captured, counter.syncs)
    names = {n for n, _ in captured}
    if kind == "dense10":
        assert {"_lm_dense_fwd_kernel", "_lm_sum_splits_kernel", "_lm_dense_dx_kernel",
                "_lm_dense_dw_kernel"} <= names  # the forward's K_src split at these shapes
    else:
        assert "_lm_index_bwd_kernel" in names
    if input != "logits":
        assert "_lm_stats_combine_kernel" in names  # 64 rows: the row statistics split over columns


def test_dense_batch_split_for_a_small_vocabulary(captured):
    """d mapping of a 1000-class map over a large batch: few (K_src, K_tgt) tiles, so the batch is split."""
    x = torch.zeros(4096, 1000, requires_grad=True)
    w = torch.zeros(1000, 10, requires_grad=True)
    out = rk.label_map(x, w, input="probs", backend="triton")
    out.backward(torch.zeros_like(out))
    dw = [g for n, g in captured if n == "_lm_dense_dw_kernel"]
    assert dw and dw[0][0] >= SMS
    _check(captured, {})


@pytest.mark.parametrize(("weight", "topk", "B", "K", "preds"), [
    ("count", None, 256, 1000, False), ("prob", 1, 256, 1000, False), ("prob", None, 64, 128256, False),
    ("prob", 5, 64, 128256, False), ("count", None, 64, 128256, False), ("count", None, 4096, 1000, True)])
def test_label_histogram_benchmark_shapes_fill_a_wave_without_syncs(captured, weight, topk, B, K, preds):
    x = torch.randint(0, K, (B,)) if preds else torch.zeros(B, K, dtype=torch.bfloat16)
    y = torch.randint(0, 10, (B,))
    counter = _SyncCounter()
    with counter:
        rk.label_histogram(x, y, K, 10, weight=weight, topk=topk, backend="triton")
    _check(captured, counter.syncs)


def test_label_histogram_more_targets_than_grid_axis_1(captured):
    """K_tgt = 70,000 > 65,535: (source block, target) share grid axis 0."""
    T = 70_000
    x, y = torch.zeros(8, 3), torch.randint(0, T, (8,))
    rk.label_histogram(x, y, 3, T, backend="triton")
    hist = [g for n, g in captured if n == "_hist_kernel"]
    assert hist == [(T, 1, 1)]
    assert tlh.hist_grid(300, 10**6, 64, 256)[1] == 64


def test_split_helpers_cover_every_column_once():
    """The chunks of the split helpers tile [0, n) exactly: nsplit chunks, the last one non-empty."""
    for B, K, block in ((64, 128256, 2048), (1, 17, 16), (600, 10**6, 2048), (3, 2**31 - 1, 2048)):
        for fn in (tlm.stats_splits, tlh.row_splits):
            n, chunk = fn(B, K, block)
            assert chunk % block == 0 and (n - 1) * chunk < K <= n * chunk
        n, chunk = tlm.reduction_splits(1, K, 64)
        assert (n - 1) * chunk < K <= n * chunk and n <= tlm.DENSE_MAX_SPLITS
