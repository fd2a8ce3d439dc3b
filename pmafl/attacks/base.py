"""Common base of the attacks: eval mode while attacking, the [0, 1] box, no parameter gradients."""

from __future__ import annotations

import torch
from torch import nn


class Attack:
    """Subclasses implement `perturb(images, targets)`; calling the attack runs it with the model
    in eval mode (restored afterwards) and returns detached images in [0, 1]."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def perturb(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                adv = self.perturb(images.detach(), targets.detach())
        finally:
            self.model.train(was_training)
        return adv.clamp(0.0, 1.0).detach()
