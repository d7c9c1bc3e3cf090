"""cpu backend of ``label_map``: tensors -> ``LabelMapParams`` -> csrc/cpu/label_map.cpp.

Index mappings: one thread per row, one sweep for the row's max and one for its sum of exp (the row still in
cache), then only the mapped columns; the backward scatters each row's d out in the reference's index_add_ order
and sweeps the row once. Dense mappings: the (K, T) weights as float32, the products as register tiles of a few
rows (csrc/cpu/gemm_tile.h; each output summed over K in order, d logits over T in order), d mapping summed over
the batch in sample order by one thread per block of sources (backward). Logits float32/float16/bfloat16, any strides
(stride 0 included); float64 is the reference's.
"""

from __future__ import annotations

import torch

from .. import _cpu
from .._alloc import empty_output
from ..reference.label_map import out_dtype
from . import DTYPE_CODES, case_dict, check_cpu, dtype_reason, float_code

INPUT_CODES = {"logits": 0, "probs": 1, "log_probs": 2}
REDUCE_CODES = {"mean": 0, "sum": 1}
INDEX_CODES = {torch.int64: 0, torch.int32: 1}


def supports(case: tuple) -> str:
    """case keys: dtype (of the logits), mapping ("index" or "dense"), mapping_dtype (of a dense mapping), input.

    auto takes the cpu kernels where they were measured faster than the reference (auto's other choice) and the
    eager chain (docs/cpu-backend.md): logits of any kernel dtype with an index mapping (one-to-one or many-to-one),
    any input (AVX2 host, full shapes: 1.4-5.4x eager, 1.2-7.2x torch.compile; B2-B4: 0.97-1.6x eager, 1.3-1.6x
    compile).
    The op itself runs a one-to-one logits mapping as torch.index_select in eager mode.
    Dense mappings: the case holds no sizes, so auto keeps the reference (a BLAS GEMM) here; in eager mode the op
    takes this backend where ``dense_serves`` says the kernel is faster.
    """
    d = case_dict(case)
    why = dtype_reason(d, "dtype", *(("mapping_dtype",) if d.get("mapping") == "dense" else ()))
    if why:
        return why
    if d.get("mapping") != "index":
        return f"mapping={d.get('mapping')!r}: only index mappings were measured faster than eager on the cpu kernels"
    return ""


# Dense mappings: the kernel's packed, blocked register-tile GEMM (csrc/cpu/gemm_tile.h) against torch's BLAS GEMM
# (MKL; 2 threads of an AMD EPYC with AVX2, interleaved medians, 2026-12-06):
# - few targets: 1.4-2.3x forward and 1.3-2.3x forward + backward at B256 x 1000 for T = 2..16 targets, slower
#   below ~64K logits, where the launch's fixed cost (~15 us) is more than the GEMM;
# - more targets: the kernel alone is as fast as MKL (T = 100..400, B256), but the launch costs ~50 us more than the
#   reference's plain matmul, 0.73-0.88x at B256 x 1000 for T = 24..400;
# - many logits with a gradient (training a mapping of a large vocabulary): its d logits (grad W^T, B packed from W
#   per block) beats MKL's transposed product where B x K is large: forward + backward 1.04-1.34x at 4M logits and
#   more (B256 x 16000 x 50 ... 200, B128-256 x 32157 x 100 ... 397, B512 x 8192 x 64; float32, float16, bfloat16),
#   0.82-1.0x at 1-2M (B32-64 x 32157, B256 x 4000-8000).
# - few rows: the 6-row tiles leave threads idle and compute rows that are dropped, so both rules need rows. With
#   T = 10: B >= 32 1.5-2.6x forward and 0.96-1.38x forward + backward (B32-256, K 512-8192); B <= 16 0.46-0.84x
#   forward (B2 x 128256, B8 x 32768) or 0.52-0.75x forward + backward. With a gradient of 4M+ logits: B64 x 65536 x
#   100 0.81x, B32 x 131072 x 50 0.77x, B128-512 the wins above.
# - softmax inputs (probs, log_probs): the kernel's exp per logit against torch's softmax, so rows must be short:
#   1.17-1.57x torch's softmax @ W at K = 1000-4000 (B256, T 7-10), 0.70-1.0x at K = 32157 (B64, T 16).
DENSE_MAX_TARGETS = 16
DENSE_MIN_LOGITS = 1 << 17
DENSE_MIN_ROWS = 32
DENSE_GRAD_MIN_LOGITS = 4_000_000  # (B256 x 16000 = 4,096,000 measured faster; 2.06M slower)
DENSE_GRAD_MIN_ROWS = 128
DENSE_SOFTMAX_MAX_SOURCES = 4096


def dense_serves(B: int, K: int, T: int, needs_grad: bool = False, softmax_input: bool = False) -> bool:
    """Whether auto, in eager mode, runs a (B, K) x (K, T) dense mapping on this backend rather than the BLAS;
    ``needs_grad``: the logits will get a gradient (autograd records the call); ``softmax_input``: probs or
    log_probs."""
    if softmax_input and K > DENSE_SOFTMAX_MAX_SOURCES:
        return False
    return ((T <= DENSE_MAX_TARGETS and B >= DENSE_MIN_ROWS and B * K >= DENSE_MIN_LOGITS)
            or (needs_grad and B >= DENSE_GRAD_MIN_ROWS and B * K >= DENSE_GRAD_MIN_LOGITS))


def _set_index_mapping(p, mapping: torch.Tensor, reduce: str) -> torch.Tensor:
    """Point p at a (T, M) index mapping (as the kernels read it) and return that tensor: keep it alive until the
    launch has run."""
    m = _index(mapping)
    p.M = m.shape[1]
    p.mapping = m.data_ptr()
    p.map_st, p.map_sm = m.stride()
    p.map_dtype = INDEX_CODES[m.dtype]
    p.reduce = REDUCE_CODES[reduce]
    return m


def _params(logits: torch.Tensor, input: str):
    p = _cpu.Params()
    p.x_dtype = float_code(logits, "logits")
    p.B, p.K = logits.shape
    p.x = logits.data_ptr()
    p.x_sb, p.x_sk = logits.stride()
    p.input = INPUT_CODES[input]
    return p


def _dense_weights(mapping: torch.Tensor) -> torch.Tensor:
    """The (K, T) weights as the kernels read them: float32, contiguous (a float32 contiguous map as it is, without
    the two no-op conversion calls: ~3 us a call on the AVX2 host)."""
    if mapping.dtype == torch.float32 and mapping.is_contiguous():
        return mapping
    return mapping.to(torch.float32).contiguous()


def _index(mapping: torch.Tensor) -> torch.Tensor:
    return mapping if mapping.dtype in INDEX_CODES else mapping.to(torch.int64)


def label_map(logits: torch.Tensor, mapping: torch.Tensor, reduce: str, input: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    check_cpu(logits=logits, mapping=mapping)
    mapping = mapping.unsqueeze(1) if mapping.dim() == 1 else mapping
    B = logits.shape[0]
    dense = mapping.is_floating_point()
    if dense:
        float_code(mapping, "mapping")
    T = mapping.shape[1] if dense else mapping.shape[0]
    odt = out_dtype(logits, input)
    out = empty_output((B, T), odt, logits.device)
    lse = (empty_output((B, 2), torch.float32, logits.device) if input != "logits"
           else torch.empty((0,), dtype=torch.float32))
    p = _params(logits, input)
    if B == 0:
        return out, lse
    p.T = T
    p.out = out.data_ptr()
    p.lse = lse.data_ptr() if input != "logits" else 0
    if dense:
        w = _dense_weights(mapping)
        p.w = w.data_ptr()
        p.out_dtype = DTYPE_CODES[odt]
        _cpu.run("label_map_dense_fwd", p)
        del w
        return out, lse
    m = _set_index_mapping(p, mapping, reduce)
    p.check_index = 1  # the mapping range-checked in the launch (IndexRangeError)
    _cpu.run("label_map_fwd", p)
    del m
    return out, lse


def label_map_backward(grad: torch.Tensor, logits: torch.Tensor, mapping: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, reduce: str, input: str, need_logits: bool, need_mapping: bool
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    dense = mapping.is_floating_point()
    need_mapping = need_mapping and dense
    if not (need_logits or need_mapping):
        return None, None
    check_cpu(grad=grad, logits=logits, mapping=mapping)
    mapping = mapping.unsqueeze(1) if mapping.dim() == 1 else mapping
    B, K = logits.shape
    T = mapping.shape[1] if dense else mapping.shape[0]
    g = grad if grad.dtype in DTYPE_CODES else grad.float()
    p = _params(logits, input)
    p.T = T
    p.grad = g.data_ptr()
    p.grad_sb, p.grad_st = g.stride()
    p.grad_dtype = DTYPE_CODES[g.dtype]
    keep = []
    if input != "logits":
        lse_k = lse.float().contiguous()
        keep.append(lse_k)
        p.lse = lse_k.data_ptr()
    if input == "probs":
        out_k = out.float().contiguous()
        keep.append(out_k)
        p.out = out_k.data_ptr()
    dx = empty_output((B, K), logits.dtype, logits.device) if need_logits else None
    if dense:
        dw_dtype = mapping.dtype if mapping.dtype in DTYPE_CODES else torch.float32
        dw = empty_output((K, T), dw_dtype, logits.device) if need_mapping else None
        w = _dense_weights(mapping)
        p.w = w.data_ptr()
        p.dx = dx.data_ptr() if dx is not None else 0
        p.dw = dw.data_ptr() if dw is not None else 0
        p.dw_dtype = DTYPE_CODES[dw_dtype]
        if B == 0 and dw is not None:
            dw.zero_()
        elif B or K:
            _cpu.run("label_map_dense_bwd", p)
        del w, keep
        return dx, (dw.to(mapping.dtype) if dw is not None else None)
    assert dx is not None
    if B == 0 or K == 0:
        return dx, None
    m = _set_index_mapping(p, mapping, reduce)
    p.dx = dx.data_ptr()
    _cpu.run("label_map_bwd", p)
    del keep, m
    return dx, None
