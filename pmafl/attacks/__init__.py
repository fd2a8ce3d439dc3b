"""L_inf attacks on models that take images in [0, 1]: `attack(images, targets) -> adversarial images`."""

from pmafl.attacks.base import Attack
from pmafl.attacks.pgd import PGD

__all__ = ["Attack", "PGD"]
