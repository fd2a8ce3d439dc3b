"""Local training: one loop for every objective, the add-on terms on top.

`train_model(model, teacher, loader, config)` is the client-side function any Flower ClientApp
(or plain script) can call: it trains `model` in place for `config.local_epochs` epochs with
`config.objective` (`pmafl.objectives.OBJECTIVES`: PM-AFL, its ablations, the baselines, the
teacher's own pre-training), adds every add-on term whose weight is > 0
(`pmafl.objectives.ADD_ONS`: KDIGA, RobustKD), and returns the mean of every loss term plus
`num-examples`. The frozen global model G of PM-AFL's consistency term is the model as it was
when the call started, i.e. the global model the client received. `pmafl_train` is the same
function under the name the plug-in API has always had.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

from pmafl.attacks.factory import training_attack
from pmafl.batch import Batch
from pmafl.config import TrainConfig
from pmafl.objectives import ADD_ONS, OBJECTIVES, StepContext, active_add_ons
from pmafl.protocol import GLOBAL_LOSS, NUM_EXAMPLES
from pmafl.robustkd import MARGIN_IMAGES


def train_metric_names(config: TrainConfig) -> frozenset[str]:
    """The metric keys `train_model` returns for `config`: "loss", the objective's terms, every
    weighted term (the objective's own and the add-ons') whose weight is > 0, and
    "num-examples", and `global-loss` with `fair-q` > 0. A server checks every train reply
    against them."""
    objective = OBJECTIVES[config.objective]
    config = dataclasses.replace(config, **objective.overrides)
    weighted = {**objective.weighted_terms, **{a.term: a.weight for a in ADD_ONS.values()}}
    return frozenset({"loss", *objective.terms, NUM_EXAMPLES,
                      *((GLOBAL_LOSS,) if config.fair_q > 0 else ()),
                      *(term for term, weight in weighted.items() if getattr(config, weight) > 0)})


def warmup_eps(eps: float, warmup_rounds: int, server_round: int) -> float:
    """The training radius of a round under a linear warm-up: eps * min(1, round / warmup_rounds)
    (the full eps when warmup_rounds is 0)."""
    return eps * min(1.0, server_round / warmup_rounds) if warmup_rounds > 0 else eps


def global_loss(model: nn.Module, loader: DataLoader, config: TrainConfig) -> float:
    """q-FFL's F_k for adversarial training: the mean cross-entropy of `model` (in eval mode, as
    received) on the training attack's examples of every image in `loader` (`train-attack` at
    `eps`, against the labels). It reads the whole of the loader's dataset in order (the loader's
    `collate_fn`, not its sampler) and draws the attack's random start under a forked torch RNG:
    local training shuffles and draws the same torch numbers with or without this measurement.
    Costs one training-attack pass and one forward pass over the data."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    attack = training_attack(model, config)
    total, seen = 0.0, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for tensors in DataLoader(loader.dataset, batch_size=loader.batch_size or 256,
                                  collate_fn=loader.collate_fn):
            batch = Batch.of(tensors, device)
            x_adv = attack(batch.images, batch.labels)
            with torch.no_grad():
                total += cross_entropy(model(x_adv), batch.labels, reduction="sum").item()
            seen += len(batch.labels)
    model.train(was_training)
    return total / max(seen, 1)


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


def _first_images(loader: DataLoader, device: torch.device) -> torch.Tensor:
    """The loader's first `MARGIN_IMAGES` images, in dataset order (what an add-on's module is
    built from)."""
    dataset = loader.dataset
    return torch.stack([dataset[i][0] for i in range(min(MARGIN_IMAGES, len(dataset)))]).to(device)


def train_model(model: nn.Module, teacher: nn.Module | None, loader: DataLoader,
                config: TrainConfig, add_on_state: dict[str, Any] | None = None) -> dict[str, float]:
    """Train `model` in place on `loader` with `config.objective`; return mean loss terms.

    Parameters
    ----------
    model : nn.Module
        The model to train (the received global model), on the device training runs on.
    teacher : nn.Module or None
        Required by the objectives that distil (`pmafl`, its ablations, `kdiga`), ignored by the
        others; with `robustkd-weight` > 0, the detoxified teacher
        (`pmafl.teacher.load_detoxified`).
    loader : DataLoader
        Yields `(images, labels)`, `(images, labels, teacher_logits)` or `(images, labels,
        teacher_logits, teacher_input_grads)` (`pmafl.batch.Batch`), images in [0, 1]; the
        teacher's logits and input gradients on the un-augmented images
        (`pmafl.kdiga.teacher_input_gradients`), precomputed, save teacher passes in every batch.
    config : TrainConfig
        The objective, its hyperparameters and the add-ons' weights.
    add_on_state : dict or None
        The state of the add-ons' trainable modules (RobustKD's connectors), by add-on name: read
        when present, written back after training. Pass the same dict every round to keep them;
        None starts fresh ones. A module is built under a forked RNG, so building it draws no
        random numbers from local training's.

    Returns
    -------
    dict[str, float]
        The mean of every loss term over the examples seen, `num-examples`, and with
        `fair-q` > 0 `global-loss` (`global_loss` of the model as received).
    """
    if config.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {config.objective!r}; known: {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[config.objective]
    config = dataclasses.replace(config, **objective.overrides)
    if objective.needs_teacher and teacher is None:
        raise ValueError(f"objective {config.objective!r} needs a teacher model")
    add_ons = active_add_ons(config)
    for add_on in add_ons.values():
        if not objective.needs_teacher:
            raise ValueError(f"{add_on.weight.replace('_', '-')} needs an objective that distils "
                             f"from the teacher, got {config.objective!r}")
    device = next(model.parameters()).device
    ctx = StepContext(config, model)
    if objective.needs_teacher:
        ctx.teacher = teacher.eval()
        ctx.global_model = copy.deepcopy(model).eval().requires_grad_(False)
    if objective.needs_prior:
        ctx.log_prior = class_log_prior(*_labels_and_classes(model, loader)).to(device)
    fairness = {GLOBAL_LOSS: global_loss(model, loader, config)} if config.fair_q > 0 else {}
    params = list(model.parameters())
    modules: dict[str, nn.Module] = {}
    for name, add_on in add_ons.items():
        if add_on.module is None:
            continue
        # Built from the RNG as the caller seeded it (a client, per round): its first weights are
        # the same in every run with one seed, and local training draws as if it were not built.
        with torch.random.fork_rng(devices=[]):
            module = add_on.module(model, ctx.teacher, _first_images(loader, device), config)
        if add_on_state and name in add_on_state:
            module.load_state_dict(add_on_state[name])
        modules[name] = module.to(device).train()
        params += list(module.parameters())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    model.train()
    for _ in range(config.local_epochs):
        for tensors in loader:
            batch = Batch.of(tensors, device)
            x, y = batch.images, batch.labels
            teacher_logits = batch.teacher_logits if objective.needs_teacher else None
            terms = objective.step(model, x, y, teacher_logits, ctx)
            for name, add_on in add_ons.items():
                terms[add_on.term] = add_on.loss(model, ctx.teacher, batch, modules.get(name))
                terms["loss"] = terms["loss"] + getattr(config, add_on.weight) * terms[add_on.term]
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            for name, value in terms.items():
                sums[name] += value.item() * len(x)
            seen += len(x)
    if add_on_state is not None:
        for name, module in modules.items():
            add_on_state[name] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    metrics = {name: total / max(seen, 1) for name, total in sums.items()}
    metrics[NUM_EXAMPLES] = len(loader.dataset)
    return {**metrics, **fairness}


# The plug-in API's name for `train_model` (README, docs/plugin.md).
pmafl_train = train_model
