"""Each loss term against a hand computation on tiny tensors."""

import math

import pytest
import torch

from pmafl.losses import (
    adversarial_mixture_kd,
    calibrated_cross_entropy,
    calibrated_logits,
    cross_entropy,
    global_consistency,
    kd_kl,
    mart_boosted_ce,
    mart_weighted_kl,
    pmafl_objective,
    trades_kl,
    vanilla_mixture_kd,
)


def softmax(values, tau=1.0):
    exps = [math.exp(v / tau) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


S = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
T = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
S2 = [[0.0, 1.0, 0.0], [1.0, -2.0, 0.5]]
T2 = [[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]


def hand_kd(student, teacher, tau):
    rows = [kl(softmax(t, tau), softmax(s, tau)) for s, t in zip(student, teacher)]
    return tau**2 * sum(rows) / len(rows)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_kd_kl_matches_hand_computation(tau):
    got = kd_kl(torch.tensor(S), torch.tensor(T), tau).item()
    assert got == pytest.approx(hand_kd(S, T, tau), rel=1e-5)


def test_kd_kl_is_zero_for_equal_logits():
    logits = torch.tensor(S)
    assert kd_kl(logits, logits, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_vanilla_mixture_kd_adds_plain_and_blend_terms():
    got = vanilla_mixture_kd(torch.tensor(S), torch.tensor(S2), torch.tensor(T), torch.tensor(T2), 2.0)
    assert got.item() == pytest.approx(hand_kd(S, T, 2.0) + hand_kd(S2, T2, 2.0), rel=1e-5)


def test_adversarial_mixture_kd_pairs_adversarial_student_with_clean_teacher():
    s_adv, s_adv_mix = [[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0], [1.0, 1.0, -1.0]]
    got = adversarial_mixture_kd(torch.tensor(s_adv), torch.tensor(s_adv_mix), torch.tensor(T),
                                 torch.tensor(T2), 1.0)
    assert got.item() == pytest.approx(hand_kd(s_adv, T, 1.0) + hand_kd(s_adv_mix, T2, 1.0), rel=1e-5)


def test_global_consistency_is_mean_per_sample_squared_distance():
    # sample 1: (1-2)^2 + (0-1)^2 + (-1-0)^2 = 3; sample 2: 0.25 + 0.25 + 1 = 1.5 -> mean 2.25
    assert global_consistency(torch.tensor(S), torch.tensor(T)).item() == pytest.approx(2.25)


def test_pmafl_objective_weights_the_terms():
    l_vkd, l_akd, l_alg = torch.tensor(2.0), torch.tensor(4.0), torch.tensor(10.0)
    got = pmafl_objective(l_vkd, l_akd, l_alg, alpha=0.25, lambda_alg=0.5)
    assert got.item() == pytest.approx(0.25 * 2 + 0.75 * 4 + 0.5 * 10)


def test_cross_entropy_matches_hand_computation():
    expected = -(math.log(softmax(S[0])[0]) + math.log(softmax(S[1])[2])) / 2
    assert cross_entropy(torch.tensor(S), torch.tensor([0, 2])).item() == pytest.approx(expected, rel=1e-6)


def test_trades_kl_matches_hand_computation():
    expected = sum(kl(softmax(c), softmax(a)) for c, a in zip(S, S2)) / 2
    assert trades_kl(torch.tensor(S), torch.tensor(S2)).item() == pytest.approx(expected, rel=1e-5)


def test_mart_boosted_ce_matches_hand_computation():
    labels = [0, 2]
    expected = 0.0
    for logits, y in zip(S2, labels):
        p = softmax(logits)
        wrong = max((k for k in range(3) if k != y), key=lambda k: p[k])
        expected += -math.log(p[y]) - math.log(1.0001 - p[wrong] + 1e-12)
    got = mart_boosted_ce(torch.tensor(S2), torch.tensor(labels)).item()
    assert got == pytest.approx(expected / 2, rel=1e-5)


def test_mart_weighted_kl_matches_hand_computation():
    labels = [0, 2]
    expected = sum(kl(softmax(c), softmax(a)) * (1.0000001 - softmax(c)[y])
                   for c, a, y in zip(S, S2, labels)) / 2
    got = mart_weighted_kl(torch.tensor(S), torch.tensor(S2), torch.tensor(labels)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_calibrated_cross_entropy_by_hand():
    """CalFAT: CE(z + tau log pi, y) for z = (1, 0, -1), pi = (0.5, 0.25, 0.25), tau = 1, y = 1."""
    log_prior = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    calibrated = [1.0 + math.log(0.5), 0.0 + math.log(0.25), -1.0 + math.log(0.25)]
    expected = -math.log(softmax(calibrated)[1])
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    assert calibrated_logits(logits, log_prior)[0].tolist() == pytest.approx(calibrated)
    loss = calibrated_cross_entropy(logits, torch.tensor([1]), log_prior)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # A uniform prior shifts every logit alike: plain CE.
    uniform = torch.log(torch.full((3,), 1 / 3))
    assert calibrated_cross_entropy(logits, torch.tensor([1]), uniform).item() == \
        pytest.approx(cross_entropy(logits, torch.tensor([1])).item(), rel=1e-6)
