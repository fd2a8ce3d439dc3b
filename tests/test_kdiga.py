"""KDIGA: the input gradient against a linear softmax classifier's closed form, L_GA by hand,
its gradient to the student's weights against finite differences, and the objective."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pmafl.config import ConfigError, RunConfig, TrainConfig
from pmafl.data import make_loader
from pmafl.kdiga import gradient_alignment, input_gradient, teacher_input_gradients
from pmafl.objectives import StepContext, kdiga_step
from pmafl.train import train_model


def linear(seed, classes=3, pixels=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(pixels, classes)).double()


X = torch.rand(5, 1, 2, 2, dtype=torch.float64)
Y = torch.tensor([0, 1, 2, 1, 0])


def closed_form_gradient(model, x, y):
    """grad_x CE(Wx + b, y) = W^T (softmax(Wx + b) - onehot(y)) for a linear softmax classifier."""
    layer = model[1]
    probs = F.softmax(layer(x.flatten(1)), dim=1)
    return ((probs - F.one_hot(y, probs.shape[1])) @ layer.weight).view_as(x)


def test_input_gradient_is_the_linear_classifiers_closed_form():
    model = linear(0)
    assert torch.allclose(input_gradient(model, X, Y), closed_form_gradient(model, X, Y))
    assert torch.allclose(teacher_input_gradients(model, X, Y, chunk=2), closed_form_gradient(model, X, Y))


def test_alignment_is_the_mean_l2_distance_of_input_gradients():
    student, teacher = linear(0), linear(1)
    diff = closed_form_gradient(student, X, Y) - closed_form_gradient(teacher, X, Y)
    manual = sum(diff[i].pow(2).sum().sqrt() for i in range(len(X))) / len(X)
    value = gradient_alignment(student, X, Y, input_gradient(teacher, X, Y))
    assert value.item() == pytest.approx(manual.item())


def test_alignment_gradient_reaches_the_students_weights_as_finite_differences_say():
    """Double back-propagation: a detached student gradient (a known bug elsewhere) would give
    zero here."""
    student, teacher = linear(0), linear(1)
    target = input_gradient(teacher, X, Y)
    gradient_alignment(student, X, Y, target).backward()
    weight = student[1].weight
    h = 1e-6
    for i, j in ((0, 0), (1, 2), (2, 3)):
        with torch.no_grad():
            weight[i, j] += h
            up = gradient_alignment(student, X, Y, target).item()
            weight[i, j] -= 2 * h
            down = gradient_alignment(student, X, Y, target).item()
            weight[i, j] += h
        assert weight.grad[i, j].item() == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)
    assert weight.grad.abs().sum() > 0


def test_kdiga_objective_is_ce_and_kl_by_hand():
    student, teacher = linear(0), linear(1)
    ctx = StepContext(TrainConfig(objective="kdiga", alpha=0.25, tau=2.0), student, teacher=teacher)
    terms = kdiga_step(student, X, Y, None, ctx)
    s, t = student(X), teacher(X)
    ce = F.cross_entropy(s, Y)
    p_t = F.softmax(t / 2, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 2, dim=1))).sum(dim=1).mean() * 4
    assert terms["loss"].item() == pytest.approx((0.75 * ce + 0.25 * kl).item())


def test_training_adds_the_weighted_term_and_cached_gradients_change_nothing():
    teacher = linear(1).float()
    images, labels = X.float(), Y
    with torch.no_grad():
        logits = teacher(images)
    grads = teacher_input_gradients(teacher, images, labels)
    results = []
    for tensors in ((images, labels, logits), (images, labels, logits, grads)):
        student = linear(0).float()
        loader = make_loader(*tensors, batch_size=5, shuffle=False)
        metrics = train_model(student, teacher, loader, TrainConfig(objective="kdiga", kdiga_weight=2.0,
                                                                    local_epochs=1))
        results.append((metrics, student[1].weight.detach().clone()))
    (first, w_first), (second, w_second) = results
    assert first["loss"] == pytest.approx((0.5 * first["loss-ce"] + 0.5 * first["loss-kl"])
                                          + 2.0 * first["loss-ga"])
    assert first == pytest.approx(second) and torch.allclose(w_first, w_second)
    plain = train_model(linear(0).float(), teacher, make_loader(images, labels, batch_size=5, shuffle=False),
                        TrainConfig(objective="kdiga", local_epochs=1))
    assert "loss-ga" not in plain


def test_kdiga_weight_needs_an_objective_with_a_teacher():
    with pytest.raises(ConfigError, match="key 'kdiga-weight'"):
        RunConfig.from_mapping({"objective": "pgd-at", "kdiga-weight": 1.0})
    assert RunConfig.from_mapping({"objective": "pmafl", "kdiga-weight": 1.0}).train.kdiga_weight == 1.0
