"""L_inf attacks on models that take images in [0, 1]: `attack(images, targets) -> adversarial images`."""

from pmafl.attacks.autoattack import AutoAttack
from pmafl.attacks.base import Attack
from pmafl.attacks.fgsm import FGSM, FGSMRS
from pmafl.attacks.pgd import PGD

__all__ = ["Attack", "AutoAttack", "FGSM", "FGSMRS", "PGD"]
