"""Model registry: architectures created by name, with input normalisation inside the model.

Every model takes images in [0, 1] (attacks work in that space) and normalises them itself with
the dataset's mean and std, held as non-persistent buffers so they never travel in a state dict.
`create_model("cnn-small", num_classes=10, in_channels=1, mean=..., std=...)`;
`torchvision/<name>` builds any torchvision classification architecture (randomly initialised:
teachers are pre-trained here, on the public split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

ModelFn = Callable[[int, int], nn.Module]
_MODELS: dict[str, ModelFn] = {}


def register_model(name: str) -> Callable[[ModelFn], ModelFn]:
    def wrap(fn: ModelFn) -> ModelFn:
        _MODELS[name] = fn
        return fn
    return wrap


def model_names() -> list[str]:
    return sorted(_MODELS) + ["torchvision/<name>"]


def is_known_model(name: str) -> bool:
    if name.startswith("torchvision/"):
        import torchvision

        return name.removeprefix("torchvision/") in torchvision.models.list_models(module=torchvision.models)
    return name in _MODELS


class Normalized(nn.Module):
    """(x - mean) / std in front of a network; x stays in [0, 1] for the attacks. `arch` is the
    registry name the network was created by ("" when built by hand)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], arch: str = "") -> None:
        super().__init__()
        self.net, self.arch = net, arch
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def create_model(name: str, num_classes: int, in_channels: int,
                 mean: Sequence[float], std: Sequence[float]) -> Normalized:
    if name.startswith("torchvision/"):
        net = _torchvision_model(name.removeprefix("torchvision/"), num_classes, in_channels)
    elif name in _MODELS:
        net = _MODELS[name](num_classes, in_channels)
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return Normalized(net, mean, std, name)


class ModelFileError(ValueError):
    """A model file is not a plain state dict of the architecture it is loaded into."""


def load_weights(model: nn.Module, path: str | Path, architecture: str, what: str = "model file"
                 ) -> nn.Module:
    """`model` with the state dict stored at `path`: the project's one reader of model files (a
    run's model.pt, a cached teacher; a checkpoint, which holds more, is `pmafl.results`').

    Parameters
    ----------
    model : nn.Module
        The architecture to fill, as `create_model` built it.
    path : str or Path
        The file, written by `torch.save(model.state_dict(), ...)`.
    architecture : str
        The registry name of `model`, for the error.
    what : str
        What the file is, for the error ("teacher file", ...).

    Returns
    -------
    nn.Module
        `model`, its weights loaded.

    Raises
    ------
    ModelFileError
        The file is unreadable, pickles anything but tensors (`weights_only`: such a file is
        refused, never run), or does not fit the architecture.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unsafe or unreadable file gets the same answer
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ModelFileError(f"{what} {path} is not a plain state dict (tensors only): "
                             f"{type(e).__name__}: {first_line}") from e
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise ModelFileError(f"{what} {path} does not fit architecture {architecture!r}: {e}") from e
    return model


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]


def _kaiming(net: nn.Module) -> nn.Module:
    """He initialisation: PyTorch's default shrinks activations through a BatchNorm-free ReLU
    stack, and adversarial training from that start stalls at chance level."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


@register_model("cnn-small")
def cnn_small(num_classes: int, in_channels: int) -> nn.Module:
    """The small student: four 3x3 convolutions (32-32-64-64), 68k parameters."""
    return _kaiming(nn.Sequential(
        *_conv_block(in_channels, 32), *_conv_block(32, 32), nn.MaxPool2d(2),
        *_conv_block(32, 64), *_conv_block(64, 64), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4, num_classes),
    ))


@register_model("cnn-large")
def cnn_large(num_classes: int, in_channels: int) -> nn.Module:
    """A wider teacher CNN (64-64-128-128, 256-unit head): 393k parameters, 5.8x the student."""
    return _kaiming(nn.Sequential(
        *_conv_block(in_channels, 64), *_conv_block(64, 64), nn.MaxPool2d(2),
        *_conv_block(64, 128), *_conv_block(128, 128), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes),
    ))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int) -> nn.Module:
    """CIFAR-style ResNet-18 (3x3 stem, no max-pool), as used across the robustness literature."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(inplace=True)]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class _RepeatChannels(nn.Module):
    """Grey images into networks built for RGB."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1)


def _torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    if not is_known_model(f"torchvision/{name}"):
        raise ValueError(f"unknown torchvision model {name!r}")
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return nn.Sequential(_RepeatChannels(), net) if in_channels == 1 else net
