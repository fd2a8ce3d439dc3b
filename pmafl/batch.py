"""A batch of local training, by field name.

A loader of local training yields tuples in the order of `Batch`'s fields: `(images, labels)`,
`(images, labels, teacher_logits)` or `(images, labels, teacher_logits, teacher_input_grads)`;
the training loop names them (`Batch.of`), and the objectives and add-on terms read them by name.
The teacher's logits and input gradients on a client's un-augmented images never change: computed
once per node and carried in the batch, they save a teacher pass in every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Batch:
    """One batch: images in [0, 1] and their labels, plus what was precomputed for them."""

    images: torch.Tensor
    labels: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    teacher_input_grads: torch.Tensor | None = None

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], device: torch.device) -> Batch:
        """The loader's tuple as a `Batch` on `device` (fields in declaration order)."""
        if not 2 <= len(tensors) <= len(fields(cls)):
            raise ValueError(f"a training batch holds 2 to {len(fields(cls))} tensors ("
                             f"{', '.join(f.name for f in fields(cls))}), got {len(tensors)}")
        return cls(*(t.to(device) for t in tensors))
