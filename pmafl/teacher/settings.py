"""What defines a teacher: every setting of its pre-training, one dataclass, and its cache key.

Two teachers with equal settings are the same file (pre-training is seeded); any setting that
differs gives another cache key, so the cache never serves a teacher trained otherwise under the
name of this one. The dataclass holds every knob `pretrain_teacher` reads, the optimiser's and the
attack's included: a new default for any of them trains new teachers under new names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pmafl.assembly import backdoor_trigger
from pmafl.backdoor import Trigger
from pmafl.config import RunConfig
from pmafl.data import SPLIT_SEED


@dataclass(frozen=True)
class TeacherSettings:
    """A teacher's pre-training on the public split, in full.

    Parameters
    ----------
    dataset, model : str
        The dataset (its public split) and the architecture, by registry name.
    objective : str
        `ce` or `pgd-at` (`pmafl.objectives`).
    attack : str
        The training attack: `pgd` (PGD-`pgd_steps`, step eps * `pgd_step_ratio`) or `fgsm-rs`.
    epochs : int
        Epochs over the public split.
    eps : float
        The attack radius; it ramps up linearly over the first epochs / `ramp_divisor` epochs
        (adversarial training at the full radius from a random start does not get off the ground
        on small data).
    public_fraction, split_seed : float, int
        Which public split the teacher trained on: the share of the training split kept public,
        and the seed that drew it (`pmafl.data.SPLIT_SEED`). `pretrain_teacher` trains on the
        split it is given; these say which one that was.
    lr, momentum, weight_decay, grad_clip, batch_size : float, float, float, float, int
        SGD on the public split (`grad_clip` 0: none; plain adversarial cross-entropy does not
        diverge here).
    seed : int
        Torch seed of the initial weights and the batch order.
    backdoor : dict or None
        An experiment's planted BadNets backdoor: poison `rate` and the trigger's fields
        (`pmafl.backdoor.Trigger`); None for a clean teacher, whose settings then hold no
        `backdoor` key at all.
    """

    dataset: str
    model: str
    objective: str
    attack: str
    epochs: int
    eps: float
    public_fraction: float
    split_seed: int = SPLIT_SEED
    ramp_divisor: int = 3
    pgd_steps: int = 10
    pgd_step_ratio: float = 0.25
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float = 0.0
    batch_size: int = 64
    seed: int = 0
    backdoor: dict[str, Any] | None = None

    @classmethod
    def from_run_config(cls, cfg: RunConfig) -> TeacherSettings:
        """The teacher a run distils from: the run's `teacher-*` keys, its dataset, radius and
        public split, and its planted backdoor (`backdoor-rate` > 0)."""
        backdoor = None
        if cfg.backdoor_rate > 0:
            backdoor = {"rate": cfg.backdoor_rate, **backdoor_trigger(cfg).to_dict()}
        return cls(dataset=cfg.dataset, model=cfg.teacher_model, objective=cfg.teacher_objective,
                   attack=cfg.teacher_attack, epochs=cfg.teacher_epochs, eps=cfg.train.eps,
                   public_fraction=cfg.public_fraction, backdoor=backdoor)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> TeacherSettings:
        """Settings as a record stores them; `where` (the record) names a record that does not
        hold exactly these fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not isinstance(values, dict) or not required <= set(values) <= names:
            raise ValueError(f"{where}: the teacher's settings must hold {sorted(required)} and at "
                             f"most {sorted(names - required)}, got {values!r}")
        if not isinstance(values.get("backdoor") or {}, dict):
            raise ValueError(f"{where}: the teacher's 'backdoor' setting must be an object (rate and "
                             f"trigger), got {values['backdoor']!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a record stores them (no `backdoor` key for a clean teacher)."""
        values = dataclasses.asdict(self)
        if values["backdoor"] is None:
            del values["backdoor"]
        return values

    def key(self) -> str:
        """A short hash of every setting: part of the teacher's file name."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]

    def file_name(self) -> str:
        """`<dataset>--<model>--<key>.pt`, the teacher's name in a cache."""
        return f"{self.dataset}--{self.model.replace('/', '_')}--{self.key()}.pt"

    def trigger(self) -> Trigger | None:
        """The planted backdoor's trigger (None for a clean teacher)."""
        if self.backdoor is None:
            return None
        return Trigger(**{k: v for k, v in self.backdoor.items() if k != "rate"})
