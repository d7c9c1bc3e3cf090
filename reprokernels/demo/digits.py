"""``reprokernels demo``: reprogram a frozen digit classifier for digits it never saw, on scikit-learn's digits.

1. Source model: a small CNN (two conv + BatchNorm + ReLU + pool blocks and a linear head, ~2.6k parameters)
   trained on digits 0-4, upscaled (bilinear) from 8x8 to 16x16, normalised with the source training set's mean
   and std. Then frozen.
2. Target task: digits 5-9 at their native 8x8 size. A :class:`~reprokernels.nn.Reprogrammer` places them in the
   centre of the 16x16 canvas with an :class:`~reprokernels.nn.ExpansivePrompter` (learnable δ on the 4-pixel
   border, sigmoid-squashed, then the source normalisation) and maps the 5 source classes to the 5 target
   classes with a :class:`~reprokernels.nn.LabelMapping` (FLM, ILM, BLM+ each, from a fresh δ = 0).
3. Reported per method: test accuracy of the mapping alone (the image zero-padded onto the canvas, no
   perturbation, mapping fitted on the training set: "δ = 0, the mapping alone"), at initialisation (δ = 0,
   i.e. a sigmoid(0) = 0.5 border, ILM-VP's start) and after reprogramming; trainable vs frozen parameters; the
   training step time per backend that runs on this device; a JSON summary and a PNG.

Data: the 1,797 images of ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download), pixel
values / 16; each task split 60/40 into train/test by a permutation drawn from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import BACKENDS, backend_status
from ..nn import ExpansivePrompter, LabelMapping, Reprogrammer
from ._timing import median_step_ms

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)
METHODS = ("flm", "ilm", "blm+")
CANVAS = 16
NATIVE = 8
TIMED_BACKENDS = ("reference", "triton", "cuda")
CHANCE = 1.0 / len(TARGET_DIGITS)
IMPROVED_MARGIN = 0.10  # accuracy over both the mapping alone and chance that counts as "improved"


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_tasks(seed: int, train_fraction: float = 0.6) -> tuple[Split, Split]:
    """(source, target): source = digits 0-4 at 16x16, target = digits 5-9 at 8x8, labels 0-4, float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    y = torch.from_numpy(digits.target).long()
    g = torch.Generator().manual_seed(seed)

    def split(classes: tuple[int, ...], size: int) -> Split:
        idx = torch.nonzero(torch.isin(y, torch.tensor(classes))).squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        xs, ys = x[idx], y[idx] - classes[0]
        if size != NATIVE:
            xs = F.interpolate(xs, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
        n = round(train_fraction * idx.numel())
        return Split(xs[:n], ys[:n], xs[n:], ys[n:])

    return split(SOURCE_DIGITS, CANVAS), split(TARGET_DIGITS, NATIVE)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    order = torch.randperm(x.shape[0], generator=generator) if generator is not None else torch.arange(x.shape[0])
    for i in range(0, x.shape[0], batch_size):
        j = order[i:i + batch_size]
        yield x[j], y[j]


# ---------------------------------------------------------------------------------------------------- models


class SourceCNN(nn.Module):
    """(B, 1, 16, 16) normalised images -> (B, 5) logits."""

    def __init__(self, num_classes: int = len(SOURCE_DIGITS)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(16 * 4 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size):
        correct += int((model(xb).argmax(-1) == yb).sum())
    model.train(was_training)
    return correct / max(1, x.shape[0])


def train_source(source: Split, mean: float, std: float, epochs: int, seed: int, device: torch.device,
                 progress: Any) -> tuple[SourceCNN, float, float]:
    torch.manual_seed(seed)
    model = SourceCNN().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)
    xtr = ((source.x_train - mean) / std).to(device)
    xte = ((source.x_test - mean) / std).to(device)
    ytr, yte = source.y_train.to(device), source.y_test.to(device)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(xtr, ytr, 32, g):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        progress.update(1)
    seconds = time.perf_counter() - t0
    return model.eval(), accuracy(model, xte, yte), seconds


def make_reprogrammer(backbone: nn.Module, method: str, mean: float, std: float, backend: str,
                      squash: str = "sigmoid") -> Reprogrammer:
    prompter = ExpansivePrompter(CANVAS, input_size=NATIVE, channels=1, mean=(mean,), std=(std,), squash=squash,
                                 backend=backend)
    mapping = LabelMapping(len(SOURCE_DIGITS), len(TARGET_DIGITS), method=method, backend=backend)
    return Reprogrammer(backbone, prompter, mapping).to(next(backbone.parameters()).device)


@torch.no_grad()
def refit_mapping(model: Reprogrammer, x: torch.Tensor, y: torch.Tensor) -> None:
    """Re-estimate the label mapping from the frozen model's outputs on (x, y) with the current prompt."""
    mapping = model.label_mapping
    assert isinstance(mapping, LabelMapping)
    was_training = model.training
    model.eval()
    mapping.reset_statistics()
    for xb, yb in batches(x, y, 512):
        mapping.accumulate(model.backbone(model.input_prompt(xb)), yb)  # type: ignore[misc]
    mapping.update()
    model.train(was_training)


def reprogram(backbone: nn.Module, target: Split, method: str, *, epochs: int, lr: float, batch_size: int,
              mean: float, std: float, backend: str, seed: int, device: torch.device,
              progress: Any) -> tuple[Reprogrammer, dict[str, Any]]:
    """Train a fresh prompt (δ = 0) + mapping on the target task; returns the model and its curves."""
    torch.manual_seed(seed)
    xtr, ytr = target.x_train.to(device), target.y_train.to(device)
    xte, yte = target.x_test.to(device), target.y_test.to(device)

    # the mapping alone: no perturbation (a δ = 0 prompter without squash adds exactly 0), mapping fitted
    plain = make_reprogrammer(backbone, method, mean, std, backend, squash="none")
    refit_mapping(plain, xtr, ytr)
    acc_mapping_alone = accuracy(plain, xte, yte)

    model = make_reprogrammer(backbone, method, mean, std, backend)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 2)
    refit_mapping(model, xtr, ytr)
    curve_loss: list[float] = []
    curve_acc = [accuracy(model, xte, yte)]  # epoch 0: δ = 0, mapping fitted
    acc_init = curve_acc[0]
    model.train()
    assert isinstance(model.label_mapping, LabelMapping)
    for epoch in range(epochs):
        if epoch > 0 and model.label_mapping.should_update():
            refit_mapping(model, xtr, ytr)
        total, count = 0.0, 0
        for xb, yb in batches(xtr, ytr, batch_size, g):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * xb.shape[0]
            count += xb.shape[0]
        curve_loss.append(total / count)
        curve_acc.append(accuracy(model, xte, yte))
        progress.set_postfix_str(f"{method} acc {curve_acc[-1]:.3f}")
        progress.update(1)
    return model, {
        "acc_mapping_alone": acc_mapping_alone,
        "acc_init": acc_init,
        "acc_final": curve_acc[-1],
        "train_loss": curve_loss,
        "test_acc": curve_acc,
        "mapping": model.label_mapping.mapping.detach().cpu().tolist(),
        "improved": curve_acc[-1] >= max(acc_mapping_alone, CHANCE) + IMPROVED_MARGIN,
    }


# ---------------------------------------------------------------------------------------------------- timing


def time_backends(backbone: nn.Module, target: Split, *, mean: float, std: float, device: torch.device,
                  batch_size: int, steps: int) -> dict[str, dict[str, Any]]:
    """Median wall time of one training step (forward, backward, Adam) of the reprogrammed model per backend.

    On a CPU the fused backends are reported as needing a GPU rather than timed through the Triton interpreter
    (which is a correctness tool, orders of magnitude slower than the kernels it interprets)."""
    out: dict[str, dict[str, Any]] = {}
    xb = target.x_train[:batch_size].to(device)
    yb = target.y_train[:batch_size].to(device)
    for name in TIMED_BACKENDS:
        if device.type != "cuda" and name != "reference":
            out[name] = {"status": "needs a GPU", "ms": None}
            continue
        ok, why = backend_status(name, device.type)
        if not ok:
            out[name] = {"status": f"unavailable: {why}", "ms": None}
            continue
        model = make_reprogrammer(backbone, "blm+", mean, std, name).train()
        opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)

        def step(model: Reprogrammer = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()

        try:
            ms = median_step_ms(step, device, steps)
        except Exception as exc:  # a backend that fails here is reported, not fatal for the demo
            out[name] = {"status": f"failed: {type(exc).__name__}: {exc}"[:300], "ms": None}
            continue
        out[name] = {"status": "ok", "ms": ms, "steps": steps, "batch": batch_size}
    return out


# ---------------------------------------------------------------------------------------------------- plot


def save_plot(path: Path, summary: dict[str, Any], best: Reprogrammer, example: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    ax = axes[0]
    for name, r in methods.items():
        ax.plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], marker="o", label=name)
    ax.set(title="training loss (target task)", xlabel="epoch", ylabel="cross-entropy")
    ax.legend()
    ax = axes[1]
    for name, r in methods.items():
        line, = ax.plot(range(len(r["test_acc"])), r["test_acc"], marker="o", label=f"{name}")
        ax.axhline(r["acc_mapping_alone"], color=line.get_color(), ls="--", lw=1)
    ax.set(title="test accuracy (dashed: mapping alone)", xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    ax.legend()

    prompter = best.input_prompt
    assert isinstance(prompter, ExpansivePrompter)
    with torch.no_grad():
        pert = torch.sigmoid(prompter.delta.detach().float().cpu()[0])
        lo, hi = (CANVAS - NATIVE + 1) // 2, (CANVAS - NATIVE + 1) // 2 + NATIVE
        pert[lo:hi, lo:hi] = float("nan")
        canvas = prompter(example.to(prompter.delta.device)).detach().float().cpu()[0, 0] * summary["norm"]["std"]
        canvas = canvas + summary["norm"]["mean"]
    ax = axes[2]
    im = ax.imshow(pert.numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set(title=f"learned perturbation sigmoid(δ) ({summary['best_method']})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[3]
    ax.imshow(canvas.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set(title=f"a target digit ({TARGET_DIGITS[0] + int(summary['example_label'])}) on the canvas")
    for a in axes[2:]:
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the models and the data order")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--backend", default="auto", choices=[b for b in BACKENDS if b != "composite"],
                   help="backend of the prompt and mapping ops during reprogramming (default auto)")
    p.add_argument("--epochs", type=int, default=None,
                   help="reprogramming epochs per method (default 20; 1 with --quick unless given)")
    p.add_argument("--quick", action="store_true",
                   help="reduced run for CI: fewer source epochs, fewer timing steps")
    p.add_argument("--out", type=Path, default=Path("reprokernels-demo"),
                   help="folder for summary.json and demo.png (default ./reprokernels-demo/)")
    p.add_argument("--lr", type=float, default=0.2, help="Adam learning rate of δ (default 0.2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--text", action="store_true",
                   help="also steer a frozen tiny transformer (copy -> reverse) by prompt tuning and prefix tuning "
                        "(see reprokernels.demo.text); adds a \"text\" section to summary.json")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (torch.cuda.is_available() is False)")
    return device


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    device = resolve_device(args.device)
    if args.backend not in ("auto", "reference"):
        ok, why = backend_status(args.backend, device.type)
        if not ok:
            raise ValueError(f"--backend {args.backend}: cannot run on {device.type}: {why}")
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 20)
    if epochs < 1:
        raise ValueError(f"--epochs: expected >= 1, got {epochs}")
    source_epochs = 6 if args.quick else 12
    batch_size = 16 if args.quick else 32
    timing_steps = 5 if args.quick else 30
    torch.manual_seed(args.seed)

    source, target = load_digits_tasks(args.seed)
    mean = float(source.x_train.mean())
    std = float(source.x_train.std())

    total = source_epochs + epochs * len(METHODS)
    with tqdm(total=total, desc="demo", unit="epoch", disable=args.no_progress, file=sys.stderr,
              dynamic_ncols=True) as progress:
        progress.set_postfix_str("source CNN")
        backbone, source_acc, source_seconds = train_source(source, mean, std, source_epochs, args.seed, device,
                                                            progress)
        results: dict[str, Any] = {}
        models: dict[str, Reprogrammer] = {}
        for method in METHODS:
            model, r = reprogram(backbone, target, method, epochs=epochs, lr=args.lr, batch_size=batch_size,
                                 mean=mean, std=std, backend=args.backend, seed=args.seed, device=device,
                                 progress=progress)
            results[method], models[method] = r, model

    best_method = max(METHODS, key=lambda m: (results[m]["acc_final"], -METHODS.index(m)))
    best = models[best_method]
    prompter = best.input_prompt
    assert isinstance(prompter, ExpansivePrompter)
    checkpoint = best.state_dict()
    timing = time_backends(backbone, target, mean=mean, std=std, device=device, batch_size=64, steps=timing_steps)

    summary: dict[str, Any] = {
        "config": {"seed": args.seed, "device": str(device), "backend": args.backend, "epochs": epochs,
                   "quick": bool(args.quick), "lr": args.lr, "batch_size": batch_size,
                   "source_epochs": source_epochs},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
                        platform.processor() or platform.machine()},
        "data": {"source_digits": list(SOURCE_DIGITS), "target_digits": list(TARGET_DIGITS),
                 "source_train": len(source.y_train), "source_test": len(source.y_test),
                 "target_train": len(target.y_train), "target_test": len(target.y_test),
                 "canvas": CANVAS, "target_size": NATIVE},
        "norm": {"mean": mean, "std": std},
        "source": {"test_acc": source_acc, "train_seconds": source_seconds},
        "parameters": {
            "trainable": best.num_trainable,
            "trainable_active": prompter.num_parameters,
            "frozen": best.num_frozen,
            "checkpoint_keys": sorted(checkpoint),
            "checkpoint_elements": sum(t.numel() for t in checkpoint.values()),
        },
        "methods": results,
        "chance_acc": CHANCE,
        "improved_margin": IMPROVED_MARGIN,
        "best_method": best_method,
        "step_time": timing,
        "example_label": int(target.y_test[0]),
    }
    if getattr(args, "text", False):
        from .text import run_text

        summary["text"] = run_text(seed=args.seed, device=device, backend=args.backend, quick=args.quick,
                                   progress_enabled=not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "demo.png"
    save_plot(png, summary, best, target.x_test[:1])
    summary["files"] = {"json": str(args.out / "summary.json"), "png": str(png)}
    summary["total_seconds"] = time.perf_counter() - t_start
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def report(summary: dict[str, Any]) -> str:
    c, d, p = summary["config"], summary["data"], summary["parameters"]
    lines = [
        f"reprokernels demo: reprogram a frozen digits-{d['source_digits'][0]}-{d['source_digits'][-1]} CNN "
        f"for digits {d['target_digits'][0]}-{d['target_digits'][-1]} (scikit-learn digits)",
        f"  device {c['device']}, backend {c['backend']}, seed {c['seed']}, {c['epochs']} epoch(s) per method"
        + (" (quick)" if c["quick"] else ""),
        f"  source model: {d['source_train']} train / {d['source_test']} test images at "
        f"{d['canvas']}x{d['canvas']}, test accuracy {summary['source']['test_acc']:.3f} "
        f"(trained in {summary['source']['train_seconds']:.1f} s), then frozen",
        f"  target task: {d['target_train']} train / {d['target_test']} test images at "
        f"{d['target_size']}x{d['target_size']} on the {d['canvas']}x{d['canvas']} canvas",
        f"  parameters: trainable {p['trainable']:,} (δ on the canvas; {p['trainable_active']:,} active on the "
        f"border) vs frozen {p['frozen']:,}; checkpoint: {p['checkpoint_elements']:,} elements "
        f"({', '.join(p['checkpoint_keys'])})",
        "",
        f"  test accuracy ({len(TARGET_DIGITS)} classes: chance {summary['chance_acc']:.3f})",
        f"  {'method':<8}{'mapping alone':>15}{'δ = 0 (init)':>15}{'reprogrammed':>15}{'chance':>8}",
    ]
    ch = summary["chance_acc"]
    for name, r in summary["methods"].items():
        mark = "  <- best" if name == summary["best_method"] else ""
        lines.append(f"  {name:<8}{r['acc_mapping_alone']:>15.3f}{r['acc_init']:>15.3f}{r['acc_final']:>15.3f}"
                     f"{ch:>8.3f}{mark}")
    alone = [r["acc_mapping_alone"] for r in summary["methods"].values()]
    if max(alone) < ch + summary["improved_margin"]:
        lines.append("  mapping alone is at chance: the frozen model's outputs on unprompted target digits carry "
                     "no usable signal, so the gain is the learned border's")
    for name, r in summary["methods"].items():
        if not r["improved"]:
            lines.append(f"  {name}: did NOT learn the task for seed {c['seed']} ({r['acc_final']:.3f}, not "
                         f"{summary['improved_margin']:.2f} above both the mapping alone and chance)")
    lines += ["", "  training step time (batch 64, forward + backward + Adam, median; no baseline timed here):"]
    for name, t in summary["step_time"].items():
        value = f"{t['ms']:.2f} ms" if t["ms"] is not None and math.isfinite(t["ms"]) else t["status"]
        lines.append(f"    {name:<10} {value}")
    if "text" in summary:
        from .text import report_text

        lines += report_text(summary["text"])
    lines += ["", f"  wrote {summary['files']['json']} and {summary['files']['png']} "
                  f"({summary['total_seconds']:.1f} s in all)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reprokernels demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except ValueError as exc:
        print(f"reprokernels demo: error: {exc}", file=sys.stderr)
        return 2
    print(report(summary))
    return 0
