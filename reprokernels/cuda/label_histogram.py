"""CUDA backend of ``label_histogram``: tensors -> ``LabelHistogramParams`` -> the kernels of csrc/label_histogram.cu.

``label_histogram_accumulate`` has the signature every backend module has (see ``reprokernels/ops/label_histogram.py``)
and adds the batch's statistic into ``out`` in place, on the current stream.

``emulate=True`` runs the very same per-thread C++ functions in plain CPU loops over CPU tensors (the ``*_host``
entry point of the extension, ballots and warp reductions in the device's order): that is how the kernel code is
tested on machines without a GPU. The op layer never passes it, and without it CPU tensors are refused.

Plan (the Triton backend's, reprokernels/triton/label_histogram.py; B samples, K = K_src, T = K_tgt):

0. Torch pre-steps on B integers, no host synchronisation: a stable sort of the targets (``perm``: the samples
   grouped by class, in sample order inside a class) and the class offsets (a searchsorted of the sorted
   targets). With
   ``weight="prob"`` and a top-k, ``torch.topk(logits, k).values`` gives each row's k-th largest logit ``thr``
   and ``quota`` = k minus the number of entries strictly above it (the k-th *value* is unique whatever
   ``torch.topk`` picks among ties; the kernel keeps every entry > thr and the first ``quota`` entries == thr by
   source index, the reference's tie rule exactly).
1. Row kernel (logits only), one warp per row: the argmax (``torch.argmax``'s rule) or the softmax statistics (max,
   1 / sum exp) and, with top-k, the source index of the last kept tie (ballots in source order).
2. Histogram kernel, one block per (class, block of sources, split), a thread per source: the class's samples in
   sample order, contributions summed in a float32 register, added in place into ``out`` (only cells with a
   non-zero sum), or stored as per-split partials that a third kernel adds into ``out`` in split order.

No atomics; every sum has a fixed order: bitwise deterministic. Counts are exact integers up to 2**24 per cell.
Logits: float32 / float16 / bfloat16, any strides (element-aligned); predictions and targets: int64 / int32, any
strides; ``out``: float32, any strides.
"""

from __future__ import annotations

import torch

from .. import _cuda
from .._alloc import empty_output
from ._launch import check_devices, float_code, launch

INDEX_CODES = {torch.int64: 0, torch.int32: 1}
WEIGHT_CODES = {"count": 0, "prob": 1}

# Split a class over several blocks only while there are few blocks, each split keeps a fair share of samples and
# the (splits, T, K) float32 partials stay small (the Triton backend's heuristic).
TARGET_BLOCKS = 1024
MIN_SAMPLES_PER_SPLIT = 64
MAX_SPLITS = 64
MAX_PARTIAL_BYTES = 1 << 26
MAX_SOURCES_PER_BLOCK = 256


def _element_aligned(t: torch.Tensor) -> torch.Tensor:
    """The kernels need element-aligned data (always true for tensors torch allocated)."""
    return t if t.data_ptr() % t.element_size() == 0 else t.contiguous()


def hist_threads(K: int, threads: int = 0) -> int:
    """Threads (= sources) per block of the histogram kernel: the caller's choice, else a power of two in [32, 256]."""
    if threads:
        return threads
    n = 32
    while n < MAX_SOURCES_PER_BLOCK and n < K:
        n *= 2
    return n


def choose_splits(K: int, T: int, n_sblk: int, B: int) -> int:
    """How many blocks share one class: enough blocks to fill a GPU when T * n_sblk is small, each with a fair
    share of samples (B bounds a class's size: no host sync to count them), and only while the float32 partials
    stay under 64 MiB."""
    base = T * n_sblk
    if base >= TARGET_BLOCKS or B <= MIN_SAMPLES_PER_SPLIT:
        return 1
    splits = min(-(-TARGET_BLOCKS // base), -(-B // MIN_SAMPLES_PER_SPLIT), MAX_SPLITS)
    while splits > 1 and splits * K * T * 4 > MAX_PARTIAL_BYTES:
        splits //= 2
    return max(1, splits)


def label_histogram_accumulate(out: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, topk: int, weight: str,
                               *, emulate: bool = False, splits: int | None = None, threads: int = 0) -> None:
    """out (K, T) float32, any strides, += the batch's statistic. x: (B, K) float logits (any strides) or (B,)
    integer predictions (weight="count"); targets (B,) integer in [0, T) (range-checked by the op); topk 0 = all.

    ``splits`` overrides the heuristic and ``threads`` the sources per block of the histogram kernel (a multiple of
    32 up to 1024): tests use them to cover the split reduction and several source blocks.
    """
    check_devices(emulate, out=out, x=x, targets=targets)
    B = targets.shape[0]
    K, T = out.shape
    if B == 0:
        return
    dev = out.device
    prob = weight == "prob"
    use_topk = prob and 0 < topk < K

    p = _cuda.extension().LabelHistogramParams()
    p.B, p.K, p.T = B, K, T
    p.weight = WEIGHT_CODES[weight]
    p.topk = int(use_topk)
    p.threads = int(threads)
    p.stream = 0 if emulate else _cuda.stream_of(out)
    keep = []  # temporaries alive until the launches were enqueued (their memory is stream-ordered)

    # samples grouped by class, sample order inside; class offsets by a search of the sorted targets (a bincount
    # sizes its output from the largest target: a host sync on CUDA). Targets outside [0, T) (the device-side
    # range check fails the stream) fall outside every class's range.
    sorted_t, perm = torch.sort(targets, stable=True)
    perm = perm.contiguous()
    starts = torch.searchsorted(sorted_t, torch.arange(T + 1, device=dev, dtype=sorted_t.dtype)).contiguous()
    keep += [perm, starts]
    p.perm, p.starts = perm.data_ptr(), starts.data_ptr()

    if x.is_floating_point():
        x = _element_aligned(x)
        keep.append(x)
        p.x_dtype = float_code(x, "logits_or_preds")
        p.x = x.data_ptr()
        p.x_sb, p.x_sk = x.stride()
        if prob:
            m = empty_output((B,), torch.float32, dev)
            inv = empty_output((B,), torch.float32, dev)
            keep += [m, inv]
            p.m, p.inv = m.data_ptr(), inv.data_ptr()
            if use_topk:
                vals = torch.topk(x, topk, dim=1, sorted=True).values
                kth = vals[:, topk - 1:]
                thr = kth.squeeze(1).to(torch.float32).contiguous()
                quota = (topk - (vals > kth).sum(dim=1)).to(torch.int32).contiguous()
                jstar = empty_output((B,), torch.int32, dev)
                keep += [thr, quota, jstar]
                p.thr, p.quota, p.jstar = thr.data_ptr(), quota.data_ptr(), jstar.data_ptr()
        else:
            pred = empty_output((B,), torch.int32, dev)
            keep.append(pred)
            p.pred, p.pred_dtype, p.pred_s = pred.data_ptr(), 1, 1
    else:
        if x.dtype not in INDEX_CODES:
            raise ValueError(f"logits_or_preds: the cuda backend reads int64 or int32 predictions, got {x.dtype}")
        p.pred, p.pred_dtype, p.pred_s = x.data_ptr(), INDEX_CODES[x.dtype], x.stride(0)

    n_sblk = -(-K // hist_threads(K, threads))
    p.splits = int(splits) if splits is not None else choose_splits(K, T, n_sblk, B)
    if p.splits > 1:
        part = empty_output((p.splits, T, K), torch.float32, dev)
        keep.append(part)
        p.part = part.data_ptr()
    p.out = out.data_ptr()
    p.out_sk, p.out_st = out.stride()
    launch("label_histogram_accumulate", p, dev, emulate)
    del keep
