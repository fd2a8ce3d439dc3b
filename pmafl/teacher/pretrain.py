"""Pre-training a teacher on the public split, and building a missing one into the cache.

`ensure_teacher` pre-trains a missing teacher under a file lock, so that processes sharing one
cache build it once, and records its test accuracy and pre-training time beside it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from pmafl.backdoor import attack_success_rate, poison
from pmafl.config import TrainConfig
from pmafl.data import FederatedData, Split, make_loader
from pmafl.evaluate import evaluate
from pmafl.models import create_model
from pmafl.teacher.cache import load_teacher, save_teacher, teacher_record
from pmafl.teacher.settings import TeacherSettings
from pmafl.train import train_model

log = logging.getLogger(__name__)


def pretrain_teacher(data: FederatedData, settings: TeacherSettings,
                     device: str | torch.device = "cpu") -> nn.Module:
    """Train a teacher on `data`'s public split as `settings` say (`train_model` with objective
    `settings.objective`, one epoch at a time, the radius ramped up over the first
    epochs / `settings.ramp_divisor` epochs); returns it in eval mode."""
    torch.manual_seed(settings.seed)
    model = create_model(settings.model, data.num_classes, data.in_channels, data.mean,
                         data.std).to(device)
    images, labels = data.public.tensors()
    trigger = settings.trigger()
    if trigger is not None:  # an experiment's backdoored teacher: BadNets on the public split
        images, labels, poisoned = poison(images, labels, trigger, settings.backdoor["rate"],
                                          settings.seed)
        log.info("teacher pre-training: BACKDOOR planted in %d of %d public images (%s)",
                 len(poisoned), len(labels), settings.backdoor)
    loader = make_loader(images, labels, batch_size=settings.batch_size, shuffle=True,
                         seed=settings.seed)
    ramp_epochs = max(1.0, settings.epochs / settings.ramp_divisor)
    start = time.time()
    for epoch in range(1, settings.epochs + 1):
        config = TrainConfig(objective=settings.objective, local_epochs=1, lr=settings.lr,
                             momentum=settings.momentum, weight_decay=settings.weight_decay,
                             grad_clip=settings.grad_clip,
                             eps=settings.eps * min(1.0, epoch / ramp_epochs),
                             train_attack=settings.attack, pgd_steps=settings.pgd_steps,
                             pgd_step_ratio=settings.pgd_step_ratio)
        metrics = train_model(model, None, loader, config)
        log.info("teacher pre-training (%s, %s, %s): epoch %d/%d, loss %.3f, %.0fs", settings.model,
                 settings.objective, settings.attack, epoch, settings.epochs, metrics["loss"],
                 time.time() - start)
    return model.eval()


def ensure_teacher(path: Path, data: FederatedData, settings: TeacherSettings, test: Split,
                   expected_sha256: str = "", device: str | torch.device = "cpu"
                   ) -> tuple[nn.Module, str]:
    """Load the cached teacher at `path`, pre-training and caching it first when absent; a new
    teacher's clean and PGD-20 accuracy on `test` and its pre-training time go into its record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            log.info("teacher cache: %s absent, pre-training it on the public split (%d images)",
                     path, len(data.public))
            start = time.time()
            model = pretrain_teacher(data, settings, device=device)
            seconds = time.time() - start
            x, y = test.tensors()
            scores = evaluate(model, x, y, settings.eps, steps=20)
            meta = {**teacher_record(data, settings), "test_examples": len(y),
                    "test_clean_acc": scores["clean_acc"], "test_pgd_acc": scores["pgd_acc"],
                    "pretrain_seconds": round(seconds, 1), "pretrain_device": str(device)}
            trigger = settings.trigger()
            if trigger is not None:
                meta["test_asr"] = attack_success_rate(model, x, y, trigger)
            sha256 = save_teacher(model, path, meta)
            log.info("teacher cache: saved %s (sha256 %s), on %d test images: clean %.3f, "
                     "PGD-20 %.3f%s", path, sha256, len(y), scores["clean_acc"], scores["pgd_acc"],
                     f", backdoor ASR {meta['test_asr']:.3f}" if "test_asr" in meta else "")
    return load_teacher(path, data.num_classes, expected_sha256, device, settings)
