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

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pmafl.config import TrainConfig
from pmafl.kdiga import gradient_alignment, input_gradient
from pmafl.objectives import OBJECTIVES, StepContext
from pmafl.protocol import NUM_EXAMPLES
from pmafl.robustkd import MARGIN_IMAGES, FeatureDistiller, architecture

# The add-on terms the training loop adds to any distilling objective: {term: TrainConfig weight}.
ADD_ON_TERMS = {"loss-ga": "kdiga_weight", "loss-feat": "robustkd_weight"}


def train_metric_names(config: TrainConfig) -> frozenset[str]:
    """The metric keys `pmafl_train` returns for `config`: "loss", the objective's terms, every
    weighted term (the objective's own and the add-ons, `ADD_ON_TERMS`) whose weight is > 0, and
    "num-examples". A server checks every train reply against them."""
    objective = OBJECTIVES[config.objective]
    config = dataclasses.replace(config, **objective.overrides)
    weighted = {**objective.weighted_terms, **ADD_ON_TERMS}
    return frozenset({"loss", *objective.terms, NUM_EXAMPLES,
                      *(term for term, weight in weighted.items() if getattr(config, weight) > 0)})


def warmup_eps(eps: float, warmup_rounds: int, server_round: int) -> float:
    """The training radius of a round under a linear warm-up: eps * min(1, round / warmup_rounds)
    (the full eps when warmup_rounds is 0)."""
    return eps * min(1.0, server_round / warmup_rounds) if warmup_rounds > 0 else eps


def class_log_prior(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log pi, the class prior of a client's labels (CalFAT). A class the client lacks counts as
    one example, as in the official code, so that its calibration stays finite."""
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1.0)
    return (counts / counts.sum()).log().float()


def _labels_and_classes(model: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, int]:
    """All labels of the loader's dataset, and the model's number of classes."""
    dataset = loader.dataset
    if isinstance(dataset, TensorDataset):
        labels = dataset.tensors[1]
    else:
        labels = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
    was_training = model.training
    with torch.no_grad():
        num_classes = model.eval()(dataset[0][0][None].to(next(model.parameters()).device)).shape[1]
    model.train(was_training)
    return labels.long(), num_classes


def pmafl_train(model: nn.Module, teacher: nn.Module | None, loader: DataLoader,
                config: TrainConfig, features: FeatureDistiller | None = None) -> dict[str, float]:
    """Train `model` in place on `loader` with `config.objective`; return mean loss terms.

    `loader` yields `(images, labels)`, `(images, labels, teacher_logits)` or `(images, labels,
    teacher_logits, teacher_input_grads)`, images in [0, 1]; the teacher's logits and input
    gradients on the un-augmented images (`pmafl.kdiga.teacher_input_gradients`), precomputed,
    save teacher passes in every batch. `teacher` is required by the objectives that distil
    (`pmafl`, its ablations, `kdiga`) and ignored by the baselines. With `config.kdiga_weight` > 0
    those objectives also minimise kdiga_weight * L_GA (`pmafl.kdiga.gradient_alignment`), and
    with `config.robustkd_weight` > 0, robustkd_weight * RobustKD's feature term (`features`, a
    `pmafl.robustkd.FeatureDistiller` whose connectors train along; pass the same one every round
    to keep them, or None for a fresh one; `teacher` is then the detoxified teacher,
    `pmafl.teacher.load_detoxified`). Training runs on the device that holds `model`.
    """
    if config.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {config.objective!r}; known: {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[config.objective]
    config = dataclasses.replace(config, **objective.overrides)
    if objective.needs_teacher and teacher is None:
        raise ValueError(f"objective {config.objective!r} needs a teacher model")
    if config.kdiga_weight > 0 and not objective.needs_teacher:
        raise ValueError(f"kdiga-weight needs an objective that distils from the teacher, got "
                         f"{config.objective!r}")
    if config.robustkd_weight > 0 and not objective.needs_teacher:
        raise ValueError(f"robustkd-weight needs an objective that distils from the teacher, got "
                         f"{config.objective!r}")
    align = config.kdiga_weight > 0
    device = next(model.parameters()).device
    ctx = StepContext(config, model)
    if objective.needs_teacher:
        ctx.teacher = teacher.eval()
        ctx.global_model = copy.deepcopy(model).eval().requires_grad_(False)
    if objective.needs_prior:
        ctx.log_prior = class_log_prior(*_labels_and_classes(model, loader)).to(device)
    params = list(model.parameters())
    if config.robustkd_weight > 0:
        if features is None:
            dataset = loader.dataset
            images = torch.stack([dataset[i][0] for i in range(min(MARGIN_IMAGES, len(dataset)))]).to(device)
            features = FeatureDistiller.build(model, architecture(model), teacher,
                                              architecture(teacher), images, config.robustkd_noise)
        features.noise = config.robustkd_noise
        features.train()
        params += list(features.parameters())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    model.train()
    for _ in range(config.local_epochs):
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            teacher_logits = batch[2].to(device) if len(batch) > 2 and objective.needs_teacher else None
            terms = objective.step(model, x, y, teacher_logits, ctx)
            if align:
                teacher_grad = (batch[3].to(device) if len(batch) > 3
                                else input_gradient(ctx.teacher, x, y))
                terms["loss-ga"] = gradient_alignment(model, x, y, teacher_grad)
                terms["loss"] = terms["loss"] + config.kdiga_weight * terms["loss-ga"]
            if features is not None and config.robustkd_weight > 0:
                terms["loss-feat"] = features(model, ctx.teacher, x)
                terms["loss"] = terms["loss"] + config.robustkd_weight * terms["loss-feat"]
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            for name, value in terms.items():
                sums[name] += value.item() * len(x)
            seen += len(x)
    metrics = {name: total / max(seen, 1) for name, total in sums.items()}
    metrics[NUM_EXAMPLES] = len(loader.dataset)
    return metrics
