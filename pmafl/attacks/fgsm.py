"""Fast gradient sign method (Goodfellow et al. 2015), L_inf."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pmafl.attacks.base import Attack


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
