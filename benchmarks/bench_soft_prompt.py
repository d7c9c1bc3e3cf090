"""Benchmark of ``soft_prompt_concat``: ``python -m benchmarks.run soft_prompt [--quick]``.

Shapes: ``SHAPES["soft_prompt"]`` in benchmarks/shapes.py (a Llama-3-8B-sized bf16 embedding with a table of 8
task prompts mixed in one batch; Lester et al.'s T5-base prompt tuning in fp32). Inputs are token ids looked up
in the frozen (V, D) table, a right-padded attention mask and labels; the prompt is float32.

Providers
    peft-eager          what PEFT's prompt tuning does today: ``F.embedding`` (materialises (B, L, D)),
                        ``prompt.repeat(B, 1, 1)`` (a table: ``prompt[task_ids]``), ``.to(embeds.dtype)``,
                        ``torch.cat``, then the ones-prefix ``torch.cat`` on the mask and the -100-prefix
                        ``torch.cat`` on the labels. The baseline.
    peft-eager+compile  ``torch.compile`` of that function (inductor fuses the chain); the best a compiler
                        does with the user's code.
    reference           ``reprokernels.soft_prompt_concat(..., backend="reference")`` (the spec behind the op;
                        it also returns position_ids).
    cpu                 ``backend="cpu"``: the C++/OpenMP kernels (csrc/cpu/, the embedding gather fused); a
                        skipped row on a GPU or without the built extension (the reason is the row's note).
    auto                ``backend="auto"``: what a user gets by default (docs/cpu-backend.md says what it picks).
    triton / cuda       the fused kernels; on a CPU they get a skipped row (the interpreter is not timed, CUDA
                        needs a GPU), as does any provider that cannot run (with the reason).

Minimum bytes (what a one-pass kernel must move), fwd: the (B, P + L, D) output written once; each gathered
token row read once (B*L*D elements of the table's dtype: only the rows used, never the whole table); the
prompt's *distinct* bytes T*P*D*4 (float32). The prompt is broadcast to every row of its task: a one-pass kernel
re-reads it B times (T*P*D distinct, B*P*D total), which a GPU's cache serves, so only the distinct bytes
count. Plus the int64 ids, task ids, the mask and labels read and written extended (position_ids, which only
the op returns, are not counted). fwd+bwd adds the prompt slice of the output gradient read once (B*P*D
elements) and d prompt written once (T*P*D*4); the token slices of the gradient are never read, since the
table is frozen and gets no gradient.

Before timing, each provider's outputs (embeddings, mask, labels) and, in fwd+bwd, its prompt gradient are
checked against peft-eager; a mismatch is written in the row's note. On the CPU the providers of a case and mode
are timed interleaved, round by round (benchmarks/common.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import reprokernels
from benchmarks.common import Row, op_provider, run_shapes
from benchmarks.shapes import SHAPES

OP = "soft_prompt"
PROVIDERS = ("peft-eager", "peft-eager+compile", "reference", "cpu", "auto", "triton", "cuda")
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (inputs_embeds, attention_mask, labels)


def shape_name(s: dict) -> str:
    return f"{s['name']} B{s['B']} L{s['L']} P{s['P']} D{s['D']} T{s['T']}"


class Case:
    """Inputs of one (shape, dtype)."""

    def __init__(self, s: dict, dtype: torch.dtype, device: torch.device) -> None:
        self.s, self.dtype, self.device = s, dtype, device
        B, L, P, D, V, T = (s[k] for k in ("B", "L", "P", "D", "V", "T"))
        g = torch.Generator(device="cpu").manual_seed(0)
        self.weight = torch.randn(V, D, generator=g).to(device=device, dtype=dtype)  # frozen table
        self.input_ids = torch.randint(0, V, (B, L), generator=g).to(device)
        lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
        self.attention_mask = (torch.arange(L)[None, :] < lengths[:, None]).long().to(device)  # right padding
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)
        shape = (P, D) if T == 1 else (T, P, D)
        self.prompt = (torch.rand(shape, generator=g) - 0.5).to(device).requires_grad_()
        self.task_ids = torch.randint(0, T, (B,), generator=g).to(device) if T > 1 else None
        self.grad_out = torch.randn(B, P + L, D, generator=g).to(device=device, dtype=dtype)

    def min_bytes(self, mode: str) -> int:
        s = self.s
        B, L, P, D, T = (s[k] for k in ("B", "L", "P", "D", "T"))
        es, ps = self.weight.element_size(), self.prompt.element_size()
        fwd = (B * (P + L) * D * es + B * L * D * es + T * P * D * ps  # out, gathered rows, distinct prompt
               + B * L * 8 + (B * 8 if T > 1 else 0)  # ids, task ids
               + 2 * (B * L * 8 + B * (P + L) * 8))  # mask and labels, in and out
        return fwd if mode == "fwd" else fwd + B * P * D * es + T * P * D * ps

    # -- providers: each a function prompt -> (inputs_embeds, attention_mask, labels)

    def peft_eager(self, prompt: torch.Tensor) -> Outputs:
        ids, mask, labels = self.input_ids, self.attention_mask, self.labels
        embeds = F.embedding(ids, self.weight)
        B, P = ids.shape[0], prompt.shape[-2]
        prompts = prompt.unsqueeze(0).repeat(B, 1, 1) if prompt.dim() == 2 else prompt[self.task_ids]
        embeds = torch.cat((prompts.to(embeds.dtype), embeds), dim=1)
        mask = torch.cat((torch.ones(B, P, dtype=mask.dtype, device=mask.device), mask), dim=1)
        labels = torch.cat((torch.full((B, P), -100, dtype=labels.dtype, device=labels.device), labels), dim=1)
        return embeds, mask, labels

    eager = peft_eager  # the name benchmarks.common.op_provider calls the user's chain by

    def compiled_eager(self) -> Callable[[torch.Tensor], Outputs]:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit across shapes/dtypes
        return torch.compile(self.peft_eager, dynamic=False)

    def op(self, backend: str) -> Callable[[torch.Tensor], Outputs]:
        def f(prompt: torch.Tensor) -> Outputs:
            out = reprokernels.soft_prompt_concat(prompt, input_ids=self.input_ids, embedding_weight=self.weight,
                                                  task_ids=self.task_ids, attention_mask=self.attention_mask,
                                                  labels=self.labels, backend=backend)
            return out.inputs_embeds, out.attention_mask, out.labels

        return f

    def runner(self, f: Callable[[torch.Tensor], Outputs], mode: str) -> Callable[[], object]:
        prompt, g = self.prompt, self.grad_out
        if mode == "fwd":
            def fwd() -> object:
                with torch.no_grad():
                    return f(prompt)
            return fwd

        def fwd_bwd() -> object:
            return torch.autograd.grad(f(prompt)[0], prompt, g)
        return fwd_bwd

    def check(self, f: Callable[[torch.Tensor], Outputs], mode: str) -> str:
        """'' when f agrees with peft-eager (outputs, and the prompt gradient in fwd+bwd), else what differs."""
        got, want = list(f(self.prompt)), list(self.peft_eager(self.prompt))
        names = ["embeds", "mask", "labels"]
        if mode != "fwd":
            got += torch.autograd.grad(got[0], self.prompt, self.grad_out)
            want += torch.autograd.grad(want[0], self.prompt, self.grad_out)
            names.append("dprompt")
        bad = []
        for name, a, b in zip(names, got, want, strict=True):
            if name in ("mask", "labels"):
                ok = a.shape == b.shape and bool(torch.equal(a, b))
                err = 0.0 if ok else float("inf")
            else:
                # embeds: a gather, one cast and copies, exact; dprompt: float32 sums over the batch in every
                # provider (from the same bf16/fp32 gradient), differing only by summation order
                a, b = a.detach().float(), b.detach().float()
                err = float(((a - b).abs() / (1 + b.abs())).max()) if a.numel() and a.shape == b.shape else 0.0
                ok = a.shape == b.shape and err <= (0.0 if name == "embeds" else 1e-3)
            if not ok:
                bad.append(f"{name} err {err:.2g}")
        return "MISMATCH vs peft-eager: " + ", ".join(bad) if bad else ""


def _provider_fn(case: Case, provider: str) -> tuple[Callable[[torch.Tensor], Outputs] | None, str]:
    """(function, '') or (None, why it cannot run here)."""
    return op_provider(case, provider, "peft-eager")


def run(device: torch.device | str, quick: bool = False) -> list[Row]:
    return run_shapes(OP, SHAPES[OP]["quick" if quick else "full"], Case, PROVIDERS, _provider_fn, shape_name,
                      device, quick)
