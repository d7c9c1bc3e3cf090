"""Benchmark of the Hugging Face integrations: ``python -m benchmarks.run integrations [--quick]``.

A Llama of 4 layers, hidden 512, 8 heads, 2 kv heads, vocabulary 32,000 (random init), float32 on the CPU,
bfloat16 on a GPU. Issue-8 shapes: a training step at B=32, L=128, P=128, and a 64-token greedy generation
from 32-token prompts at B=32 (left-padded rows); prefix generation also at P=2048. ``--quick`` shrinks every
size (a smoke run).

Providers (``mode`` = train-step | generate)
    no-prompt            the same frozen model without any prompt: the bound. train-step: forward + backward
                         to the input embeddings (nothing else is trainable) + loss; generate: its own
                         ``generate``.
    peft                 PEFT 0.21 itself (``get_peft_model``); train-step: forward + backward + Adam step on
                         the adapter. generate: PEFT's ``generate`` (for prompt tuning; wrong, see README).
    peft-expanded-cache  prefix tuning's generation baseline: PEFT's own generate drops the prefix, so a
                         correct greedy loop with PEFT's prefix expanded to the batch into the model's cache
                         (what PEFT means to do) is timed instead.
    accelerated          ``reprokernels.integrations.peft.accelerate`` of the same PEFT model.

Each row's note gives the ratio to the baseline (peft, or peft-expanded-cache) and to the bound. Peak memory:
see ``benchmarks.common.peak_memory_mb``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import Row, device_name, git_sha, peak_memory_mb, skipped, tick, versions

OP = "integrations"


def _shapes(quick: bool) -> dict:
    if quick:
        return dict(layers=2, hidden=128, heads=4, kv_heads=2, vocab=1000, B=4, L=16, P=8, prompt=8, new=8,
                    long_P=64, reps=2)
    return dict(layers=4, hidden=512, heads=8, kv_heads=2, vocab=32000, B=32, L=128, P=128, prompt=32, new=64,
                long_P=2048, reps=3)


def _model(s: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=4 * s["hidden"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], max_position_embeddings=4096, pad_token_id=0,
                      bos_token_id=1, eos_token_id=None)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def _peft(s: dict, kind: str, P: int, device: torch.device, dtype: torch.dtype):
    import peft

    cfg = (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P) if kind == "prefix"
           else peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(_model(s, device, dtype), cfg)


def _batch(B: int, L: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(B):
        mask[b, : b % 5] = 0  # left padding of 0-4 tokens
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[float, float, float]:
    """(median, min, max) wall ms over ``reps`` calls after one warm-up (the steps here take 0.1-100 s)."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), float(min(times)), float(max(times))


def _row(shape: str, dtype: torch.dtype, mode: str, provider: str, fn: Callable[[], object], device: torch.device,
         reps: int, note: str = "") -> Row:
    """reps = 0: a single call (no warm-up), timed while its peak memory is measured (for minutes-long calls)."""
    tick(f"{shape} {mode} {provider}")
    if reps:
        med, lo, hi = _time(fn, device, reps)
        peak = peak_memory_mb(fn, device)
    else:
        t0 = time.perf_counter()
        peak = peak_memory_mb(fn, device)
        med = lo = hi = (time.perf_counter() - t0) * 1e3
        note = "; ".join(filter(None, [note, "one call, timed under the memory profiler"]))
    return Row(op=OP, shape=shape, dtype=str(dtype).removeprefix("torch."), mode=mode, provider=provider,
               median_ms=med, p20_ms=lo, p80_ms=hi, peak_mem_mb=peak, note=note,
               device=device_name(device), versions=versions(), git_sha=git_sha(),
               timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))


# ----------------------------------------------------------------------------------------- train step


def _train_step(model: Callable, params: list[torch.Tensor], ids, mask, labels) -> Callable[[], None]:
    opt = torch.optim.Adam(params, lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()

    return step


def _no_prompt_step(model, ids, mask, labels) -> Callable[[], None]:
    model.requires_grad_(False)  # frozen, as under PEFT: only the input embeddings get a gradient
    emb = model.get_input_embeddings()

    def step() -> None:
        x = emb(ids).detach().requires_grad_()
        model(inputs_embeds=x, attention_mask=mask, labels=labels).loss.backward()

    return step


def _train_rows(s: dict, device: torch.device, dtype: torch.dtype) -> list[Row]:
    from reprokernels.integrations.peft import accelerate

    B, L, P = s["B"], s["L"], s["P"]
    ids, mask = _batch(B, L, s["vocab"], device)
    labels = ids.masked_fill(mask == 0, -100)
    shape = f"B{B} L{L} P{P} layers{s['layers']} d_model{s['hidden']}"
    rows = [_row(shape, dtype, "train-step", "no-prompt", _no_prompt_step(_model(s, device, dtype), ids, mask, labels),
                 device, s["reps"])]
    for kind in ("prefix", "prompt"):
        pm = _peft(s, kind, P, device, dtype)
        params = [p for p in pm.parameters() if p.requires_grad]
        rows.append(_row(f"{kind} {shape}", dtype, "train-step", "peft", _train_step(pm, params, ids, mask, labels),
                         device, s["reps"]))
        acc = accelerate(pm)
        rows.append(_row(f"{kind} {shape}", dtype, "train-step", "accelerated",
                         _train_step(acc, params, ids, mask, labels), device, s["reps"]))
    return rows


# ------------------------------------------------------------------------------------------ generation


def _expanded_cache_generate(pm, ids, mask, new: int) -> torch.Tensor:
    """Greedy decoding with PEFT's prefix expanded to the batch into the model's cache (PEFT's intent)."""
    base = pm.get_base_model()
    P = pm.active_peft_config.num_virtual_tokens
    B, L = ids.shape
    cache = pm.get_prompt(batch_size=B)  # a DynamicCache holding B copies of the prefix
    full_mask = torch.cat([mask.new_ones(B, P), mask], 1)
    pos = torch.arange(P, P + L, device=ids.device).unsqueeze(0)
    step_ids, out = ids, [ids]
    for _ in range(new):
        logits = base(input_ids=step_ids, attention_mask=full_mask, position_ids=pos, cache=cache,
                      use_cache=True).logits[:, -1]
        step_ids = logits.argmax(-1, keepdim=True)
        out.append(step_ids)
        full_mask = torch.cat([full_mask, full_mask.new_ones(B, 1)], 1)
        pos = pos[:, -1:] + 1
    return torch.cat(out, 1)


def _generate_fn(model, ids, mask, new: int) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                  pad_token_id=0)
    return run


def _generate_rows(s: dict, device: torch.device, dtype: torch.dtype) -> list[Row]:
    from reprokernels.integrations.peft import accelerate

    B, L, new = s["B"], s["prompt"], s["new"]
    ids, mask = _batch(B, L, s["vocab"], device)
    reps = max(1, s["reps"] - 1)
    shape = f"B{B} prompt{L} new{new}"
    rows = [_row(shape, dtype, "generate", "no-prompt", _generate_fn(_model(s, device, dtype), ids, mask, new),
                 device, reps)]
    pm = _peft(s, "prompt", s["P"], device, dtype)
    rows.append(_row(f"prompt P{s['P']} {shape}", dtype, "generate", "peft", _generate_fn(pm, ids, mask, new),
                     device, 0, note="PEFT's generate re-inserts the prompt every step (wrong tokens)"))
    rows.append(_row(f"prompt P{s['P']} {shape}", dtype, "generate", "accelerated",
                     _generate_fn(accelerate(pm), ids, mask, new), device, reps))
    for P in (s["P"], s["long_P"]):
        pm = _peft(s, "prefix", P, device, dtype)
        with torch.no_grad():
            rows.append(_row(f"prefix P{P} {shape}", dtype, "generate", "peft-expanded-cache",
                             lambda pm=pm: _expanded_cache_generate(pm, ids, mask, new), device, reps))
        rows.append(_row(f"prefix P{P} {shape}", dtype, "generate", "accelerated",
                         _generate_fn(accelerate(pm), ids, mask, new), device, reps))
    return rows


def _annotate(rows: list[Row]) -> None:
    """Ratios to the baseline of the same shape and to the no-prompt bound of the same mode."""
    bound = {r.mode: r.median_ms for r in rows if r.provider == "no-prompt"}
    base = {(r.shape, r.mode): r.median_ms for r in rows if r.provider in ("peft", "peft-expanded-cache")}
    for r in rows:
        parts = [r.note] if r.note else []
        b = base.get((r.shape, r.mode))
        if r.provider == "accelerated" and b:
            ratio = b / r.median_ms  # a ratio under 1 is a slowdown: say so rather than "0.97x faster"
            parts.append(f"{ratio:.2f}x faster than the baseline" if ratio >= 1
                         else f"{1 / ratio:.2f}x slower than the baseline")
        if r.provider != "no-prompt" and bound.get(r.mode):
            parts.append(f"{r.median_ms / bound[r.mode]:.2f}x the no-prompt time")
        r.note = "; ".join(parts)


def run(device: torch.device, quick: bool = False) -> list[Row]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:  # a skipped row, so `reprokernels bench` over all ops still runs the others
        return [skipped(OP, "all", dtype, mode, "all", device, f"needs the hf extra (pip install "
                        f"'reprokernels[hf]'): {e}") for mode in ("train-step", "generate")]
    s = _shapes(quick)
    rows = _train_rows(s, device, dtype) + _generate_rows(s, device, dtype)
    _annotate(rows)
    return rows
