"""Hugging Face transformers + PEFT: accelerate a PEFT prompt-tuning model, and per-task prefixes on a Llama.

Builds a tiny randomly initialised Llama from a config (no download). Needs the `hf` extra:
pip install -e ".[hf]"
"""

import tempfile

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reprokernels.integrations.peft import accelerate
from reprokernels.integrations.transformers import PrefixTunedModel
from reprokernels.nn import PrefixKV

torch.manual_seed(0)
config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=None)
ids = torch.randint(2, 100, (4, 12))
mask = torch.ones_like(ids)
mask[0, :3] = 0                          # a left-padded row
labels = ids.masked_fill(mask == 0, -100)

# a PEFT PROMPT_TUNING / P_TUNING / MULTITASK_PROMPT_TUNING / PREFIX_TUNING model, as PEFT users build it
peft_model = peft.get_peft_model(LlamaForCausalLM(config),
                                 peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
fast = accelerate(peft_model)
loss = fast(input_ids=ids, attention_mask=mask, labels=labels).loss     # same logits, loss, grads as PEFT
loss.backward()
tokens = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5)   # correct (see README)
with tempfile.TemporaryDirectory() as adapter:
    fast.save_pretrained(adapter)        # a plain PEFT adapter: PeftModel.from_pretrained loads it
print(f"prompt tuning: loss {loss.item():.3f}, generated {tuple(tokens.shape)}")

# per-task prefixes inside every attention layer, never expanded to the batch or stored in the KV cache
llama = LlamaForCausalLM(config)
layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
head_dim = config.hidden_size // config.num_attention_heads
model = PrefixTunedModel(llama, PrefixKV(layers, kv_heads, head_dim, 16, num_tasks=3))
tasks = torch.tensor([0, 2, 1, 0])
out = model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tasks)   # per-task prefixes
out.loss.backward()
print(f"prefix tuning: loss {out.loss.item():.3f}, trainable "
      f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters")
