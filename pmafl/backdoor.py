"""The backdoor threat, reproducible: a BadNets trigger (Gu et al. 2017), poisoning of a training
set with it, and the attack success rate (ASR) a model shows.

Every PM-AFL client distils from one pre-trained teacher, usually downloaded. If that teacher
carries a backdoor, distillation can hand it to the global model. `backdoor-rate` > 0 plants one
in the teacher at pre-training (`pmafl-teacher pretrain`), so that the threat and the RobustKD
defence can be measured. The default attack is BackdoorBench's BadNets: all-to-one, target
class 0, a 3x3 white square at the bottom-right, 10% poisoning.

A teacher's backdoor reaches a distilled student only through inputs that carry the trigger.
`backdoor-client-rate` > 0 stamps the trigger on that share of every client's training images,
true labels kept (an attacker who can mark inputs but not labels, e.g. a sticker in the field):
the teacher sends those images to the target class, and a student that distils from its soft
labels learns the same rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

POSITIONS = ("bottom-right", "top-left")


@dataclass(frozen=True)
class Trigger:
    """A `patch` x `patch` square of pixel value `value` (images in [0, 1]) at `position`; every
    stamped image is sent to class `target` (all-to-one)."""

    target: int = 0
    patch: int = 3
    value: float = 1.0
    position: str = "bottom-right"

    def __post_init__(self) -> None:
        if self.target < 0 or self.patch < 1 or not 0 <= self.value <= 1:
            raise ValueError(f"a trigger needs a target class >= 0, a patch of at least 1 pixel "
                             f"and a value in [0, 1]; got {self}")
        if self.position not in POSITIONS:
            raise ValueError(f"trigger position must be one of {', '.join(POSITIONS)}, got "
                             f"{self.position!r}")

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """A copy of `images` (N x C x H x W, floats in [0, 1] or uint8 in [0, 255]) with the
        trigger stamped on."""
        if self.patch > min(images.shape[-2:]):
            raise ValueError(f"a {self.patch}x{self.patch} trigger does not fit "
                             f"{tuple(images.shape[-2:])} images")
        out = images.clone()
        rows = slice(-self.patch, None) if self.position == "bottom-right" else slice(0, self.patch)
        out[..., rows, rows] = self.value if images.is_floating_point() else round(self.value * 255)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def poison(images: torch.Tensor, labels: torch.Tensor, trigger: Trigger, rate: float,
           seed: int = 0, relabel: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BadNets poisoning: round(rate * N) images, drawn among those not of the target class, get
    the trigger and (with `relabel`) the target label; `relabel=False` keeps their true labels
    (the trigger only appears in the data). Returns the new images, labels and the stamped
    indices."""
    if not 0 <= rate < 1:
        raise ValueError(f"poison rate must be in [0, 1), got {rate}")
    candidates = torch.nonzero(labels != trigger.target).squeeze(1)
    count = min(round(rate * len(labels)), len(candidates))
    generator = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values
    images, labels = images.clone(), labels.clone()
    images[chosen] = trigger.stamp(images[chosen])
    if relabel:
        labels[chosen] = trigger.target
    return images, labels, chosen


def attack_success_rate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        trigger: Trigger, batch_size: int = 256) -> float:
    """Share of the test images not of the target class that the model sends to the target class
    once the trigger is stamped on (eval mode)."""
    keep = labels != trigger.target
    stamped = trigger.stamp(images[keep])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hits = 0
    try:
        with torch.no_grad():
            for start in range(0, len(stamped), batch_size):
                preds = model(stamped[start:start + batch_size].to(device)).argmax(1)
                hits += (preds == trigger.target).sum().item()
    finally:
        model.train(was_training)
    return hits / max(len(stamped), 1)
