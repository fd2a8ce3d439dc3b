"""PGD: stays in the eps-ball and [0, 1], raises the loss, leaves the model's mode alone."""

import pytest
import torch
import torch.nn.functional as F

from pmafl.attacks import FGSM, FGSMRS, PGD, AutoAttack
from pmafl.attacks.pgd import cw_attack_loss
from pmafl.models import create_model


def setup_model():
    torch.manual_seed(0)
    model = create_model("cnn-small", 10, 1, [0.3], [0.4])
    images = torch.rand(16, 1, 8, 8)
    labels = torch.randint(0, 10, (16,))
    return model, images, labels


def test_pgd_stays_in_eps_ball_and_unit_box():
    model, images, labels = setup_model()
    adv = PGD(model, eps=0.1, step=0.03, steps=10)(images, labels)
    assert (adv - images).abs().max().item() <= 0.1 + 1e-6
    assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
    assert (adv - images).abs().max().item() > 0.05  # it moved


def test_pgd_raises_the_loss():
    model, images, labels = setup_model()
    model.eval()
    with torch.no_grad():
        clean = F.cross_entropy(model(images), labels).item()
    adv = PGD(model, eps=0.1, step=0.025, steps=10)(images, labels)
    with torch.no_grad():
        attacked = F.cross_entropy(model(adv), labels).item()
    assert attacked > clean + 0.1


def test_kl_loss_moves_away_from_target_probabilities():
    model, images, _ = setup_model()
    model.eval()
    with torch.no_grad():
        target = F.softmax(model(images), dim=1)
    adv = PGD(model, eps=0.1, step=0.025, steps=10, loss="kl")(images, target)
    with torch.no_grad():
        moved = F.kl_div(F.log_softmax(model(adv), 1), target, reduction="batchmean").item()
    assert moved > 1e-3


def test_pgd_restores_training_mode_and_leaves_parameter_gradients_empty():
    model, images, labels = setup_model()
    model.train()
    PGD(model, eps=0.1, step=0.03, steps=3)(images, labels)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_zero_eps_returns_the_input():
    model, images, labels = setup_model()
    assert torch.equal(PGD(model, eps=0.0, step=0.01, steps=3)(images, labels), images)


def test_fgsm_is_one_signed_step_of_size_eps():
    model, images, labels = setup_model()
    images = images * 0.5 + 0.25  # away from the box, so no clamping
    adv = FGSM(model, eps=0.05)(images, labels)
    assert torch.allclose((adv - images).abs(), torch.full_like(images, 0.05), atol=1e-6)
    model.eval()
    with torch.no_grad():
        assert F.cross_entropy(model(adv), labels) > F.cross_entropy(model(images), labels)


def test_cw_loss_is_the_margin_of_the_best_wrong_class():
    logits = torch.tensor([[2.0, 5.0, 1.0], [0.5, -1.0, 3.0]])
    labels = torch.tensor([1, 0])
    # sample 1: max(2, 1) - 5 = -3; sample 2: max(-1, 3) - 0.5 = 2.5
    assert cw_attack_loss(logits, labels).item() == pytest.approx(-0.5)


def test_autoattack_stays_in_the_ball_and_is_at_least_as_strong_as_fgsm():
    model, images, labels = setup_model()
    model.eval()
    with torch.no_grad():
        labels = model(images).argmax(1)  # all correctly classified to start with
    adv = AutoAttack(model, eps=0.1)(images[:6], labels[:6])
    assert (adv - images[:6]).abs().max().item() <= 0.1 + 1e-5
    with torch.no_grad():
        aa_correct = (model(adv).argmax(1) == labels[:6]).sum().item()
        fgsm_correct = (model(FGSM(model, 0.1)(images[:6], labels[:6])).argmax(1) == labels[:6]).sum().item()
    assert aa_correct <= fgsm_correct


def test_fgsm_rs_is_one_step_of_1_25_eps_from_a_uniform_start():
    """Wong et al. 2020: delta ~ U(-eps, eps); delta += 1.25 eps sign(grad); project; clip."""
    model, images, labels = setup_model()
    eps = 0.1
    torch.manual_seed(4)
    adv = FGSMRS(model, eps)(images, labels)
    torch.manual_seed(4)
    start = (images + torch.empty_like(images).uniform_(-eps, eps)).clamp(0, 1).requires_grad_(True)
    model.eval()
    (grad,) = torch.autograd.grad(F.cross_entropy(model(start), labels, reduction="sum"), start)
    expected = (images + (start.detach() + 1.25 * eps * grad.sign() - images).clamp(-eps, eps)).clamp(0, 1)
    assert torch.allclose(adv, expected)
    assert (adv - images).abs().max().item() <= eps + 1e-6
