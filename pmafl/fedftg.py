"""FedFTG: data-free fine-tuning of the aggregated global model on the server (Zhang et al.,
"Fine-tuning Global Model via Data-Free Knowledge Distillation for Non-IID Federated Learning",
CVPR 2022; official code ZhangLin-PKU/FedFTG, whose defaults these are).

After aggregation, the received client models act as teachers of the global model on synthetic
images from a conditional generator that persists across rounds. Per round, `iterations` times:

1. draw labels y from the clients' pooled label counts (`label_distribution`) and z ~ N(0, I);
2. one generator step minimising
   -L_md + lambda_cls * L_cls + lambda_div * L_div   (`generator_loss`)
   (hard-sample mining: the generator seeks images where global and client models disagree);
3. `global_steps` SGD steps of the global model on those images, minimising `distillation_loss`
   against the class-weighted ensemble of the clients' softmaxes (`ensemble_soft_labels`).
   The robust variant adds the same loss on adversarial versions of the synthetic images
   (`robust_distillation_loss`), so that fine-tuning does not erode robustness the clients built.

Client k's weight for class y is alpha_k^y = n_k^y / n^y (`class_ensemble_weights`): a client
speaks for the classes it holds. Plain PyTorch; the Flower wrapper is `strategies.fedftg.FedFTG`.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pmafl.attacks import TrainingAttackSettings, training_attack

VARIANTS = ("fedftg", "fedftg-robust")


def label_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """n_k^y for y = 0..num_classes-1: what a client reports with its train reply."""
    return torch.bincount(labels.long(), minlength=num_classes).tolist()


@dataclass(frozen=True)
class FedFTGConfig:
    """FedFTG's server-side hyperparameters (official defaults).

    iterations: generator + distillation iterations per round (10); global_steps: distillation
    steps per iteration on one synthetic batch (5); batch_size: synthetic images per iteration
    (50); generator_lr: Adam (0.01); global_lr: SGD without momentum (0.1); lr_decay: both learning
    rates are multiplied by lr_decay ** (round - 1) (0.998); noise_dim: z's size (100);
    lambda_cls, lambda_div: weights of the generator's CE and diversity terms (1, 1).
    robust: also distil on adversarial versions of the synthetic images (the run's training
    attack against the global model, see `FedFTGServer`); robust_weight: their share of the
    distillation loss (0.5, as PM-AFL's alpha weighs clean and adversarial KD).
    """

    iterations: int = 10
    global_steps: int = 5
    batch_size: int = 50
    generator_lr: float = 0.01
    global_lr: float = 0.1
    lr_decay: float = 0.998
    noise_dim: int = 100
    lambda_cls: float = 1.0
    lambda_div: float = 1.0
    robust: bool = False
    robust_weight: float = 0.5


class ConditionalGenerator(nn.Module):
    """The official `CGeneratorA`, sized for the data: z and the one-hot label each go through a
    linear map to `width` channels at image_size/4, then BN, 2x upsampling, conv-BN-LeakyReLU, 2x
    upsampling, conv-BN-LeakyReLU and a conv to the image's channels (28x28: 7 -> 14 -> 28).

    The official last layers (Tanh, then a non-affine BatchNorm) produce standardised images for
    models fed normalised data; pmafl's models take pixels in [0, 1] and normalise inside, so the
    output goes through a sigmoid instead."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int, noise_dim: int = 100,
                 width: int = 64) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the generator needs an image size divisible by 4, got {image_size}")
        self.num_classes, self.noise_dim, self.init_size = num_classes, noise_dim, image_size // 4
        cells = width * self.init_size**2
        self.noise_map = nn.Linear(noise_dim, cells)
        self.label_map = nn.Linear(num_classes, cells)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
            nn.Conv2d(width, in_channels, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(labels, self.num_classes).float()
        h = torch.cat([self.noise_map(z), self.label_map(onehot)], dim=1)
        return self.blocks(h.view(len(z), -1, self.init_size, self.init_size))


def label_distribution(counts: torch.Tensor) -> torch.Tensor:
    """p(y) = n^y / n, n^y = sum_k n_k^y: synthetic labels follow the participants' pooled labels
    (customised label sampling). `counts` is [clients, classes]."""
    pooled = counts.sum(dim=0).double()
    return (pooled / pooled.sum()).float()


def class_ensemble_weights(counts: torch.Tensor) -> torch.Tensor:
    """alpha_k^y = n_k^y / n^y, [clients, classes]; each class's column sums to 1 over the clients
    (0 for a class nobody holds, which is never sampled)."""
    pooled = counts.sum(dim=0, keepdim=True).double()
    return (counts.double() / pooled.clamp_min(1.0)).float()


def disagreement(global_logits: torch.Tensor, client_logits: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
    """L_md = mean_i sum_k w_ik * mean_c |G(x_i)_c - C_k(x_i)_c| (logits; w_ik = alpha_k^{y_i}):
    the class-weighted L1 disagreement between global and client models, which the generator
    maximises (hard-sample mining). client_logits: [clients, batch, classes]; weights: [batch,
    clients]."""
    l1 = (global_logits[None] - client_logits).abs().mean(dim=2)  # [clients, batch]
    return (l1.t() * weights).sum(dim=1).mean()


def weighted_client_ce(client_logits: torch.Tensor, labels: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    """L_cls = mean_i sum_k w_ik * CE(C_k(x_i), y_i): the clients that hold class y_i recognise
    x_i as y_i. (The official code multiplies a batch-mean CE by the mean weight, which loses the
    per-sample weighting; this is the formula of the paper.)"""
    ce = torch.stack([F.cross_entropy(logits, labels, reduction="none") for logits in client_logits])
    return (ce.t() * weights).sum(dim=1).mean()


def diversity_loss(noise: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L_div = exp(-mean_{i,j} d_z(i, j) * d_x(i, j)), d_z the mean squared difference of the noise
    vectors, d_x the mean absolute difference of the images, over all pairs (DFAD/FedGen's
    diversity loss, as in the official code): small when distant noises give distant images."""
    z, x = noise.flatten(1), images.flatten(1)
    d_z = (z[:, None] - z[None]).pow(2).mean(dim=2)
    d_x = (x[:, None] - x[None]).abs().mean(dim=2)
    return torch.exp(-(d_z * d_x).mean())


def generator_loss(l_md: torch.Tensor, l_cls: torch.Tensor, l_div: torch.Tensor,
                   lambda_cls: float, lambda_div: float) -> torch.Tensor:
    """L_G = -L_md + lambda_cls * L_cls + lambda_div * L_div."""
    return -l_md + lambda_cls * l_cls + lambda_div * l_div


def ensemble_soft_labels(client_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """q_i = sum_k w_ik * softmax(C_k(x_i)): the class-weighted ensemble of the client models."""
    return (weights.t()[:, :, None] * F.softmax(client_logits, dim=2)).sum(dim=0)


def distillation_loss(global_logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """L_D = mean over batch and classes of -q_ic * log softmax(G(x_i))_c: the soft-label CE of
    the global model against the ensemble, averaged over classes as well as samples as in the
    official code (so its learning rate 0.1 carries over)."""
    return (-F.log_softmax(global_logits, dim=1) * soft_labels).mean()


def robust_distillation_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor,
                             soft_labels: torch.Tensor, robust_weight: float) -> torch.Tensor:
    """(1 - w) * L_D(G(x), q(x)) + w * L_D(G(x_adv), q(x)): the ensemble's soft labels on the
    clean synthetic image are also the target for its adversarial version, as PM-AFL's
    adversarial KD pairs the teacher's clean output with the student's adversarial one."""
    return ((1.0 - robust_weight) * distillation_loss(clean_logits, soft_labels)
            + robust_weight * distillation_loss(adv_logits, soft_labels))


def _forked_rng() -> contextlib.AbstractContextManager:
    """The CPU and every CUDA device's random state, restored on exit (`torch.manual_seed` inside
    reseeds them all)."""
    return torch.random.fork_rng(devices=range(torch.cuda.device_count()))


class FedFTGServer:
    """The generator, its optimiser and the round loop of FedFTG. `finetune` changes the global
    model in place; `state_dict` / `load_state_dict` carry the generator and optimiser across a
    checkpoint, and every round draws its noise, labels and attack starts from an RNG seeded by
    (seed, round), so that a resumed run fine-tunes exactly as an uninterrupted one."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int,
                 config: FedFTGConfig | None = None, seed: int = 0,
                 device: torch.device | None = None,
                 attack_config: TrainingAttackSettings | None = None) -> None:
        """`attack_config`: the run's training-attack settings (`train-attack`, `eps`, `pgd-steps`,
        `pgd-step-ratio`), which the robust variant attacks the global model with (at the full
        eps, also during an eps warm-up), maximising the KL to the ensemble's soft labels."""
        self.cfg = config or FedFTGConfig()
        if self.cfg.robust and (attack_config is None or attack_config.eps <= 0):
            raise ValueError("the robust FedFTG variant needs the run's attack settings, eps > 0")
        self.seed, self.attack_config = seed, attack_config
        self.device = device or torch.device("cpu")
        with _forked_rng():
            torch.manual_seed(seed)
            self.generator = ConditionalGenerator(num_classes, in_channels, image_size,
                                                  self.cfg.noise_dim).to(self.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.cfg.generator_lr)

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])

    def finetune(self, global_model: nn.Module, client_models: list[nn.Module],
                 counts: torch.Tensor, server_round: int) -> dict[str, float]:
        """One round of FedFTG on `global_model` (in place) with `client_models` as teachers and
        `counts` [clients, classes] their label counts; returns the mean of each loss term."""
        if len(client_models) != len(counts) or not client_models:
            raise ValueError(f"FedFTG needs one label-count row per client model, got "
                             f"{len(client_models)} models and {len(counts)} rows")
        # Noise, labels and attack starts come from an RNG seeded by (seed, round), forked so that
        # the caller's random state is left as it was.
        with _forked_rng():
            torch.manual_seed(self.seed * 1_000_003 + server_round)
            return self._finetune(global_model, client_models, counts.to(self.device), server_round)

    def _finetune(self, global_model: nn.Module, client_models: list[nn.Module],
                  counts: torch.Tensor, server_round: int) -> dict[str, float]:
        cfg = self.cfg
        alpha = class_ensemble_weights(counts)
        probs = label_distribution(counts)
        decay = cfg.lr_decay ** (server_round - 1)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.generator_lr * decay
        global_opt = torch.optim.SGD(global_model.parameters(), lr=cfg.global_lr * decay)
        # Eval mode: BatchNorm statistics of the models stay those of real client data.
        for model in client_models:
            model.eval().requires_grad_(False)
        global_model.eval()
        attack = training_attack(global_model, self.attack_config, loss="kl") if cfg.robust else None
        sums: dict[str, float] = defaultdict(float)
        self.generator.train()
        for _ in range(cfg.iterations):
            labels = torch.multinomial(probs, cfg.batch_size, replacement=True)
            z = torch.randn(cfg.batch_size, cfg.noise_dim, device=probs.device)
            weights = alpha[:, labels].t()  # [batch, clients]

            images = self.generator(z, labels)
            client_logits = torch.stack([m(images) for m in client_models])
            global_model.requires_grad_(False)
            l_md = disagreement(global_model(images), client_logits, weights)
            global_model.requires_grad_(True)
            l_cls = weighted_client_ce(client_logits, labels, weights)
            l_div = diversity_loss(z, images)
            self.optimizer.zero_grad(set_to_none=True)
            generator_loss(l_md, l_cls, l_div, cfg.lambda_cls, cfg.lambda_div).backward()
            self.optimizer.step()

            with torch.no_grad():
                images = self.generator(z, labels)
                soft_labels = ensemble_soft_labels(torch.stack([m(images) for m in client_models]),
                                                   weights)
            for _ in range(cfg.global_steps):
                if attack is not None:
                    adv = attack(images, soft_labels)
                    l_kd = robust_distillation_loss(global_model(images), global_model(adv),
                                                    soft_labels, cfg.robust_weight)
                else:
                    l_kd = distillation_loss(global_model(images), soft_labels)
                global_opt.zero_grad(set_to_none=True)
                l_kd.backward()
                global_opt.step()
                sums["loss-kd"] += l_kd.item() / cfg.global_steps
            for name, value in (("loss-md", l_md), ("loss-cls", l_cls), ("loss-div", l_div)):
                sums[name] += value.item()
        return {name: total / cfg.iterations for name, total in sums.items()}
