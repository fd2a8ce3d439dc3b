"""Projected gradient descent, L_inf (Madry et al. 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pmafl.attacks.base import Attack

__all__ = ["PGD", "ATTACK_LOSSES"]


def ce_attack_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="sum")


def kl_attack_loss(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)): pushes the model away from a teacher's probabilities."""
    return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="sum")


def cw_attack_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin max_{j != y} z_j - z_y, summed: PGD on it is the CW_inf attack."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return (others.max(dim=1).values - true).sum()


ATTACK_LOSSES = {"ce": ce_attack_loss, "kl": kl_attack_loss, "cw": cw_attack_loss}


class PGD(Attack):
    """x_{k+1} = clip_{x, eps}(x_k + step * sign(grad_x loss(model(x_k), targets))), K steps,
    from a uniform random start in the eps-ball. `loss` is "ce" or "cw" (targets are labels;
    "cw" makes it CW_inf) or "kl" (targets are class probabilities)."""

    def __init__(self, model: nn.Module, eps: float, step: float, steps: int,
                 random_start: bool = True, loss: str = "ce") -> None:
        super().__init__(model)
        if eps < 0 or step < 0 or (step == 0 and eps > 0) or steps < 1:
            raise ValueError(f"PGD needs eps >= 0, step > 0 (0 only with eps 0), steps >= 1; got "
                             f"{eps}, {step}, {steps}")
        self.eps, self.step, self.steps, self.random_start = eps, step, steps, random_start
        self.loss_fn = ATTACK_LOSSES[loss]

    def perturb(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.eps == 0:
            return images
        adv = images.clone()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0.0, 1.0)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            loss = self.loss_fn(self.model(adv), targets)
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + self.step * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0.0, 1.0)
        return adv
