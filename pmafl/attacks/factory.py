"""The attacks by purpose: the one place that says which attack local training runs and which
the evaluation suite runs, with what steps. Everything else asks here."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from pmafl.attacks.autoattack import AutoAttack
from pmafl.attacks.base import Attack
from pmafl.attacks.fgsm import FGSM, FGSMRS
from pmafl.attacks.pgd import PGD

# The attacks of local training (`train-attack`), and of the evaluation suite (`pmafl-evaluate`).
TRAIN_ATTACKS = ("pgd", "fgsm-rs")
ATTACKS = ("fgsm", "pgd20", "cw", "autoattack")


class TrainingAttackSettings(Protocol):
    """What the training attack is made of (`pmafl.config.TrainConfig` has these fields)."""

    train_attack: str
    eps: float
    pgd_steps: int
    pgd_step_ratio: float


def training_attack(model: nn.Module, settings: TrainingAttackSettings, loss: str = "ce") -> Attack:
    """The attack of local training, maximising `loss` against `model`: PGD-K (K `pgd_steps`,
    step eps * `pgd_step_ratio`, random start) or FGSM with random start (Wong et al. 2020: one
    step of 1.25 eps from a uniform start in the ball)."""
    if settings.train_attack == "fgsm-rs":
        return FGSMRS(model, settings.eps, loss=loss)
    if settings.train_attack == "pgd":
        return PGD(model, settings.eps, settings.eps * settings.pgd_step_ratio, settings.pgd_steps,
                   loss=loss)
    raise ValueError(f"unknown training attack {settings.train_attack!r}; known: "
                     f"{', '.join(TRAIN_ATTACKS)}")


def eval_pgd(model: nn.Module, eps: float, steps: int = 20, loss: str = "ce") -> PGD:
    """The evaluation PGD, the same everywhere (per-round log, nodes, pmafl-evaluate, teacher
    record): `steps` steps of eps/4 from a uniform random start."""
    return PGD(model, eps, eps / 4, steps, loss=loss)


def make_attack(name: str, model: nn.Module, eps: float, seed: int = 0) -> Attack:
    """The suite's attacks by name (`ATTACKS`); PGD-20 and CW take 20 steps of eps/4 from a
    random start."""
    if name == "fgsm":
        return FGSM(model, eps)
    if name == "pgd20":
        return eval_pgd(model, eps)
    if name == "cw":
        return eval_pgd(model, eps, loss="cw")
    if name == "autoattack":
        return AutoAttack(model, eps, seed=seed)
    raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
