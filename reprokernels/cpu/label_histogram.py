"""cpu backend of ``label_histogram``: tensors -> ``LabelHistogramParams`` -> csrc/cpu/label_histogram.cpp.

count: one thread per row for the argmax (torch.argmax's rule), counts added in sample order (exact integers).
prob: per row the softmax statistics and the top-k cut (ties at the k-th value: lowest source first), then one
thread per block of sources sums the kept probabilities over the batch in sample order in float64, adding the
float32 result into ``out`` in place. Logits float32/float16/bfloat16, any strides; predictions and targets
int64/int32; ``out`` float32, any strides. Deterministic for any thread count.
"""

from __future__ import annotations

import torch

from .. import _cpu
from . import case_dict, check_cpu, dtype_reason, float_code

INDEX_CODES = {torch.int64: 0, torch.int32: 1}
WEIGHT_CODES = {"count": 0, "prob": 1}


def supports(case: tuple) -> str:
    """case keys: dtype (of the logits or integer predictions), weight ("count" or "prob").

    auto takes the cpu kernel where it was measured faster than the reference (auto's other choice)
    (docs/cpu-backend.md): counts of the argmax of logits of any kernel dtype (FLM, N 50,000 x 1000 on the AVX2 host:
    1.8x eager and 1.3x compile in float32, 8.5x / 10x in float16), and weight="prob" (BLM+ top-1: 3.6-5.5x eager
    and compile;
    every k: 1.5x eager for all classes, 0.75x for top-3, always 2-7x the reference).
    Implemented but not measured faster (so auto keeps the reference): integer predictions.
    """
    d = case_dict(case)
    dtype = d.get("dtype", "").replace("torch.", "")
    if dtype.startswith(("int", "uint")):
        return f"dtype={dtype}: integer predictions were not measured faster than eager on the cpu kernel"
    why = dtype_reason(d, "dtype")
    if why:
        return why
    return ""


def label_histogram_accumulate(out: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, topk: int,
                               weight: str) -> None:
    check_cpu(out=out, x=x, targets=targets)
    if targets.numel() == 0:
        return
    p = _cpu.Params()
    p.K, p.T = out.shape
    p.out = out.data_ptr()
    p.out_sk, p.out_st = out.stride()
    t = targets if targets.dtype in INDEX_CODES else targets.to(torch.int64)
    p.targets, p.t_s, p.target_dtype = t.data_ptr(), t.stride(0), INDEX_CODES[t.dtype]
    p.weight = WEIGHT_CODES[weight]
    p.topk = int(topk)
    if x.is_floating_point():
        p.x_dtype = float_code(x, "logits_or_preds")
        p.B = x.shape[0]
        p.x_sb, p.x_sk = x.stride()
    else:
        x = x if x.dtype in INDEX_CODES else x.to(torch.int64)
        p.preds, p.pred_dtype = 1, INDEX_CODES[x.dtype]
        p.B = x.shape[0]
        p.x_sb = x.stride(0)
    p.x = x.data_ptr()
    _cpu.run("label_histogram_accumulate", p)
    del t
