"""Local training: one loop, objectives composed from the loss terms in `pmafl.losses`.

`pmafl_train(model, teacher, loader, config)` is the client-side function any Flower ClientApp
(or plain script) can call: it trains `model` in place for `config.local_epochs` epochs and returns
the mean of every loss term plus `num-examples`. The frozen global model G of PM-AFL's consistency
term is the model as it was when the call started, i.e. the global model the client received.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from pmafl.attacks import PGD
from pmafl.config import ABLATIONS, TrainConfig
from pmafl.losses import (
    adversarial_mixture_kd,
    cross_entropy,
    global_consistency,
    mart_boosted_ce,
    mart_weighted_kl,
    pmafl_objective,
    trades_kl,
    vanilla_mixture_kd,
)


@dataclass
class StepContext:
    """What an objective needs besides the batch."""

    config: TrainConfig
    attack: PGD
    kl_attack: PGD
    teacher: nn.Module | None = None
    global_model: nn.Module | None = None


Terms = dict[str, torch.Tensor]


def ce_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
            ctx: StepContext) -> Terms:
    """FedAvg: CE(S(x), y)."""
    return {"loss": cross_entropy(model(x), y)}


def pgd_at_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """Madry PGD-AT: CE(S(x_adv), y) with x_adv from PGD-K on CE."""
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
    targets = y if cfg.attack_loss == "ce" else torch.softmax(teacher_logits / cfg.tau, dim=1)
    x_adv = ctx.attack(x, targets)
    x_adv_mix = lam * x_adv + (1 - lam) * x_adv[perm]
    with torch.no_grad():
        teacher_mix_logits = teacher(x_mix)
        global_logits = global_model(x)
    # One forward over the four views: fewer, larger kernels than four small calls.
    s_clean, s_mix, s_adv, s_adv_mix = model(torch.cat([x, x_mix, x_adv, x_adv_mix])).split(len(x))
    l_vkd = vanilla_mixture_kd(s_clean, s_mix, teacher_logits, teacher_mix_logits, cfg.tau)
    l_akd = adversarial_mixture_kd(s_adv, s_adv_mix, teacher_logits, teacher_mix_logits, cfg.tau)
    l_alg = global_consistency(s_adv, global_logits)
    loss = pmafl_objective(l_vkd, l_akd, l_alg, cfg.alpha, cfg.lambda_alg)
    terms = {"loss-vkd": l_vkd, "loss-akd": l_akd, "loss-alg": l_alg}
    if cfg.ce_weight > 0:
        terms["loss-ce"] = cross_entropy(s_clean, y)
        loss = loss + cfg.ce_weight * terms["loss-ce"]
    return {"loss": loss, **terms}


def fat_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """FAT-style mix of clean and adversarial training: (CE(S(x), y) + CE(S(x_adv), y)) / 2."""
    x_adv = ctx.attack(x, y)
    s_clean, s_adv = model(torch.cat([x, x_adv])).split(len(x))
    l_clean, l_adv = cross_entropy(s_clean, y), cross_entropy(s_adv, y)
    return {"loss": 0.5 * (l_clean + l_adv), "loss-clean": l_clean, "loss-adv": l_adv}


def trades_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """TRADES: CE(S(x), y) + beta * KL(p_S(x) || p_S(x_adv)), x_adv maximising that KL."""
    with torch.no_grad():
        clean_probs = torch.softmax(model.eval()(x), dim=1)
    model.train()
    x_adv = ctx.kl_attack(x, clean_probs)
    s_clean, s_adv = model(torch.cat([x, x_adv])).split(len(x))
    l_ce, l_kl = cross_entropy(s_clean, y), trades_kl(s_clean, s_adv)
    return {"loss": l_ce + ctx.config.beta * l_kl, "loss-ce": l_ce, "loss-kl": l_kl}


def mart_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              teacher_logits: torch.Tensor | None, ctx: StepContext) -> Terms:
    """MART: BCE(S(x_adv), y) + beta * KL(p_S(x) || p_S(x_adv)) * (1 - p_S(x)_y)."""
    x_adv = ctx.attack(x, y)
    s_clean, s_adv = model(torch.cat([x, x_adv])).split(len(x))
    l_bce, l_kl = mart_boosted_ce(s_adv, y), mart_weighted_kl(s_clean, s_adv, y)
    return {"loss": l_bce + ctx.config.beta * l_kl, "loss-bce": l_bce, "loss-kl": l_kl}


OBJECTIVES: dict[str, Callable[..., Terms]] = {
    "pmafl": pmafl_step, "ce": ce_step, "pgd-at": pgd_at_step, "fat": fat_step,
    "trades": trades_step, "mart": mart_step}



def pmafl_train(model: nn.Module, teacher: nn.Module | None, loader: DataLoader,
                config: TrainConfig) -> dict[str, float]:
    """Train `model` in place on `loader` with `config.objective`; return mean loss terms.

    `loader` yields `(images, labels)` or `(images, labels, teacher_logits)`, images in [0, 1];
    precomputed teacher logits on the un-augmented images save one teacher forward per batch.
    `teacher` is required by the `pmafl` objective and ignored by the baselines. Training runs on
    the device that holds `model`.
    """
    if config.objective in ABLATIONS:
        config = dataclasses.replace(config, objective="pmafl", **ABLATIONS[config.objective])
    if config.objective not in OBJECTIVES:
        known = ", ".join([*OBJECTIVES, *ABLATIONS])
        raise ValueError(f"unknown objective {config.objective!r}; known: {known}")
    needs_teacher = config.objective == "pmafl"
    if needs_teacher and teacher is None:
        raise ValueError("objective 'pmafl' needs a teacher model")
    device = next(model.parameters()).device
    global_model = None
    if needs_teacher:
        teacher.eval()
        global_model = copy.deepcopy(model).eval().requires_grad_(False)
    attack = PGD(model, config.eps, config.pgd_step, config.pgd_steps, loss=config.attack_loss)
    kl_attack = PGD(model, config.eps, config.pgd_step, config.pgd_steps, loss="kl")
    ctx = StepContext(config, attack, kl_attack, teacher, global_model)
    step = OBJECTIVES[config.objective]
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    model.train()
    for _ in range(config.local_epochs):
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            teacher_logits = batch[2].to(device) if len(batch) > 2 and needs_teacher else None
            terms = step(model, x, y, teacher_logits, ctx)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            for name, value in terms.items():
                sums[name] += value.item() * len(x)
            seen += len(x)
    metrics = {name: total / max(seen, 1) for name, total in sums.items()}
    metrics["num-examples"] = len(loader.dataset)
    return metrics
