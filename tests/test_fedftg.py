"""FedFTG's pieces against hand computations, and its server loop: it moves the global model
toward the ensemble, is repeatable, and resumes from its state bit-identically."""

import math

import pytest
import torch
import torch.nn.functional as F

from pmafl.config import ConfigError, RunConfig, TrainConfig
from pmafl.fedftg import (
    ConditionalGenerator,
    FedFTGConfig,
    FedFTGServer,
    class_ensemble_weights,
    disagreement,
    distillation_loss,
    diversity_loss,
    ensemble_soft_labels,
    generator_loss,
    label_counts,
    label_distribution,
    robust_distillation_loss,
    weighted_client_ce,
)
from pmafl.models import create_model

COUNTS = torch.tensor([[3.0, 0.0, 1.0], [1.0, 2.0, 0.0]])  # 2 clients x 3 classes


def test_label_sampling_follows_the_pooled_counts():
    assert label_distribution(COUNTS).tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert label_counts(torch.tensor([2, 0, 2, 2]), 4) == [1, 0, 3, 0]


def test_class_weights_are_each_clients_share_of_the_class():
    alpha = class_ensemble_weights(torch.tensor([[3.0, 0.0, 1.0, 0.0], [1.0, 2.0, 0.0, 0.0]]))
    assert alpha.tolist() == [[0.75, 0.0, 1.0, 0.0], [0.25, 1.0, 0.0, 0.0]]


# Two clients, a batch of two, two classes; w[i, k] is client k's weight for sample i.
GLOBAL = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
CLIENTS = torch.tensor([[[0.0, 0.0], [1.0, 1.0]],     # client 0 on samples 0, 1
                        [[2.0, -3.0], [0.0, 0.0]]])   # client 1
WEIGHTS = torch.tensor([[0.75, 0.25], [0.0, 1.0]])
LABELS = torch.tensor([0, 1])


def test_disagreement_is_the_weighted_l1_between_global_and_clients():
    # |G - C_k| averaged over classes: client 0: sample 0 (1 + 1)/2 = 1, sample 1 (1 + 1)/2 = 1;
    # client 1: sample 0 (1 + 2)/2 = 1.5, sample 1 (0 + 2)/2 = 1.
    manual = ((0.75 * 1 + 0.25 * 1.5) + (0.0 * 1 + 1.0 * 1)) / 2
    assert disagreement(GLOBAL, CLIENTS, WEIGHTS).item() == pytest.approx(manual)


def test_weighted_client_ce_weighs_each_sample_by_its_class_weights():
    def ce(logits, label):
        return -math.log(math.exp(logits[label]) / sum(math.exp(v) for v in logits))

    manual = ((0.75 * ce([0, 0], 0) + 0.25 * ce([2, -3], 0))
              + (0.0 * ce([1, 1], 1) + 1.0 * ce([0, 0], 1))) / 2
    assert weighted_client_ce(CLIENTS, LABELS, WEIGHTS).item() == pytest.approx(manual)


def test_diversity_loss_by_hand():
    z = torch.tensor([[0.0, 0.0], [1.0, 3.0], [2.0, 0.0]])
    x = torch.tensor([[0.0], [0.5], [1.0]])
    pairs = [(sum((a - b) ** 2 for a, b in zip(z[i].tolist(), z[j].tolist())) / 2)
             * abs(x[i, 0].item() - x[j, 0].item()) for i in range(3) for j in range(3)]
    assert diversity_loss(z, x).item() == pytest.approx(math.exp(-sum(pairs) / 9))


def test_generator_loss_maximises_disagreement():
    total = generator_loss(torch.tensor(2.0), torch.tensor(0.5), torch.tensor(0.25), 4.0, 8.0)
    assert total.item() == pytest.approx(-2.0 + 4 * 0.5 + 8 * 0.25)


def test_ensemble_and_distillation_loss_by_hand():
    q = ensemble_soft_labels(CLIENTS, WEIGHTS)
    p = [F.softmax(CLIENTS[k], dim=1) for k in range(2)]
    manual_q = torch.stack([0.75 * p[0][0] + 0.25 * p[1][0], 0.0 * p[0][1] + 1.0 * p[1][1]])
    assert torch.allclose(q, manual_q)
    log_p = F.log_softmax(GLOBAL, dim=1)
    manual = -(manual_q * log_p).sum().item() / 4  # mean over 2 samples x 2 classes
    assert distillation_loss(GLOBAL, q).item() == pytest.approx(manual)
    adv = GLOBAL.flip(1)
    assert robust_distillation_loss(GLOBAL, adv, q, 0.25).item() == pytest.approx(
        0.75 * manual + 0.25 * distillation_loss(adv, q).item())


@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
def test_generator_makes_images_in_the_models_input_range(channels, size):
    gen = ConditionalGenerator(10, channels, size, noise_dim=16, width=8)
    images = gen(torch.randn(5, 16), torch.arange(5))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match="divisible by 4"):
        ConditionalGenerator(10, 1, 30)


def _models(n, seed):
    torch.manual_seed(seed)
    return [create_model("cnn-small", 3, 1, (0.5,), (0.25,)) for _ in range(n)]


CFG = FedFTGConfig(iterations=3, global_steps=2, batch_size=8, noise_dim=8)


def test_finetune_moves_the_global_model_toward_the_ensemble():
    clients = _models(2, 0)
    [global_model] = _models(1, 1)
    server = FedFTGServer(3, 1, 8, FedFTGConfig(iterations=10, global_steps=5, batch_size=16, noise_dim=8))
    images = torch.rand(64, 1, 8, 8)
    counts = torch.tensor([[10.0, 10.0, 10.0], [10.0, 10.0, 10.0]])
    alpha = class_ensemble_weights(counts)

    def gap():
        with torch.no_grad():
            logits = torch.stack([m.eval()(images) for m in clients])
            target = ensemble_soft_labels(logits, alpha[:, logits.mean(0).argmax(1)].t())
            return F.kl_div(F.log_softmax(global_model(images), 1), target, reduction="batchmean").item()

    before = gap()
    first = server.finetune(global_model, clients, counts, 1)
    later = server.finetune(global_model, clients, counts, 2)
    assert set(first) == {"loss-md", "loss-cls", "loss-div", "loss-kd"}
    assert later["loss-kd"] < first["loss-kd"]
    assert gap() < before


def test_finetune_is_repeatable_and_resumes_from_its_state():
    clients = _models(2, 0)
    counts = COUNTS

    def run(rounds, server, model):
        for r in rounds:
            server.finetune(model, clients, counts, r)
        return model

    [a], [b] = _models(1, 1), _models(1, 1)
    torch.manual_seed(123)
    state_before = torch.get_rng_state()
    run([1, 2], FedFTGServer(3, 1, 8, CFG, seed=5), a)
    assert torch.equal(torch.get_rng_state(), state_before)  # the caller's RNG is left alone
    first = FedFTGServer(3, 1, 8, CFG, seed=5)
    run([1], first, b)
    resumed = FedFTGServer(3, 1, 8, CFG, seed=5)
    resumed.load_state_dict(first.state_dict())
    run([2], resumed, b)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    [c] = _models(1, 1)
    run([1, 2], FedFTGServer(3, 1, 8, CFG, seed=6), c)
    assert not torch.equal(a.state_dict()["net.0.weight"], c.state_dict()["net.0.weight"])


def test_robust_variant_distils_on_adversarial_images_too():
    clients = _models(2, 0)
    [plain], [robust] = _models(1, 1), _models(1, 1)
    FedFTGServer(3, 1, 8, CFG, seed=0).finetune(plain, clients, COUNTS, 1)
    attack = TrainConfig(eps=0.1, train_attack="fgsm-rs")
    losses = FedFTGServer(3, 1, 8, FedFTGConfig(**{**vars(CFG), "robust": True}), seed=0,
                          attack_config=attack).finetune(robust, clients, COUNTS, 1)
    assert math.isfinite(losses["loss-kd"])
    assert not torch.equal(plain.state_dict()["net.0.weight"], robust.state_dict()["net.0.weight"])
    with pytest.raises(ValueError, match="needs the run's attack settings, eps > 0"):
        FedFTGServer(3, 1, 8, FedFTGConfig(robust=True))
    with pytest.raises(ConfigError, match="key 'server-finetune': 'fedftg-robust' attacks within eps"):
        RunConfig.from_mapping({"server-finetune": "fedftg-robust", "eps": 0.0})


def test_finetune_needs_one_count_row_per_model():
    with pytest.raises(ValueError, match="one label-count row per client model"):
        FedFTGServer(3, 1, 8, CFG).finetune(_models(1, 0)[0], _models(2, 1), COUNTS[:1], 1)
