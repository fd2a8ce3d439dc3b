"""Loss terms of PM-AFL and the baselines, one function per term (notation of the notes:
S student, T teacher, G frozen received global model, p_M(x) = softmax(M(x) / tau)).

All take logits; teacher logits are tempered inside. Every term is a batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(p_T || p_S), averaged over the batch (Hinton et al.'s scaling keeps gradients
    comparable across temperatures)."""
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    p_t = F.softmax(teacher_logits / tau, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * tau**2


def vanilla_mixture_kd(student_logits: torch.Tensor, student_mix_logits: torch.Tensor,
                       teacher_logits: torch.Tensor, teacher_mix_logits: torch.Tensor,
                       tau: float) -> torch.Tensor:
    """L_VKD = KL(p_T(x_i) || p_S(x_i)) + KL(p_T(x_ij) || p_S(x_ij)), for clean accuracy."""
    return kd_kl(student_logits, teacher_logits, tau) + kd_kl(student_mix_logits, teacher_mix_logits, tau)


def adversarial_mixture_kd(student_adv_logits: torch.Tensor, student_adv_mix_logits: torch.Tensor,
                           teacher_logits: torch.Tensor, teacher_mix_logits: torch.Tensor,
                           tau: float) -> torch.Tensor:
    """L_AKD = KL(p_T(x_i) || p_S(x_i^adv)) + KL(p_T(x_ij) || p_S(x_ij^adv)): the teacher sees
    clean inputs, the student adversarial ones, for robustness."""
    return (kd_kl(student_adv_logits, teacher_logits, tau)
            + kd_kl(student_adv_mix_logits, teacher_mix_logits, tau))


def global_consistency(student_adv_logits: torch.Tensor, global_logits: torch.Tensor) -> torch.Tensor:
    """L_ALG = mean_i || S(x_i^adv) - G(x_i) ||_2^2 on logits, against client drift."""
    return (student_adv_logits - global_logits).pow(2).sum(dim=1).mean()


def pmafl_objective(l_vkd: torch.Tensor, l_akd: torch.Tensor, l_alg: torch.Tensor,
                    alpha: float, lambda_alg: float) -> torch.Tensor:
    """L = alpha * L_VKD + (1 - alpha) * L_AKD + lambda * L_ALG."""
    return alpha * l_vkd + (1.0 - alpha) * l_akd + lambda_alg * l_alg


def trades_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """TRADES' robustness term KL(p_S(x) || p_S(x_adv)), averaged over the batch (Zhang et al. 2019)."""
    return F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(clean_logits, dim=1),
                    reduction="batchmean")


def mart_boosted_ce(adv_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MART's BCE on adversarial examples (Wang et al. 2020): CE(S(x_adv), y) plus
    -log(1 - p_S(x_adv)_k), k the most likely wrong class; batch mean."""
    probs = F.softmax(adv_logits, dim=1)
    wrong = probs.masked_fill(F.one_hot(labels, probs.shape[1]).bool(), -1.0).argmax(dim=1)
    margin = -torch.log(1.0001 - probs.gather(1, wrong[:, None]).squeeze(1) + 1e-12)
    return F.cross_entropy(adv_logits, labels) + margin.mean()


def mart_weighted_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    """MART's robustness term: mean_i KL(p_S(x_i) || p_S(x_i^adv)) * (1 - p_S(x_i)_y), which
    weighs misclassified examples up."""
    clean_probs = F.softmax(clean_logits, dim=1)
    kl = (clean_probs * (torch.log(clean_probs + 1e-12) - F.log_softmax(adv_logits, dim=1))).sum(dim=1)
    return (kl * (1.0000001 - clean_probs.gather(1, labels[:, None]).squeeze(1))).mean()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(S(x), y): FedAvg's clean objective, and Madry's PGD-AT when x is adversarial."""
    return F.cross_entropy(logits, labels)


def calibrated_logits(logits: torch.Tensor, log_prior_offset: torch.Tensor) -> torch.Tensor:
    """CalFAT's calibration (Chen et al. 2022): z + tau * log(pi), with `log_prior_offset` =
    tau * log(pi) for the client's class prior pi. Training through the calibrated logits leaves
    the client's label skew in the offset rather than in the model's own logits z, which the
    server averages and which are used, uncalibrated, at test time."""
    return logits + log_prior_offset


def calibrated_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                             log_prior_offset: torch.Tensor) -> torch.Tensor:
    """CE(z + tau * log(pi), y), batch mean: CalFAT's loss on (adversarial) examples."""
    return F.cross_entropy(calibrated_logits(logits, log_prior_offset), labels)
