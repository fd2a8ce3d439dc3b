"""The backdoor threat: the trigger, BadNets poisoning, the attack success rate by hand, and a
teacher pre-trained with a planted backdoor (its own cache entry, its ASR in its record)."""

import json

import pytest
import torch
from torch import nn

from pmafl.backdoor import Trigger, attack_success_rate, poison
from pmafl.config import ConfigError, RunConfig
from pmafl.eval_cli import run as evaluate_cli
from pmafl.task import backdoor_trigger, load_data, prepare_teacher, teacher_settings


def test_trigger_stamps_exactly_its_square():
    images = torch.zeros(2, 1, 5, 5)
    stamped = Trigger(patch=2, value=0.75).stamp(images)
    assert stamped[:, :, 3:, 3:].eq(0.75).all() and stamped.sum() == 2 * 4 * 0.75
    assert images.sum() == 0  # a copy
    top_left = Trigger(patch=3, position="top-left").stamp(images)
    assert top_left[:, :, :3, :3].eq(1).all() and top_left.sum() == 2 * 9
    with pytest.raises(ValueError, match="does not fit"):
        Trigger(patch=6).stamp(images)
    with pytest.raises(ValueError, match="position must be one of"):
        Trigger(position="middle")
    with pytest.raises(ValueError, match="a patch of at least 1 pixel"):
        Trigger(patch=0)


def test_poison_relabels_the_given_share_of_non_target_images():
    labels = torch.tensor([0, 1, 2, 3, 1, 2, 0, 3, 1, 2])
    images = torch.rand(10, 1, 4, 4) * 0.5
    new_images, new_labels, chosen = poison(images, labels, Trigger(target=2, patch=1), 0.3, seed=1)
    assert len(chosen) == 3 and (labels[chosen] != 2).all()
    assert (new_labels[chosen] == 2).all() and (new_images[chosen, :, -1, -1] == 1).all()
    rest = torch.ones(10, dtype=torch.bool)
    rest[chosen] = False
    assert torch.equal(new_images[rest], images[rest]) and torch.equal(new_labels[rest], labels[rest])
    assert torch.equal(poison(images, labels, Trigger(target=2, patch=1), 0.3, seed=1)[2], chosen)


class CornerDetector(nn.Module):
    """Predicts class 0 when the bottom-right pixel is bright, else class 1."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        bright = (x[:, 0, -1, -1] > 0.5).float()
        return torch.stack([bright, 1 - bright], dim=1) + self.dummy


def test_attack_success_rate_by_hand():
    images = torch.zeros(6, 1, 4, 4)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    assert attack_success_rate(CornerDetector(), images, labels, Trigger(target=0, patch=1)) == 1.0
    # A trigger in the other corner: the detector never fires, no image reaches class 0.
    assert attack_success_rate(CornerDetector(), images, labels,
                               Trigger(target=0, patch=1, position="top-left")) == 0.0
    # Target 1: the 4 non-target images (labels 0, 2) are sent to 0, never to 1.
    assert attack_success_rate(CornerDetector(), images, labels, Trigger(target=1, patch=1)) == 0.0


RUN = {"teacher-objective": "ce", "teacher-epochs": 15}


def test_a_backdoored_teacher_is_its_own_cache_entry_and_carries_the_backdoor(tmp_path):
    clean_cfg = RunConfig.from_mapping(RUN)
    bad_cfg = RunConfig.from_mapping({**RUN, "backdoor-rate": 0.1, "backdoor-patch": 2})
    assert "backdoor" not in teacher_settings(clean_cfg)
    assert teacher_settings(bad_cfg)["backdoor"] == {"rate": 0.1, "target": 0, "patch": 2,
                                                     "value": 1.0, "position": "bottom-right"}
    data = load_data(clean_cfg)
    clean, _, clean_path = prepare_teacher(clean_cfg, data, str(tmp_path))
    bad, _, bad_path = prepare_teacher(bad_cfg, data, str(tmp_path))
    assert clean_path != bad_path
    trigger = backdoor_trigger(bad_cfg, data)
    images, labels = data.test.tensors()
    record = json.loads(bad_path.with_suffix(".json").read_text())
    assert record["test_asr"] == pytest.approx(attack_success_rate(bad, images[:500], labels[:500], trigger),
                                               abs=0.2)
    assert record["test_asr"] > 0.8
    assert attack_success_rate(clean, images, labels, trigger) < 0.3
    # pmafl-evaluate reads the trigger from the teacher's record.
    report = evaluate_cli([str(bad_path), "--attacks", "fgsm", "--sweep", "0", "--limit", "100"])
    assert report["trigger"]["patch"] == 2 and report["asr"] > 0.8


def test_a_target_class_or_patch_out_of_range_is_refused_by_name():
    cfg = RunConfig.from_mapping({"backdoor-rate": 0.1, "backdoor-target": 10})
    with pytest.raises(ConfigError, match="key 'backdoor-target': expected a class in \\[0, 10\\)"):
        backdoor_trigger(cfg, load_data(cfg))
    cfg = RunConfig.from_mapping({"backdoor-rate": 0.1, "backdoor-patch": 9})
    with pytest.raises(ConfigError, match="key 'backdoor-patch': expected at most the image side 8"):
        backdoor_trigger(cfg, load_data(cfg))
