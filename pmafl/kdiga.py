"""KDIGA: knowledge distillation with input-gradient alignment (Shao, Yi, Chen, Hsieh, "How and
When Adversarial Robustness Transfers in Knowledge Distillation?", arXiv 2110.12072).

Plain KD matches the teacher's outputs and loses its robustness; matching its input gradients as
well transfers it. The alignment term L_GA (`gradient_alignment`) is added, weighted by
`kdiga-weight`, to every objective that distils from the teacher: the `kdiga` objective
((1 - alpha) CE + alpha tau^2 KL(p_T || p_S), no adversarial examples; with weight 0 it is plain
KD) and PM-AFL and its ablations.

The teacher's input gradients on a client's un-augmented images never change, like its logits:
`teacher_input_gradients` computes them once per node (one float per input pixel: a Fashion-MNIST
client of 200 images keeps 0.6 MB, all 60,000 training images would be 188 MB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pmafl.batch import Batch


def input_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                   create_graph: bool = False) -> torch.Tensor:
    """grad_x CE(model(x_i), y_i) for every sample i: the CE is summed over the batch, so each
    sample's gradient is its own loss's (a batch mean would divide it by the batch size).
    `create_graph=True` keeps the graph for a second back-propagation through the model."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, create_graph=create_graph)
    return grad


def gradient_alignment(student: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                       teacher_input_grad: torch.Tensor) -> torch.Tensor:
    """L_GA = mean_i || grad_x CE(S(x_i), y_i) - grad_x CE(T(x_i), y_i) ||_2 (a plain L2 norm per
    sample, averaged, as in the first author's code). The student's gradient keeps its graph
    (double back-propagation), so L_GA trains the student's weights; the teacher's is a
    constant."""
    student_grad = input_gradient(student, x, labels, create_graph=True)
    return torch.linalg.vector_norm((student_grad - teacher_input_grad).flatten(1), dim=1).mean()


def teacher_input_gradients(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                            chunk: int = 512) -> torch.Tensor:
    """grad_x CE(T(x_i), y_i) of the frozen teacher (eval mode) on every image, on the CPU."""
    device = next(teacher.parameters()).device
    teacher.eval()
    return torch.cat([input_gradient(teacher, x.to(device), y.to(device)).cpu()
                      for x, y in zip(images.split(chunk), labels.split(chunk), strict=True)])


def alignment_term(model: nn.Module, teacher: nn.Module, batch: Batch, module: None) -> torch.Tensor:
    """KDIGA's add-on term (`pmafl.objectives.ADD_ONS`): L_GA on the batch, against the teacher's
    input gradients the batch carries (`teacher_input_grads`, precomputed once per node) or,
    without them, computed here."""
    teacher_grad = batch.teacher_input_grads
    if teacher_grad is None:
        teacher_grad = input_gradient(teacher, batch.images, batch.labels)
    return gradient_alignment(model, batch.images, batch.labels, teacher_grad)
