"""Clean and PGD robust accuracy of a model, always in eval mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pmafl.attacks import PGD


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float,
             steps: int = 20, batch_size: int = 256) -> dict[str, float]:
    """{"clean_acc", "clean_loss", "pgd_acc"} on images in [0, 1]; PGD-`steps` with random start."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    attack = PGD(model, eps, step, steps)
    correct = robust = 0
    loss = 0.0
    try:
        for start in range(0, len(labels), batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device)
            with torch.no_grad():
                logits = model(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            with torch.no_grad():
                robust += (model(attack(x, y)).argmax(1) == y).sum().item()
    finally:
        model.train(was_training)
    n = max(len(labels), 1)
    return {"clean_acc": correct / n, "clean_loss": loss / n, "pgd_acc": robust / n}
