"""The op calls the GPU-readiness audit (tools/aot_audit.py) makes: every public op, forward and backward.

Two kinds of scenario:
- ``wave=True``: the full shapes of benchmarks/shapes.py (the shapes we publish numbers for). Every Triton
  launch there must fill one wave of an H100 (>= 132 programs) unless its kernel is small by design.
- ``wave=False``: coverage of the configurations the launchers can pick (every dtype, the fp32-parameter +
  16-bit-activation mix, head dims 32..256, masks, GQA + tasks, key padding, split decode): they must compile
  and fit, whatever their grid.

``launchers``: the backends a scenario runs on. Every scenario runs on ``triton`` (captured, compiled, checked)
unless it lists only ``cuda``; the ops with a CUDA extension kernel (``CUDA_OPS``) and the decode scenarios of
prefix_attention (Lq <= 16, no gradient: what the cuda backend serves; training stays on Triton) also run
through their CUDA launcher with the extension call stubbed out, where only host syncs are counted.
merge_attention_states has no Triton kernel: its scenarios are ``cuda`` only.

Tensors whose values no kernel reads on the host are ``torch.empty`` (no memory is touched when launches are
captured instead of run); index tensors hold valid values (the op layer checks them).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ from a source checkout

import reprokernels as rk
from benchmarks.shapes import SHAPES
from reprokernels.ops.prefix_attention import CUDA_MAX_LQ, auto_prefers_cuda

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The backend the scenarios call (read when an op is called): "triton", or "cuda" to exercise the CUDA launchers.
BACKEND = "triton"
IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
# ops whose every scenario also runs through the CUDA launcher (prefix_attention: its decode scenarios only)
CUDA_OPS = ("visual_prompt", "soft_prompt_concat", "label_map", "label_histogram")
TRITON, BOTH, CUDA = ("triton",), ("triton", "cuda"), ("cuda",)


@dataclass
class Scenario:
    op: str
    name: str
    wave: bool
    build: Callable[[], tuple[Callable[[], object], bool]]  # -> (forward, whether it has a backward)
    launchers: tuple[str, ...] = TRITON  # the backends it runs on (module docstring)

    @property
    def key(self) -> str:
        return f"{self.op}/{self.name}"


def _e(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    return t.requires_grad_() if grad else t


# ------------------------------------------------------------------------------------------------ visual_prompt
def _vp(B: int, C: int, h: int, w: int, H: int, W: int, dtype: torch.dtype, mask: object = "outside",
        mask_res: tuple[int, int] | None = None, mask_channels: int = 1, delta_dtype: torch.dtype = torch.float32,
        **kw: object) -> Callable[[], tuple[Callable[[], object], bool]]:
    def build() -> tuple[Callable[[], object], bool]:
        x = _e(B, C, h, w, dtype=dtype)
        delta = torch.zeros(C, H, W, dtype=delta_dtype, requires_grad=True)
        m = mask
        if mask == "tensor":
            m = torch.ones(B, mask_channels, *mask_res, requires_grad=True)
        kw.setdefault("mean", IMAGENET["mean"])
        kw.setdefault("std", IMAGENET["std"])
        return (lambda: rk.visual_prompt(x, delta, size=(H, W), mask=m, backend=BACKEND, **kw)), True
    return build


# --------------------------------------------------------------------------------------------------- soft_prompt
def _sp(B: int, L: int, P: int, D: int, V: int, T: int, dtype: torch.dtype, prompt_dtype: torch.dtype,
        from_ids: bool = True, insert: bool = False) -> Callable[[], tuple[Callable[[], object], bool]]:
    def build() -> tuple[Callable[[], object], bool]:
        prompt = torch.zeros(*((T,) if T > 1 else ()), P, D, dtype=prompt_dtype, requires_grad=True)
        kw: dict = {}
        if from_ids:
            kw.update(input_ids=torch.randint(0, V, (B, L)), embedding_weight=_e(V, D, dtype=dtype))
        else:
            kw.update(inputs_embeds=_e(B, L, D, dtype=dtype, grad=True))
        if T > 1:
            kw["task_ids"] = torch.randint(0, T, (B,))
        if insert:
            kw["insert_at"] = torch.full((B,), min(5, L), dtype=torch.int64)
        kw["attention_mask"] = torch.ones(B, L, dtype=torch.int64)
        return (lambda: rk.soft_prompt_concat(prompt, backend=BACKEND, **kw).inputs_embeds), True
    return build


# ----------------------------------------------------------------------------------------------------- label_map
def _lm(B: int, K: int, T: int, dtype: torch.dtype, mapping: str = "index", m: int = 1, reduce: str = "mean",
        input: str = "logits") -> Callable[[], tuple[Callable[[], object], bool]]:
    def build() -> tuple[Callable[[], object], bool]:
        logits = _e(B, K, dtype=dtype, grad=True)
        if mapping == "dense":
            mp = torch.zeros(K, T, requires_grad=True)  # an fp32 master map beside 16-bit logits
        else:
            g = torch.Generator().manual_seed(0)
            mp = torch.randint(0, K, (T, m), generator=g) if m > 1 else torch.randperm(K, generator=g)[:T]
        return (lambda: rk.label_map(logits, mp, reduce=reduce, input=input, backend=BACKEND)), True
    return build


def _lh(B: int, K: int, T: int, dtype: torch.dtype | None, weight: str = "count", topk: int | None = None
        ) -> Callable[[], tuple[Callable[[], object], bool]]:
    def build() -> tuple[Callable[[], object], bool]:
        x = torch.randint(0, K, (B,)) if dtype is None else _e(B, K, dtype=dtype)
        y = torch.randint(0, T, (B,))
        return (lambda: rk.label_histogram(x, y, K, T, weight=weight, topk=topk, backend=BACKEND)), False
    return build


# ---------------------------------------------------------------------------------------------- prefix_attention
def _pa_train(B: int, Hq: int, Hkv: int, L: int, P: int, d: int, dtype: torch.dtype,
              prefix_dtype: torch.dtype | None = None, T: int = 0, kpm: bool = False
              ) -> Callable[[], tuple[Callable[[], object], bool]]:
    def build() -> tuple[Callable[[], object], bool]:
        q = _e(B, Hq, L, d, dtype=dtype, grad=True)
        k, v = _e(B, Hkv, L, d, dtype=dtype, grad=True), _e(B, Hkv, L, d, dtype=dtype, grad=True)
        pshape = ((T,) if T else ()) + (Hkv, P, d)
        pk = torch.zeros(pshape, dtype=prefix_dtype or dtype, requires_grad=True)
        pv = torch.zeros(pshape, dtype=prefix_dtype or dtype, requires_grad=True)
        kw: dict = {}
        if T:
            kw["task_ids"] = torch.randint(0, T, (B,))
        if kpm:
            kw["key_padding_mask"] = torch.ones(B, L, dtype=torch.bool)
        return (lambda: rk.prefix_attention(q, k, v, pk, pv, causal=True, backend=BACKEND, **kw)), True
    return build


def _pa_decode(B: int, Hq: int, Hkv: int, Lk: int, P: int, d: int, dtype: torch.dtype,
               prefix_dtype: torch.dtype | None = None, T: int = 0, Lq: int = 1, kpm: bool = False
               ) -> Callable[[], tuple[Callable[[], object], bool]]:
    """Decode forward (no gradients): Lq queries per row against own caches of Lk keys (kv_lengths, or a
    key-padding mask with ``kpm``), a shared (Hkv, P, d) prefix, a (T, Hkv, P, d) table with task_ids, or none
    (P = 0)."""
    def build() -> tuple[Callable[[], object], bool]:
        q = _e(B, Hq, Lq, d, dtype=dtype)
        k, v = _e(B, Hkv, Lk, d, dtype=dtype), _e(B, Hkv, Lk, d, dtype=dtype)
        pshape = ((T,) if T else ()) + (Hkv, P, d)
        pk, pv = (_e(*pshape, dtype=prefix_dtype or dtype), _e(*pshape, dtype=prefix_dtype or dtype)) if P else (
            None, None)
        kw: dict = {}
        if T:
            kw["task_ids"] = torch.arange(B) % T
        if kpm:
            kw["key_padding_mask"] = torch.ones(B, Lk, dtype=torch.bool)
        else:
            kw["kv_lengths"] = Lq + torch.arange(B, dtype=torch.int64) % (Lk - Lq + 1)  # ragged, in [Lq, Lk]
        return (lambda: rk.prefix_attention(q, k, v, pk, pv, causal=True, backend=BACKEND, **kw)), False
    return build


def _decode(name: str, wave: bool, build: Callable[[], tuple[Callable[[], object], bool]],
            launchers: tuple[str, ...] = BOTH) -> Scenario:
    """A prefix_attention decode scenario: on Triton and, forward only with Lq <= 16, on the CUDA launcher."""
    return Scenario("prefix_attention", name, wave, build, launchers)


# ---------------------------------------------------------------------------------------- merge_attention_states
def _merge(shape: tuple[int, ...], dtype: torch.dtype, dtype_b: torch.dtype | None = None,
           strided: bool = False) -> Callable[[], tuple[Callable[[], object], bool]]:
    """Forward merge of two partial states (o (..., d) in ``dtype`` / ``dtype_b``, float32 lse); ``strided``:
    o_b a transposed view (the launcher's row coalescing, or its contiguous copy)."""
    def build() -> tuple[Callable[[], object], bool]:
        oa = _e(*shape, dtype=dtype)
        if strided:
            ob = _e(shape[0], shape[2], shape[1], *shape[3:], dtype=dtype_b or dtype).transpose(1, 2)
        else:
            ob = _e(*shape, dtype=dtype_b or dtype)
        la, lb = _e(*shape[:-1]), _e(*shape[:-1])
        return (lambda: rk.merge_attention_states(oa, la, ob, lb, backend=BACKEND)), False
    return build


# ---------------------------------------------------------------------------------------------------- the list
def _from_shapes() -> list[Scenario]:
    out: list[Scenario] = []
    for s in SHAPES["visual_prompt"]["full"]:
        for dn in s["dtypes"]:
            dt = DTYPES[dn]
            out.append(Scenario("visual_prompt", f"{s['name']}_B{s['B']}/{SHORT[dt]}", True, _vp(
                s["B"], s["C"], s["h"], s["w"], s["H"], s["W"], dt, mask=s["mask"], mask_res=s.get("mask_res"),
                mask_channels=s.get("mask_channels", 1), squash=s["squash"], order=s["order"])))
    for s in SHAPES["soft_prompt"]["full"]:
        for dn in s["dtypes"]:
            dt = DTYPES[dn]
            out.append(Scenario("soft_prompt_concat", f"{s['name']}_B{s['B']}_L{s['L']}/{SHORT[dt]}+fp32prompt",
                                True, _sp(s["B"], s["L"], s["P"], s["D"], s["V"], s["T"], dt, torch.float32)))
    for s in SHAPES["label_map"]["full"]:
        for dn in s["dtypes"]:
            dt = DTYPES[dn]
            tag = f"{s['name']}_B{s['B']}_K{s['K_src']}_T{s['K_tgt']}"
            if s["op"] == "label_histogram":
                out.append(Scenario("label_histogram", f"{tag}_{s['weight']}/{SHORT[dt]}", True,
                                    _lh(s["B"], s["K_src"], s["K_tgt"], dt, s["weight"], s["topk"])))
            else:
                out.append(Scenario("label_map", f"{tag}_{s['mapping']}_m{s['m']}_{s['input']}/{SHORT[dt]}", True,
                                    _lm(s["B"], s["K_src"], s["K_tgt"], dt, s["mapping"], s["m"], s["reduce"],
                                        s["input"])))
    for s in SHAPES["prefix_attention"]["full"]:
        for dn in s["dtypes"]:
            dt = DTYPES[dn]
            if s["kind"] == "train":
                name = f"train_B{s['B']}_Hq{s['Hq']}_Hkv{s['Hkv']}_L{s['L']}_P{s['P']}_d{s['d']}/{SHORT[dt]}"
                build = _pa_train(s["B"], s["Hq"], s["Hkv"], s["L"], s["P"], s["d"], dt)
            else:
                T = s.get("T") or 0
                tasks = f"_T{T}" if T else ""
                name = (f"decode_B{s['B']}_Hq{s['Hq']}_Hkv{s['Hkv']}_Lk{s['Lk']}_P{s['P']}{tasks}_d{s['d']}"
                        f"/{SHORT[dt]}")
                # The one-wave rule holds for the kernels auto serves a benchmark shape with. Decode shapes with at
                # most 16 queries per prefix kv head (B * Hq / Hkv * Lq) go to the CUDA decode kernels (their
                # partial launch is split to ~2 blocks per SM from sizes); on Triton they are still captured,
                # compiled and checked for fit and syncs, but not held to a wave (its pass 2 has B * Hkv
                # programs there: 8 at B = 1).
                wave = not auto_prefers_cuda(s["B"], s["Hq"], s["Hkv"], 1, s["P"])
                out.append(_decode(name, wave, _pa_decode(s["B"], s["Hq"], s["Hkv"], s["Lk"], s["P"], s["d"], dt,
                                                          T=T)))
                continue
            out.append(Scenario("prefix_attention", name, True, build))
    return out


def _coverage() -> list[Scenario]:
    f32, f16, b16 = torch.float32, torch.float16, torch.bfloat16
    out: list[Scenario] = []
    add = out.append
    for dt in (f32, f16, b16):
        t = SHORT[dt]
        add(Scenario("visual_prompt", f"pad164_outside/{t}", False, _vp(64, 3, 164, 164, 224, 224, dt)))
        add(Scenario("visual_prompt", f"resize224to164_bilinear/{t}", False,
                     _vp(64, 3, 224, 224, 224, 224, dt, resize=164)))
        add(Scenario("visual_prompt", f"patchmask14/{t}", False,
                     _vp(64, 3, 224, 224, 224, 224, dt, mask="tensor", mask_res=(14, 14))))
        add(Scenario("soft_prompt_concat", f"embeds_T4_insert/{t}", False,
                     _sp(8, 64, 16, 512, 0, 4, dt, dt, from_ids=False, insert=True)))
        add(Scenario("label_map", f"dense_probs/{t}+fp32map", False, _lm(64, 4096, 10, dt, "dense", input="probs")))
        add(Scenario("label_map", f"index_m16_probs/{t}", False, _lm(64, 4096, 10, dt, m=16, input="probs")))
        add(Scenario("label_histogram", f"prob_all/{t}", False, _lh(64, 4096, 10, dt, "prob")))
        add(Scenario("prefix_attention", f"train_B2_H8_L512_P64_d128/{t}", False,
                     _pa_train(2, 8, 8, 512, 64, 128, dt)))
        add(_decode(f"decode_B8_Hq32_Hkv8_Lk128_P512_d128/{t}", False, _pa_decode(8, 32, 8, 128, 512, 128, dt)))
    for dt in (f16, b16):
        t = SHORT[dt]
        add(Scenario("visual_prompt", f"full_sigmoid_clamp/{t}+fp32delta", False,
                     _vp(64, 3, 224, 224, 224, 224, dt, mask="full", squash="sigmoid", clamp=(0.0, 1.0))))
        add(Scenario("prefix_attention", f"train_B2_H8_L512_P64_d128/{t}+fp32prefix", False,
                     _pa_train(2, 8, 8, 512, 64, 128, dt, prefix_dtype=f32)))
        add(_decode(f"decode_B8_Hq32_Hkv8_Lk128_P512_d128/{t}+fp32prefix", False,
                    _pa_decode(8, 32, 8, 128, 512, 128, dt, prefix_dtype=f32)))
    add(Scenario("label_histogram", "count_preds/int64", False, _lh(4096, 1000, 10, None)))
    add(Scenario("label_histogram", "prob_top1/bf16", False, _lh(256, 1000, 10, b16, "prob", topk=1)))
    add(Scenario("prefix_attention", "train_kpm_B2_H8_L512_P64_d128/bf16", False,
                 _pa_train(2, 8, 8, 512, 64, 128, b16, kpm=True)))
    add(Scenario("prefix_attention", "train_kpm_B2_H8_L512_P64_d128/bf16+fp32prefix", False,
                 _pa_train(2, 8, 8, 512, 64, 128, b16, prefix_dtype=f32, kpm=True)))
    add(Scenario("prefix_attention", "train_gqa_T4_B4_Hq16_Hkv4_L512_P64_d128/bf16", False,
                 _pa_train(4, 16, 4, 512, 64, 128, b16, T=4)))
    add(_decode("decode_splitK_B1_Hq32_Hkv8_Lk4096_P2048_d128/bf16", False, _pa_decode(1, 32, 8, 4096, 2048, 128, b16)))
    for d in (32, 64, 80, 96, 256):
        for dt in (f32, b16):
            t = SHORT[dt]
            add(Scenario("prefix_attention", f"train_B2_H8_L512_P64_d{d}/{t}", False,
                         _pa_train(2, 8, 8, 512, 64, d, dt)))
            add(_decode(f"decode_B8_Hq32_Hkv8_Lk128_P512_d{d}/{t}", False, _pa_decode(8, 32, 8, 128, 512, d, dt)))
        add(Scenario("prefix_attention", f"train_B2_H8_L512_P64_d{d}/bf16+fp32prefix", False,
                     _pa_train(2, 8, 8, 512, 64, d, b16, prefix_dtype=f32)))
    return out


def _cuda_only() -> list[Scenario]:
    """What only the CUDA launchers serve: decode configurations the cuda backend adds (speculative Lq up to 16,
    no prefix, a task table with an fp32 prefix, key padding, head dim 512) and merge_attention_states."""
    f32, f16, b16 = torch.float32, torch.float16, torch.bfloat16
    return [
        _decode("decode_lq16_B1_Hq32_Hkv8_Lk1024_P2048_d128/bf16", False,
                _pa_decode(1, 32, 8, 1024, 2048, 128, b16, Lq=CUDA_MAX_LQ), CUDA),
        _decode("decode_lq4_T3_B6_Hq32_Hkv8_Lk512_P1024_d128/fp16+fp32prefix", False,
                _pa_decode(6, 32, 8, 512, 1024, 128, f16, prefix_dtype=f32, T=3, Lq=4), CUDA),
        _decode("decode_noprefix_B4_Hq32_Hkv8_Lk2048_d128/bf16", False, _pa_decode(4, 32, 8, 2048, 0, 128, b16), CUDA),
        _decode("decode_kpm_B4_Hq8_Hkv8_Lk300_P700_d64/fp32", False,
                _pa_decode(4, 8, 8, 300, 700, 64, f32, kpm=True), CUDA),
        _decode("decode_B2_Hq8_Hkv2_Lk256_P512_d512/bf16", False, _pa_decode(2, 8, 2, 256, 512, 512, b16), CUDA),
        Scenario("merge_attention_states", "B64_H32_L1_d128/bf16", False, _merge((64, 32, 1, 128), b16), CUDA),
        Scenario("merge_attention_states", "B4_H8_L17_d64/bf16+fp32_strided", False,
                 _merge((4, 8, 17, 64), b16, f32, strided=True), CUDA),
        Scenario("merge_attention_states", "rows4096_d80/fp32", False, _merge((4096, 80), f32), CUDA),
    ]


def scenarios() -> list[Scenario]:
    out = _from_shapes() + _coverage() + _cuda_only()
    for sc in out:
        if sc.op in CUDA_OPS:
            sc.launchers = BOTH
    return out
