"""``reprokernels demo --text``: steer a frozen tiny transformer to a new task by prompt tuning and prefix tuning.

1. Backbone: a tiny causal transformer in plain torch (:class:`TinyTransformer`, built from :class:`TinyConfig`:
   vocab 16, d_model 32, 2 pre-LN layers, 2 heads, learned absolute positions), randomly initialised from
   ``--seed``. Every attention layer calls :func:`reprokernels.prefix_attention` ``(q, k, v, prefix_k, prefix_v,
   causal=True)``, so a prefix can be injected; ``forward`` accepts ``inputs_embeds`` (so
   :class:`~reprokernels.nn.PromptTunedModel` can drive it).
2. Source task (copy): ``BOS x1..xn SEP x1..xn``, teacher-forced, loss on the answer tokens only. Sequence
   positions are shifted by a random offset during this training so every position embedding is trained: a soft
   prompt of P tokens then only moves the sequence to positions P..., which the model has seen. Then frozen.
3. New task (reverse): ``BOS x1..xn SEP xn..x1``. The frozen copy model answers it with confident copies, so its
   loss is high. Two steerings of the frozen model, each from the same seed:

   * prompt tuning: :class:`~reprokernels.nn.SoftPrompt` (P virtual tokens, "vocab" init) +
     :class:`~reprokernels.nn.PromptTunedModel` (the fused ``soft_prompt_concat``);
   * prefix tuning: :class:`~reprokernels.nn.PrefixKV` (P learned keys/values per layer, P-tuning v2 style)
     read by ``prefix_attention`` inside each layer.

   Reported: loss and token accuracy on a fixed held-out set of the new task before/after, trainable vs frozen
   parameters, and the median training step time (forward + backward + Adam) of a PEFT-style eager path
   (``prompt.repeat`` + ``torch.cat``; prefix ``expand`` + ``cat`` into k/v + masked SDPA) vs the reprokernels
   path, on this device.

The answer is printed as it comes out: if a tuning does not lower the loss for a seed, the report says so.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import PrefixKV, PromptTunedModel, SoftPrompt
from ..ops.prefix_attention import prefix_attention
from ._timing import median_step_ms

BOS, SEP = 0, 1
FIRST_SYMBOL = 2


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 16
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 128
    max_positions: int = 48


@dataclass(frozen=True)
class TextSettings:
    """The text demo's budget (``quick`` for CI)."""

    seq_len: int = 4  # n symbols to copy / reverse
    source_steps: int = 700
    tune_steps: int = 400
    batch_size: int = 64
    prompt_tokens: int = 16
    prefix_tokens: int = 8
    source_lr: float = 3e-3
    prompt_lr: float = 3e-2
    prefix_lr: float = 3e-2
    eval_size: int = 512
    timing_steps: int = 30
    timing_batch: int = 64

    @classmethod
    def for_run(cls, quick: bool) -> TextSettings:
        if quick:
            return cls(source_steps=400, tune_steps=150, timing_steps=8)
        return cls()


# ---------------------------------------------------------------------------------------------------- model


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None, impl: str,
                backend: str) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if impl == "reprokernels":
            pk, pv = prefix if prefix is not None else (None, None)
            o = prefix_attention(q, k, v, pk, pv, causal=True, backend=backend)
        elif prefix is None:  # eager
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # PEFT-style: expand the prefix over the batch, concatenate into k/v, SDPA with a mask
            pk, pv = prefix
            P = pk.shape[-2]
            k = torch.cat([pk.to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
            mask = torch.ones(L, P + L, dtype=torch.bool, device=x.device)
            mask[:, P:] = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x, prefix, impl, backend):
        x = x + self.attn(self.ln1(x), prefix, impl, backend)
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """A tiny causal LM. ``forward(input_ids=None, inputs_embeds=None, *, prefix_kv=None, position_offset=0)``
    -> logits (B, L, V). ``prefix_kv``: a :class:`PrefixKV` (or a list of per-layer (prefix_k, prefix_v)).
    ``attn_impl``: "reprokernels" (``prefix_attention``) or "eager" (PEFT-style expand + cat + masked SDPA);
    ``backend``: the backend of ``prefix_attention``."""

    def __init__(self, cfg: TinyConfig, attn_impl: str = "reprokernels", backend: str = "auto") -> None:
        super().__init__()
        self.config, self.attn_impl, self.backend = cfg, attn_impl, backend
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_positions, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, *,
                prefix_kv: PrefixKV | list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                position_offset: int = 0) -> torch.Tensor:
        x = self.tok(input_ids) if inputs_embeds is None else inputs_embeds
        L = x.shape[1]
        x = x + self.pos(torch.arange(position_offset, position_offset + L, device=x.device))
        prefixes = prefix_kv.prefixes() if isinstance(prefix_kv, PrefixKV) else prefix_kv
        for i, block in enumerate(self.blocks):
            x = block(x, None if prefixes is None else prefixes[i], self.attn_impl, self.backend)
        return self.head(self.ln_f(x))


# ---------------------------------------------------------------------------------------------------- data


def make_batch(task: str, batch: int, n: int, vocab: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, 2n+1), targets (B, n)): ``BOS x SEP y`` minus its last token; the targets are y, predicted at
    input positions n+1 ... 2n (the SEP and the answer so far)."""
    x = torch.randint(FIRST_SYMBOL, vocab, (batch, n), generator=generator)
    y = x if task == "copy" else x.flip(1)
    col = torch.full((batch, 1), BOS, dtype=torch.long)
    seq = torch.cat([col, x, col.fill_(SEP), y], dim=1)
    return seq[:, :-1].to(device), y.to(device)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and token accuracy of the answer positions (the last n of the logits)."""
    n = targets.shape[1]
    ans = logits[:, -n:]
    loss = F.cross_entropy(ans.reshape(-1, ans.shape[-1]).float(), targets.reshape(-1))
    return loss, (ans.argmax(-1) == targets).float().mean()


# ---------------------------------------------------------------------------------------------------- runs


def _forward(kind: str, backbone: TinyTransformer, module: nn.Module | None, ids: torch.Tensor,
             peft_style: bool = False) -> torch.Tensor:
    """Logits of the frozen model (kind "frozen"), prompt-tuned or prefix-tuned, reprokernels or PEFT-style."""
    if kind == "frozen":
        return backbone(ids)
    if kind == "prompt":
        if peft_style:  # PEFT PROMPT_TUNING: repeat the prompt over the batch, cat with the token embeddings
            prompt = module.soft_prompt.prompt
            embeds = torch.cat([prompt.unsqueeze(0).repeat(ids.shape[0], 1, 1), backbone.tok(ids)], dim=1)
            return backbone(inputs_embeds=embeds)
        return module(ids)
    return backbone(ids, prefix_kv=module)  # prefix: the backbone's attn_impl picks the path


@torch.no_grad()
def evaluate(kind: str, backbone: TinyTransformer, module: nn.Module | None, data) -> tuple[float, float]:
    loss, acc = answer_loss(_forward(kind, backbone, module, data[0]), data[1])
    return float(loss), float(acc)


def train_source(cfg: TinyConfig, s: TextSettings, seed: int, device: torch.device, backend: str,
                 progress) -> tuple[TinyTransformer, dict[str, Any]]:
    torch.manual_seed(seed)
    # Pre-training has no prefix: the eager causal SDPA computes what prefix_attention(q, k, v, causal=True)
    # does without a prefix, at a fraction of the CPU cost of a custom op at these tiny shapes.
    model = TinyTransformer(cfg, attn_impl="eager", backend=backend).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=s.source_lr, weight_decay=0.0)
    t0 = time.perf_counter()
    model.train()
    span = 2 * s.seq_len + 1
    for step in range(s.source_steps):
        ids, y = make_batch("copy", s.batch_size, s.seq_len, cfg.vocab_size, gen, device)
        offset = int(torch.randint(0, cfg.max_positions - span + 1, (1,), generator=gen))
        for group in opt.param_groups:  # linear warm-up, cosine decay
            group["lr"] = s.source_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step
                                                                                       / s.source_steps))
        loss, _ = answer_loss(model(ids, position_offset=offset), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(1)
    model.eval()
    model.attn_impl = "reprokernels"  # from here on every attention runs through prefix_attention
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {"train_seconds": time.perf_counter() - t0, "steps": s.source_steps}


def make_module(kind: str, backbone: TinyTransformer, s: TextSettings, seed: int, backend: str) -> nn.Module:
    torch.manual_seed(seed + (2 if kind == "prompt" else 3))
    cfg = backbone.config
    if kind == "prompt":
        sp = SoftPrompt(s.prompt_tokens, cfg.d_model, init="vocab", embedding=backbone.tok, backend=backend)
        return PromptTunedModel(backbone, sp).to(backbone.head.weight.device)
    return PrefixKV(cfg.n_layers, cfg.n_heads, cfg.d_model // cfg.n_heads, s.prefix_tokens).to(
        backbone.head.weight.device)


def tune(kind: str, backbone: TinyTransformer, s: TextSettings, seed: int, device: torch.device, backend: str,
         eval_data, progress) -> tuple[nn.Module, dict[str, Any]]:
    module = make_module(kind, backbone, s, seed, backend)
    params = [p for p in module.parameters() if p.requires_grad]
    lr = s.prompt_lr if kind == "prompt" else s.prefix_lr
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed + 4)
    before = evaluate(kind, backbone, module, eval_data)
    curve = []
    t0 = time.perf_counter()
    for step in range(s.tune_steps):
        ids, y = make_batch("reverse", s.batch_size, s.seq_len, backbone.config.vocab_size, gen, device)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / s.tune_steps))
        loss, _ = answer_loss(_forward(kind, backbone, module, ids), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        progress.update(1)
    seconds = time.perf_counter() - t0
    after = evaluate(kind, backbone, module, eval_data)
    every = max(1, len(curve) // 20)
    return module, {
        "loss_before": before[0], "acc_before": before[1], "loss_after": after[0], "acc_after": after[1],
        "improved": after[0] < before[0], "trainable": sum(p.numel() for p in params),
        "virtual_tokens": s.prompt_tokens if kind == "prompt" else s.prefix_tokens,
        "steps": s.tune_steps, "lr": lr, "train_seconds": seconds,
        "train_loss": [statistics.fmean(curve[i:i + every]) for i in range(0, len(curve), every)],
    }


def time_paths(kind: str, backbone: TinyTransformer, module: nn.Module, s: TextSettings, device: torch.device,
               seed: int) -> dict[str, Any]:
    """Median step time (forward + backward + Adam on the prompt/prefix) of the PEFT-style vs reprokernels path."""
    gen = torch.Generator().manual_seed(seed + 5)
    ids, y = make_batch("reverse", s.timing_batch, s.seq_len, backbone.config.vocab_size, gen, device)
    out: dict[str, Any] = {}
    for path in ("peft_style", "reprokernels"):
        originals = [p for p in module.parameters() if p.requires_grad]
        backbone.attn_impl = "eager" if path == "peft_style" else "reprokernels"
        try:
            with torch.no_grad():  # train a copy of the values: the reported figures stay those of tuning
                saved = [p.detach().clone() for p in originals]
            opt = torch.optim.Adam(originals, lr=1e-4)

            def step(opt: torch.optim.Optimizer = opt, peft_style: bool = path == "peft_style") -> None:
                opt.zero_grad(set_to_none=True)
                answer_loss(_forward(kind, backbone, module, ids, peft_style=peft_style), y)[0].backward()
                opt.step()

            out[path] = median_step_ms(step, device, s.timing_steps)
        finally:
            backbone.attn_impl = "reprokernels"
            with torch.no_grad():
                for p, v in zip(originals, saved, strict=True):
                    p.copy_(v)
    out["speedup"] = out["peft_style"] / out["reprokernels"]
    out.update(steps=s.timing_steps, batch=s.timing_batch)
    return out


def run_text(*, seed: int, device: torch.device, backend: str, quick: bool, progress_enabled: bool) -> dict[str, Any]:
    """The whole text demo; returns the JSON-ready "text" section."""
    import sys

    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    cfg, s = TinyConfig(), TextSettings.for_run(quick)
    with tqdm(total=s.source_steps + 2 * s.tune_steps, desc="text demo", unit="step", disable=not progress_enabled,
              file=sys.stderr, dynamic_ncols=True) as progress:
        progress.set_postfix_str("source: copy")
        backbone, source = train_source(cfg, s, seed, device, backend, progress)
        gen = torch.Generator().manual_seed(seed + 6)
        copy_eval = make_batch("copy", s.eval_size, s.seq_len, cfg.vocab_size, gen, device)
        rev_eval = make_batch("reverse", s.eval_size, s.seq_len, cfg.vocab_size, gen, device)
        source["copy_loss"], source["copy_acc"] = evaluate("frozen", backbone, None, copy_eval)
        frozen = dict(zip(("loss", "acc"), evaluate("frozen", backbone, None, rev_eval), strict=True))
        methods: dict[str, Any] = {}
        modules: dict[str, nn.Module] = {}
        for kind in ("prompt", "prefix"):
            progress.set_postfix_str(f"{kind} tuning: reverse")
            modules[kind], methods[kind] = tune(kind, backbone, s, seed, device, backend, rev_eval, progress)
    frozen_params = sum(p.numel() for p in backbone.parameters())
    for kind in ("prompt", "prefix"):
        methods[kind]["step_time_ms"] = time_paths(kind, backbone, modules[kind], s, device, seed)
    assert all(not p.requires_grad for p in backbone.parameters())
    return {
        "config": {**asdict(cfg), **asdict(s), "quick": bool(quick), "seed": seed, "backend": backend,
                   "source_task": "copy", "target_task": "reverse"},
        "source": source,
        "frozen_on_target": frozen,
        "frozen_parameters": frozen_params,
        "methods": methods,
        "any_improved": any(m["improved"] for m in methods.values()),
        "total_seconds": time.perf_counter() - t_start,
    }


def report_text(t: dict[str, Any]) -> list[str]:
    c, src = t["config"], t["source"]
    names = {"prompt": "prompt tuning", "prefix": "prefix tuning"}
    lines = [
        "",
        f"  text: a tiny causal transformer (vocab {c['vocab_size']}, d_model {c['d_model']}, {c['n_layers']} "
        f"layers, {c['n_heads']} heads; {t['frozen_parameters']:,} parameters, frozen) trained "
        f"{src['steps']} steps on copy (n = {c['seq_len']}) in {src['train_seconds']:.1f} s: copy accuracy "
        f"{src['copy_acc']:.3f}",
        f"  steered to reverse; held-out {c['eval_size']} sequences, answer tokens only "
        f"(chance: loss {math.log(c['vocab_size'] - FIRST_SYMBOL):.2f}, accuracy "
        f"{1 / (c['vocab_size'] - FIRST_SYMBOL):.3f})",
        f"    {'method':<15}{'trainable':>10}{'loss before':>13}{'loss after':>12}{'acc before':>12}"
        f"{'acc after':>11}",
        f"    {'frozen model':<15}{0:>10}{t['frozen_on_target']['loss']:>13.3f}{'':>12}"
        f"{t['frozen_on_target']['acc']:>12.3f}",
    ]
    for kind, m in t["methods"].items():
        label = f"{kind} P={m['virtual_tokens']}"
        lines.append(f"    {label:<15}{m['trainable']:>10,}{m['loss_before']:>13.3f}"
                     f"{m['loss_after']:>12.3f}{m['acc_before']:>12.3f}{m['acc_after']:>11.3f}")
    chance = 1 / (c["vocab_size"] - FIRST_SYMBOL)
    for kind, m in t["methods"].items():
        if not m["improved"]:
            lines.append(f"    note: {names[kind]} did NOT lower the loss on reverse for seed {c['seed']}")
        elif m["acc_after"] < 2 * chance:
            lines.append(f"    note: {names[kind]} lowered the loss (fewer confident copies) but its token accuracy "
                         f"stays near chance for seed {c['seed']}: it did not learn to reverse")
    lines.append(f"  training step time (batch {c['timing_batch']}, forward + backward + Adam, median of "
                 f"{c['timing_steps']}):")
    for kind, m in t["methods"].items():
        st = m["step_time_ms"]
        what = ("prompt.repeat + cat" if kind == "prompt" else "prefix expand + cat + masked SDPA")
        lines.append(f"    {names[kind]:<14} PEFT-style ({what}) {st['peft_style']:.2f} ms, reprokernels "
                     f"{st['reprokernels']:.2f} ms ({st['speedup']:.2f}x)")
    lines.append(f"  text demo: {t['total_seconds']:.1f} s")
    return lines
