"""AutoAttack "standard" (Croce & Hein 2020: APGD-CE, APGD-T, FAB-T, Square) from the maintained
`pyautoattack` package, behind the common attack interface."""

from __future__ import annotations

import torch
from torch import nn

from pmafl.attacks.base import Attack


class AutoAttack(Attack):
    """L_inf AutoAttack, `version="standard"`. Returns, per image, the first adversarial example
    any of its attacks found (the clean image where all failed)."""

    def __init__(self, model: nn.Module, eps: float, seed: int = 0, batch_size: int = 250) -> None:
        super().__init__(model)
        self.eps, self.seed, self.batch_size = eps, seed, batch_size

    def perturb(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from pyautoattack import AutoAttack as _AutoAttack

        if self.eps == 0:
            return images
        attack = _AutoAttack(self.model, norm="Linf", eps=self.eps, version="standard",
                             device=images.device, seed=self.seed)
        adversarial, _ = attack.run_standard_evaluation(images, labels, batch_size=self.batch_size)
        return adversarial
