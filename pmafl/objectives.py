"""Local objectives and add-on loss terms, one registry each.

Every objective (`OBJECTIVES`) is a step function composed from the loss terms in `pmafl.losses`,
plus what it needs (a teacher, the client's class prior) and, for the PM-AFL ablations, the
`TrainConfig` fields it pins. A step takes the model in train mode, a batch `x` (in [0, 1]),
labels `y`, the teacher's logits on `x` when the batch carries them, and a `StepContext`; it
returns the loss to back-propagate under "loss" and every term by name (averaged per epoch into
the client's metrics).

An add-on (`ADD_ONS`) is a loss term that the training loop adds, weighted by its `TrainConfig`
field, to every objective that distils from the teacher: KDIGA's input-gradient alignment and
RobustKD's feature distillation. A new method of that kind is one core module holding its term
(and, if it trains one, its module) plus one entry here; see docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from pmafl.attacks import TrainingAttackSettings, training_attack
from pmafl.batch import Batch
from pmafl.kdiga import alignment_term
from pmafl.losses import (
    adversarial_mixture_kd,
    calibrated_cross_entropy,
    calibrated_logits,
    cross_entropy,
    global_consistency,
    kd_kl,
    mart_boosted_ce,
    mart_weighted_kl,
    pmafl_objective,
    trades_kl,
    vanilla_mixture_kd,
)
from pmafl.robustkd import feature_module, feature_term

Terms = dict[str, torch.Tensor]


class ObjectiveSettings(TrainingAttackSettings, Protocol):
    """The hyperparameters the objectives read (`pmafl.config.TrainConfig` has these fields)."""

    alpha: float
    lambda_alg: float
    tau: float
    mixup_alpha: float
    ce_weight: float
    attack_loss: str
    beta: float
    calfat_tau: float


@dataclass
class StepContext:
    """What an objective needs besides the batch."""

    config: ObjectiveSettings
    model: nn.Module
    teacher: nn.Module | None = None
    global_model: nn.Module | None = None
    log_prior: torch.Tensor | None = None  # log class prior of the client's data (CalFAT)

    def attack(self, x: torch.Tensor, targets: torch.Tensor, loss: str = "ce",
               model: nn.Module | None = None) -> torch.Tensor:
        """Adversarial examples for `x` against `model` (default: the trained model)."""
        return training_attack(model or self.model, self.config, loss)(x, targets)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def forward_views(model: nn.Module, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The model's logits on several views of one batch. Without BatchNorm, one forward over the
    concatenated views (fewer, larger kernels); with it, one forward per view, so that clean and
    adversarial images never share batch statistics."""
    if has_batchnorm(model):
        return tuple(model(v) for v in views)
    return model(torch.cat(views)).split(len(views[0]))


def ce_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
            ctx: StepContext) -> Terms:
    """FedAvg: CE(S(x), y)."""
    return {"loss": cross_entropy(model(x), y)}


def pgd_at_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """Madry adversarial training: CE(S(x_adv), y), x_adv maximising CE."""
    return {"loss": cross_entropy(model(ctx.attack(x, y)), y)}


def pmafl_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """PM-AFL: L = alpha*L_VKD + (1-alpha)*L_AKD + lambda*L_ALG (+ ce_weight * CE(S(x), y))."""
    cfg, teacher, global_model = ctx.config, ctx.teacher, ctx.global_model
    assert teacher is not None and global_model is not None
    with torch.no_grad():
        if teacher_logits is None:
            teacher_logits = teacher(x)
    lam = (torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample().item()
           if cfg.mixup_alpha > 0 else 1.0)
    perm = torch.randperm(len(x), device=x.device)
    x_mix = lam * x + (1 - lam) * x[perm]
    if cfg.attack_loss == "kl":
        x_adv = ctx.attack(x, torch.softmax(teacher_logits / cfg.tau, dim=1), loss="kl")
    else:
        x_adv = ctx.attack(x, y, loss=cfg.attack_loss)
    x_adv_mix = lam * x_adv + (1 - lam) * x_adv[perm]
    with torch.no_grad():
        teacher_mix_logits = teacher(x_mix)
        global_logits = global_model(x)
    s_clean, s_mix, s_adv, s_adv_mix = forward_views(model, x, x_mix, x_adv, x_adv_mix)
    l_vkd = vanilla_mixture_kd(s_clean, s_mix, teacher_logits, teacher_mix_logits, cfg.tau)
    l_akd = adversarial_mixture_kd(s_adv, s_adv_mix, teacher_logits, teacher_mix_logits, cfg.tau)
    l_alg = global_consistency(s_adv, global_logits)
    loss = pmafl_objective(l_vkd, l_akd, l_alg, cfg.alpha, cfg.lambda_alg)
    terms = {"loss-vkd": l_vkd, "loss-akd": l_akd, "loss-alg": l_alg}
    if cfg.ce_weight > 0:
        terms["loss-ce"] = cross_entropy(s_clean, y)
        loss = loss + cfg.ce_weight * terms["loss-ce"]
    return {"loss": loss, **terms}


def kdiga_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """KDIGA's distillation (Shao et al. 2021): (1 - alpha) CE(S(x), y) + alpha tau^2
    KL(p_T(x) || p_S(x)); the training loop adds kdiga-weight * L_GA (`pmafl.kdiga`)."""
    cfg = ctx.config
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = ctx.teacher(x)
    logits = model(x)
    l_ce, l_kl = cross_entropy(logits, y), kd_kl(logits, teacher_logits, cfg.tau)
    return {"loss": (1.0 - cfg.alpha) * l_ce + cfg.alpha * l_kl, "loss-ce": l_ce, "loss-kl": l_kl}


def fat_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """FAT-style mix of clean and adversarial training: (CE(S(x), y) + CE(S(x_adv), y)) / 2."""
    x_adv = ctx.attack(x, y)
    s_clean, s_adv = forward_views(model, x, x_adv)
    l_clean, l_adv = cross_entropy(s_clean, y), cross_entropy(s_adv, y)
    return {"loss": 0.5 * (l_clean + l_adv), "loss-clean": l_clean, "loss-adv": l_adv}


def trades_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """TRADES: CE(S(x), y) + beta * KL(p_S(x) || p_S(x_adv)), x_adv maximising that KL."""
    with torch.no_grad():
        clean_probs = torch.softmax(model.eval()(x), dim=1)
    model.train()
    x_adv = ctx.attack(x, clean_probs, loss="kl")
    s_clean, s_adv = forward_views(model, x, x_adv)
    l_ce, l_kl = cross_entropy(s_clean, y), trades_kl(s_clean, s_adv)
    return {"loss": l_ce + ctx.config.beta * l_kl, "loss-ce": l_ce, "loss-kl": l_kl}


def mart_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """MART: BCE(S(x_adv), y) + beta * KL(p_S(x) || p_S(x_adv)) * (1 - p_S(x)_y)."""
    x_adv = ctx.attack(x, y)
    s_clean, s_adv = forward_views(model, x, x_adv)
    l_bce, l_kl = mart_boosted_ce(s_adv, y), mart_weighted_kl(s_clean, s_adv, y)
    return {"loss": l_bce + ctx.config.beta * l_kl, "loss-bce": l_bce, "loss-kl": l_kl}


class _Calibrated(nn.Module):
    """model(x) + offset: the attack of CalFAT runs on calibrated logits."""

    def __init__(self, model: nn.Module, offset: torch.Tensor) -> None:
        super().__init__()
        self.model, self.offset = model, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return calibrated_logits(self.model(x), self.offset)


def calfat_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """CalFAT (Chen et al. 2022): CE(S(x_adv) + tau log pi, y), pi the client's class prior, with
    x_adv maximising KL(p(x) || p(x_adv)) between the calibrated clean and adversarial outputs (as
    the official code's `kl_adv` does; TRADES' attack on calibrated logits)."""
    assert ctx.log_prior is not None
    offset = ctx.config.calfat_tau * ctx.log_prior
    calibrated = _Calibrated(model, offset)
    with torch.no_grad():
        clean_probs = torch.softmax(calibrated.eval()(x), dim=1)
    model.train()
    x_adv = ctx.attack(x, clean_probs, loss="kl", model=calibrated)
    return {"loss": calibrated_cross_entropy(model(x_adv), y, offset)}


@dataclass(frozen=True)
class Objective:
    step: Callable[..., Terms]
    doc: str
    terms: tuple[str, ...]  # the names `step` always returns besides "loss"
    needs_teacher: bool = False
    needs_prior: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # Terms `step` returns only when a TrainConfig weight is > 0: {term: weight field}.
    weighted_terms: Mapping[str, str] = field(default_factory=dict)


_PMAFL = "PM-AFL: vanilla + adversarial mixture KD + consistency with the global model"
_PMAFL_TERMS = ("loss-vkd", "loss-akd", "loss-alg")
_PMAFL_CE = {"loss-ce": "ce_weight"}
OBJECTIVES: dict[str, Objective] = {
    "pmafl": Objective(pmafl_step, _PMAFL, _PMAFL_TERMS, needs_teacher=True, weighted_terms=_PMAFL_CE),
    "ce": Objective(ce_step, "FedAvg, clean cross-entropy", ()),
    "pgd-at": Objective(pgd_at_step, "FedAvg + Madry adversarial training", ()),
    "fat": Objective(fat_step, "clean + adversarial cross-entropy", ("loss-clean", "loss-adv")),
    "trades": Objective(trades_step, "TRADES, `beta`", ("loss-ce", "loss-kl")),
    "mart": Objective(mart_step, "MART, `beta`", ("loss-bce", "loss-kl")),
    "calfat": Objective(calfat_step, "CalFAT, calibrated by the client's class prior", (),
                        needs_prior=True),
    "kdiga": Objective(kdiga_step, "KD as in KDIGA: (1 - alpha) CE + alpha KL to the teacher, "
                       "plus `kdiga-weight` times the input-gradient alignment (0: plain KD)",
                       ("loss-ce", "loss-kl"), needs_teacher=True),
    "pmafl-no-vkd": Objective(pmafl_step, "ablation: alpha 0", _PMAFL_TERMS, True,
                              overrides={"alpha": 0.0}, weighted_terms=_PMAFL_CE),
    "pmafl-no-akd": Objective(pmafl_step, "ablation: alpha 1", _PMAFL_TERMS, True,
                              overrides={"alpha": 1.0}, weighted_terms=_PMAFL_CE),
    "pmafl-no-alg": Objective(pmafl_step, "ablation: lambda 0", _PMAFL_TERMS, True,
                              overrides={"lambda_alg": 0.0}, weighted_terms=_PMAFL_CE),
    "pmafl-no-mixup": Objective(pmafl_step, "ablation: mixup a 0", _PMAFL_TERMS, True,
                                overrides={"mixup_alpha": 0.0}, weighted_terms=_PMAFL_CE),
}


def needs_teacher(objective: str) -> bool:
    """PM-AFL and its ablations distil from the teacher; the baselines do not."""
    return OBJECTIVES[objective].needs_teacher


@dataclass(frozen=True)
class AddOn:
    """A loss term added to every objective that distils from the teacher, weighted by a
    `TrainConfig` field (0: off).

    Parameters
    ----------
    term : str
        Its metric name (a key of the client's metrics, which the server checks).
    weight : str
        The `TrainConfig` field that weights it.
    doc : str
        What it is, for errors ("the alignment term").
    loss : Callable[[nn.Module, nn.Module, Batch, nn.Module | None], torch.Tensor]
        The term on one batch: `loss(model, teacher, batch, module)`; `module` is what `module`
        built (None without one). It reads the batch's fields by name, computing a missing one
        itself.
    batch_fields : tuple of str
        The precomputed `Batch` fields it reads (`teacher_input_grads`): a node computes them
        once, on its un-augmented images, and carries them in every batch
        (`client_app.handlers`).
    module : Callable[[nn.Module, nn.Module, torch.Tensor, Any], nn.Module] or None
        Builds a trainable module the term needs besides the model (RobustKD's connectors):
        `module(model, teacher, images, config)`, `images` the client's first clean images. It
        trains with the model, is not part of the global model, and its state carries over the
        rounds through `train_model`'s `add_on_state`.
    """

    term: str
    weight: str
    doc: str
    loss: Callable[[nn.Module, nn.Module, Batch, nn.Module | None], torch.Tensor]
    batch_fields: tuple[str, ...] = ()
    module: Callable[[nn.Module, nn.Module, torch.Tensor, Any], nn.Module] | None = None


ADD_ONS: dict[str, AddOn] = {
    "kdiga": AddOn("loss-ga", "kdiga_weight", "the alignment term", alignment_term,
                   batch_fields=("teacher_input_grads",)),
    "robustkd": AddOn("loss-feat", "robustkd_weight", "feature distillation", feature_term,
                      module=lambda model, teacher, images, config: feature_module(
                          model, teacher, images, config.robustkd_noise)),
}


def active_add_ons(config: Any) -> dict[str, AddOn]:
    """The add-ons whose weight in `config` (a `TrainConfig`) is > 0."""
    return {name: add_on for name, add_on in ADD_ONS.items() if getattr(config, add_on.weight) > 0}
