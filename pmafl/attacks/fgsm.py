"""Fast gradient sign method (Goodfellow et al. 2015), L_inf, and its random-start variant for fast
adversarial training (Wong, Rice and Kolter 2020, "Fast is better than free")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pmafl.attacks.base import Attack
from pmafl.attacks.pgd import PGD


class FGSM(Attack):
    """x_adv = clip_[0,1](x + eps * sign(grad_x CE(model(x), y))): one step, no random start."""

    def __init__(self, model: nn.Module, eps: float) -> None:
        super().__init__(model)
        if eps < 0:
            raise ValueError(f"FGSM needs eps >= 0, got {eps}")
        self.eps = eps

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(self.model(images), labels), images)
        return images.detach() + self.eps * grad.sign()


class FGSMRS(PGD):
    """FGSM with random start (Wong et al. 2020): x_0 = x + U(-eps, eps), one step of
    1.25 * eps along sign(grad_x loss), projected back into the eps-ball and [0, 1]. About two
    forward/backward passes per training step instead of PGD-10's eleven. `loss` as for PGD."""

    STEP_RATIO = 1.25

    def __init__(self, model: nn.Module, eps: float, loss: str = "ce") -> None:
        super().__init__(model, eps, self.STEP_RATIO * eps, 1, random_start=True, loss=loss)
