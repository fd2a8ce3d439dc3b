"""RobustKD (Chen et al., "RobustKD: Robust Knowledge Distillation Based on Feature Variance Against
Backdoored Teacher Model", Applied Soft Computing 2024, arXiv 2406.03409): vetting a teacher that
may carry a backdoor, detoxifying its features, and distilling features from it safely
(`FeatureDistiller`, which `train_model` adds with `robustkd-weight` > 0; its registration is
`pmafl.objectives.ADD_ONS`).

Detection, the step the public code leaves out, is a Neural Cleanse (Wang et al. 2019,
`reverse_engineer_trigger`): for every candidate target class, the smallest input mask and
pattern that send clean images there. A backdoor's target needs far fewer pixels than any other
class; `flags_backdoor` asks for a mask at most half the median class's that is an outlier by the
MAD anomaly index, or at most a tenth of the median class's. It works on adversarially trained
teachers (PM-AFL's default), where forging a natural class takes many pixels; a plain-CE teacher
is forged by a few pixels for any class and its backdoor does not stand out
(docs/robustkd.md has the numbers).

Detoxification (`DetoxifiedTeacher`, `detox_channels`): F <- (1 - M) * F + M * P at the first
feature stage, where a trigger detector is still local: M covers the channels the
reverse-engineered trigger excites most, inside the trigger's region only, and P is their mean
there on clean data, so the teacher's features, and with them its logits, lose the shortcut and
keep the rest. The distillation pieces are Heo et al.'s margin (`activation_margin`) and partial
L2 (`partial_l2`), and salt-and-pepper noise on the student's inputs (`salt_and_pepper`).
`FeatureDistiller` puts them together: at every stage, the student's features on noisy inputs,
through a 1x1 conv + BN connector, regress the detoxified teacher's.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pmafl.batch import Batch

# Feature stages of each architecture, as module names inside `Normalized`: pre-ReLU conv outputs
# (where Heo et al.'s margin-based feature distillation reads them). Hooks read them, so state
# dicts and the plug-in path are unchanged.
FEATURE_STAGES: dict[str, tuple[str, ...]] = {
    "cnn-small": ("net.2", "net.7"),
    "cnn-large": ("net.2", "net.7"),
}


def feature_stages(model_name: str) -> tuple[str, ...]:
    if model_name not in FEATURE_STAGES:
        raise ValueError(f"RobustKD needs the feature stages of model {model_name!r}; known for "
                         f"{', '.join(FEATURE_STAGES)}")
    return FEATURE_STAGES[model_name]


def stage_features(model: nn.Module, x: torch.Tensor, stages: Sequence[str]
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's logits on `x` and the outputs of its modules named `stages`."""
    modules = dict(model.named_modules())
    found: dict[str, torch.Tensor] = {}
    # A copy: an in-place ReLU right after the stage would overwrite the pre-ReLU values.
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: found.__setitem__(name, out.clone())) for name in stages]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, [found[name] for name in stages]


def salt_and_pepper(x: torch.Tensor, rate: float = 0.1) -> torch.Tensor:
    """`rate` of the pixels (all channels of a location together) set to 0 or 1, half each: the
    noise RobustKD feeds the student, which breaks trigger patterns in the inputs."""
    hit = torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < rate
    salt = torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < 0.5
    return torch.where(hit, salt.to(x.dtype).expand_as(x), x)


def detoxify(features: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - M) * F + M * P, F [N, C, H, W]; M and P per channel ([C]) or per feature ([C, H, W])."""
    shape = (1, -1, 1, 1) if mask.dim() == 1 else (1, *mask.shape)
    m, p = mask.view(shape), pattern.view(shape)
    return (1 - m) * features + m * p


def activation_margin(features: torch.Tensor) -> torch.Tensor:
    """Per channel, the mean of the negative pre-ReLU responses, E[F | F < 0] over a batch of
    clean data: Heo et al.'s margin, measured (their closed form from BatchNorm statistics needs a
    BN before the ReLU, which pmafl's CNN teachers do not have). 0 for a channel never negative."""
    neg = features.clamp(max=0).transpose(0, 1).flatten(1)
    count = (features < 0).transpose(0, 1).flatten(1).sum(dim=1)
    return neg.sum(dim=1) / count.clamp_min(1)


def partial_l2(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Heo et al. 2019's margin-based partial L2: with target t = max(F_T, m) (m per channel), the
    squared error (s - t)^2 counts everywhere except where the teacher's response is negative and
    the student is already below it (s <= t <= 0): there ReLU makes them agree. Averaged over the
    elements."""
    target = torch.maximum(teacher, margin.view(1, -1, 1, 1))
    keep = ~((student <= target) & (target <= 0))
    return ((student - target).pow(2) * keep).mean()


@dataclass
class VetResult:
    """What `vet` found: per candidate class, the L1 norm (in pixels) of the smallest input mask
    that sends clean images there; the MAD anomaly index of the smallest norm and its class; that
    class's reverse-engineered trigger (mask over pixels, pattern); and the feature detoxification
    (per-channel mask M and values P at `stage`; all-zero M when the teacher looks clean)."""

    norms: list[float]
    anomaly_index: float
    target: int
    trigger_mask: torch.Tensor
    trigger_pattern: torch.Tensor
    stage: str
    mask: torch.Tensor
    pattern: torch.Tensor

    @property
    def backdoored(self) -> bool:
        return flags_backdoor(self.norms)

    @property
    def channels(self) -> list[int]:
        """The channels masked anywhere."""
        masked = self.mask.flatten(1).amax(dim=1) if self.mask.dim() > 1 else self.mask
        return torch.nonzero(masked > 0).squeeze(1).tolist()


ANOMALY_THRESHOLD = 2.0
MAX_NORM_RATIO = 0.5
OUTLIER_NORM_RATIO = 0.1
VET_IMAGES = 128  # clean images `vet` runs on (the public split's first)
VET_STEPS = 100  # Neural Cleanse steps per class
MARGIN_IMAGES = 256  # a client's images the feature margins are measured on (its first)


def anomaly_index(norms: Sequence[float]) -> tuple[float, int]:
    """Neural Cleanse's outlier test on the small side: (median - min) / (1.4826 * MAD), and the
    class of the minimum."""
    values = torch.tensor(list(norms), dtype=torch.float64)
    median = values.quantile(0.5)
    mad = (values - median).abs().quantile(0.5) * 1.4826
    smallest = int(values.argmin())
    return float((median - values[smallest]) / mad.clamp_min(1e-12)), smallest


def norm_ratio(norms: Sequence[float]) -> float:
    """The smallest trigger's L1 norm over the median class's."""
    return min(norms) / max(statistics.median(norms), 1e-12)


def flags_backdoor(norms: Sequence[float]) -> bool:
    """Whether the smallest trigger stands out. It must be at most `MAX_NORM_RATIO` times the
    median class's, which keeps a teacher whose classes all need about the same mask (a tiny
    MAD) from being flagged for a small absolute difference. Then either Neural Cleanse's test
    holds (an anomaly index above `ANOMALY_THRESHOLD`), or the trigger is at most
    `OUTLIER_NORM_RATIO` times the median class's: an order of magnitude below, which the
    anomaly index can miss where the natural classes' masks spread widely (Fashion-MNIST's do,
    from 0.2x to 3x the median)."""
    index, ratio = anomaly_index(norms)[0], norm_ratio(norms)
    return ratio <= MAX_NORM_RATIO and (index > ANOMALY_THRESHOLD or ratio <= OUTLIER_NORM_RATIO)


def reverse_engineer_trigger(teacher: nn.Module, images: torch.Tensor, target: int,
                             steps: int = 300, lr: float = 0.1, target_rate: float = 0.99,
                             seed: int = 0) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Neural Cleanse for one class: the smallest mask m in [0, 1]^{HxW} and pattern p in
    [0, 1]^{CxHxW} with x' = (1 - m) x + m p sent to `target` on `target_rate` of the clean
    `images`; Adam on CE(T(x'), target) + lam |m|_1, lam from 1e-3, times 1.5 after 5 steps in a
    row that reach the rate, divided by 1.5^1.5 after 5 that do not (the defaults of the original
    and of BackdoorBench). Returns (|m|_1 of the best mask, or H*W when none reached the rate;
    mask; pattern)."""
    generator = torch.Generator().manual_seed(seed * 1009 + target)
    shape, device = images.shape[1:], images.device
    theta = (torch.randn(shape[1:], generator=generator) * 0.1).to(device).requires_grad_(True)
    phi = (torch.randn(shape, generator=generator) * 0.1).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([theta, phi], lr=lr, betas=(0.5, 0.9))
    labels = torch.full((len(images),), target, device=device)
    lam, up, down = 1e-3, 0, 0
    best = (float(shape[1] * shape[2]), torch.zeros(shape[1:], device=device),
            torch.zeros(shape, device=device))
    for _ in range(steps):
        mask, pattern = torch.tanh(theta) / 2 + 0.5, torch.tanh(phi) / 2 + 0.5
        logits = teacher((1 - mask) * images + mask * pattern)
        loss = F.cross_entropy(logits, labels) + lam * mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            reached = (logits.argmax(1) == target).float().mean().item() >= target_rate
            if reached and mask.sum().item() < best[0]:
                best = (mask.sum().item(), mask.detach().clone(), pattern.detach().clone())
        up, down = (up + 1, 0) if reached else (0, down + 1)
        if up >= 5:
            lam, up = lam * 1.5, 0
        elif down >= 5:
            lam, down = lam / 1.5**1.5, 0
    return best


def trigger_region(trigger_mask: torch.Tensor, size: tuple[int, int], radius: int = 2,
                   threshold: float = 0.1) -> torch.Tensor:
    """Where a trigger reaches a feature map of `size`: the input pixels its mask covers (above
    `threshold`), resized to the map and widened by `radius` (two 3x3 convolutions see 2 pixels
    around). A [H, W] mask of 0 and 1."""
    region = (trigger_mask > threshold).float()[None, None]
    if tuple(region.shape[-2:]) != tuple(size):  # a smaller map keeps any covered pixel
        region = F.adaptive_max_pool2d(region, size) if size[0] <= region.shape[-2] else \
            F.interpolate(region, size=size, mode="nearest")
    return F.max_pool2d(region, 2 * radius + 1, stride=1, padding=radius)[0, 0]


def detox_channels(teacher: nn.Module, stage: str, images: torch.Tensor, triggered: torch.Tensor,
                   trigger_mask: torch.Tensor, target: int, residual: float = 0.05,
                   max_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature detoxification against a (reverse-engineered) trigger at `stage`, inside the
    trigger's region only (`trigger_region`): channels ranked by how much more the triggered
    images excite them there than the clean ones (in units of the clean spread), replaced there
    by their clean mean, one by one, until fewer than `residual` of the triggered images still
    reach `target` (at most `max_fraction` of the channels). Elsewhere the features are left as
    they were, so clean accuracy is spared. Returns M and P, both [C, H, W]. At most a quarter of
    the channels fell short on Fashion-MNIST: the real trigger still reached the target 0.76 of
    the time with 16 of 64 channels masked, and 0.05 with 32, at no clean cost there."""
    with torch.no_grad():
        _, (clean,) = stage_features(teacher, images, [stage])
        _, (bad,) = stage_features(teacher, triggered, [stage])
        pattern = clean.mean(dim=0)
        region = trigger_region(trigger_mask, tuple(clean.shape[-2:]))
        if region.sum() == 0:  # no pixel of the trigger above the threshold: the whole map
            region = torch.ones_like(region)
        inside = region.flatten() > 0
        clean_r = clean.flatten(2)[:, :, inside].transpose(0, 1).flatten(1)
        bad_r = bad.flatten(2)[:, :, inside].transpose(0, 1).flatten(1)
        gap = (bad_r.mean(dim=1) - clean_r.mean(dim=1)) / (clean_r.std(dim=1) + 1e-6)
        head = _head(teacher, stage)
        mask = torch.zeros_like(pattern)
        for channel in gap.argsort(descending=True)[:max(1, int(max_fraction * len(gap)))]:
            if (head(detoxify(bad, mask, pattern)).argmax(1) == target).float().mean() < residual:
                break
            mask[channel] = region
    return mask, pattern


def vet(teacher: nn.Module, model_name: str, images: torch.Tensor, steps: int = VET_STEPS,
        seed: int = 0) -> VetResult:
    """Vet a teacher on clean `images` (`VET_IMAGES` of them): Neural Cleanse for every class, the
    outlier test, and, when a class stands out, the feature detoxification against its trigger
    at the first feature stage (where a trigger detector is still local: measured on digits,
    masking there cut the real trigger's success from 1.0 to 0.09, at the last stage only to
    0.65 with half of its channels masked)."""
    teacher = copy.deepcopy(teacher).eval().requires_grad_(False)  # the caller's is left as it was
    stage = feature_stages(model_name)[0]
    with torch.no_grad():
        num_classes = teacher(images[:1]).shape[1]
    found = [reverse_engineer_trigger(teacher, images, t, steps, seed=seed) for t in range(num_classes)]
    norms = [norm for norm, _, _ in found]
    index, target = anomaly_index(norms)
    _, trigger_mask, trigger_pattern = found[target]
    with torch.no_grad():
        _, (features,) = stage_features(teacher, images, [stage])
    pattern = features.mean(dim=0)
    mask = torch.zeros_like(pattern)
    if flags_backdoor(norms):
        triggered = (1 - trigger_mask) * images + trigger_mask * trigger_pattern
        mask, pattern = detox_channels(teacher, stage, images, triggered, trigger_mask, target)
    return VetResult(norms, index, target, trigger_mask, trigger_pattern, stage, mask, pattern)


def _head(model: nn.Module, stage: str) -> nn.Module:
    """The layers after `stage` in a `Normalized` nn.Sequential network."""
    index = int(stage.split(".")[1])
    return model.net[index + 1:]


class DetoxifiedTeacher(nn.Module):
    """The teacher with its features at `stage` detoxified, F <- (1 - M) * F + M * P, through a
    forward hook: its logits (what PM-AFL distils) and features come out of the cleaned stage."""

    def __init__(self, teacher: nn.Module, stage: str, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        super().__init__()
        self.teacher, self.stage = copy.deepcopy(teacher), stage  # the hook stays on the copy
        self.register_buffer("mask", mask.float().clone())
        self.register_buffer("pattern", pattern.float().clone())
        module = dict(self.teacher.named_modules())[stage]
        channels = getattr(module, "out_channels", len(mask))
        if len(mask) != channels or mask.shape != pattern.shape:
            raise ValueError(f"stage {stage} has {channels} channels; the mask has shape "
                             f"{tuple(mask.shape)} and the pattern {tuple(pattern.shape)}")
        module.register_forward_hook(self._detoxify)

    def _detoxify(self, _module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        return detoxify(out, self.mask, self.pattern)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)


class FeatureDistiller(nn.Module):
    """RobustKD's feature term: at every feature stage, the student's pre-ReLU features on inputs
    with salt-and-pepper noise, through a connector (1x1 conv + BN, student channels to teacher
    channels), regress the (detoxified) teacher's pre-ReLU features under Heo et al.'s partial L2
    with the teacher's per-channel margins; the loss is the sum over stages.

    The connectors train with the student but are not part of the global model: a client keeps
    its distiller across rounds (the ClientApp holds it in the node's state). Build one with
    `FeatureDistiller.build`."""

    def __init__(self, student_stages: Sequence[str], teacher_stages: Sequence[str],
                 student_channels: Sequence[int], teacher_channels: Sequence[int],
                 margins: Sequence[torch.Tensor], noise: float = 0.1) -> None:
        super().__init__()
        if not (len(student_stages) == len(teacher_stages) == len(student_channels)
                == len(teacher_channels) == len(margins)):
            raise ValueError("student and teacher need the same number of feature stages")
        self.student_stages, self.teacher_stages = tuple(student_stages), tuple(teacher_stages)
        self.noise = noise
        self.connectors = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.BatchNorm2d(c_t))
            for c_s, c_t in zip(student_channels, teacher_channels, strict=True))
        for conv, _ in self.connectors:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        self.register_buffer("margins", torch.cat([m.float().flatten() for m in margins]))
        self._sizes = [len(m.flatten()) for m in margins]

    @classmethod
    def build(cls, student: nn.Module, student_name: str, teacher: nn.Module, teacher_name: str,
              images: torch.Tensor, noise: float = 0.1) -> FeatureDistiller:
        """A distiller for this pair, its margins measured on the teacher's features of the first
        `MARGIN_IMAGES` of the clean `images` (a client's own data)."""
        images = images[:MARGIN_IMAGES]
        s_stages, t_stages = feature_stages(student_name), feature_stages(teacher_name)
        t_stages = tuple(_inner(teacher) + name for name in t_stages)
        was_training = student.training
        with torch.no_grad():
            _, s_feats = stage_features(student.eval(), images[:2], s_stages)
            _, t_feats = stage_features(teacher.eval(), images, t_stages)
        student.train(was_training)
        for (name, s), t in zip(zip(s_stages, s_feats, strict=True), t_feats, strict=True):
            if s.shape[2:] != t.shape[2:]:
                raise ValueError(f"student stage {name} has spatial size {tuple(s.shape[2:])}, the "
                                 f"teacher's {tuple(t.shape[2:])}: a 1x1 connector cannot map them")
        return cls(s_stages, t_stages, [f.shape[1] for f in s_feats], [f.shape[1] for f in t_feats],
                   [activation_margin(f) for f in t_feats], noise).to(images.device)

    def forward(self, student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
        noisy = salt_and_pepper(x, self.noise) if self.noise > 0 else x
        _, s_feats = stage_features(student, noisy, self.student_stages)
        with torch.no_grad():
            _, t_feats = stage_features(teacher, noisy, self.teacher_stages)
        margins = self.margins.split(self._sizes)
        return sum(partial_l2(connector(s), t, m)
                   for connector, s, t, m in zip(self.connectors, s_feats, t_feats, margins, strict=True))


def feature_module(model: nn.Module, teacher: nn.Module, images: torch.Tensor, noise: float
                   ) -> FeatureDistiller:
    """RobustKD's add-on module (`pmafl.objectives.ADD_ONS`): a `FeatureDistiller` for the student
    `model` and the (detoxified) `teacher`, built from their registry names, its margins measured
    on `images` (a client's own, clean)."""
    return FeatureDistiller.build(model, architecture(model), teacher, architecture(teacher), images,
                                  noise)


def feature_term(model: nn.Module, teacher: nn.Module, batch: Batch, module: FeatureDistiller
                 ) -> torch.Tensor:
    """RobustKD's add-on term (`pmafl.objectives.ADD_ONS`): the feature loss of the batch's images."""
    return module(model, teacher, batch.images)


def architecture(model: nn.Module) -> str:
    """The registry name a model (or the teacher inside a `DetoxifiedTeacher`) was created by."""
    inner = model.teacher if isinstance(model, DetoxifiedTeacher) else model
    name = getattr(inner, "arch", "")
    if not name:
        raise ValueError("the model does not say its architecture: build it with "
                         "pmafl.models.create_model (RobustKD's feature stages are known by name)")
    return name


def _inner(teacher: nn.Module) -> str:
    """The prefix of the wrapped network's module names: a `DetoxifiedTeacher` holds its copy of
    the teacher as `teacher` (its detoxification hook is on that copy's stage, registered first,
    so hooks reading the stage see detoxified features)."""
    return "teacher." if isinstance(teacher, DetoxifiedTeacher) else ""
