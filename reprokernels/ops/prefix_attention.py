"""``prefix_attention``: attention with prefix keys/values (prefix tuning, P-tuning v2, a shared prompt's KV
cache) without expanding or concatenating the prefix; ``merge_attention_states``: the exact LSE merge."""

from __future__ import annotations

import importlib
import math

import torch

from .. import _cpu
from .._amp import no_autocast
from .._apply import apply_function, direct_call, plain_eager
from .._backend import backend_status, default_backend, register_op
from .._cpu import IndexRangeError
from .._validation import (
    INDEX_DTYPES,
    KERNEL_DTYPES,
    check_float,
    check_index_dtype,
    check_index_range,
    check_ndim,
    check_same_device,
    check_tensor,
    resolve_backend_for,
)
from ..composite import prefix_attention as _composite
from ..cpu import prefix_attention as _cpu_decode
from ..reference import prefix_attention as _ref

OP = "prefix_attention"
MERGE_OP = "merge_attention_states"
register_op(OP, ("reference", "composite", "triton", "cuda", "cpu"))
register_op(MERGE_OP, ("reference", "cuda"))

_MODULES = {
    "reference": "reprokernels.reference.prefix_attention",
    "composite": "reprokernels.composite.prefix_attention",
    "triton": "reprokernels.triton.prefix_attention",
    "cuda": "reprokernels.cuda.prefix_attention",
    "cpu": "reprokernels.cpu.prefix_attention",
}
# the head dims the fused Triton kernels serve (kept here so choosing a backend never imports triton)
TRITON_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
# What the CUDA decode kernels serve (reprokernels/cuda/prefix_attention.py; kept here so that choosing a backend
# never loads the extension): the forward of at most CUDA_MAX_LQ queries per row, head dims up to CUDA_MAX_HEAD_DIM.
CUDA_MAX_LQ = 16
CUDA_MAX_HEAD_DIM = 512
# auto on CUDA takes the CUDA decode kernels while at most this many queries read each prefix kv head
# (B * Hq / Hkv * Lq, an upper bound with a task table), or there is no prefix. Their dot products run on CUDA
# cores; past about 16 queries per prefix key the prefix part turns compute-bound there (4 d bytes of a 16-bit
# key/value pair against 2 d FMAs per query: at ~25 TFMA/s effective and 3.35 TB/s the two meet near 15 queries),
# while Triton's stage 1 runs it as a tensor-core GEMM. A model, not a measurement: no GPU has timed either yet.
CUDA_AUTO_MAX_PREFIX_QUERIES = 16
# What the CPU decode kernel serves (reprokernels/cpu/prefix_attention.py, a light import: no extension loaded):
# the forward of at most CPU_MAX_LQ queries per row.
CPU_MAX_LQ = _cpu_decode.MAX_LQ
# auto on CPU takes it for every call it serves (no gradient, Lq <= 16, kernel dtypes): measured faster than
# composite (auto's other choice) and PEFT's concat + SDPA at every shape tried, 2 cores of an AVX2 EPYC, float32
# unless named: decode B1-64, P 256-4096, d 32-128, GQA groups 1-16 2.0-6.6x composite; bfloat16 B16 H32/8 Lk1024
# P2048 d128 10.8x; 64-256 queries per kv head in a row (Lq 16, G 4-16) 1.3-2.1x, 168M-671M query-key products
# included (docs/cpu-backend.md).


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def cuda_refusal(q: torch.Tensor, needs_grad: bool) -> str:
    """Why the CUDA decode kernels cannot serve this call ("" when they can), naming what to use instead."""
    Lq, d = q.shape[2], q.shape[3]
    if needs_grad:
        return ("the cuda backend of prefix_attention is the decode forward: it has no backward, and inputs "
                "require gradients here (training: backend='triton' on CUDA, or 'composite'; or call it under "
                "torch.no_grad())")
    if Lq > CUDA_MAX_LQ:
        return (f"the cuda backend of prefix_attention serves decoding with at most {CUDA_MAX_LQ} queries per row, "
                f"got Lq={Lq} (prefill: backend='triton', or 'composite')")
    if d > CUDA_MAX_HEAD_DIM:
        return (f"the cuda backend of prefix_attention serves head dims up to {CUDA_MAX_HEAD_DIM}, got d={d} "
                "(backend='composite' serves any)")
    if q.dtype not in KERNEL_DTYPES:
        return f"the cuda backend supports float32, float16 and bfloat16, got {q.dtype} (backend='composite')"
    return ""


def cpu_refusal(q: torch.Tensor, needs_grad: bool) -> str:
    """Why the CPU decode kernel cannot serve this call ("" when it can), naming what to use instead."""
    if needs_grad:
        return ("the cpu backend of prefix_attention is the decode forward: it has no backward, and inputs require "
                "gradients here (training: backend='composite'; or call it under torch.no_grad())")
    return _cpu_decode.unsupported(q)


def _cpu_built() -> bool:
    return _cpu.available()


# a constant for torch.compile (as _backend._resolve): traced calls route like eager ones, no graph break
_cpu_built._dynamo_marked_constant = True  # type: ignore[attr-defined]


def auto_prefers_cuda(B: int, Hq: int, Hkv: int, Lq: int, P: int) -> bool:
    """Whether auto takes the CUDA decode kernels over Triton for a decode call it can serve (see
    CUDA_AUTO_MAX_PREFIX_QUERIES)."""
    return P == 0 or B * (Hq // Hkv) * Lq <= CUDA_AUTO_MAX_PREFIX_QUERIES

_ARGS = "Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, Tensor? task_ids, " \
        "Tensor? key_padding_mask, Tensor? kv_lengths"
torch.library.define(
    "reprokernels::prefix_attention_fwd",
    f"({_ARGS}, bool causal, float scale, str backend) -> (Tensor, Tensor)",
)
torch.library.define(
    "reprokernels::prefix_attention_bwd",
    f"(Tensor grad_out, {_ARGS}, Tensor out, Tensor lse, bool causal, float scale, bool[] needs, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


def _kernel_prefix(prefix: torch.Tensor | None, q: torch.Tensor, backend: str) -> torch.Tensor | None:
    """The triton, cuda and cpu kernels read float32/float16/bfloat16 prefixes. A float64 one is rounded to q's dtype
    (the contract's one rounding) and held in float32, which the kernels' own cast to q's dtype then keeps exact."""
    if backend not in ("triton", "cuda", "cpu") or prefix is None or prefix.dtype in KERNEL_DTYPES:
        return prefix
    return prefix.to(q.dtype).to(torch.float32)


def _fwd(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal, scale, backend):
    mod = importlib.import_module(_MODULES[backend])
    prefix_k, prefix_v = _kernel_prefix(prefix_k, q, backend), _kernel_prefix(prefix_v, q, backend)
    with no_autocast(q.device):
        return mod.prefix_attention(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal,
                                    scale)


torch.library.impl("reprokernels::prefix_attention_fwd", ["CPU", "CUDA"])(_fwd)


@torch.library.register_fake("reprokernels::prefix_attention_fwd")
def _fwd_fake(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_ref.lse_dtype(q))


@torch.library.impl("reprokernels::prefix_attention_bwd", ["CPU", "CUDA"])
def _bwd(grad_out, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, out, lse, causal, scale,
         needs, backend):
    mod = importlib.import_module(_MODULES[backend])
    kpk, kpv = _kernel_prefix(prefix_k, q, backend), _kernel_prefix(prefix_v, q, backend)
    with no_autocast(q.device):
        grads = mod.prefix_attention_backward(grad_out, q, k, v, kpk, kpv, task_ids, key_padding_mask,
                                              kv_lengths, out, lse, causal, scale, *needs)
    like = (q, k, v, prefix_k, prefix_v)
    return tuple(grad_out.new_empty((0,)) if t is None else t.to(x.dtype) for t, x in zip(grads, like, strict=True))


@torch.library.register_fake("reprokernels::prefix_attention_bwd")
def _bwd_fake(grad_out, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, out, lse, causal, scale,
              needs, backend):
    like = (q, k, v, prefix_k, prefix_v)
    return tuple(t.new_empty(t.shape) if need and t is not None else grad_out.new_empty((0,))
                 for t, need in zip(like, needs, strict=True))


class PrefixAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, causal, scale, backend):
        return torch.ops.reprokernels.prefix_attention_fwd(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask,
                                                           kv_lengths, causal, scale, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, ctx.causal, ctx.scale, ctx.backend = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, out, lse)

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, out, lse = ctx.saved_tensors
        needs = [bool(ctx.needs_input_grad[i]) for i in range(5)]
        needs[3] = needs[3] and prefix_k is not None
        needs[4] = needs[4] and prefix_v is not None
        grads = torch.ops.reprokernels.prefix_attention_bwd(grad_out.contiguous(), q, k, v, prefix_k, prefix_v,
                                                            task_ids, key_padding_mask, kv_lengths, out, lse,
                                                            ctx.causal, ctx.scale, needs, ctx.backend)
        return (*(g if n else None for g, n in zip(grads, needs, strict=True)), None, None, None, None, None, None)


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    """Any strides are accepted; a non-unit last-dim stride is made contiguous (kernels need unit last stride)."""
    if t is None or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _check_int(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A (B,) index tensor of any integer dtype and strides -> contiguous int32/int64 (what every backend reads:
    a kernel indexes it as a dense array; B elements, no host sync). Its values: ``_check_ranges``."""
    check_tensor(t, name)
    check_index_dtype(t, name, INDEX_DTYPES)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32):
        t = t.to(torch.int32)
    return t.contiguous()


def _check_ranges(ranges: list[tuple[torch.Tensor, int, int, str, str]]) -> None:
    """Every (tensor, lo, hi, name, what) index tensor within [lo, hi], before a kernel reads through it (the cpu
    kernel checks them in its own launch instead: ``_cpu.IndexRangeError``, after which this names the value)."""
    for t, lo, hi, name, what in ranges:
        check_index_range(t, lo, hi, name, what)


def _concat_serves(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths) -> bool:
    """Whether auto runs a CPU call as concat + SDPA (``composite.concat_sdpa``): plain eager mode (no autocast:
    it would lower the SDPA), every tensor float32 or every one float64, a prefix of P >= 1 keys, queries and keys
    present, and the concatenated keys small (``CONCAT_MAX_KEYS``)."""
    if prefix_k is None or q.device.type != "cpu":
        return False
    B, _, Lq, d = q.shape
    P, Lk = prefix_k.shape[-2], k.shape[2]
    if P == 0 or B == 0 or Lq == 0 or B * k.shape[1] * (P + Lk) * d > _composite.CONCAT_MAX_KEYS:
        return False
    if q.dtype not in (torch.float32, torch.float64) or not (
            q.dtype == k.dtype == v.dtype == prefix_k.dtype == prefix_v.dtype):
        return False
    return plain_eager(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths)


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    task_ids: torch.Tensor | None = None,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    kv_lengths: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over ``cat([prefix, k])`` without expanding or concatenating the prefix.

    Args:
        q: (B, Hq, Lq, d) queries (the layout of ``F.scaled_dot_product_attention``).
        k, v: (B, Hkv, Lk, d) the sequence's own keys and values; Hq % Hkv == 0 (query head h reads kv head
            h // (Hq // Hkv): GQA / MQA).
        prefix_k, prefix_v: (Hkv, P, d) shared by the batch, or (T, Hkv, P, d) a table of per-task prefixes
            chosen per row by ``task_ids`` (B,); both or neither (None: plain attention, as P = 0). Every query
            sees all P prefix keys. They may have another floating dtype than q (e.g. float32 master weights
            with a bf16 model, or float64): every backend rounds them once to q's dtype before the products
            (float32 math; float64 for float64 q), and their gradient flows straight through that rounding,
            accumulated in float32 (float64) and returned in the prefix's dtype, summed over the batch (per task).
        causal: among the sequence's own keys, bottom-right aligned: query i sees keys 0 ... Lk - Lq + i.
        key_padding_mask: (B, Lk) bool, True = keep. Or ``kv_lengths`` (B,) integer (int64/int32/int16/int8/
            uint8, any strides): keys >= kv_lengths[b] unseen (decoding against a KV cache, Lq may be 1). Not
            both. Unseen keys and values may hold anything, NaN and inf included (a cache's unused slots): they
            never reach the output, the LSE or a gradient, and their own gradients are exactly 0.
        task_ids: (B,) integer tensor (any integer dtype, any strides; an index, never a mask) in [0, T).
        scale: the score multiplier, default 1 / sqrt(d).
        return_lse: also return the (B, Hq, Lq) LSE (natural log; float32, float64 for float64 q; -inf for a
            query that sees no key, whose output is 0). The LSE carries no gradient.
        backend: "auto" | "reference" | "composite" | "triton" | "cuda". auto: composite on CPU (a small eager
            float32/float64 call with a prefix and no return_lse: concat + SDPA, see docs/cpu-backend.md); on CUDA the
            CUDA decode kernels for a decode call (Lq <= 16, no gradients, d <= 512) where at most 16 queries read
            each prefix kv head (B * Hq / Hkv * Lq) or there is no prefix, else triton, or composite for a head dim
            outside {32, 64, 80, 96, 128, 256}. "cuda" is forward-only: it refuses calls that need gradients,
            more than 16 queries per row or d > 512, naming what to use.

    Returns:
        out (B, Hq, Lq, d) in q's dtype, or (out, lse). Differentiable in q, k, v, prefix_k, prefix_v.

    Any strides are accepted, stride 0 (expanded tensors) included; empty sizes (B, Lq, Lk, P = 0) give empty or
    well-defined results (no prefix and no key seen: O = 0, LSE = -inf); d = 0 is refused. Meta and fake tensors
    give shapes and dtypes without reading values. The full contract: docs/contracts-attention.md.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(t, name)
        check_ndim(t, 4, name, "(B, H, L, d)")
    B, Hq, _, d = q.shape
    if d == 0:
        raise ValueError(f"q: expected a head dim d >= 1, got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k: expected (B={B}, Hkv, Lk, d={d}) (B and d of q), got {tuple(k.shape)}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k: the number of query heads Hq={Hq} must be a multiple of the kv heads Hkv={Hkv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"k, v: expected q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k/prefix_v: expected both or neither, got only "
                         + ("prefix_k" if prefix_k is not None else "prefix_v"))
    if prefix_k is not None:
        check_float(prefix_k, "prefix_k")
        check_float(prefix_v, "prefix_v")
        check_ndim(prefix_k, (3, 4), "prefix_k", "(Hkv, P, d) or (T, Hkv, P, d)")
        if prefix_k.shape[-3] != Hkv or prefix_k.shape[-1] != d:
            raise ValueError(f"prefix_k: expected (Hkv={Hkv}, P, d={d}) or (T, Hkv={Hkv}, P, d={d}), "
                             f"got {tuple(prefix_k.shape)}")
        if prefix_v.shape != prefix_k.shape:
            raise ValueError(f"prefix_v: expected the shape of prefix_k {tuple(prefix_k.shape)}, "
                             f"got {tuple(prefix_v.shape)}")
        if prefix_v.dtype != prefix_k.dtype:
            raise TypeError(f"prefix_v: expected prefix_k's dtype {prefix_k.dtype}, got {prefix_v.dtype}")
    ranges: list[tuple[torch.Tensor, int, int, str, str]] = []  # index tensors' value checks (_check_ranges)
    if prefix_k is not None and prefix_k.dim() == 4:
        if task_ids is None:
            raise ValueError(f"task_ids: a (T, Hkv, P, d) prefix table needs task_ids (B={B},), got None")
        task_ids = _check_int(task_ids, "task_ids", (B,))
        ranges.append((task_ids, 0, prefix_k.shape[0] - 1, "task_ids", "tasks of the prefix table"))
    elif task_ids is not None:
        raise ValueError("task_ids: only used with a (T, Hkv, P, d) prefix table")
    if key_padding_mask is not None and kv_lengths is not None:
        raise ValueError("key_padding_mask/kv_lengths: expected at most one of them, got both")
    if key_padding_mask is not None:
        check_tensor(key_padding_mask, "key_padding_mask")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected a bool tensor (True = keep), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask: expected shape (B={B}, Lk={Lk}), got {tuple(key_padding_mask.shape)}")
    if kv_lengths is not None:
        kv_lengths = _check_int(kv_lengths, "kv_lengths", (B,))
        ranges.append((kv_lengths, 0, Lk, "kv_lengths", "keys of each row"))
    check_same_device(("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v),
                      ("task_ids", task_ids), ("key_padding_mask", key_padding_mask), ("kv_lengths", kv_lengths))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    chosen = resolve_backend_for(OP, backend, q.device)
    is_auto = backend == "auto" and default_backend() == "auto"
    if chosen == "cuda":
        why = cuda_refusal(q, _needs_grad(q, k, v, prefix_k, prefix_v))
        if why and not is_auto:
            raise ValueError(f"backend: {why}")
        P = 0 if prefix_k is None else prefix_k.shape[-2]
        if is_auto and (why or not auto_prefers_cuda(B, Hq, Hkv, q.shape[2], P)):
            chosen = "triton" if backend_status("triton", q.device.type)[0] else "composite"
    needs_grad = _needs_grad(q, k, v, prefix_k, prefix_v)
    if chosen == "cpu":
        why = cpu_refusal(q, needs_grad)
        if why:
            raise ValueError(f"backend: {why}")
    elif chosen == "composite" and is_auto and q.is_cpu and not cpu_refusal(q, needs_grad) and _cpu_built():
        chosen = "cpu"
    # the cpu kernel checks task_ids and kv_lengths in its own launch where it runs (a non-empty output; task ids
    # are read with a prefix)
    if not (chosen == "cpu" and q.numel() and (task_ids is None or prefix_k.shape[-2])):
        _check_ranges(ranges)
    if chosen == "cpu" and direct_call("cpu", q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths):
        # nothing to record (no gradient): the launcher itself, without the Function and the registered op
        q, k, v, prefix_k, prefix_v = (_unit_last(t) for t in (q, k, v, prefix_k, prefix_v))
        try:
            out, lse = _fwd(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths, bool(causal),
                            scale, "cpu")
        except IndexRangeError:
            _check_ranges(ranges)  # raises, naming the value
            raise
        return (out, lse) if return_lse else out
    if chosen == "triton" and d not in TRITON_HEAD_DIMS:
        if is_auto:
            chosen = "composite"  # auto's documented fallback for head dims the fused kernels do not serve
        else:
            raise ValueError(f"q: the triton backend supports head dims {TRITON_HEAD_DIMS}, got d={d} "
                             "(backend='composite' serves any d)")
    if chosen == "triton":
        check_float(q, "q", KERNEL_DTYPES)
    if (chosen == "composite" and is_auto and not return_lse
            and _concat_serves(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths)):
        # a small CPU problem: PEFT's own concat + SDPA chain is faster than the composite plan's many calls
        return _composite.concat_sdpa(q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask, kv_lengths,
                                      bool(causal), scale)
    q, k, v, prefix_k, prefix_v = (_unit_last(t) for t in (q, k, v, prefix_k, prefix_v))
    try:
        out, lse = apply_function(PrefixAttentionFunction, q, k, v, prefix_k, prefix_v, task_ids, key_padding_mask,
                                  kv_lengths, bool(causal), scale, chosen)
    except IndexRangeError:  # (the cpu kernel's own check)
        _check_ranges(ranges)
        raise
    return (out, lse) if return_lse else out


torch.library.define("reprokernels::merge_attention_states_fwd",
                     "(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b, str backend) -> (Tensor, Tensor)")


@torch.library.impl("reprokernels::merge_attention_states_fwd", ["CPU", "CUDA"])
def _merge_fwd(o_a, lse_a, o_b, lse_b, backend):
    mod = importlib.import_module(_MODULES[backend])
    with torch.no_grad():
        o, lse = mod.merge_attention_states(o_a, lse_a, o_b, lse_b)
    return o.contiguous(), lse.contiguous()


@torch.library.register_fake("reprokernels::merge_attention_states_fwd")
def _merge_fwd_fake(o_a, lse_a, o_b, lse_b, backend):
    o_dt, l_dt, _ = _ref.merge_dtypes(o_a, lse_a, o_b, lse_b)
    return o_a.new_empty(o_a.shape, dtype=o_dt), lse_a.new_empty(lse_a.shape, dtype=l_dt)


def merge_attention_states(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor, *,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial attentions over disjoint key sets: (o, lse).

    o_a, o_b: (..., L, d), each normalised over its own keys; lse_a, lse_b: (..., L) their log-sum-exps.
    lse = log(e^lse_a + e^lse_b), o = (e^lse_a o_a + e^lse_b o_b) / e^lse. Limits (no NaN from them, in the
    backward either):

    - a -inf partition has weight 0 and its o is never read (it may be NaN): o = the other's, gradient 0 to it;
      two -inf give o = 0 and lse = -inf;
    - a +inf partition beside a finite or -inf one: o = its o, lse = +inf; two +inf: o = (o_a + o_b) / 2
      (equal weights, the limit of lse_a = lse_b -> +inf), lse = +inf; no gradient reaches the lse of such rows;
    - finite lse up to the dtype's maximum never overflow; NaN lse (or NaN o with weight > 0) propagate.

    Dtypes: o in ``torch.promote_types(o_a.dtype, o_b.dtype)``; lse float32, or float64 if either lse is float64;
    math in float32, float64 if any input is float64. Broadcasting is not done: o_a and o_b share one shape and
    each lse has it without the last dim. Any strides. Meta tensors give shapes.

    backend: "auto" | "reference" | "cuda". "reference" is plain PyTorch ops, differentiable in all four inputs
    (composes with torch.compile). "cuda" is one fused kernel (one warp per row, any strides, float32/float16/
    bfloat16), forward only: it refuses inputs that require gradients and float64. auto takes cuda on CUDA tensors
    where it can serve the call (the extension is built, no gradient needed, no float64), else reference.
    """
    for name, t in (("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
        check_float(t, name)
    if o_a.dim() < 1 or o_a.shape != o_b.shape:
        raise ValueError(f"o_b: expected the shape of o_a {tuple(o_a.shape)}, got {tuple(o_b.shape)}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(t.shape) != tuple(o_a.shape[:-1]):
            raise ValueError(f"{name}: expected shape {tuple(o_a.shape[:-1])} (o without its last dim), "
                             f"got {tuple(t.shape)}")
    check_same_device(("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b))
    chosen = resolve_backend_for(MERGE_OP, backend, o_a.device)
    if chosen == "cuda":
        why = ""
        if _needs_grad(o_a, lse_a, o_b, lse_b):
            why = ("the cuda backend of merge_attention_states is forward-only and inputs require gradients here "
                   "(backend='reference' is differentiable; or call it under torch.no_grad())")
        elif any(t.dtype not in KERNEL_DTYPES for t in (o_a, lse_a, o_b, lse_b)):
            why = "the cuda backend supports float32, float16 and bfloat16 inputs (backend='reference' for float64)"
        if why:
            if backend == "auto" and default_backend() == "auto":
                chosen = "reference"
            else:
                raise ValueError(f"backend: {why}")
    if chosen == "reference":
        return _ref.merge_attention_states(o_a, lse_a, o_b, lse_b)
    return torch.ops.reprokernels.merge_attention_states_fwd(o_a, lse_a, o_b, lse_b, chosen)
