"""Clean and robust accuracy, always in eval mode: the per-round check (clean + PGD), the field's
attack suite (FGSM, PGD-20, CW_inf, AutoAttack), and an eps sweep that flags gradient masking."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pmafl.attacks import FGSM, PGD, Attack, AutoAttack

ATTACKS = ("fgsm", "pgd20", "cw", "autoattack")


def make_attack(name: str, model: nn.Module, eps: float, seed: int = 0) -> Attack:
    """The suite's attacks by name; PGD and CW take 20 steps of eps/4 from a random start."""
    if name == "fgsm":
        return FGSM(model, eps)
    if name == "pgd20":
        return PGD(model, eps, max(eps / 4, 1e-8), 20)
    if name == "cw":
        return PGD(model, eps, max(eps / 4, 1e-8), 20, loss="cw")
    if name == "autoattack":
        return AutoAttack(model, eps, seed=seed)
    raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             attack: Attack | None = None, batch_size: int = 256,
             progress: Callable[[int], None] | None = None) -> float:
    """Fraction of `images` classified correctly, after `attack` when given."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(labels), batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            if attack is not None:
                x = attack(x, y)
            with torch.no_grad():
                correct += (model(x).argmax(1) == y).sum().item()
            if progress:
                progress(len(y))
    finally:
        model.train(was_training)
    return correct / max(len(labels), 1)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float,
             steps: int = 20, batch_size: int = 256) -> dict[str, float]:
    """{"clean_acc", "clean_loss", "pgd_acc"} on images in [0, 1]; PGD-`steps` with random start."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(labels), batch_size):
                logits = model(images[start:start + batch_size].to(device))
                y = labels[start:start + batch_size].to(device)
                loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    n = max(len(labels), 1)
    return {"clean_acc": correct / n, "clean_loss": loss / n,
            "pgd_acc": accuracy(model, images, labels, PGD(model, eps, step, steps), batch_size)}


def eps_sweep(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              eps_values: Iterable[float], batch_size: int = 256) -> list[dict[str, float]]:
    """PGD-20 accuracy at each eps (step eps/4)."""
    return [{"eps": eps, "pgd20_acc": accuracy(model, images, labels,
                                               make_attack("pgd20", model, eps), batch_size)}
            for eps in eps_values]


def gradient_masking_warnings(sweep: list[dict[str, float]], num_examples: int,
                              zero_level: float = 0.05) -> list[str]:
    """Signs that gradients are masked: robust accuracy that rises as eps grows (beyond one
    example's worth of noise) or that is still above `zero_level` at the largest eps."""
    warnings = []
    slack = 1.0 / max(num_examples, 1)
    for before, after in zip(sweep, sweep[1:]):
        if after["pgd20_acc"] > before["pgd20_acc"] + slack:
            warnings.append(f"PGD-20 accuracy rises from {before['pgd20_acc']:.3f} at eps "
                            f"{before['eps']:g} to {after['pgd20_acc']:.3f} at eps {after['eps']:g}")
    if sweep and sweep[-1]["pgd20_acc"] > zero_level:
        warnings.append(f"PGD-20 accuracy is still {sweep[-1]['pgd20_acc']:.3f} at the largest eps "
                        f"{sweep[-1]['eps']:g} (expected about 0)")
    return warnings
