"""Embedding-space reprogramming modules: prompt tuning and P-tuning as ``nn.Module`` s whose forward is one
call of the fused op :func:`reprokernels.soft_prompt_concat`.

:class:`SoftPrompt` owns the learnable prompt, a (P, D) matrix or a (T, P, D) table of one prompt per task
(optionally produced by a small encoder network, P-tuning); :class:`PromptTunedModel` freezes a model that
accepts ``inputs_embeds`` and feeds it ``cat(prompt, embedding(input_ids))`` built by the op, which gathers
the token rows from the frozen embedding table itself (the (B, L, D) token embedding is never
materialised, the table is never copied, written, or given a gradient). Neither re-implements the op.

===================================  =====================================================================
what                                  recipe
===================================  =====================================================================
``SoftPrompt(P, D)``                  prompt tuning (Lester et al. 2021; PEFT ``PROMPT_TUNING``)
``SoftPrompt(P, D, num_tasks=T)``     one prompt per task, chosen per row by ``task_ids`` (mixed-task batches)
``SoftPrompt(P, D, encoder="mlp")``   P-tuning (Liu et al. 2021; PEFT ``P_TUNING`` with the MLP encoder)
``SoftPrompt(P, D, encoder="lstm")``  P-tuning with PEFT's bidirectional-LSTM + MLP encoder
``PromptTunedModel(model, sp)``       the frozen model + the prompt, a drop-in for ``model(input_ids, ...)``
===================================  =====================================================================

Dtypes: the prompt (or the encoder) is stored in float32 (master weights); the op casts the prompt into the
token embeddings' dtype (the model's: fp16/bf16 models with an fp32 prompt is the intended mixed-precision
use) and returns the prompt gradient in float32, summed over the batch in float32.

``backend`` ("auto" | "reference" | "triton" | "cuda") is passed to every op call; see
:mod:`reprokernels._backend`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._backend import BACKENDS
from ..ops.soft_prompt import PromptedInputs, soft_prompt_concat
from ._adapter_state import save_adapter_only
from .visual_prompt import freeze_backbone

__all__ = ["ENCODERS", "INITS", "PromptEncoder", "PromptTunedModel", "SoftPrompt"]

INITS = ("random", "normal", "vocab", "text")
ENCODERS = ("mlp", "lstm")
Embedding = nn.Module | torch.Tensor


def _embedding_weight(embedding: Embedding, name: str = "embedding") -> torch.Tensor:
    """The (V, D) table of an ``nn.Embedding`` (or any module with a 2-D ``.weight``) or a weight tensor."""
    weight = embedding if isinstance(embedding, torch.Tensor) else getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        what = (f"a tensor of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor)
                else type(embedding).__name__)
        raise TypeError(f"{name}: expected an nn.Embedding (or a module with a (V, D) .weight) or a (V, D) "
                        f"weight tensor, got {what}")
    return weight


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


class PromptEncoder(nn.Module):
    """P-tuning's reparametrisation: the prompt is ``head(embedding of the P virtual tokens)``.

    Follows PEFT's ``PromptEncoder`` (after NVIDIA NeMo's):

    * ``"mlp"``: Linear(D, H) - ReLU - Linear(H, H) - ReLU - Linear(H, D)
    * ``"lstm"``: a bidirectional ``layers``-layer LSTM(D -> H per direction), then
      Linear(2H, 2H) - ReLU - Linear(2H, D)

    Shapes: x (T, P, D) (the input table: T tasks, each a sequence of P virtual-token vectors) ->
    (T, P, D). The MLP acts per token; the LSTM runs along each task's P tokens (tasks are its batch), so the
    encoder is shared by the tasks and the inputs are per task. It runs once per forward, on T*P tokens (PEFT
    runs it on the batch-expanded (B, P) token ids, B identical copies).
    """

    def __init__(self, kind: str, dim: int, hidden: int, *, layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in ENCODERS:
            raise ValueError(f"encoder: expected one of {ENCODERS} or None, got {kind!r}")
        self.kind = kind
        self.lstm: nn.LSTM | None = None
        if kind == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=_positive_int(layers, "encoder_layers"),
                                dropout=dropout, bidirectional=True, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, P, D) -> (T, P, D)."""
        if self.lstm is not None:
            x = self.lstm(x)[0]
        return self.mlp(x)


class SoftPrompt(nn.Module):
    """A learnable soft prompt (prompt tuning) or a table of one prompt per task, prepended by the fused op.

    out = cat(prompt[task_b], embedding(input_ids[b]) * embed_scale)        for each row b

    (with ``insert_at``: the first ``insert_at[b]`` tokens stay before the prompt.)

    Args:
        num_virtual_tokens: P, the prompt length.
        dim: D, the model's embedding width.
        num_tasks: T. 1 holds one (P, D) prompt; T > 1 a (T, P, D) table, and forward needs ``task_ids``.
        init: how the prompt (or, with an encoder, the encoder's input table) starts:

            * ``"random"``: uniform in [-0.5, 0.5], the "random uniform" initialisation of Lester et al. 2021
              (and their T5X code). Note: PEFT's ``PromptTuningInit.RANDOM`` does *not* do this; it keeps
              ``nn.Embedding``'s default N(0, 1), which is ``"normal"`` here.
            * ``"normal"``: N(0, 1), PEFT's RANDOM (and the input table of PEFT's P-tuning encoder).
            * ``"vocab"``: rows of the frozen ``embedding`` sampled without replacement (with replacement
              only when P exceeds the population) from its first ``vocab_population`` rows (default 5000),
              as Lester et al.'s "sampled vocab" ("the 5,000 most common tokens") and their T5X
              ``from_sample_of_embeddings(population_size=5000)``. That assumes ids ordered by frequency,
              true of SentencePiece vocabularies (T5, Llama) and roughly of BPE merges (GPT-2);
              ``vocab_population=None`` samples the whole table (PEFT's SAMPLE_VOCAB samples uniformly
              from the whole vocabulary). Each task draws its own sample.
            * ``"text"``: the embedding rows of ``init_text_ids`` (a tokenised task description, or class
              label names), truncated to P or repeated until P as PEFT's TEXT does (ids [a, b, c], P = 7:
              a b c a b c a). One id sequence for every task, or a list of T sequences.

            Draws use torch's global RNG (``torch.manual_seed`` makes them reproducible). The copied rows
            are cast to float32; the table itself is only read.
        embedding: the frozen input embedding (``nn.Embedding`` or its (V, D) weight), for "vocab"/"text"
            init only. It is not kept: forward takes the embedding per call (PromptTunedModel passes it).
        init_text_ids: token ids for ``init="text"``.
        encoder: None (the prompt is the parameter), ``"mlp"`` or ``"lstm"`` (P-tuning: the prompt is
            ``PromptEncoder(input table)``, recomputed every forward, and the op still does the rest).
        encoder_hidden: H of the encoder (default D).
        encoder_layers, encoder_dropout: LSTM depth and dropout (PEFT's defaults: 2 and 0.0).
        vocab_population: rows eligible for ``init="vocab"`` (the first ones), None for all.
        backend: backend of the op.

    Parameters: ``prompt`` (P, D) or (T, P, D) float32 without an encoder; with one, ``encoder_input`` of
    that shape plus ``encoder``'s weights. :meth:`prompt_embeddings` returns the prompt the op gets either
    way, and :meth:`to_static` folds an encoder into a plain prompt (for inference, like PEFT's saved
    prompt embeddings). ``num_parameters`` counts trainable elements (encoder included).
    """

    def __init__(self, num_virtual_tokens: int, dim: int, num_tasks: int = 1, init: str = "random",
                 embedding: Embedding | None = None, init_text_ids: Sequence[int] | Sequence[Sequence[int]]
                 | torch.Tensor | None = None, encoder: str | None = None, encoder_hidden: int | None = None, *,
                 encoder_layers: int = 2, encoder_dropout: float = 0.0, vocab_population: int | None = 5000,
                 backend: str = "auto") -> None:
        super().__init__()
        P = _positive_int(num_virtual_tokens, "num_virtual_tokens")
        D = _positive_int(dim, "dim")
        T = _positive_int(num_tasks, "num_tasks")
        if init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {init!r}")
        if encoder is not None and encoder not in ENCODERS:
            raise ValueError(f"encoder: expected one of {ENCODERS} or None, got {encoder!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        if init_text_ids is not None and init != "text":
            raise ValueError(f"init_text_ids: only used with init='text', got init={init!r}")
        self.num_virtual_tokens, self.dim, self.num_tasks = P, D, T
        self.init, self.backend = init, backend
        table = self._initial_table(init, T, P, D, embedding, init_text_ids, vocab_population)
        table = table if T > 1 else table[0]
        self.encoder: PromptEncoder | None = None
        if encoder is None:
            self.prompt = nn.Parameter(table)
        else:
            hidden = D if encoder_hidden is None else _positive_int(encoder_hidden, "encoder_hidden")
            self.encoder_input = nn.Parameter(table)
            self.encoder = PromptEncoder(encoder, D, hidden, layers=encoder_layers, dropout=encoder_dropout)

    @staticmethod
    def _initial_table(init: str, T: int, P: int, D: int, embedding: Embedding | None,
                       init_text_ids: Any, vocab_population: int | None) -> torch.Tensor:
        """(T, P, D) float32."""
        if init == "random":
            return torch.empty(T, P, D).uniform_(-0.5, 0.5)
        if init == "normal":
            return torch.randn(T, P, D)
        if embedding is None:
            raise ValueError(f"embedding: init={init!r} copies rows of the frozen input embedding; pass the "
                             "nn.Embedding (model.get_input_embeddings()) or its (V, D) weight")
        weight = _embedding_weight(embedding).detach()
        V = weight.shape[0]
        if weight.shape[1] != D:
            raise ValueError(f"embedding: expected a (V, D={D}) table (D = dim), got {tuple(weight.shape)}")
        if init == "vocab":
            pop = V if vocab_population is None else min(_positive_int(vocab_population, "vocab_population"), V)
            if P <= pop:  # without replacement within a task (T5X); each task its own draw
                ids = torch.stack([torch.randperm(pop)[:P] for _ in range(T)])
            else:
                ids = torch.randint(0, pop, (T, P))
        else:
            ids = SoftPrompt._text_ids(init_text_ids, T, P, V)
        return weight[ids.to(weight.device)].to(device="cpu", dtype=torch.float32)

    @staticmethod
    def _text_ids(init_text_ids: Any, T: int, P: int, V: int) -> torch.Tensor:
        """(T, P) int64: each task's ids truncated to P, or repeated (PEFT: ids * ceil(P / n), then [:P])."""
        if init_text_ids is None:
            raise ValueError("init_text_ids: init='text' needs the token ids of the initial text, got None")
        if isinstance(init_text_ids, torch.Tensor):
            seqs = [init_text_ids.tolist()] if init_text_ids.dim() == 1 else init_text_ids.tolist()
        else:
            seqs = list(init_text_ids)
            seqs = [seqs] if seqs and not isinstance(seqs[0], (Sequence, torch.Tensor)) else seqs
        seqs = [[int(i) for i in s] for s in seqs]
        if len(seqs) == 1:
            seqs = seqs * T
        if len(seqs) != T or any(len(s) == 0 for s in seqs):
            raise ValueError(f"init_text_ids: expected one non-empty id sequence or {T} (one per task), got "
                             f"{len(seqs)} sequences of lengths {[len(s) for s in seqs]}")
        rows = [(s * math.ceil(P / len(s)))[:P] for s in seqs]
        ids = torch.tensor(rows, dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"init_text_ids: expected ids in [0, {V - 1}] (rows of the embedding), got {bad}")
        return ids

    def prompt_embeddings(self) -> torch.Tensor:
        """The prompt the op receives: (P, D) (one task) or (T, P, D); the encoder's output with an encoder."""
        if self.encoder is None:
            return self.prompt
        table = self.encoder_input
        out = self.encoder(table if table.dim() == 3 else table.unsqueeze(0))
        return out if table.dim() == 3 else out.squeeze(0)

    @torch.no_grad()
    def to_static(self) -> SoftPrompt:
        """A copy without encoder whose ``prompt`` is the encoder's current output (detached, float32)."""
        static = SoftPrompt.__new__(SoftPrompt)
        nn.Module.__init__(static)
        static.num_virtual_tokens, static.dim, static.num_tasks = self.num_virtual_tokens, self.dim, self.num_tasks
        static.init, static.backend, static.encoder = self.init, self.backend, None
        static.prompt = nn.Parameter(self.prompt_embeddings().detach().clone())
        return static

    @property
    def num_parameters(self) -> int:
        """Trainable elements (parameters with ``requires_grad``), the encoder's included."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, input_ids: torch.Tensor | None = None, embedding: Embedding | None = None,
                inputs_embeds: torch.Tensor | None = None, task_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                insert_at: torch.Tensor | None = None, embed_scale: float | None = None) -> PromptedInputs:
        """Prepend the prompt to a batch; every argument is passed to :func:`reprokernels.soft_prompt_concat`.

        Shapes: input_ids (B, L) with ``embedding`` (nn.Embedding or (V, D) weight, read only), or
        inputs_embeds (B, L, D); task_ids (B,) (required when num_tasks > 1); attention_mask, labels (B, L);
        insert_at (B,). Returns ``PromptedInputs``: inputs_embeds (B, P + L, D) in the tokens' dtype,
        attention_mask (B, P + L) (1 on the prompt), labels (B, P + L) (-100 on the prompt), position_ids
        (B, P + L) when a mask is given. ``embed_scale`` multiplies the token embeddings only.
        """
        weight = None
        if input_ids is not None:
            if embedding is None:
                raise ValueError("embedding: input_ids need the frozen input embedding (nn.Embedding or its "
                                 "(V, D) weight), got None")
            weight = _embedding_weight(embedding)
        elif embedding is not None:
            raise ValueError("embedding: only used with input_ids, not with inputs_embeds")
        return soft_prompt_concat(self.prompt_embeddings(), input_ids=input_ids, inputs_embeds=inputs_embeds,
                                  embedding_weight=weight, task_ids=task_ids, attention_mask=attention_mask,
                                  labels=labels, insert_at=insert_at, embed_scale=embed_scale,
                                  backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, dim={self.dim}, num_tasks={self.num_tasks}, "
                f"init={self.init!r}, backend={self.backend!r}")


def _forward_params(model: nn.Module) -> tuple[set[str], bool]:
    """Names ``model.forward`` accepts, and whether it takes ``**kwargs``."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin / C forward: assume it accepts anything
        return set(), True
    names = {n for n, p in sig.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


class PromptTunedModel(nn.Module):
    """A frozen model reprogrammed by a soft prompt: ``model(inputs_embeds=cat(prompt, embed(ids)), ...)``.

    Works with any module whose forward takes ``inputs_embeds`` (Hugging Face models, or plain torch
    modules), which is called as ``model(inputs_embeds=..., attention_mask=..., labels=..., position_ids=...,
    **kwargs)`` with each of the last three passed only when available and accepted (see below).

    Args:
        model: the backbone. Frozen here (``freeze_backbone``: every parameter ``requires_grad=False``);
            its train/eval mode is left as it is.
        soft_prompt: the :class:`SoftPrompt` (its ``dim`` must be the embedding's width).
        embedding: the input embedding (``nn.Embedding``, a module with a (V, D) ``.weight``, or the weight
            itself). An explicit argument wins; else ``model.get_input_embeddings()``; else a ``ValueError``.
            Only its ``.weight`` is used (read by the op's gather on every forward, never copied or written),
            so a custom embedding forward is bypassed: a module with an ``embed_scale`` attribute (e.g.
            Gemma 3's scaled word embedding) has that scale applied to the token rows by the op, rounded to
            the table's dtype as the module does, unless ``embed_scale`` is given. ``nn.Embedding`` with
            ``max_norm`` (which renormalises the table in place on lookup) is refused.
        embed_scale: multiplier of the token rows gathered for ``input_ids`` (never of the prompt, nor of
            ``inputs_embeds``, which are taken as the embedding module's output, already scaled).

    Forward: ``forward(input_ids=None, attention_mask=None, labels=None, *, inputs_embeds=None,
    task_ids=None, insert_at=None, **kwargs)`` -> whatever ``model`` returns. input_ids (B, L) (or
    inputs_embeds (B, L, D)), attention_mask (B, L), labels (B, L), task_ids (B,), insert_at (B,).

    * ``attention_mask`` is extended with ones over the prompt (as PEFT). If given and the forward does not
      accept it, a ``TypeError`` (a silently dropped mask would change the result).
    * ``labels`` of shape (B, L) are extended with -100 over the prompt (decoder-only LMs and token
      classification, as PEFT); other shapes (a sequence classifier's (B,)) and the labels of an
      encoder-decoder model (``model.config.is_encoder_decoder``: decoder targets) pass through untouched.
      Labels the forward does not accept are a ``TypeError``.
    * ``position_ids`` are not passed by default (as PEFT): the model numbers the P + L positions itself.
      ``pass_position_ids=True`` passes the op's (cumsum of the extended mask - 1, 0 on padding, as HF
      ``generate`` computes them for left-padded batches) when a mask is given and the forward names a
      ``position_ids`` argument. Not the default because models with offset positions (RoBERTa and
      XLM-R count from ``padding_idx + 1``) would silently read the wrong position embeddings; a decoder-only
      LM's own default (``arange``) differs from them only on left-padded batches.

    State: ``state_dict()`` holds **only the soft prompt** (keys ``soft_prompt.*``), and ``load_state_dict``
    expects only those: the backbone is frozen, lives in its own checkpoint, and a per-task checkpoint of a
    few thousand numbers is the point of prompt tuning (PEFT saves only the adapter too). This also holds
    when the wrapper is nested in another module. ``self.model.state_dict()`` gives the backbone's.
    ``trainable_parameters()`` is the soft prompt's trainable parameters (for the optimiser).
    """

    def __init__(self, model: nn.Module, soft_prompt: SoftPrompt, embedding: Embedding | None = None,
                 embed_scale: float | None = None, *, pass_position_ids: bool = False) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not isinstance(soft_prompt, SoftPrompt):
            raise TypeError(f"soft_prompt: expected a reprokernels.nn.SoftPrompt, got {type(soft_prompt).__name__}")
        self.model = freeze_backbone(model)
        self.soft_prompt = soft_prompt
        names, var_kw = _forward_params(model)
        self._accepts = names
        self._var_kw = var_kw
        if "inputs_embeds" not in names and not var_kw:
            raise TypeError(f"model: {type(model).__name__}.forward has no inputs_embeds argument; the prompted "
                            "embeddings are passed as model(inputs_embeds=...)")
        self.pass_position_ids = bool(pass_position_ids) and "position_ids" in names
        config = getattr(model, "config", None)
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))

        source = embedding
        if source is None:
            getter = getattr(model, "get_input_embeddings", None)
            source = getter() if callable(getter) else None
        if source is None:
            raise ValueError(f"embedding: {type(model).__name__} has no get_input_embeddings() (or it returned "
                             "None); pass the input embedding (nn.Embedding or its (V, D) weight) as embedding=")
        weight = _embedding_weight(source)
        if getattr(source, "max_norm", None) is not None:
            raise ValueError("embedding: nn.Embedding with max_norm renormalises the table in place on lookup; "
                             "the fused op reads the table as it is and never writes it")
        if weight.shape[1] != soft_prompt.dim:
            raise ValueError(f"soft_prompt: dim={soft_prompt.dim} but the embedding table is {tuple(weight.shape)}")
        if embed_scale is None and isinstance(source, nn.Module) and getattr(source, "embed_scale", None) is not None:
            scale = source.embed_scale
            embed_scale = float(scale.to(weight.dtype)) if isinstance(scale, torch.Tensor) else float(
                torch.tensor(float(scale), dtype=weight.dtype))
        self.embed_scale = None if embed_scale is None else float(embed_scale)

        # The embedding belongs to the model (the usual case): keep an unregistered reference, so it is not
        # a second submodule (no duplicate parameters or state) and follows the model's .to(). A separate
        # module is registered (frozen) so .to() moves it; a bare tensor becomes a non-persistent buffer.
        in_model = any(t is weight for t in model.parameters()) or any(t is weight for t in model.buffers())
        is_module = isinstance(source, nn.Module)
        object.__setattr__(self, "_embedding_module", source if is_module else None)
        object.__setattr__(self, "_embedding_param", weight if in_model and not is_module else None)
        self.external_embedding = freeze_backbone(source) if is_module and not in_model else None
        self.register_buffer("_embedding_tensor", None if in_model or is_module else weight.detach(),
                             persistent=False)

        save_adapter_only(self, ("model.", "external_embedding."))

    # -- the embedding table, read fresh every call (follows .to(), dtype changes, tied weights)

    @property
    def embedding_weight(self) -> torch.Tensor:
        """The frozen (V, D) input-embedding table the op reads."""
        if self._embedding_module is not None:
            return self._embedding_module.weight
        return self._embedding_param if self._embedding_param is not None else self._embedding_tensor

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise: the soft prompt's (and its encoder's) that require grad."""
        return [p for p in self.soft_prompt.parameters() if p.requires_grad]

    @property
    def num_parameters(self) -> int:
        return self.soft_prompt.num_parameters

    # -- forward

    def _check_accepted(self, name: str) -> None:
        if name not in self._accepts and not self._var_kw:
            raise TypeError(f"{name}: given, but {type(self.model).__name__}.forward does not accept {name}")

    def prompted_inputs(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                        task_ids: torch.Tensor | None = None,
                        insert_at: torch.Tensor | None = None) -> tuple[PromptedInputs, torch.Tensor | None]:
        """(the op's PromptedInputs, the labels to pass: extended, or untouched when not per-token).

        ``embed_scale`` applies to the rows gathered for ``input_ids`` only: ``inputs_embeds`` are taken as the
        embedding module's output (already scaled, as Hugging Face models expect them).
        """
        tokens = input_ids if input_ids is not None else inputs_embeds
        per_token = (labels is not None and tokens is not None and not self.is_encoder_decoder
                     and tuple(labels.shape) == tuple(tokens.shape[:2]))
        from_ids = input_ids is not None
        prompted = self.soft_prompt(input_ids, self.embedding_weight if from_ids else None,
                                    inputs_embeds=inputs_embeds, task_ids=task_ids, attention_mask=attention_mask,
                                    labels=labels if per_token else None, insert_at=insert_at,
                                    embed_scale=self.embed_scale if from_ids else None)
        return prompted, (prompted.labels if per_token else labels)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                task_ids: torch.Tensor | None = None, insert_at: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """input_ids (B, L) -> ``model(inputs_embeds=(B, P + L, D), attention_mask=(B, P + L), labels=...)``."""
        if "position_ids" in kwargs:
            raise ValueError("position_ids: the (B, L) positions do not describe the (B, P + L) prompted sequence; "
                             "use pass_position_ids=True to pass the op's, computed from the attention mask")
        prompted, labels_out = self.prompted_inputs(input_ids, attention_mask, labels, inputs_embeds=inputs_embeds,
                                                    task_ids=task_ids, insert_at=insert_at)
        call = dict(kwargs)
        call["inputs_embeds"] = prompted.inputs_embeds
        if attention_mask is not None:
            self._check_accepted("attention_mask")
            call["attention_mask"] = prompted.attention_mask
            if self.pass_position_ids:
                call["position_ids"] = prompted.position_ids
        if labels is not None:
            self._check_accepted("labels")
            call["labels"] = labels_out
        return self.model(**call)

    def extra_repr(self) -> str:
        return f"embed_scale={self.embed_scale}, pass_position_ids={self.pass_position_ids}"
