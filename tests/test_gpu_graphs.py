"""On a GPU: every op, forward and backward, runs with no host sync and replays from a captured CUDA graph.

For each op and GPU backend: one eager step (forward, then the gradients of every differentiable input) gives
the expected values; the same step under ``torch.cuda.set_sync_debug_mode("error")`` must not synchronise
(a blocking copy, ``item()``, ``nonzero``... raises); the step captured in a CUDA graph, replayed on new
input values copied into the static inputs, must equal an eager step on those values bit for bit (the kernels
are deterministic: no atomics in default paths). Skipped without a CUDA device (the ``gpu`` marker).

Forward-only steps (inside ``torch.no_grad()``): prefix_attention's decode path at sizes where ``auto`` picks the
cuda kernel (B * (Hq // Hkv) * Lq <= 16; a shared prefix and a task table, ragged kv_lengths, Lq = 1 and 4) on
``auto`` and ``cuda``, and merge_attention_states on ``cuda``: the cuda decode backend has no backward.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import reprokernels as rk

pytestmark = pytest.mark.gpu

Step = Callable[[], list[torch.Tensor]]


def _backends(op: str) -> list[str]:
    has_cuda = op in ("visual_prompt", "soft_prompt_concat", "label_map", "label_histogram")
    return ["triton", "auto"] + (["cuda"] if has_cuda and rk.cuda_available() else [])


def _decode_backends() -> list[str]:
    """prefix_attention's decode path (forward only): auto (cuda at these small sizes, where built) and cuda."""
    return ["auto"] + (["cuda"] if rk.cuda_available() else [])


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return [out.detach(), *torch.autograd.grad(out, inputs, g)]


# ---------------------------------------------------------------------------------------------- the op steps
# Each maker returns (step, inputs): ``inputs`` are the tensors whose values a new replay may change (refilled
# in place with fresh random values of the same kind), ``step`` computes forward + gradients from them.

def _visual_prompt(backend: str, dtype: torch.dtype, tensor_mask: bool) -> tuple[Step, list[torch.Tensor]]:
    dev = "cuda"
    x = torch.rand(5, 3, 33, 31, device=dev, dtype=dtype)
    delta = torch.randn(3, 72, 70, device=dev, requires_grad=True)  # fp32 master delta beside 16-bit x
    mask = torch.rand(5, 1, 9, 10, device=dev, requires_grad=True) if tensor_mask else "outside"
    wrt = [delta] + ([mask] if tensor_mask else [])
    g = torch.randn(5, 3, 72, 70, device=dev, dtype=dtype)

    def step() -> list[torch.Tensor]:
        out = rk.visual_prompt(x, delta, size=(72, 70), mask=mask, squash="sigmoid", clamp=(0.0, 1.0),
                               mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], backend=backend)
        return _grads(out, wrt, g)
    return step, [x, delta, g] + ([mask] if tensor_mask else [])


def _soft_prompt(backend: str, dtype: torch.dtype) -> tuple[Step, list[torch.Tensor]]:
    dev = "cuda"
    table = torch.randn(3, 7, 48, device=dev, requires_grad=True)  # fp32 prompts, 16-bit model
    emb = torch.randn(101, 48, device=dev, dtype=dtype)
    ids = torch.randint(0, 101, (4, 13), device=dev)
    tasks = torch.randint(0, 3, (4,), device=dev)
    am = torch.ones(4, 13, dtype=torch.int64, device=dev)
    g = torch.randn(4, 20, 48, device=dev, dtype=dtype)

    def step() -> list[torch.Tensor]:
        res = rk.soft_prompt_concat(table, input_ids=ids, embedding_weight=emb, task_ids=tasks, attention_mask=am,
                                    backend=backend)
        return [*_grads(res.inputs_embeds, [table], g), res.attention_mask]
    return step, [table, emb, ids, tasks, g]


def _label_map(backend: str, dtype: torch.dtype, kind: str) -> tuple[Step, list[torch.Tensor]]:
    dev = "cuda"
    logits = torch.randn(6, 1001, device=dev, dtype=dtype, requires_grad=True)
    wrt = [logits]
    if kind == "dense":
        mapping = torch.rand(1001, 11, device=dev, requires_grad=True)
        wrt.append(mapping)
        mutable = [logits, mapping]
    else:
        mapping = torch.randint(0, 1001, (11, 3), device=dev)
        mutable = [logits, mapping]
    g = torch.randn(6, 11, device=dev, dtype=dtype if kind != "dense" else torch.float32)

    def step() -> list[torch.Tensor]:
        out = rk.label_map(logits, mapping, input="probs" if kind == "dense" else "log_probs", backend=backend)
        return _grads(out, wrt, g.to(out.dtype))
    return step, [*mutable, g]


def _label_histogram(backend: str, dtype: torch.dtype) -> tuple[Step, list[torch.Tensor]]:
    dev = "cuda"
    logits = torch.randn(37, 1000, device=dev, dtype=dtype)
    y = torch.randint(0, 10, (37,), device=dev)
    out = torch.empty(1000, 10, device=dev)

    def step() -> list[torch.Tensor]:
        out.zero_()
        rk.label_histogram(logits, y, 1000, 10, weight="prob", topk=2, out=out, backend=backend)
        return [out.clone()]
    return step, [logits, y]


def _prefix_train(backend: str, dtype: torch.dtype, prefix_dtype: torch.dtype) -> tuple[Step, list[torch.Tensor]]:
    dev = "cuda"
    q = torch.randn(2, 8, 67, 64, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 67, 64, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 67, 64, device=dev, dtype=dtype, requires_grad=True)
    pk = torch.randn(3, 2, 19, 64, device=dev, dtype=prefix_dtype, requires_grad=True)
    pv = torch.randn(3, 2, 19, 64, device=dev, dtype=prefix_dtype, requires_grad=True)
    tasks = torch.tensor([2, 0], device=dev)
    g = torch.randn(2, 8, 67, 64, device=dev, dtype=dtype)

    def step() -> list[torch.Tensor]:
        out = rk.prefix_attention(q, k, v, pk, pv, task_ids=tasks, causal=True, backend=backend)
        return _grads(out, [q, k, v, pk, pv], g)
    return step, [q, k, v, pk, pv, tasks, g]


def _prefix_decode(backend: str, dtype: torch.dtype) -> tuple[Step, list[torch.Tensor]]:
    dev = "cuda"
    q = torch.randn(9, 8, 1, 128, device=dev, dtype=dtype)
    k = torch.randn(9, 2, 300, 128, device=dev, dtype=dtype)
    v = torch.randn(9, 2, 300, 128, device=dev, dtype=dtype)
    pk = torch.randn(2, 700, 128, device=dev, dtype=dtype)
    pv = torch.randn(2, 700, 128, device=dev, dtype=dtype)
    kvl = torch.randint(1, 301, (9,), device=dev)

    def step() -> list[torch.Tensor]:
        o, lse = rk.prefix_attention(q, k, v, pk, pv, kv_lengths=kvl, causal=True, return_lse=True, backend=backend)
        return [o, lse]
    return step, [q, k, v, pk, pv]


def _prefix_decode_small(backend: str, dtype: torch.dtype, tasks: bool, lq: int = 1
                         ) -> tuple[Step, list[torch.Tensor]]:
    """Decode at B * (Hq // Hkv) * Lq <= 16 queries per prefix kv head (where auto picks the cuda kernel): a
    shared prefix or a (T, Hkv, P, d) table with task_ids, ragged kv_lengths, GQA, forward only (no_grad)."""
    dev = "cuda"
    B = 3 if lq == 1 else 1
    q = torch.randn(B, 8, lq, 128, device=dev, dtype=dtype)
    k = torch.randn(B, 2, 300, 128, device=dev, dtype=dtype)
    v = torch.randn(B, 2, 300, 128, device=dev, dtype=dtype)
    pshape = (3, 2, 700, 128) if tasks else (2, 700, 128)
    pk = torch.randn(pshape, device=dev, dtype=dtype)
    pv = torch.randn(pshape, device=dev, dtype=dtype)
    kvl = torch.tensor([1, 300, 137][:B], device=dev)  # ragged, the full capacity included
    tid = torch.tensor([2, 0, 2][:B], device=dev) if tasks else None
    assert B * (q.shape[1] // k.shape[1]) * lq <= 16

    def step() -> list[torch.Tensor]:
        with torch.no_grad():
            o, lse = rk.prefix_attention(q, k, v, pk, pv, task_ids=tid, kv_lengths=kvl, causal=True, return_lse=True,
                                         backend=backend)
        return [o, lse]
    return step, [q, k, v, pk, pv, kvl] + ([tid] if tasks else [])


def _merge_cuda(dtype: torch.dtype) -> tuple[Step, list[torch.Tensor]]:
    """merge_attention_states on the cuda kernel, forward (no_grad): o_b a strided view, fp32 lse."""
    dev = "cuda"
    oa = torch.randn(3, 4, 17, 64, device=dev, dtype=dtype)
    ob = torch.randn(3, 17, 4, 64, device=dev, dtype=dtype).transpose(1, 2)  # non-contiguous rows
    la = torch.randn(3, 4, 17, device=dev)
    lb = torch.randn(3, 4, 17, device=dev)

    def step() -> list[torch.Tensor]:
        with torch.no_grad():
            o, lse = rk.merge_attention_states(oa, la, ob, lb, backend="cuda")
        return [o, lse]
    return step, [oa, ob, la, lb]


def _merge(dtype: torch.dtype) -> tuple[Step, list[torch.Tensor]]:
    dev = "cuda"
    oa = torch.randn(3, 4, 17, 64, device=dev, dtype=dtype, requires_grad=True)
    ob = torch.randn(3, 4, 17, 64, device=dev, dtype=dtype, requires_grad=True)
    la = torch.randn(3, 4, 17, device=dev, requires_grad=True)
    lb = torch.randn(3, 4, 17, device=dev, requires_grad=True)
    g = torch.randn(3, 4, 17, 64, device=dev, dtype=dtype)

    def step() -> list[torch.Tensor]:
        o, _ = rk.merge_attention_states(oa, la, ob, lb)
        return _grads(o, [oa, la, ob, lb], g)
    return step, [oa, ob, la, lb, g]


DT = [torch.float32, torch.bfloat16, torch.float16]
CASES: list[tuple[str, Callable[[], tuple[Step, list[torch.Tensor]]]]] = []
for _dt in DT:
    _n = str(_dt).removeprefix("torch.")
    for _b in _backends("visual_prompt"):
        CASES.append((f"visual_prompt-outside-{_b}-{_n}", lambda b=_b, d=_dt: _visual_prompt(b, d, False)))
        CASES.append((f"visual_prompt-tensormask-{_b}-{_n}", lambda b=_b, d=_dt: _visual_prompt(b, d, True)))
    for _b in _backends("soft_prompt_concat"):
        CASES.append((f"soft_prompt-{_b}-{_n}", lambda b=_b, d=_dt: _soft_prompt(b, d)))
    for _b in _backends("label_map"):
        CASES.append((f"label_map-index-{_b}-{_n}", lambda b=_b, d=_dt: _label_map(b, d, "index")))
        CASES.append((f"label_map-dense-{_b}-{_n}", lambda b=_b, d=_dt: _label_map(b, d, "dense")))
    for _b in _backends("label_histogram"):
        CASES.append((f"label_histogram-{_b}-{_n}", lambda b=_b, d=_dt: _label_histogram(b, d)))
    for _b in _backends("prefix_attention"):
        CASES.append((f"prefix_train-{_b}-{_n}", lambda b=_b, d=_dt: _prefix_train(b, d, d)))
        CASES.append((f"prefix_decode-{_b}-{_n}", lambda b=_b, d=_dt: _prefix_decode(b, d)))
        if _dt != torch.float32:
            CASES.append((f"prefix_train-{_b}-{_n}+fp32prefix",
                          lambda b=_b, d=_dt: _prefix_train(b, d, torch.float32)))
    for _b in _decode_backends():
        CASES.append((f"prefix_decode_small-{_b}-{_n}", lambda b=_b, d=_dt: _prefix_decode_small(b, d, False)))
        CASES.append((f"prefix_decode_tasks-{_b}-{_n}", lambda b=_b, d=_dt: _prefix_decode_small(b, d, True)))
        CASES.append((f"prefix_decode_lq4-{_b}-{_n}", lambda b=_b, d=_dt: _prefix_decode_small(b, d, True, lq=4)))
    CASES.append((f"merge_attention_states-{_n}", lambda d=_dt: _merge(d)))
    if rk.cuda_available():
        CASES.append((f"merge_attention_states-cuda-{_n}", lambda d=_dt: _merge_cuda(d)))


def _refill(inputs: list[torch.Tensor]) -> None:
    """New values in place, of the same kind (indices stay in range: permuted along their first dim)."""
    with torch.no_grad():
        for t in inputs:
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) if t.min() < 0 else torch.rand_like(t))
            elif t.numel() > 1:
                t.copy_(t.flatten()[torch.randperm(t.numel(), device=t.device)].view_as(t))


@pytest.mark.parametrize("make", [m for _, m in CASES], ids=[n for n, _ in CASES])
def test_no_host_sync_and_graph_replay(make: Callable[[], tuple[Step, list[torch.Tensor]]]) -> None:
    torch.manual_seed(0)
    step, inputs = make()
    # warm up on a side stream (Triton compiles, allocator pools), as graph capture requires
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # raises on any synchronising CUDA call
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for _ in range(2):
        _refill(inputs)
        expected = [t.clone() for t in step()]
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(static_out, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
