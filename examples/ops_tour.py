"""The four interfaces in one page: each op on CPU tensors (backend "auto": the cpu, reference or composite path)."""

import torch

import reprokernels as rk

# input: a 32x32 image in a 224x224 canvas, sigmoid-squashed delta outside it, ImageNet normalisation
x, delta = torch.rand(8, 3, 32, 32), torch.zeros(3, 224, 224, requires_grad=True)
inp = rk.visual_prompt(x, delta, squash="sigmoid", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])

# embedding: two tasks' soft prompts in one batch, gathered from the frozen table in the same pass
emb, table = torch.randn(1000, 64), torch.randn(2, 10, 64, requires_grad=True)
ids, tasks = torch.randint(0, 1000, (4, 16)), torch.tensor([0, 1, 1, 0])
out = rk.soft_prompt_concat(table, input_ids=ids, embedding_weight=emb, task_ids=tasks,
                            attention_mask=torch.ones(4, 16, dtype=torch.long))

# hidden: attention that sees a shared 64-token prefix without copying it into every row (GQA 8/2 heads)
q, k, v = torch.randn(4, 8, 16, 64), torch.randn(4, 2, 16, 64), torch.randn(4, 2, 16, 64)
pk, pv = torch.randn(2, 64, 64), torch.randn(2, 64, 64)
o = rk.prefix_attention(q, k, v, pk, pv, causal=True)

# output: 1000 source classes -> 10 targets, 3 label words each, averaged on probabilities
logits = torch.randn(8, 1000)
probs = rk.label_map(logits, torch.randint(0, 1000, (10, 3)), input="probs")
D = rk.label_histogram(logits, torch.randint(0, 10, (8,)), 1000, 10)     # FLM statistic
mapping = rk.greedy_label_mapping(D)                                      # one-to-one FLM mapping

print("visual_prompt", tuple(inp.shape), "| soft_prompt_concat", tuple(out.inputs_embeds.shape),
      "| prefix_attention", tuple(o.shape), "| label_map", tuple(probs.shape), "| mapping", tuple(mapping.shape))
