"""``reprokernels demo --text``: steer a frozen tiny transformer to a new task by prompt tuning and prefix tuning.

1. Backbone: a tiny causal transformer in plain torch (:class:`TinyTransformer`, built from :class:`TinyConfig`:
   vocab 16, d_model 32, 2 pre-LN layers, 2 heads, learned absolute positions), randomly initialised from
   ``--seed``. Every attention layer calls :func:`reprokernels.prefix_attention` ``(q, k, v, prefix_k, prefix_v,
   causal=True)``, so a prefix can be injected; ``forward`` accepts ``inputs_embeds`` (so
   :class:`~reprokernels.nn.PromptTunedModel` can drive it).
2. Pre-training, teacher-forced, loss on the answer tokens only: plain sequences are copied
   (``BOS BOS x1..xn SEP x1..xn``: the first slot holds no instruction); sequences whose first slot is the
   instruction token ``REV`` are reversed (``REV BOS x1..xn SEP xn..x1``), as a pre-trained model follows an
   instruction it was trained with. Positions are shifted by a random offset so every position embedding is
   trained: a soft prompt of P tokens only moves the sequence to positions the model has seen. Then frozen.
3. New task: reverse, given *without* the instruction (``BOS BOS x1..xn SEP xn..x1``). The frozen model copies, so
   its accuracy on the task is near chance. Two ways to steer it from examples alone, each from the same seed:

   * prompt tuning: :class:`~reprokernels.nn.SoftPrompt` (P virtual tokens initialised from the embeddings of
     sampled symbol tokens, PEFT's SAMPLE_VOCAB init, ``REV`` excluded) + :class:`~reprokernels.nn.PromptTunedModel`
     (the fused ``soft_prompt_concat``);
   * prefix tuning: :class:`~reprokernels.nn.PrefixKV` (P learned keys/values per layer, P-tuning v2 style)
     read by ``prefix_attention`` inside each layer.

   Reported: loss and token accuracy on a fixed held-out set of the new task before/after, beside chance and the
   frozen model; trainable vs frozen parameters; the median training step time (forward + backward + Adam) of a
   PEFT-style eager path (``prompt.repeat`` + ``torch.cat``; prefix ``expand`` + ``cat`` into k/v + masked SDPA)
   vs the reprokernels path on this device, with the reason in words where reprokernels is slower.

A method "improved" when its accuracy beats both the frozen model's and chance by ``IMPROVED_MARGIN``; the report
says so when it does not.
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
# The instruction token is the last id: symbols are FIRST_SYMBOL .. vocab_size - 2, and the prompt's vocabulary
# init samples only ids below it (it must learn the instruction, not be handed it).
IMPROVED_MARGIN = 0.10  # accuracy over both the frozen model and chance that counts as "improved"


def rev_token(vocab_size: int) -> int:
    return vocab_size - 1


def chance(vocab_size: int) -> float:
    """Token accuracy of a uniform guess among the symbols."""
    return 1.0 / (vocab_size - 1 - FIRST_SYMBOL)


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
    source_steps: int = 1000
    tune_steps: int = 300
    batch_size: int = 64
    prompt_tokens: int = 4
    prefix_tokens: int = 4
    source_lr: float = 6e-3
    prompt_lr: float = 5e-2
    prefix_lr: float = 5e-2
    eval_size: int = 512
    timing_steps: int = 30
    timing_batch: int = 64

    @classmethod
    def for_run(cls, quick: bool) -> TextSettings:
        if quick:
            return cls(source_steps=600, tune_steps=150, timing_steps=8)
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
               device: torch.device, instruction: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (B, 2n+2), targets (B, n)): ``I BOS x SEP y`` minus its last token, where the instruction slot I is
    ``REV`` when ``instruction`` else ``BOS`` (no instruction); the targets are y, predicted at the last n input
    positions (the SEP and the answer so far)."""
    x = torch.randint(FIRST_SYMBOL, rev_token(vocab), (batch, n), generator=generator)
    y = x if task == "copy" else x.flip(1)
    col = torch.full((batch, 1), BOS, dtype=torch.long)
    slot = torch.full_like(col, rev_token(vocab) if instruction else BOS)
    return torch.cat([slot, col, x, torch.full_like(col, SEP), y], dim=1)[:, :-1].to(device), y.to(device)


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
    span = 2 * s.seq_len + 2  # the input length of make_batch
    for step in range(s.source_steps):
        # both skills in every batch: half plain sequences (copied), half REV-led ones (reversed)
        half = s.batch_size // 2
        plain = make_batch("copy", half, s.seq_len, cfg.vocab_size, gen, device)
        told = make_batch("reverse", s.batch_size - half, s.seq_len, cfg.vocab_size, gen, device, instruction=True)
        ids, y = torch.cat([plain[0], told[0]]), torch.cat([plain[1], told[1]])
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
        sp = SoftPrompt(s.prompt_tokens, cfg.d_model, init="vocab", embedding=backbone.tok, backend=backend,
                        vocab_population=rev_token(cfg.vocab_size))
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
        "trainable": sum(p.numel() for p in params),
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
        instructed_eval = make_batch("reverse", s.eval_size, s.seq_len, cfg.vocab_size, gen, device,
                                     instruction=True)
        rev_eval = make_batch("reverse", s.eval_size, s.seq_len, cfg.vocab_size, gen, device)
        source["copy_loss"], source["copy_acc"] = evaluate("frozen", backbone, None, copy_eval)
        source["instructed_reverse_acc"] = evaluate("frozen", backbone, None, instructed_eval)[1]
        frozen = dict(zip(("loss", "acc"), evaluate("frozen", backbone, None, rev_eval), strict=True))
        methods: dict[str, Any] = {}
        modules: dict[str, nn.Module] = {}
        for kind in ("prompt", "prefix"):
            progress.set_postfix_str(f"{kind} tuning: reverse")
            modules[kind], methods[kind] = tune(kind, backbone, s, seed, device, backend, rev_eval, progress)
    frozen_params = sum(p.numel() for p in backbone.parameters())
    bar = max(frozen["acc"], chance(cfg.vocab_size)) + IMPROVED_MARGIN
    for kind in ("prompt", "prefix"):
        methods[kind]["improved"] = methods[kind]["acc_after"] >= bar
        methods[kind]["step_time_ms"] = time_paths(kind, backbone, modules[kind], s, device, seed)
    assert all(not p.requires_grad for p in backbone.parameters())
    return {
        "config": {**asdict(cfg), **asdict(s), "quick": bool(quick), "seed": seed, "backend": backend,
                   "source_task": "copy, and reverse after the REV instruction",
                   "target_task": "reverse", "chance_acc": chance(cfg.vocab_size),
                   "improved_margin": IMPROVED_MARGIN, "device": str(device)},
        "source": source,
        "frozen_on_target": frozen,
        "frozen_parameters": frozen_params,
        "methods": methods,
        "any_improved": any(m["improved"] for m in methods.values()),
        "all_improved": all(m["improved"] for m in methods.values()),
        "total_seconds": time.perf_counter() - t_start,
    }


def slower_reason(device: str) -> str:
    """Why the reprokernels path can be slower than the PEFT-style one at this demo's sizes."""
    if device.startswith("cuda"):
        return ("at these tiny sizes (a few thousand elements per op) a step is launch-bound, and the fused op "
                "launches its own kernels next to PyTorch's")
    return ("on a CPU reprokernels runs its reference and composite paths (input validation, a custom autograd op, "
            "float32 compute), which at these tiny sizes cost more per call than the PEFT-style path's native ATen "
            "ops; its fused kernels need a GPU")


def speed_words(speedup: float) -> str:
    """'1.30x faster' / '0.63x: slower' / 'about the same' for a PEFT-style / reprokernels time ratio."""
    if speedup >= 1.05:
        return f"{speedup:.2f}x faster"
    if speedup <= 0.95:
        return f"{speedup:.2f}x, i.e. {1 / speedup:.2f}x SLOWER"
    return f"{speedup:.2f}x, about the same"


def report_text(t: dict[str, Any]) -> list[str]:
    c, src = t["config"], t["source"]
    names = {"prompt": "prompt tuning", "prefix": "prefix tuning"}
    ch = c["chance_acc"]
    lines = [
        "",
        f"  text: a tiny causal transformer (vocab {c['vocab_size']}, d_model {c['d_model']}, {c['n_layers']} "
        f"layers, {c['n_heads']} heads; {t['frozen_parameters']:,} parameters) pre-trained {src['steps']} steps "
        f"in {src['train_seconds']:.1f} s to copy n = {c['seq_len']} symbols, and to reverse them after a REV "
        f"instruction token (accuracy: copy {src['copy_acc']:.3f}, reverse with REV "
        f"{src['instructed_reverse_acc']:.3f}), then frozen",
        f"  new task: reverse WITHOUT the instruction; held-out {c['eval_size']} sequences, answer tokens only; "
        f"chance: accuracy {ch:.3f}, loss {-math.log(ch):.2f}",
        f"    {'method':<15}{'trainable':>10}{'loss before':>13}{'loss after':>12}{'acc before':>12}"
        f"{'acc after':>11}{'chance':>8}",
        f"    {'frozen model':<15}{0:>10}{t['frozen_on_target']['loss']:>13.3f}{'':>12}"
        f"{t['frozen_on_target']['acc']:>12.3f}{'':>11}{ch:>8.3f}",
    ]
    for kind, m in t["methods"].items():
        label = f"{kind} P={m['virtual_tokens']}"
        lines.append(f"    {label:<15}{m['trainable']:>10,}{m['loss_before']:>13.3f}"
                     f"{m['loss_after']:>12.3f}{m['acc_before']:>12.3f}{m['acc_after']:>11.3f}{ch:>8.3f}")
    frozen_acc = t["frozen_on_target"]["acc"]
    for kind, m in t["methods"].items():
        if m["improved"]:
            lines.append(f"    {names[kind]}: learned the task ({m['acc_after']:.3f} vs frozen {frozen_acc:.3f} and "
                         f"chance {ch:.3f})")
        else:
            lines.append(f"    {names[kind]}: did NOT learn the task for seed {c['seed']} ({m['acc_after']:.3f}, "
                         f"not {c['improved_margin']:.2f} above both the frozen model {frozen_acc:.3f} and chance "
                         f"{ch:.3f})")
    lines.append(f"  training step time (batch {c['timing_batch']}, forward + backward + Adam, median of "
                 f"{c['timing_steps']}), PEFT-style path vs reprokernels on {c['device']}:")
    slower = False
    for kind, m in t["methods"].items():
        st = m["step_time_ms"]
        what = ("prompt.repeat + cat" if kind == "prompt" else "prefix expand + cat + masked SDPA")
        slower |= st["speedup"] <= 0.95
        lines.append(f"    {names[kind]:<14} PEFT-style ({what}) {st['peft_style']:.2f} ms, reprokernels "
                     f"{st['reprokernels']:.2f} ms: {speed_words(st['speedup'])}")
    if slower:
        lines.append(f"    reprokernels is slower here: {slower_reason(c['device'])}")
    lines.append(f"  text demo: {t['total_seconds']:.1f} s")
    return lines
