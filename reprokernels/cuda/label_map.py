"""CUDA backend of ``label_map``: tensors -> ``LabelMapParams`` -> the kernels of csrc/label_map.cu.

``label_map`` / ``label_map_backward`` have the signatures every backend module has (see
``reprokernels/ops/label_map.py``) and run the kernels on CUDA tensors, on the current stream.

``emulate=True`` runs the very same per-thread C++ functions in plain CPU loops over CPU tensors (the ``*_host``
entry points of the extension, block reductions in the device's tree order): that is how the kernel code is tested
on machines without a GPU. The op layer never passes it, and without it CPU tensors are refused, so the public call
on CPU tensors with ``backend="cuda"`` keeps failing in backend selection and never falls back to the emulation.

Type plan: logits in float32, float16 or bfloat16, any strides (16-byte row loads where a row is contiguous,
whatever its alignment: a scalar head and tail around the aligned groups); an index mapping in int64 or int32
read in place with any strides; a dense mapping in any of the three float dtypes. Outputs follow the reference:
float32 for probs / log_probs, else the logits' dtype; d logits in the logits' dtype, d mapping in the mapping's.

Index mappings: the forward is one launch (row statistics and the gather of the mapped columns in one block per
row). The backward builds the inverse table (the mapping's entries sorted by source with a stable argsort, the
-1 entries first, plus each column chunk's entry range by ``searchsorted``) with a few torch ops of fixed sizes
(no host sync), then one launch over (row, column chunk) blocks; the softmax's row scalar is reduced in the kernel.

Dense mappings: a simple tiled float32 GEMM kernel (row statistics first, from the index forward with no targets);
the backward's row scalar S (a (B,) vector) comes from two small torch reductions, as in the Triton backend.
"""

from __future__ import annotations

import torch

from .. import _cuda
from .._alloc import empty_output
from ..reference.label_map import index_weights, out_dtype
from ._launch import DTYPE_CODES, check_devices, float_code, launch

INDEX_CODES = {torch.int64: 0, torch.int32: 1}
INPUT_CODES = {"logits": 0, "probs": 1, "log_probs": 2}
REDUCE_CODES = {"mean": 0, "sum": 1}

# Index backward: a row is cut into column chunks only as far as needed for about TARGET_BLOCKS blocks in
# flight, never below MIN_CHUNK columns, and never so far that the per-chunk recomputation of the row scalar (a
# pass over the row's T targets) costs more than an eighth of the chunk's own columns.
TARGET_BLOCKS = 1024
MIN_CHUNK = 2048
MAX_CHUNKS = 65535
_CHUNK_ALIGN = 64


def _element_aligned(t: torch.Tensor) -> torch.Tensor:
    """The kernels need element-aligned data (always true for tensors torch allocated)."""
    return t if t.data_ptr() % t.element_size() == 0 else t.contiguous()


def _base_params(logits: torch.Tensor, input: str, emulate: bool, threads: int):
    p = _cuda.extension().LabelMapParams()
    p.x_dtype = float_code(logits, "logits")
    p.B, p.K = logits.shape
    p.x = logits.data_ptr()
    p.x_sb, p.x_sk = logits.stride()
    p.input = INPUT_CODES[input]
    p.threads = int(threads)
    p.stream = 0 if emulate else _cuda.stream_of(logits)
    return p


def label_map(logits: torch.Tensor, mapping: torch.Tensor, reduce: str, input: str, *, emulate: bool = False,
              threads: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: (out (B, K_tgt), row stats (B, 2) float32 (max, log-sum), empty for raw logits).

    ``threads`` overrides the threads per block of the row kernels (a multiple of 32 up to 1024; tests use it).
    """
    check_devices(emulate, logits=logits, mapping=mapping)
    logits = _element_aligned(logits)
    mapping = mapping.unsqueeze(1) if mapping.dim() == 1 else mapping
    B, _ = logits.shape
    dev = logits.device
    odt = out_dtype(logits, input)
    p = _base_params(logits, input, emulate, threads)
    dense = mapping.is_floating_point()
    T = mapping.shape[1] if dense else mapping.shape[0]
    out = empty_output((B, T), odt, dev)
    lse = empty_output((B, 2), torch.float32, dev) if input != "logits" else torch.empty((0,), dtype=torch.float32,
                                                                                          device=dev)
    if B == 0:
        return out, lse
    p.T = T
    p.out = out.data_ptr()
    p.lse = lse.data_ptr() if input != "logits" else 0
    if dense:
        p.w_dtype = float_code(mapping, "mapping")
        p.out_dtype = DTYPE_CODES[odt]
        p.w = mapping.data_ptr()
        p.w_sk, p.w_st = mapping.stride()
        launch("label_map_dense_fwd", p, dev, emulate)
        return out, lse
    if mapping.dtype not in INDEX_CODES:
        raise ValueError(f"mapping: the cuda backend reads int64 or int32 indices, got {mapping.dtype}")
    p.M = mapping.shape[1]
    p.mapping = mapping.data_ptr()
    p.map_st, p.map_sm = mapping.stride()
    p.map_dtype = INDEX_CODES[mapping.dtype]
    p.reduce = REDUCE_CODES[reduce]
    launch("label_map_fwd", p, dev, emulate)
    return out, lse


def _chunking(B: int, K: int, T: int, chunk: int | None) -> tuple[int, int]:
    """(columns per block, chunks per row) of the index backward."""
    if chunk is None:
        want = -(-TARGET_BLOCKS // max(B, 1))
        by_size = -(-K // MIN_CHUNK)
        by_targets = max(1, K // max(8 * T, 1))
        nchunks = max(1, min(want, by_size, by_targets))
        chunk = -(-K // nchunks)
        chunk = -(-chunk // _CHUNK_ALIGN) * _CHUNK_ALIGN
    chunk = max(int(chunk), -(-K // MAX_CHUNKS), 1)
    return chunk, -(-K // chunk)


def inverse_table(mapping: torch.Tensor, w: torch.Tensor, K: int, chunk: int, nchunks: int):
    """The index backward's table: every entry of the (T, M) mapping sorted by source (stable, so in entry order
    within a source; the -1 entries first, never reached), its target and weight, and the entry range
    [blk[c], blk[c + 1]) of each column chunk. Fixed sizes only: no host synchronisation."""
    dev = mapping.device
    M = mapping.shape[1]
    flat = mapping.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    esrc = flat[order].contiguous()
    etgt = torch.div(order, max(M, 1), rounding_mode="floor").contiguous()
    ew = w.reshape(-1)[order].contiguous()
    starts = (torch.arange(nchunks + 1, device=dev, dtype=torch.int64) * chunk).clamp_(max=K)
    blk = torch.searchsorted(esrc, starts).contiguous()
    return esrc, etgt, ew, blk


def label_map_backward(grad: torch.Tensor, logits: torch.Tensor, mapping: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, reduce: str, input: str, need_logits: bool, need_mapping: bool, *,
                       emulate: bool = False, threads: int = 0, chunk: int | None = None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d logits (B, K_src) in logits' dtype, d mapping for dense mappings in its dtype), None where not needed.

    grad may have any strides (stride 0 included). ``chunk`` overrides the columns per block of the index
    backward and ``threads`` the threads per block (tests use them to cover several chunks and block shapes).
    """
    dense = mapping.is_floating_point()
    need_mapping = need_mapping and dense
    if not (need_logits or need_mapping):
        return None, None
    check_devices(emulate, grad=grad, logits=logits, mapping=mapping, out=out, lse=lse)
    logits = _element_aligned(logits)
    mapping = mapping.unsqueeze(1) if mapping.dim() == 1 else mapping
    B, K = logits.shape
    dev = logits.device
    T = mapping.shape[1] if dense else mapping.shape[0]
    g = grad if grad.dtype in DTYPE_CODES else grad.float()
    p = _base_params(logits, input, emulate, threads)
    p.T = T
    p.grad = g.data_ptr()
    p.grad_sb, p.grad_st = g.stride()
    p.grad_dtype = DTYPE_CODES[g.dtype]
    mode = INPUT_CODES[input]
    keep = []  # temporaries alive until the launch was enqueued (their memory is stream-ordered)
    if mode:
        lse_k = lse.float().contiguous()
        keep.append(lse_k)
        p.lse = lse_k.data_ptr()
    dx = empty_output((B, K), logits.dtype, dev) if need_logits else None
    dw = empty_output((K, T), mapping.dtype, dev) if need_mapping else None

    if dense:
        p.w_dtype = float_code(mapping, "mapping")
        p.w = mapping.data_ptr()
        p.w_sk, p.w_st = mapping.stride()
        if mode and need_logits:
            # the softmax's row scalar: probs: sum_t g_t out_t; log_probs: sum_t g_t (column sum of W)
            other = out.float() if mode == 1 else mapping.float().sum(0)
            srow = (g.float() * other).sum(-1).contiguous()
            keep.append(srow)
            p.srow = srow.data_ptr()
        p.dx = dx.data_ptr() if dx is not None else 0
        p.dw = dw.data_ptr() if dw is not None else 0
        if (dx is not None and dx.numel()) or (dw is not None and dw.numel()):
            launch("label_map_dense_bwd", p, dev, emulate)
        return dx, dw

    assert dx is not None
    if B == 0 or K == 0:
        return dx, None
    w = index_weights(mapping, reduce, torch.float32)
    p.M = mapping.shape[1]
    if mode == 1:
        out_k = out.float().contiguous()
        keep.append(out_k)
        p.out = out_k.data_ptr()
    elif mode == 2:
        tw = w.sum(1).contiguous()
        keep.append(tw)
        p.tw = tw.data_ptr()
    p.chunk, p.nchunks = _chunking(B, K, T, chunk)
    esrc, etgt, ew, blk = inverse_table(mapping, w, K, p.chunk, p.nchunks)
    keep += [esrc, etgt, ew, blk]
    p.esrc, p.etgt, p.ew, p.blk = esrc.data_ptr(), etgt.data_ptr(), ew.data_ptr(), blk.data_ptr()
    p.dx = dx.data_ptr()
    launch("label_map_bwd", p, dev, emulate)
    del keep
    return dx, None
