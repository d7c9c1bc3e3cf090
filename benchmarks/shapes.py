"""The one place benchmark shapes live. Each op's script reads its entry; `quick` shapes keep CPU runs short.

``SHAPES[op]`` is ``{"full": [...], "quick": [...]}``; each entry is a dict the op's script understands (its
keys are documented next to the entry).
"""

from __future__ import annotations

SHAPES: dict[str, dict[str, list[dict]]] = {}

# visual_prompt. Keys: name; B, C; h, w (the image x); H, W (the canvas = the model's input); mask ("outside"
# | "full" | "frame" | "patch" | "tensor"); mask_res (H', W') and mask_channels for a tensor mask (per sample,
# float32, learnable: it gets a gradient); squash; order; norm ("imagenet" | None); dtypes (of x; delta is
# always float32); modes ("fwd", "fwd+bwd": gradients of delta and of a tensor mask, x is data).
_EXPANSIVE = dict(name="expansive", C=3, h=32, w=32, H=224, W=224, mask="outside", squash="sigmoid",
                  order="pre_norm", norm="imagenet", dtypes=("float32", "float16"), modes=("fwd", "fwd+bwd"))
_SMM = dict(name="smm", C=3, h=224, w=224, H=224, W=224, mask="tensor", mask_res=(28, 28), mask_channels=3,
            squash="none", order="pre_norm", norm="imagenet", dtypes=("float32", "float16"),
            modes=("fwd", "fwd+bwd"))
SHAPES["visual_prompt"] = {
    # ILM-VP / BLM: a 32x32 (CIFAR) image centred on a 224 canvas, sigmoid(delta) outside, ImageNet norm;
    # SMM: a 224 image, delta times a per-sample 3x28x28 mask upsampled by k=8, ImageNet norm.
    "full": [dict(_EXPANSIVE, B=256), dict(_SMM, B=256)],
    "quick": [dict(_EXPANSIVE, B=8), dict(_SMM, B=8)],
}

# soft_prompt. Keys: name; B, L (token ids, looked up in the frozen (V, D) embedding table); P (virtual tokens),
# D; V; T (tasks: T > 1 is a (T, P, D) prompt table with per-row task_ids, T == 1 one (P, D) prompt); dtypes
# (of the embedding table = the output; the prompt is float32 master weights, as reprokernels.nn.SoftPrompt and
# PEFT keep it); modes ("fwd", "fwd+bwd": the prompt's gradient; the table is frozen). Every case also extends
# a right-padded attention mask and labels, as PEFT does.
_LLAMA = dict(name="llama3", P=100, D=4096, V=128_256, T=8, dtypes=("bfloat16",), modes=("fwd", "fwd+bwd"))
_T5 = dict(name="t5-base", P=20, D=768, V=32_128, T=1, dtypes=("float32",), modes=("fwd", "fwd+bwd"))
SHAPES["soft_prompt"] = {
    # Llama-3-8B-sized embedding, 100-token prompts, 8 tasks mixed in one batch (bf16); Lester et al.'s
    # T5-base prompt tuning (P=20, fp32) with a large batch of short sequences.
    "full": [dict(_LLAMA, B=32, L=512), dict(_T5, B=256, L=128)],
    "quick": [dict(_LLAMA, B=4, L=32, P=8, D=256, V=1000), dict(_T5, B=4, L=32, P=8, D=256, V=1000)],
}

# label_map (and label_histogram, benchmarked by the same script). Keys: name; op ("label_map" |
# "label_histogram"); B, K_src, K_tgt; label_map: mapping ("index" | "dense": a fixed float32 (K_src, K_tgt)
# omega, no gradient), m (sources per target, index), reduce, input ("logits" | "probs" | "log_probs"), modes
# ("fwd", "fwd+bwd": the gradient of the logits); label_histogram: weight ("count" | "prob"), topk (None = all),
# accumulated into a running float32 statistic; dtypes (of the logits).
_LM = dict(op="label_map", mapping="index", m=1, reduce="mean", input="logits", modes=("fwd", "fwd+bwd"))
_FLM_10 = dict(_LM, name="flm", K_src=1000, K_tgt=10)
_BLM_10 = dict(_LM, name="blm", K_src=1000, K_tgt=10, mapping="dense")
_BAR_100 = dict(_LM, name="bar", K_src=1000, K_tgt=100, m=10, input="probs")
_BLM_100 = dict(_LM, name="blm", K_src=1000, K_tgt=100, mapping="dense")
_SUN397 = dict(_LM, name="clip-sun397", K_src=32_157, K_tgt=397, m=81)  # 81 prompt templates x 397 classes
_SUN397_BLM = dict(_LM, name="clip-sun397-blm", K_src=32_157, K_tgt=397, mapping="dense")
_VOCAB = dict(_LM, name="verbalizer", K_src=128_256, K_tgt=10, m=4, input="log_probs")  # Llama-3 vocabulary
_HIST = dict(op="label_histogram", name="cifar10-train", K_src=1000, K_tgt=10)
SHAPES["label_map"] = {
    # ImageNet -> CIFAR-10/100 (FLM/ILM one-to-one, BAR 10-to-one on probabilities, BLM dense on logits);
    # CLIP on SUN397 (prompt-ensemble mean over 81 columns per class, and BLM's dense omega); a verbalizer over
    # a 128,256-token vocabulary (4 label words per class, log-softmax); label_histogram over CIFAR-10's
    # 50,000 training images (FLM/BLM counts, BLM+ top-1 probability mass: max(1, int(0.15 * 10)) = 1).
    "full": [
        *(dict(s, B=256, dtypes=("float32", "float16")) for s in (_FLM_10, _BLM_10, _BAR_100, _BLM_100, _SUN397,
                                                                   _SUN397_BLM)),
        dict(_VOCAB, B=64, dtypes=("float32", "bfloat16")),
        dict(_HIST, B=50_000, weight="count", topk=None, dtypes=("float32", "float16")),
        dict(_HIST, B=50_000, weight="prob", topk=1, dtypes=("float32", "float16")),
    ],
    "quick": [
        dict(_FLM_10, B=8, dtypes=("float32",)),
        dict(_BLM_100, B=8, dtypes=("float32",)),
        dict(_SUN397, B=4, dtypes=("float32",)),
        dict(_VOCAB, B=2, dtypes=("float32",)),
        dict(_HIST, B=2000, weight="count", topk=None, dtypes=("float32",)),
        dict(_HIST, B=2000, weight="prob", topk=1, dtypes=("float32",)),
    ],
}

# prefix_attention. Keys: name; kind ("train": Lq = Lk = L, causal; "decode": Lq = 1 against an own cache of Lk
# keys with kv_lengths, causal); B, Hq, Hkv, L (train) or Lk (decode), P (a shared (Hkv, P, d) prefix), d;
# T (optional, decode: a (T, Hkv, P, d) prefix table, one task per row drawn by task_ids; absent = shared);
# gpu_only (skipped on the CPU: too large to time there); dtypes (q, k, v and the prefix); modes ("fwd",
# "fwd+bwd": gradients of q, k, v and the prefix; decode is fwd only).
_PA_TRAIN = dict(kind="train", name="train", modes=("fwd", "fwd+bwd"))
_PA_DECODE = dict(kind="decode", name="decode", modes=("fwd",))
SHAPES["prefix_attention"] = {
    # issue 6: training at Llama-3-8B head shapes (bf16, GPU) and the CPU target; decoding against a shared
    # 512 / 2048 / 8192-token prefix with own caches of 128 ... 1024 (GPU) and the CPU target.
    "full": [
        *(dict(_PA_TRAIN, B=8, Hq=32, Hkv=8, L=1024, P=P, d=128, gpu_only=True, dtypes=("bfloat16",))
          for P in (32, 128)),
        *(dict(_PA_DECODE, B=B, Hq=32, Hkv=8, Lk=Lk, P=P, d=128, gpu_only=True, dtypes=("bfloat16",))
          for B in (16, 64, 256) for P in (512, 2048, 8192) for Lk in (128, 1024)),
        # small-batch decoding (one user, a few): B * (Hq // Hkv) * Lq = 4 or 16 queries read each prefix kv
        # head, where auto picks the cuda decode kernel (CUDA cores, the prefix read once per kv head and split)
        # over Triton's tensor-core stage 1; and a 4-task prefix table at B = 4.
        *(dict(_PA_DECODE, B=B, Hq=32, Hkv=8, Lk=Lk, P=P, d=128, gpu_only=True, dtypes=("bfloat16",))
          for B in (1, 4) for P in (2048, 8192) for Lk in (128, 1024)),
        dict(_PA_DECODE, name="decode-tasks", B=4, T=4, Hq=32, Hkv=8, Lk=1024, P=2048, d=128, gpu_only=True,
             dtypes=("bfloat16",)),
        dict(_PA_TRAIN, B=8, Hq=8, Hkv=8, L=256, P=64, d=64, gpu_only=False, dtypes=("float32",)),
        dict(_PA_DECODE, B=64, Hq=8, Hkv=8, Lk=128, P=2048, d=64, gpu_only=False, dtypes=("float32",)),
    ],
    "quick": [
        dict(_PA_TRAIN, B=2, Hq=4, Hkv=2, L=64, P=16, d=32, gpu_only=False, dtypes=("float32",)),
        dict(_PA_DECODE, B=8, Hq=4, Hkv=2, Lk=32, P=256, d=32, gpu_only=False, dtypes=("float32",)),
    ],
}
