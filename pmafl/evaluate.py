"""Clean and robust accuracy, always in eval mode: the per-round check (clean + PGD), the field's
attack suite (FGSM, PGD-20, CW_inf, AutoAttack), and an eps sweep that flags gradient masking."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pmafl.attacks import FGSM, Attack, eval_pgd, make_attack


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


# What `evaluate` returns: the keys of every federated-evaluation reply, besides `num-examples`.
SCORES = ("clean_acc", "clean_loss", "fgsm_acc", "pgd_acc")


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
             steps: int = 20, batch_size: int = 256) -> dict[str, float]:
    """{"clean_acc", "clean_loss", "fgsm_acc", "pgd_acc"} on images in [0, 1]: PGD-`steps` as
    `eval_pgd`; FGSM beside it shows catastrophic overfitting (FGSM accuracy up, PGD down)."""
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
            "fgsm_acc": accuracy(model, images, labels, FGSM(model, eps), batch_size),
            "pgd_acc": accuracy(model, images, labels, eval_pgd(model, eps, steps), batch_size)}


def eps_sweep(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              eps_values: Iterable[float], batch_size: int = 256) -> list[dict[str, float]]:
    """PGD-20 accuracy at each eps (step eps/4)."""
    return [{"eps": eps, "pgd20_acc": accuracy(model, images, labels,
                                               make_attack("pgd20", model, eps), batch_size)}
            for eps in eps_values]


# Above this radius the check proves nothing: at 0.5 any image in [0, 1] can be moved to the
# uniform grey image, so accuracy 0 there is reached by every model, masked or not.
MAX_SWEEP_EPS = 0.45


def sweep_radii(eps: float, multiples: Iterable[float]) -> list[float]:
    """The eps-sweep radii: `multiples` of eps up to `MAX_SWEEP_EPS`, where masked gradients can
    still show as accuracy that does not fall to 0."""
    return [m * eps for m in multiples if m * eps <= MAX_SWEEP_EPS + 1e-9]


def catastrophic_overfitting(rounds: list[dict[str, float]], drop: float = 0.5,
                             min_fall: float = 0.1) -> str:
    """A warning when the last round looks like catastrophic overfitting of fast adversarial
    training (Wong et al. 2020): PGD accuracy fell below `drop` times its best so far, and by at
    least `min_fall` (not noise near zero), while FGSM accuracy rose above its value at that best
    round; "" otherwise."""
    scored = [r for r in rounds if "pgd_acc" in r and "fgsm_acc" in r]
    if len(scored) < 2:
        return ""
    best = max(scored[:-1], key=lambda r: r["pgd_acc"])
    last = scored[-1]
    fell = last["pgd_acc"] < drop * best["pgd_acc"] and best["pgd_acc"] - last["pgd_acc"] >= min_fall
    if fell and last["fgsm_acc"] > best["fgsm_acc"]:
        return (f"catastrophic overfitting? PGD accuracy {last['pgd_acc']:.3f} (best "
                f"{best['pgd_acc']:.3f} in round {best['round']}) while FGSM accuracy rose to "
                f"{last['fgsm_acc']:.3f} (from {best['fgsm_acc']:.3f})")
    return ""


def gradient_masking_warnings(sweep: list[dict[str, float]], num_examples: int,
                              zero_level: float = 0.05) -> list[str]:
    """Signs that gradients are masked: robust accuracy that rises as eps grows (beyond one
    example's worth of noise) or that is still above `zero_level` at the largest eps (when that
    eps is above 0: a sweep of eps 0 alone is clean accuracy and shows nothing)."""
    warnings = []
    slack = 1.0 / max(num_examples, 1)
    for before, after in zip(sweep, sweep[1:]):
        if after["pgd20_acc"] > before["pgd20_acc"] + slack:
            warnings.append(f"PGD-20 accuracy rises from {before['pgd20_acc']:.3f} at eps "
                            f"{before['eps']:g} to {after['pgd20_acc']:.3f} at eps {after['eps']:g}")
    if sweep and sweep[-1]["eps"] > 0 and sweep[-1]["pgd20_acc"] > zero_level:
        warnings.append(f"PGD-20 accuracy is still {sweep[-1]['pgd20_acc']:.3f} at the largest eps "
                        f"{sweep[-1]['eps']:g} (expected about 0)")
    return warnings
