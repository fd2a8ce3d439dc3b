"""L_inf attacks on models that take images in [0, 1]: `attack(images, targets) -> adversarial images`;
one class a file over `Attack`, and `factory` for the attacks of training and evaluation by name."""

from pmafl.attacks.autoattack import AutoAttack
from pmafl.attacks.base import Attack
from pmafl.attacks.factory import (
    ATTACKS,
    TRAIN_ATTACKS,
    TrainingAttackSettings,
    eval_pgd,
    make_attack,
    training_attack,
)
from pmafl.attacks.fgsm import FGSM, FGSMRS
from pmafl.attacks.pgd import PGD

__all__ = ["ATTACKS", "TRAIN_ATTACKS", "Attack", "AutoAttack", "FGSM", "FGSMRS", "PGD",
           "TrainingAttackSettings", "eval_pgd", "make_attack", "training_attack"]
