"""``reprokernels.integrations.transformers``: prefix tuning through transformers' attention interface and
prompt-tuned generation, checked against independent computations with the plain model."""

from __future__ import annotations

import pytest
import torch

from reprokernels.nn import PrefixKV, SoftPrompt
from tests.hf_models import MODELS, greedy_by_full_forwards, need_hf, padded_batch, tiny_gpt2, tiny_llama
from tests.utils import assert_close

need_hf("transformers")

from reprokernels.integrations.transformers import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    PrefixTunedModel,
    PromptTunedCausalLM,
)


def _geometry(model) -> tuple[int, int, int]:
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers, kv, cfg.hidden_size // cfg.num_attention_heads


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("left", [True, False])
def test_instruction_prefix_equals_running_the_instruction(arch: str, left: bool) -> None:
    """A frozen instruction prefix (its KV cache) + a batch == the model over cat(instruction, batch)."""
    model = MODELS[arch]()
    P, B, L = 6, 4, 9
    instruction = torch.randint(3, 50, (1, P))
    ids, mask = padded_batch(B, L, left=left)
    full_ids = torch.cat([instruction.expand(B, P), ids], 1)
    full_mask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], 1)
    with torch.no_grad():
        expected = model(input_ids=full_ids, attention_mask=full_mask).logits[:, P:]
        cache = model(input_ids=instruction, use_cache=True).past_key_values
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    wrapped = PrefixTunedModel(model, PrefixKV.from_kv_cache(keys, values))
    with torch.no_grad():
        got = wrapped(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()  # padded query rows see different keys by construction; compare real tokens
    assert_close(got[keep], expected[keep], dtype=torch.float32, scale=4.0)
    assert wrapped._state.calls == model.config.num_hidden_layers


def test_per_task_prefixes_route_rows() -> None:
    model = tiny_llama()
    layers, kv, d = _geometry(model)
    prefix = PrefixKV(layers, kv, d, 4, num_tasks=3)
    wrapped = PrefixTunedModel(model, prefix)
    ids, mask = padded_batch(5, 8)
    task_ids = torch.tensor([2, 0, 2, 1, 0])
    labels = ids.masked_fill(mask == 0, -100)
    out = wrapped(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
    with torch.no_grad():
        for t in range(3):
            rows = task_ids == t
            alone = wrapped(input_ids=ids, attention_mask=mask, task_ids=torch.full((5,), t)).logits
            assert_close(out.logits[rows].detach(), alone[rows], dtype=torch.float32)
    out.loss.backward()
    assert prefix.prefix.grad is not None
    assert prefix.prefix.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_prefix_generate_equals_full_forwards(arch: str) -> None:
    model = MODELS[arch]()
    layers, kv, d = _geometry(model)
    prefix = PrefixKV(layers, kv, d, 7, num_tasks=2)
    with torch.no_grad():
        prefix.prefix.mul_(2.0)
    wrapped = PrefixTunedModel(model, prefix)
    ids, mask = padded_batch(3, 6)
    task_ids = torch.tensor([1, 0, 1])
    expected = greedy_by_full_forwards(wrapped, ids, mask, 12, task_ids=task_ids)
    got = wrapped.generate(ids, mask, task_ids=task_ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_prompt_tuned_generate_equals_full_forwards(arch: str) -> None:
    model = MODELS[arch]()
    sp = SoftPrompt(5, model.config.hidden_size, num_tasks=2, init="normal")
    wrapped = PromptTunedCausalLM(model, sp)
    ids, mask = padded_batch(3, 6)
    task_ids = torch.tensor([0, 1, 1])
    expected = greedy_by_full_forwards(wrapped, ids, mask, 12, task_ids=task_ids)
    got = wrapped.generate(ids, mask, task_ids=task_ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_unwrap_restores_the_attention() -> None:
    model = tiny_llama()
    before = model.config._attn_implementation
    layers, kv, d = _geometry(model)
    wrapped = PrefixTunedModel(model, PrefixKV(layers, kv, d, 3))
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    ids, _ = padded_batch(2, 5)
    with torch.no_grad():
        plain_inside = model(input_ids=ids).logits  # no prefix active: plain attention
    assert wrapped.unwrap() is model
    assert model.config._attn_implementation == before
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert_close(plain_inside, plain, dtype=torch.float32)


def test_clear_errors() -> None:
    model = tiny_llama()
    layers, kv, d = _geometry(model)
    with pytest.raises(ValueError, match="num_kv_heads"):
        PrefixTunedModel(model, PrefixKV(layers, kv + 1, d, 3))
    with pytest.raises(ValueError, match="num_layers"):
        PrefixTunedModel(model, PrefixKV(layers + 1, kv, d, 3))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        PrefixTunedModel(torch.nn.Linear(2, 2), PrefixKV(layers, kv, d, 3))
    wrapped = PrefixTunedModel(model, PrefixKV(layers, kv, d, 3, num_tasks=2))
    ids, _ = padded_batch(2, 5)
    with pytest.raises(ValueError, match="task_ids"):
        wrapped(input_ids=ids)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        wrapped(input_ids=ids, task_ids=torch.zeros(2, dtype=torch.long))


def test_attention_dropout_is_refused_in_training() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=36, n_layer=1, n_head=3, attn_pdrop=0.1)).train()
    wrapped = PrefixTunedModel(model, PrefixKV(1, 3, 12, 2))
    with pytest.raises(NotImplementedError, match="dropout"):
        wrapped(input_ids=torch.ones(1, 4, dtype=torch.long))
    model.eval()
    wrapped(input_ids=torch.ones(1, 4, dtype=torch.long))


def test_gpt2_is_supported() -> None:
    model = tiny_gpt2()
    layers, kv, d = _geometry(model)
    wrapped = PrefixTunedModel(model, PrefixKV(layers, kv, d, 2))
    out = wrapped(input_ids=torch.ones(2, 3, dtype=torch.long))
    assert out.logits.shape == (2, 3, model.config.vocab_size)


def test_state_dict_holds_only_the_prefix() -> None:
    model = tiny_llama()
    layers, kv, d = _geometry(model)
    wrapped = PrefixTunedModel(model, PrefixKV(layers, kv, d, 3, projection_hidden=8))
    keys = set(wrapped.state_dict())
    assert keys and all(k.startswith("prefix_kv.") for k in keys)
    other = PrefixTunedModel(tiny_llama(), PrefixKV(layers, kv, d, 3, projection_hidden=8))
    assert not other.load_state_dict(wrapped.state_dict()).missing_keys
    for a, b in zip(wrapped.prefix_kv.parameters(), other.prefix_kv.parameters(), strict=True):
        assert torch.equal(a, b)
