"""RobustKD's pieces against hand computations: stage features by hooks (state dicts unchanged),
salt-and-pepper noise, detoxification, Heo et al.'s margin and partial L2, the outlier test, and
the detoxified teacher."""

import pytest
import torch

from pmafl.models import create_model
from pmafl.robustkd import (
    DetoxifiedTeacher,
    activation_margin,
    anomaly_index,
    benign_pattern,
    detoxify,
    feature_stages,
    partial_l2,
    reverse_engineer_trigger,
    salt_and_pepper,
    stage_features,
)


def model():
    torch.manual_seed(0)
    return create_model("cnn-large", 10, 1, (0.5,), (0.25,))


def test_stage_features_are_the_named_modules_outputs_and_leave_the_model_as_it_was():
    net, x = model(), torch.rand(3, 1, 8, 8)
    keys = list(net.state_dict())
    logits, (first, last) = stage_features(net, x, feature_stages("cnn-large"))
    assert torch.allclose(logits, net(x))
    assert torch.allclose(first, net.net[:3]((x - 0.5) / 0.25))
    assert last.shape == (3, 128, 4, 4)
    assert list(net.state_dict()) == keys and not net.net[7]._forward_hooks
    with pytest.raises(ValueError, match="feature stages of model 'resnet18'"):
        feature_stages("resnet18")


def test_salt_and_pepper_sets_the_given_share_of_locations_to_0_or_1():
    torch.manual_seed(0)
    x = torch.full((20, 3, 16, 16), 0.5)
    noisy = salt_and_pepper(x, 0.1)
    changed = (noisy != 0.5).any(dim=1)
    assert changed.float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert set(noisy[(noisy != 0.5)].unique().tolist()) == {0.0, 1.0}
    assert ((noisy != 0.5).all(dim=1) == changed).all()  # all channels of a location together


def test_detoxify_by_hand():
    features = torch.tensor([[[[2.0]], [[4.0]]]])  # 1 x 2 channels x 1 x 1
    out = detoxify(features, torch.tensor([0.0, 0.25]), torch.tensor([9.0, 8.0]))
    assert out.flatten().tolist() == [2.0, 0.75 * 4 + 0.25 * 8]


def test_margin_and_partial_l2_by_hand():
    teacher = torch.tensor([[[[-2.0, -1.0]], [[3.0, 1.0]]]])  # channels: negative, positive
    margin = activation_margin(teacher)
    assert margin.tolist() == [-1.5, 0.0]
    # targets: max(t, m) = [-1.5, -1] and [3, 1]
    student = torch.tensor([[[[-3.0, 0.5]], [[2.0, 2.0]]]])
    # s = -3 <= t = -1.5 <= 0: no loss; 0.5 vs -1: 2.25; 2 vs 3: 1; 2 vs 1: 1
    assert partial_l2(student, teacher, margin).item() == pytest.approx((0 + 2.25 + 1 + 1) / 4)


def test_anomaly_index_flags_the_small_outlier():
    index, cls = anomaly_index([10.0, 11.0, 9.0, 10.5, 2.0, 9.5])
    median, mad = 9.75, 0.75 * 1.4826  # |x - median|: .25 1.25 .75 .75 7.75 .25 -> median .75
    assert cls == 4 and index == pytest.approx((median - 2.0) / mad)


def test_detoxified_teacher_replaces_the_masked_channels_only():
    net, x = model(), torch.rand(4, 1, 8, 8)
    stage = feature_stages("cnn-large")[-1]
    pattern = benign_pattern(net, stage, x)
    mask = torch.zeros(128)
    assert torch.allclose(DetoxifiedTeacher(net, stage, mask, pattern)(x), net(x))
    mask[:64] = 1.0
    detox = DetoxifiedTeacher(net, stage, mask, pattern)
    _, (features,) = stage_features(detox.teacher, x, [stage])
    assert torch.allclose(features[:, :64], pattern[:64].view(1, -1, 1, 1).expand(4, 64, 4, 4))
    _, (original,) = stage_features(net, x, [stage])
    assert torch.allclose(features[:, 64:], original[:, 64:])
    assert not net.net[7]._forward_hooks  # the hook sits on the wrapper's own copy


class CornerModel(torch.nn.Module):
    """Two classes: 0 when the bottom-right pixel is bright, else 1 (a planted one-pixel trigger)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        corner = x[:, 0, -1, -1] - 0.5
        return torch.stack([self.scale * corner, -self.scale * corner], dim=1)


def test_neural_cleanse_finds_a_planted_one_pixel_trigger():
    torch.manual_seed(0)
    images = torch.rand(32, 1, 6, 6) * 0.4  # every corner dark: all class 1
    norm, mask, pattern = reverse_engineer_trigger(CornerModel().requires_grad_(False), images, 0,
                                                   steps=150)
    assert norm < 2.0  # about one pixel
    assert mask.argmax().item() == 35 and pattern[0, -1, -1] > 0.5
