"""GPU fit of the Triton prefix-attention launchers, checked without a GPU: grids (one axis, within CUDA's caps for
any batch x heads), no host syncs (CUDA-graph capturable), the split plans of the prefix gradient and the
decode stage, the dot dtype of every input-dtype combination, and a tile config for every kernel and head dim.

Launches are captured, not run: the kernels are replaced by recorders, so shapes far past the interpreter's reach
(B * Hq > 65,535) cost only their (small) tensors.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pa = pytest.importorskip("reprokernels.triton.prefix_attention")
tl = pytest.importorskip("triton.language")

KERNELS = ("_pa_fwd_kernel", "_pa_prefix_state_kernel", "_pa_decode_seq_kernel", "_pa_decode_reduce_kernel",
           "_pa_bwd_pre_kernel", "_pa_bwd_dkdv_kernel", "_pa_bwd_dq_kernel", "_pa_bwd_dprefix_kernel",
           "_pa_sum_splits_kernel")
CUDA_GRID_CAPS = (2**31 - 1, 65535, 65535)


class _Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, tuple(grid), args, kwargs))
        return launch


@pytest.fixture
def launches(monkeypatch):
    """Replace every kernel of the module by a recorder; yields the list of (kernel, grid, args, kwargs)."""
    log = []
    for name in KERNELS:
        monkeypatch.setattr(pa, name, _Recorder(name, log))
    return log


def _check_grids(log):
    assert log
    for name, grid, _, _ in log:
        assert len(grid) == 1, (name, grid)  # one axis: nothing meets the 65,535 cap of axes 1 and 2
        assert all(1 <= g <= cap for g, cap in zip(grid, CUDA_GRID_CAPS[:len(grid)], strict=True)), (name, grid)


def test_launch_grid_is_one_axis_within_the_cap():
    assert pa.launch_grid(3, 70000, 5) == (3 * 70000 * 5,)
    assert pa.launch_grid() == (1,)
    assert pa.launch_grid(2**31 - 1) == (2**31 - 1,)
    with pytest.raises(ValueError, match="grid limit"):
        pa.launch_grid(2**16, 2**15)


@pytest.mark.parametrize("Hq,Hkv", [(256, 8), (1, 1)])
def test_batch_times_heads_past_65535(launches, Hq, Hkv):
    """B * Hq (and B * Hkv for MQA-free heads) past 65,535 launch on axis 0 with the program count the kernels
    unflatten: forward, decode and backward."""
    B = 300 if Hq > 1 else 70000
    D = 32
    q = torch.empty(B, Hq, 1, D)
    k = v = torch.empty(B, Hkv, 3, D)
    pk = pv = torch.empty(Hkv, 5, D)
    out, lse = pa.prefix_attention(q, k, v, pk, pv, None, None, None, True, 0.1)
    fwd = [x for x in launches if x[0] == "_pa_fwd_kernel"]
    assert [g for _, g, _, _ in fwd] == [(B * Hq,)]  # Lq = 1: one query block per (row, head)
    pa.prefix_attention(q, k, v, pk, pv, None, None, torch.full((B,), 3), True, 0.1)  # the decode path
    assert {"_pa_prefix_state_kernel", "_pa_decode_seq_kernel"} <= {x[0] for x in launches}
    pa.prefix_attention_backward(torch.empty_like(q), q, k, v, pk, pv, None, None, None, out, lse, True, 0.1,
                                 True, True, True, True, True)
    names = collections.Counter(x[0] for x in launches)
    assert names["_pa_bwd_dq_kernel"] == 1 and names["_pa_bwd_dkdv_kernel"] == 1
    assert names["_pa_bwd_dprefix_kernel"] == 1
    _check_grids(launches)
    grids = {x[0]: x[1] for x in launches}
    assert grids["_pa_bwd_dq_kernel"] == (B * Hq,) and grids["_pa_bwd_dkdv_kernel"] == (B * Hkv,)


# --------------------------------------------------------------------------------------------------- host syncs

# aten ops that make the host wait for a CUDA device (a value or an output size needed on the host), or a
# blocking host-to-device copy of a Python list (torch.tensor(list, device=...) -> lift_fresh), or bincount (its
# CUDA kernel reads max(input) on the host)
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "unique_consecutive", "_unique2", "unique_dim",
            "masked_select", "lift_fresh", "bincount", "repeat_interleave"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in SYNC_OPS:
            self.syncs[name] += 1
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for i in (args[1] if len(args) > 1 else [])):
            self.syncs["boolean-mask index"] += 1
        return func(*args, **(kwargs or {}))


def _small_case(prefix, B=3, Hq=4, Hkv=2, Lq=5, Lk=7, P=6, D=32, T=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    shape = (T, Hkv, P, D) if prefix == "task" else (Hkv, P, D)
    pk = torch.randn(shape, generator=g).to(dtype)
    pv = torch.randn(shape, generator=g).to(dtype)
    tid = torch.tensor([2, 0, 2]) if prefix == "task" else None
    return q, k, v, pk, pv, tid


@pytest.mark.parametrize("prefix", ["shared", "task"])
@pytest.mark.parametrize("decode", [False, True])
def test_launchers_make_no_host_sync(prefix, decode, monkeypatch):
    """Forward (general and decode path) and backward (with the split prefix pass) run no op that syncs with a
    CUDA device: every launch is CUDA-graph capturable."""
    monkeypatch.setattr(pa, "PREFIX_GRAD_SPLIT_MIN_PROGRAMS", 10**9)
    monkeypatch.setattr(pa, "PREFIX_GRAD_SPLIT_MIN_ITEMS", 1)
    q, k, v, pk, pv, tid = _small_case(prefix, Lq=2 if decode else 5)
    kvl = torch.tensor([7, 0, 4]) if decode else None
    with SyncCounter() as fwd:
        out, lse = pa.prefix_attention(q, k, v, pk, pv, tid, None, kvl, True, 0.2)
    assert not fwd.syncs, fwd.syncs
    with SyncCounter() as bwd:
        pa.prefix_attention_backward(torch.ones_like(q), q, k, v, pk, pv, tid, None, kvl, out, lse, True, 0.2,
                                     True, True, True, True, True)
    assert not bwd.syncs, bwd.syncs


def test_op_makes_no_host_sync_with_device_checks():
    """Through the public op with asynchronous value checks (the CUDA default): no sync in forward or backward."""
    import reprokernels as rk

    q, k, v, pk, pv, tid = _small_case("task")
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    with rk.eager_checks(False), SyncCounter() as ctr:
        out = rk.prefix_attention(*leaves, task_ids=tid, backend="triton")
        out.sum().backward()
    assert not ctr.syncs, ctr.syncs


def test_task_rows_on_the_device():
    order, off = pa._task_rows(torch.tensor([2, 0, 2, 2, 0]), 5, 4, torch.device("cpu"))
    assert order.tolist() == [1, 4, 0, 2, 3] and off.tolist() == [0, 2, 2, 5, 5]
    order, off = pa._task_rows(None, 3, 1, torch.device("cpu"))
    assert order.tolist() == [0, 1, 2] and off.tolist() == [0, 3]
    order, off = pa._task_rows(None, 0, 1, torch.device("cpu"))
    assert order.numel() == 0 and off.tolist() == [0, 0]


# --------------------------------------------------------------------------------------------------- split plans


def test_prefix_grad_splits_fill_the_gpu():
    """GPU defaults at the audit's training shapes (P = 64; 16-bit dprefix tiles BLOCK_M = 32, BLOCK_N = 64 for
    d <= 128, 16 x 32 for d = 256): the split takes each from 8 -- 32 programs to >= 132 (one per SM of an H100)."""
    cases = {  # (key blocks, T, Hkv, B, G, query blocks) -> expected S
        (1, 1, 32, 8, 1, 2048 // 32): 9,     # B = 8, Hq = Hkv = 32, Lq = 2048: 32 -> 288 programs
        (1, 4, 8, 8, 4, 2048 // 32): 9,      # GQA Hq = 32, Hkv = 8 with 4 tasks: 32 -> 288
        (1, 1, 8, 2, 1, 1024 // 32): 32,     # B = 2, Hq = Hkv = 8, Lq = 1024: 8 -> 256
        (2, 1, 8, 2, 1, 1024 // 16): 17,     # the same at d = 256: 16 -> 272
    }
    for (nb, T, Hkv, B, G, nq), want in cases.items():
        s = pa.prefix_grad_splits(nb * T * Hkv, B, T, G, nq)
        assert s == want, (nb, T, Hkv, B, G, nq, s)
        assert nb * T * Hkv * s >= 132
    assert pa.prefix_grad_splits(264, 64, 1, 1, 64) == 1  # enough programs already
    assert pa.prefix_grad_splits(8, 0, 1, 1, 64) == 1     # empty batch: no partials
    assert pa.prefix_grad_splits(8, 1, 1, 1, 1) == 1      # one query block: nothing to share
    assert pa.prefix_grad_splits(8, 1, 1, 1, 5) == 2      # shares of >= 2 query blocks
    assert pa.prefix_grad_splits(8, 3, 10, 1, 8) == 4     # more tasks than rows: a task holds one row


def test_decode_stage1_plan_fills_the_gpu():
    """16-bit stage 1 tiles (BLOCK_M = 64, BLOCK_N = 64) at the audit's decode shapes (B = 64, Hq = 32, Hkv = 8,
    Lq = 1, P = 2048): 32 programs unsplit, 8 chunks of 256 keys -> 256 programs."""
    cfg = pa._GPU_CONFIGS[("stage1", 16, 128)]
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (64, 64)
    n = pa.decode_stage1_programs(64, 4, 1, 8, 1, cfg["BLOCK_M"])
    sp, chunk = pa.decode_prefix_splits(n, 2048, cfg["BLOCK_N"])
    assert (n, sp, chunk) == (32, 8, 256) and n * sp >= 132


# --------------------------------------------------------------------------------------------------- dtypes, tiles


@pytest.mark.parametrize("act,prefix,want", [
    (torch.float32, torch.float32, "fp32"), (torch.float32, torch.bfloat16, "fp32"),
    (torch.float16, torch.float16, "fp16"), (torch.float16, torch.float32, "fp16"),
    (torch.bfloat16, torch.float32, "bf16"), (torch.bfloat16, torch.bfloat16, "bf16"),
])
def test_dot_dtype_follows_the_activations(act, prefix, want, monkeypatch):
    """16-bit activations feed tensor cores whatever the prefix dtype (a float32 prefix is cast for the dots);
    float32 activations keep exact float32 dots. Under the interpreter bfloat16 dots run in float32."""
    q = torch.empty(1, 1, 1, 32, dtype=act)
    monkeypatch.setattr(pa, "_interpret", lambda: False)
    assert str(pa._dot_dtype(q)) == want
    monkeypatch.setattr(pa, "_interpret", lambda: True)
    assert str(pa._dot_dtype(q)) == ("fp32" if act == torch.bfloat16 else want)


def test_every_kernel_has_gpu_tiles(monkeypatch):
    """The GPU configs the launchers pick exist for every head dim and dot kind; float32 tiles stay small (the FMA
    dot keeps a thread's whole operand rows in registers) and every tile is a valid tl.dot shape."""
    monkeypatch.setattr(pa, "_interpret", lambda: False)
    for d in pa.SUPPORTED_HEAD_DIMS:
        bd = pa._check_head_dim(d)
        for fp32 in (False, True):
            cfgs = [pa._fwd_config(bd, fp32), pa._stage1_config(bd, fp32), *pa._bwd_config(bd, fp32)]
            cfgs += [pa._decode_config(bd, rows, fp32) for rows in (1, 4, 32, 64, 256)]
            for cfg in cfgs:
                assert cfg["BLOCK_M"] >= 16 and cfg["BLOCK_N"] >= 16, (d, fp32, cfg)
                assert cfg["num_warps"] in (4, 8) and cfg.get("num_stages", 1) >= 1
                if fp32:
                    assert cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 64 * 64, (d, cfg)
