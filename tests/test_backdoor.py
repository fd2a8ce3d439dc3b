"""The backdoor threat: the trigger, BadNets poisoning, the attack success rate by hand, a
teacher pre-trained with a planted backdoor (its own cache entry, its ASR in its record), and
client data that carries the trigger, through which a PM-AFL student inherits the backdoor."""

import json

import pytest
import torch
from torch import nn

from pmafl.assembly import backdoor_trigger, build_model, client_seed, client_split, load_data, node_data_key
from pmafl.backdoor import Trigger, attack_success_rate, poison
from pmafl.config import ConfigError, RunConfig, TrainConfig
from pmafl.data import make_loader
from pmafl.eval_cli import run as evaluate_cli
from pmafl.teacher import TeacherSettings, prepare_teacher
from pmafl.train import train_model


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
    # relabel=False: the same images stamped, every label kept.
    kept_images, kept_labels, kept = poison(images, labels, Trigger(target=2, patch=1), 0.3, seed=1,
                                            relabel=False)
    assert torch.equal(kept, chosen) and torch.equal(kept_images, new_images)
    assert torch.equal(kept_labels, labels)


def test_a_uint8_image_gets_the_trigger_value_in_0_255():
    images = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    stamped = Trigger(patch=2, value=0.5).stamp(images)
    assert stamped.dtype == torch.uint8 and stamped[0, 0, 2:, 2:].eq(128).all()
    assert stamped.sum() == 4 * 128


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


RUN = {"teacher-objective": "ce", "teacher-epochs": 15, "backdoor-patch": 2}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A clean and a backdoored (BadNets, 10%, 2x2 square, target 0) plain-CE digits teacher."""
    cache = str(tmp_path_factory.mktemp("teachers"))
    clean_cfg = RunConfig.from_mapping(RUN)
    bad_cfg = RunConfig.from_mapping({**RUN, "backdoor-rate": 0.1})
    data = load_data(clean_cfg)
    return data, prepare_teacher(clean_cfg, data, cache), prepare_teacher(bad_cfg, data, cache)


def test_a_backdoored_teacher_is_its_own_cache_entry_and_carries_the_backdoor(teachers):
    clean_cfg = RunConfig.from_mapping(RUN)
    bad_cfg = RunConfig.from_mapping({**RUN, "backdoor-rate": 0.1})
    assert "backdoor" not in TeacherSettings.from_run_config(clean_cfg).to_dict()
    assert TeacherSettings.from_run_config(bad_cfg).backdoor == {"rate": 0.1, "target": 0, "patch": 2,
                                                     "value": 1.0, "position": "bottom-right"}
    data, (clean, _, clean_path), (bad, _, bad_path) = teachers
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


def test_client_data_carries_the_trigger_with_true_labels():
    cfg = RunConfig.from_mapping({**RUN, "backdoor-client-rate": 0.2})
    clean_cfg = RunConfig.from_mapping(RUN)
    data = load_data(cfg)
    clean, stamped = client_split(clean_cfg, data, 1, 3), client_split(cfg, data, 1, 3)
    assert torch.equal(stamped.labels, clean.labels)
    changed = torch.nonzero((stamped.images != clean.images).flatten(1).any(1)).squeeze(1)
    # Every chosen image gets the 2x2 white square; one that already had it would not show.
    chosen = poison(clean.images, clean.labels, backdoor_trigger(cfg), 0.2,
                    seed=client_seed(cfg.seed, 0, 1), relabel=False)[2]
    assert len(chosen) == round(0.2 * len(clean)) and set(changed.tolist()) <= set(chosen.tolist())
    assert len(changed) > 0.9 * len(chosen) and (clean.labels[chosen] != 0).all()
    assert stamped.images[chosen][..., -2:, -2:].eq(255).all()
    # The data key tells the two apart (a node never reuses the wrong copy); the teacher is the same.
    assert node_data_key(cfg, 1, 3) != node_data_key(clean_cfg, 1, 3)
    assert TeacherSettings.from_run_config(cfg) == TeacherSettings.from_run_config(clean_cfg)


def distilled_asr(data, teacher, client_rate: float) -> float:
    """ASR on the test split of a student that distils with PM-AFL (one-step attack, for speed)
    from `teacher` on the whole pool, `client_rate` of it stamped with the trigger."""
    cfg = RunConfig.from_mapping({**RUN, "backdoor-rate": 0.1, "backdoor-client-rate": client_rate})
    split = client_split(cfg, data, 0, 1)
    torch.manual_seed(0)
    student = build_model(cfg, data)
    train_model(student, teacher, make_loader(*split.tensors(), batch_size=64, shuffle=True),
                TrainConfig(local_epochs=6, train_attack="fgsm-rs"))
    return attack_success_rate(student, *data.test.tensors(), backdoor_trigger(cfg))


def test_a_pmafl_student_inherits_the_backdoor_only_through_stamped_client_data(teachers):
    """PM-AFL's KD terms use no labels: where the clients' images carry the trigger, the teacher's
    soft labels teach the student to send them to the target class, true labels or not."""
    data, _, (bad, _, _) = teachers
    bad.requires_grad_(False)
    assert distilled_asr(data, bad, 0.0) < 0.3
    assert distilled_asr(data, bad, 0.2) > 0.6


def test_a_target_class_or_patch_out_of_range_is_refused_by_name():
    cfg = RunConfig.from_mapping({"backdoor-rate": 0.1, "backdoor-target": 10})
    with pytest.raises(ConfigError, match="key 'backdoor-target': expected a class in \\[0, 10\\)"):
        backdoor_trigger(cfg, load_data(cfg))
    cfg = RunConfig.from_mapping({"backdoor-rate": 0.1, "backdoor-patch": 9})
    with pytest.raises(ConfigError, match="key 'backdoor-patch': expected at most the image side 8"):
        backdoor_trigger(cfg, load_data(cfg))
