"""Tiny randomly initialised transformers models (no downloads) and helpers for the integration tests.

``need_hf()`` skips a module when transformers/peft are absent, except under ``REPROKERNELS_REQUIRE_HF=1``
(set by .ci/run), where their absence is an error: CI must run these tests, not skip them.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

VOCAB = 61
PAD, BOS = 0, 1
EOS = None  # no end token: generate() runs exactly max_new_tokens, as the full-forward reference


def need_hf(*modules: str) -> None:
    for name in modules:
        if os.environ.get("REPROKERNELS_REQUIRE_HF") == "1":
            __import__(name)
        else:
            pytest.importorskip(name)


def tiny_llama(*, layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 48, seed: int = 0):
    """A fresh config per model: transformers' set_attn_implementation mutates the config object."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, attention_dropout=0.0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(*, layers: int = 2, heads: int = 3, hidden: int = 36, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=PAD, bos_token_id=BOS,
                     eos_token_id=EOS)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_classifier(*, num_labels: int = 3, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD)
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def padded_batch(B: int, L: int, *, left: bool = True, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) with rows padded by 0, 3, 1, 2, ... tokens (left or right); pad ids are PAD."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for b in range(B):
        n = (0, 3, 1, 2)[b % 4]
        if n and left:
            mask[b, :n] = 0
        elif n:
            mask[b, L - n:] = 0
    ids[mask == 0] = PAD
    return ids, mask


def scale_trainable_(model: torch.nn.Module, factor: float = 3.0) -> None:
    """Make a freshly initialised prompt/prefix large enough to change the backbone's greedy choices."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(factor)


def peft_model(base, config):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, config)


@torch.no_grad()
def greedy_by_full_forwards(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, **kwargs) -> torch.Tensor:
    """The generation reference: append the argmax of a full forward (no cache), ``new_tokens`` times."""
    for _ in range(new_tokens):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
