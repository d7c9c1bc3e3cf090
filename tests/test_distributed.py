"""DDP over reprogrammed models: 2 CPU processes (gloo), spawned per test.

Each rank trains its shard under ``DistributedDataParallel`` and, beside it, a plain copy of the same model on the
concatenated batch of all ranks (the single-process run DDP must reproduce). Checked on every rank:

- the trainable tensors' gradients (δ and the linear mapping; the soft prompt) equal the full-batch gradients,
  while the rank's local gradient alone does not (so the equality needs the all-reduce);
- after the optimizer steps the trainable tensors equal the single-process ones on every rank;
- every backbone parameter has ``.grad is None`` and the backbone (parameters and buffers, BatchNorm
  statistics included) is bit-identical to what it was right after wrapping: no gradient, no update;
- DDP runs with its default ``find_unused_parameters=False`` for two iterations (a trainable parameter left
  out of a backward would make the second one raise);
- DDP's construction broadcasts rank 0's parameters, frozen ones included (rank 1 starts from a perturbed
  backbone and ends up with rank 0's);
- label-mapping statistics are per-process: all-reducing ``LabelMapping.statistics`` before ``update()``
  gives the mapping of a single-process fit on the full data (what docs/distributed.md recommends), and a
  DDP forward in between would have replaced every rank's statistics with rank 0's (the per-forward buffer
  sync, ``forward_sync_buffers``/``broadcast_buffers``, on by default);
- FSDP2 (``fully_shard``, torch >= 2.6; it runs on CPU with gloo) with one unit per decoder layer and the
  soft prompt in the root unit: the same prompt gradients and updates, no gradient to the sharded frozen
  backbone; and the pitfall docs/distributed.md warns about (the input embedding in a unit of its own) fails.

A failing assertion in a child fails the test with the child's traceback (``torch.multiprocessing.spawn``
re-raises it); a hung collective times out after ``_TIMEOUT``.
"""

from __future__ import annotations

import datetime
import gc
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from reprokernels.nn import ExpansivePrompter, LabelMapping, PromptTunedModel, Reprogrammer, SoftPrompt

WORLD = 2
_TIMEOUT = datetime.timedelta(seconds=60)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


# ---------------------------------------------------------------- harness


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker: Callable[[int], None], port: int, errors: str) -> None:
    """One child: join the gloo group, run ``worker(rank)``, leave the group. Its traceback, if any, is also
    written to ``errors/rank<r>.txt``: spawn re-raises only the first child to fail, which may be a rank that
    lost its peer rather than the one that failed first."""
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=_TIMEOUT)
    try:
        worker(rank)
        # every rank done before the group goes: without this barrier a rank that tears down while its peer is
        # still communicating sometimes aborts ("terminate called without an active exception"); the DDP
        # objects (reducers bound to the group, held in reference cycles) are freed first
        gc.collect()
        dist.barrier()
    except BaseException:
        Path(errors, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(worker: Callable[[int], None]) -> None:
    """Run ``worker(rank)`` in WORLD processes; an exception in any child fails the test with every failed
    child's traceback."""
    for _attempt in range(2):  # a second try only if another process took the free port in between
        failure = None
        with tempfile.TemporaryDirectory() as errors:
            try:
                mp.spawn(_entry, args=(worker, _free_port(), errors), nprocs=WORLD, join=True)
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
                reports = [f"-- rank {f.stem[4:]}:\n{f.read_text()}" for f in sorted(Path(errors).glob("rank*.txt"))]
                failure = "\n".join(reports) or str(e)
        if failure is None or "address already in use" not in failure.lower():
            break
    if failure is not None:
        pytest.fail(f"a DDP worker failed:\n{failure}", pytrace=False)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rank: int) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"rank {rank}: {what}: {m}")


def _far(a: torch.Tensor, b: torch.Tensor, what: str, rank: int) -> None:
    """The local gradient must differ from the full-batch one, or the all-reduce check proves nothing."""
    assert (a - b).abs().max() > 1e-4, f"rank {rank}: {what}: the local gradient already equals the full-batch one"


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def _assert_frozen(backbone: nn.Module, before: dict[str, torch.Tensor], rank: int) -> None:
    for name, p in backbone.named_parameters():
        assert not p.requires_grad, f"rank {rank}: backbone parameter {name} requires grad"
        assert p.grad is None, f"rank {rank}: backbone parameter {name} received a gradient"
    for name, t in backbone.state_dict().items():
        assert torch.equal(t, before[name]), f"rank {rank}: backbone entry {name} changed"


def _check_step(rank: int, ddp_params: dict[str, nn.Parameter], ref_params: dict[str, nn.Parameter],
                local_grads: dict[str, torch.Tensor]) -> None:
    for name, p in ddp_params.items():
        q = ref_params[name]
        assert p.grad is not None and p.grad.dtype == p.dtype, f"rank {rank}: {name}: grad {p.grad!r}"
        _close(p.grad, q.grad, f"d{name} (DDP shard vs one process on the full batch)", rank)
        _far(local_grads[name], q.grad, f"d{name}", rank)


# ---------------------------------------------------------------- (i) visual prompt + label mapping

_B, _K_SRC, _K_TGT = 3, 11, 4  # rows per rank, source and target classes


def _vision_model() -> Reprogrammer:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, _K_SRC))
    with torch.no_grad():  # non-trivial BatchNorm statistics: eval mode must use them and never update them
        cnn[1].running_mean.uniform_(-0.5, 0.5)
        cnn[1].running_var.uniform_(0.5, 2.0)
    prompter = ExpansivePrompter(9, input_size=5)
    with torch.no_grad():
        prompter.delta.normal_()
    return Reprogrammer(cnn, prompter, LabelMapping(_K_SRC, _K_TGT, method="linear"))


def _train_two_steps(rank: int, dist: tuple, single: tuple, backbone: nn.Module, before: dict) -> None:
    """Two optimizer steps of the DDP model on its shard next to one process on the whole batch: each step's
    gradients must be the all-reduced ones (equal to the single process's, not the shard's), the backbone never
    gets a gradient or an update, and the trainable parameters end equal.
    dist / single: (module, optimizer, {name: trainable param}, loss_fn(module)); the single process's
    loss_fn(module) on the shard alone gives the local gradient."""
    ddp, opt, ddp_params, shard_loss = dist
    ref, ref_opt, ref_params, full_loss = single
    for _ in range(2):
        local = torch.autograd.grad(shard_loss(ref), list(ref_params.values()))
        shard_loss(ddp).backward()
        full_loss(ref).backward()
        _check_step(rank, ddp_params, ref_params, dict(zip(ref_params, local, strict=True)))
        _assert_frozen(backbone, before, rank)
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        _assert_frozen(backbone, before, rank)
    for name, p in ddp_params.items():
        _close(p, ref_params[name], f"{name} after two steps", rank)


def _vision_worker(rank: int) -> None:
    g = torch.Generator().manual_seed(1)
    x_all = torch.rand(WORLD * _B, 3, 5, 5, generator=g)
    y_all = torch.randint(0, _K_TGT, (WORLD * _B,), generator=g)
    shard = slice(rank * _B, (rank + 1) * _B)

    model = _vision_model()
    if rank == 1:  # DDP's construction must broadcast rank 0's frozen weights too
        with torch.no_grad():
            model.backbone[0].weight.add_(1.0)
    ddp = DDP(model)  # defaults: find_unused_parameters=False, buffers synced at every forward
    ref = _vision_model()  # one process, the concatenated batch
    _close(model.backbone[0].weight, ref.backbone[0].weight, "backbone after DDP's broadcast", rank)
    before = _snapshot(model.backbone)

    params = dict(model.named_parameters())
    ddp_params = {n: p for n, p in params.items() if p.requires_grad}
    ref_params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert sorted(ddp_params) == ["input_prompt.delta", "label_mapping.linear.bias", "label_mapping.linear.weight"]
    opt = torch.optim.SGD(list(model.trainable_parameters()), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(list(ref.trainable_parameters()), lr=0.5, momentum=0.9)
    ddp.train()
    ref.train()
    _train_two_steps(rank, (ddp, opt, ddp_params, lambda m: F.cross_entropy(m(x_all[shard]), y_all[shard])),
                     (ref, ref_opt, ref_params, lambda m: F.cross_entropy(m(x_all), y_all)),
                     model.backbone, before)

    # Label-mapping statistics are local: all-reduce them before update() to get the full-data mapping.
    with torch.no_grad():
        logits_all = model.backbone(model.input_prompt(x_all))
    for method in ("ilm", "blm+"):
        mapping = LabelMapping(_K_SRC, _K_TGT, method=method)
        mapping.reset_statistics()
        mapping.accumulate(logits_all[shard], y_all[shard])
        dist.all_reduce(mapping.statistics)
        mapping.update()
        single = LabelMapping(_K_SRC, _K_TGT, method=method).fit([(logits_all, y_all)])
        _close(mapping.statistics, single.statistics, f"{method} statistics", rank)
        _close(mapping.mapping, single.mapping, f"{method} mapping", rank)

    # ... and before the next DDP forward: ``statistics`` is a (non-persistent) buffer, and DDP's default buffer
    # sync overwrites every rank's buffers with rank 0's at the start of each forward.
    ilm = _vision_model()
    ilm.label_mapping = LabelMapping(_K_SRC, _K_TGT, method="ilm")
    ddp_ilm = DDP(ilm)
    ilm.label_mapping.accumulate(logits_all[shard], y_all[shard])
    local = ilm.label_mapping.statistics.clone()
    with torch.no_grad():
        ddp_ilm(x_all[shard])
    gathered = [torch.empty_like(local) for _ in range(WORLD)]
    dist.all_gather(gathered, local)
    assert not torch.equal(gathered[0], gathered[1]), "the ranks' local statistics should differ"
    _close(ilm.label_mapping.statistics, gathered[0], "statistics after a DDP forward (rank 0's)", rank)


def test_ddp_visual_prompt_label_mapping():
    _spawn(_vision_worker)


# ---------------------------------------------------------------- (ii) prompt-tuned tiny Llama

_L, _V, _D, _P = 6, 37, 16, 3  # tokens per row, vocabulary, width, virtual tokens


def _llama_model() -> PromptTunedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=_V, hidden_size=_D, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    llm = LlamaForCausalLM(config)
    return PromptTunedModel(llm, SoftPrompt(_P, _D, init="normal"))


def _llama_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, _V, (WORLD * _B, _L), generator=g)
    mask = torch.ones_like(ids)
    mask[0::_B, -2:] = 0  # one right-padded row per rank: equal label counts, so mean losses average exactly
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _llama_worker(rank: int) -> None:
    batch = _llama_batch()
    shard = {k: v[rank * _B:(rank + 1) * _B] for k, v in batch.items()}
    model = _llama_model()
    ddp = DDP(model)
    ref = _llama_model()
    before = _snapshot(model.model)
    ddp_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref_params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert sorted(ddp_params) == ["soft_prompt.prompt"]
    opt = torch.optim.Adam(model.trainable_parameters(), lr=0.1)
    ref_opt = torch.optim.Adam(ref.trainable_parameters(), lr=0.1)
    _train_two_steps(rank, (ddp, opt, ddp_params, lambda m: m(**shard).loss),
                     (ref, ref_opt, ref_params, lambda m: m(**batch).loss), model.model, before)
    import torch.distributed.fsdp as fsdp

    if hasattr(fsdp, "fully_shard"):  # FSDP2: torch >= 2.6
        _fsdp2_llama(rank)


def test_ddp_and_fsdp2_prompt_tuned_llama():
    """DDP, then (torch >= 2.6) FSDP2, in one spawn: the children's start-up (torch + transformers) is most
    of the time."""
    pytest.importorskip("transformers")
    _spawn(_llama_worker)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to the whole tensor; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp2_llama(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    batch = _llama_batch()
    shard = {k: v[rank * _B:(rank + 1) * _B] for k, v in batch.items()}
    model = _llama_model()
    ref = _llama_model()
    before = _snapshot(model.model)
    # The usual policy: one unit per decoder layer, the rest (embedding, norm, head, soft prompt) in the root
    # unit, whose forward is PromptTunedModel's: the op reads the embedding table while the root is unsharded.
    for layer in model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    prompt = dict(model.named_parameters())["soft_prompt.prompt"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ref_opt = torch.optim.Adam(ref.trainable_parameters(), lr=0.1)
    for _ in range(2):
        local = torch.autograd.grad(ref(**shard).loss, [ref.soft_prompt.prompt])[0]
        model(**shard).loss.backward()
        ref(**batch).loss.backward()
        got = _full(prompt.grad)
        _close(got, ref.soft_prompt.prompt.grad, "dsoft_prompt.prompt (FSDP2 shard vs one process)", rank)
        _far(local, ref.soft_prompt.prompt.grad, "dsoft_prompt.prompt", rank)
        for name, p in model.named_parameters():
            assert p.requires_grad == (name == "soft_prompt.prompt"), f"rank {rank}: {name}"
            assert p.grad is None or name == "soft_prompt.prompt", f"rank {rank}: {name} received a gradient"
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    _close(_full(prompt.detach()), ref.soft_prompt.prompt.detach(), "soft prompt after two steps", rank)
    after = {k: _full(v.detach()) for k, v in model.model.state_dict().items()}
    for name, t in before.items():
        assert torch.equal(after[name], t), f"rank {rank}: backbone entry {name} changed"

    # The pitfall docs/distributed.md warns about: the input embedding in a unit of its own is never
    # unsharded (the op reads its .weight; the embedding's forward, which FSDP hooks, never runs).
    pitfall = _llama_model()
    fully_shard(pitfall.model.get_input_embeddings())
    fully_shard(pitfall)
    try:
        pitfall(**shard)
    except RuntimeError as e:
        assert "DTensor" in str(e), f"rank {rank}: unexpected error {e!r}"
    else:
        raise AssertionError(f"rank {rank}: an embedding in its own FSDP2 unit worked; update docs/distributed.md")


# ---------------------------------------------------------------- the harness itself


def _failing_worker(rank: int) -> None:
    if rank == 1:
        raise AssertionError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 waits at a collective: the spawn must still end, not hang


def test_child_failure_surfaces_with_traceback():
    with pytest.raises(pytest.fail.Exception, match=r"(?s)-- rank 1:.*_failing_worker.*rank 1 fails on purpose"):
        _spawn(_failing_worker)
