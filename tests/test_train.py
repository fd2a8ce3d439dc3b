"""Local training: the objectives as compositions, and the plug-in function's contract."""

import dataclasses
import math

import pytest
import torch

from pmafl.attacks import PGD
from pmafl.config import TrainConfig
from pmafl.data import make_loader
from pmafl.losses import adversarial_mixture_kd, global_consistency, trades_kl, vanilla_mixture_kd
from pmafl.models import create_model
from pmafl.objectives import OBJECTIVES, StepContext, forward_views, pmafl_step
from pmafl.train import class_log_prior, train_model, warmup_eps


def tiny_problem(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.rand(n, 1, 8, 8, generator=g) * 0.3
    images[:, :, :, :2] += 0.7 * (labels.view(-1, 1, 1, 1) / 3)  # class shows in a stripe
    return images.clamp(0, 1), labels


def model(seed=0):
    torch.manual_seed(seed)
    return create_model("cnn-small", 4, 1, [0.3], [0.3])


def test_pmafl_step_is_the_weighted_sum_of_its_terms():
    x, y = tiny_problem(8)
    student, teacher = model(0), model(1).eval()
    global_model = model(2).eval()
    cfg = TrainConfig(alpha=0.3, lambda_alg=0.2, tau=2.0, mixup_alpha=1.0, pgd_steps=2)
    ctx = StepContext(cfg, student, teacher, global_model)
    torch.manual_seed(7)
    terms = pmafl_step(student, x, y, None, ctx)
    expected = 0.3 * terms["loss-vkd"] + 0.7 * terms["loss-akd"] + 0.2 * terms["loss-alg"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)

    # Recompute every term from the same random draws (lam, permutation, PGD start).
    torch.manual_seed(7)
    lam = torch.distributions.Beta(1.0, 1.0).sample().item()
    perm = torch.randperm(8)
    x_mix = lam * x + (1 - lam) * x[perm]
    x_adv = ctx.attack(x, y)
    x_adv_mix = lam * x_adv + (1 - lam) * x_adv[perm]
    with torch.no_grad():
        t, t_mix, g = teacher(x), teacher(x_mix), global_model(x)
        s, s_mix, s_adv, s_adv_mix = student(x), student(x_mix), student(x_adv), student(x_adv_mix)
    vkd = vanilla_mixture_kd(s, s_mix, t, t_mix, 2.0)
    akd = adversarial_mixture_kd(s_adv, s_adv_mix, t, t_mix, 2.0)
    assert terms["loss-vkd"].item() == pytest.approx(vkd.item(), rel=1e-5)
    assert terms["loss-akd"].item() == pytest.approx(akd.item(), rel=1e-5)
    assert terms["loss-alg"].item() == pytest.approx(global_consistency(s_adv, g).item(), rel=1e-5)


def test_without_mixup_the_blend_terms_repeat_the_plain_ones():
    x, y = tiny_problem(8)
    student, teacher = model(0), model(1).eval()
    cfg = TrainConfig(mixup_alpha=0.0, pgd_steps=2)
    ctx = StepContext(cfg, student, teacher, model(2).eval())
    terms = pmafl_step(student, x, y, None, ctx)
    with torch.no_grad():
        half = vanilla_mixture_kd(student(x), student(x), teacher(x), teacher(x), 1.0).item()
    assert terms["loss-vkd"].item() == pytest.approx(half, rel=1e-5)


@pytest.mark.parametrize("objective, train_attack", [
    ("ce", "pgd"), ("pgd-at", "pgd"), ("pmafl", "pgd"), ("pgd-at", "fgsm-rs"), ("pmafl", "fgsm-rs"),
    ("calfat", "fgsm-rs")])
def test_training_lowers_the_loss_and_reports_num_examples(objective, train_attack):
    x, y = tiny_problem()
    student, teacher = model(0), model(1).eval()
    with torch.no_grad():
        teacher_logits = 3 * torch.nn.functional.one_hot(y, 4).float()  # a confident, correct teacher
    loader = make_loader(x, y, teacher_logits, batch_size=16, shuffle=True)
    cfg = TrainConfig(objective=objective, lr=0.02, eps=0.05, pgd_step_ratio=0.4, pgd_steps=3,
                      lambda_alg=0.0, local_epochs=1, train_attack=train_attack)
    first = train_model(student, teacher, loader, cfg)
    for _ in range(8):
        last = train_model(student, teacher, loader, cfg)
    assert last["num-examples"] == 48
    assert last["loss"] < 0.7 * first["loss"]
    if objective == "pmafl":
        assert {"loss-vkd", "loss-akd", "loss-alg"} <= set(last)


def test_pmafl_needs_a_teacher():
    x, y = tiny_problem(8)
    with pytest.raises(ValueError, match="needs a teacher"):
        train_model(model(), None, make_loader(x, y, batch_size=4, shuffle=False), TrainConfig())


def test_consistency_term_pulls_towards_the_received_model():
    x, y = tiny_problem()
    student = model(0)
    received = {k: v.clone() for k, v in student.state_dict().items()}
    loader = make_loader(x, y, batch_size=16, shuffle=False)
    cfg = TrainConfig(alpha=1.0, eps=0.0, local_epochs=3, mixup_alpha=0.0, lr=0.002, momentum=0.0)
    teacher = model(1).eval()  # disagrees with the student: KD alone moves it far

    def drift(lambda_alg):
        student.load_state_dict(received)
        torch.manual_seed(0)
        train_model(student, teacher, loader, TrainConfig(**{**cfg.__dict__, "lambda_alg": lambda_alg}))
        return sum((student.state_dict()[k] - received[k]).pow(2).sum() for k in received).item()

    assert drift(1.0) < 0.5 * drift(0.0)


def test_gradient_clipping_bounds_each_step():
    x, y = tiny_problem(16)
    student = model(0)
    before = [p.detach().clone() for p in student.parameters()]
    cfg = TrainConfig(objective="ce", lr=0.1, momentum=0.0, weight_decay=0.0, grad_clip=0.01,
                      local_epochs=1)
    train_model(student, None, make_loader(x, y, batch_size=16, shuffle=False), cfg)
    step = torch.sqrt(sum((p.detach() - b).pow(2).sum() for p, b in zip(student.parameters(), before)))
    assert 0 < step.item() <= 0.1 * 0.01 * (1 + 1e-4)


def baseline_terms(objective, seed=3):
    x, y = tiny_problem(8)
    student = model(0)
    cfg = TrainConfig(objective=objective, pgd_steps=2, beta=6.0)
    ctx = StepContext(cfg, student)
    torch.manual_seed(seed)
    return OBJECTIVES[objective].step(student, x, y, None, ctx)


@pytest.mark.parametrize("objective, parts", [
    ("fat", lambda t: 0.5 * (t["loss-clean"] + t["loss-adv"])),
    ("trades", lambda t: t["loss-ce"] + 6.0 * t["loss-kl"]),
    ("mart", lambda t: t["loss-bce"] + 6.0 * t["loss-kl"]),
])
def test_baselines_compose_their_terms(objective, parts):
    terms = baseline_terms(objective)
    assert terms["loss"].item() == pytest.approx(parts(terms).item(), rel=1e-6)
    assert all(torch.isfinite(v) for v in terms.values())


def test_trades_attack_maximises_the_kl_term():
    """Its adversarial examples raise KL(p(x) || p(x_adv)) above a random point of the ball's."""
    x, y = tiny_problem(8)
    student = model(0).eval()
    with torch.no_grad():
        probs = torch.softmax(student(x), 1)
    adv = PGD(student, 0.2, 0.05, 5, loss="kl")(x, probs)
    noise = (x + torch.empty_like(x).uniform_(-0.2, 0.2)).clamp(0, 1)
    with torch.no_grad():
        assert trades_kl(student(x), student(adv)) > trades_kl(student(x), student(noise))


@pytest.mark.parametrize("ablation, override", [
    ("pmafl-no-vkd", {"alpha": 0.0}), ("pmafl-no-akd", {"alpha": 1.0}),
    ("pmafl-no-alg", {"lambda_alg": 0.0}), ("pmafl-no-mixup", {"mixup_alpha": 0.0})])
def test_ablation_is_pmafl_with_one_ingredient_off(ablation, override):
    x, y = tiny_problem(16)
    loader = make_loader(x, y, batch_size=8, shuffle=False)
    teacher = model(1).eval()
    results = []
    for cfg in (TrainConfig(objective=ablation, pgd_steps=2, local_epochs=1),
                TrainConfig(objective="pmafl", pgd_steps=2, local_epochs=1, **override)):
        student = model(0)
        torch.manual_seed(5)
        results.append(train_model(student, teacher, loader, cfg))
    assert results[0] == results[1]


def test_warmup_ramps_eps_linearly_then_holds_it():
    assert [warmup_eps(0.1, 4, r) for r in (1, 2, 4, 9)] == pytest.approx([0.025, 0.05, 0.1, 0.1])
    assert warmup_eps(0.1, 0, 1) == 0.1


def test_class_log_prior_is_the_log_of_the_label_frequencies():
    prior = class_log_prior(torch.tensor([0, 0, 0, 2, 2, 2]), 4)
    # Absent classes 1 and 3 count as one example each (as CalFAT's code does): 3, 1, 3, 1 of 8.
    assert prior.tolist() == pytest.approx([math.log(3 / 8), math.log(1 / 8)] * 2)


def test_calfat_trains_with_the_prior_of_the_loader_labels():
    """train_model hands CalFAT the log prior of the node's labels: its loss equals the calibrated
    CE recomputed by hand on the same adversarial examples."""
    x, y = tiny_problem(8)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 3])
    student = model(0)
    cfg = TrainConfig(objective="calfat", local_epochs=1, lr=1e-9, momentum=0.0, weight_decay=0.0,
                      train_attack="fgsm-rs", calfat_tau=1.0)
    loader = make_loader(x, y, batch_size=8, shuffle=False)
    torch.manual_seed(3)
    metrics = train_model(student, None, loader, cfg)
    torch.manual_seed(3)
    next(iter(loader))  # a DataLoader draws its worker seed from the global generator
    log_prior = torch.log(torch.tensor([5 / 9, 2 / 9, 1 / 9, 1 / 9]))
    from pmafl.objectives import calfat_step

    expected = calfat_step(student, x, y, None, StepContext(cfg, student, log_prior=log_prior))
    assert metrics["loss"] == pytest.approx(expected["loss"].item(), rel=1e-4)


def test_batchnorm_models_see_each_view_with_its_own_batch_statistics():
    """With BatchNorm, clean and adversarial views are never normalised together; without it, one
    forward over the concatenated views gives the same logits as separate forwards."""
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                             torch.nn.Linear(4 * 6 * 6, 3)).train()
    clean, adv = torch.rand(8, 1, 8, 8), torch.rand(8, 1, 8, 8) + 2.0  # very different statistics
    s_clean, s_adv = forward_views(bn, clean, adv)
    assert torch.allclose(s_clean, bn(clean), atol=1e-5) and torch.allclose(s_adv, bn(adv), atol=1e-5)
    assert not torch.allclose(bn(torch.cat([clean, adv]))[:8], bn(clean), atol=1e-3)
    plain = model(0)
    joint = forward_views(plain, clean, adv)
    assert torch.allclose(joint[0], plain(clean), atol=1e-5)
    assert torch.allclose(joint[1], plain(adv), atol=1e-5)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("weights", [{}, {"ce_weight": 0.5, "kdiga_weight": 1.0}, {"fair_q": 1.0}])
def test_the_metric_keys_a_server_expects_are_the_ones_training_returns(objective, weights):
    """`train_metric_names` (what PMAFL's screening requires of every train reply) against what
    `train_model` really returns, for every objective and add-on term."""
    from pmafl.train import train_metric_names

    distils = OBJECTIVES[objective].needs_teacher
    if "kdiga_weight" in weights and not distils:
        weights = {"ce_weight": 0.5}
    x, y = tiny_problem(8)
    cfg = TrainConfig(objective=objective, local_epochs=1, pgd_steps=1, **weights)
    metrics = train_model(model(0), model(1) if distils else None,
                          make_loader(x, y, batch_size=8, shuffle=False), cfg)
    assert set(metrics) == train_metric_names(cfg)


def test_the_plugin_name_is_the_training_function():
    """`pmafl_train`, the plug-in API's first name for `train_model`, stays importable."""
    import pmafl
    from pmafl.train import pmafl_train, train_model

    assert pmafl.pmafl_train is pmafl_train is train_model is pmafl.train_model


def test_global_loss_is_the_mean_adversarial_cross_entropy_of_the_received_model():
    """At eps 0 the attack leaves the images as they are: the plain mean CE of the model in eval
    mode, computed by hand. With `fair-q` the training function reports it for the model it
    received and trains exactly as without (the measurement's random numbers are forked)."""
    from pmafl.train import global_loss

    x, y = tiny_problem(40)
    net = model(0)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(net.eval()(x), y).item()
    net.train()
    loader = make_loader(x, y, batch_size=16, shuffle=False)
    assert global_loss(net, loader, TrainConfig(eps=0.0, train_attack="fgsm-rs")) \
        == pytest.approx(expected, rel=1e-5)
    assert net.training
    cfg = TrainConfig(objective="pgd-at", eps=0.1, train_attack="fgsm-rs", local_epochs=1)
    adversarial = global_loss(model(0), loader, cfg)
    assert adversarial > expected  # FGSM-RS at eps 0.1 raises the loss of this untrained model
    runs = {}
    for q in (0.0, 1.0):
        torch.manual_seed(7)
        runs[q] = train_model(model(0), None, make_loader(x, y, batch_size=16, shuffle=True, seed=7),
                              dataclasses.replace(cfg, fair_q=q))
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                             torch.nn.Linear(4 * 6 * 6, 4)).train()
    stats = [t.clone() for t in bn[1].buffers()]
    global_loss(bn, loader, cfg)  # in eval mode: the running statistics stay, the mode returns
    assert all(torch.equal(a, b) for a, b in zip(stats, bn[1].buffers(), strict=True)) and bn.training
    fair = dict(runs[1.0])
    torch.manual_seed(7)
    assert fair.pop("global-loss") == pytest.approx(global_loss(model(0), loader, cfg), rel=1e-6)
    assert fair == runs[0.0]
