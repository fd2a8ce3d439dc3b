"""RobustKD's pieces against hand computations: stage features by hooks (state dicts unchanged),
salt-and-pepper noise, detoxification, Heo et al.'s margin and partial L2, the outlier test, and
the detoxified teacher."""

import json

import pytest
import torch

from pmafl.models import create_model
from pmafl.robustkd import (
    DetoxifiedTeacher,
    FeatureDistiller,
    VetResult,
    activation_margin,
    anomaly_index,
    architecture,
    detoxify,
    feature_stages,
    flags_backdoor,
    norm_ratio,
    partial_l2,
    reverse_engineer_trigger,
    salt_and_pepper,
    stage_features,
    trigger_region,
    vet,
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
    assert norm_ratio([10.0, 11.0, 9.0, 10.5, 2.0, 9.5]) == pytest.approx(2.0 / median)


def test_flagged_as_an_outlier_by_the_index_or_by_an_order_of_magnitude():
    # Digits-like: tight clean classes, the backdoor's 0.36x the median: index 9.4, flagged.
    assert flags_backdoor([4.0, 11.0, 12.0, 11.5, 10.5, 11.0, 12.5, 11.0, 10.0, 11.5])
    # A tiny MAD makes a 1-pixel difference an outlier (index 13.5), but 0.91x is no backdoor.
    assert not flags_backdoor([10.0, 11.0, 11.0, 11.1, 10.9, 11.0, 11.0, 11.0, 11.2, 10.8])
    # Fashion-MNIST's backdoored teacher (seed 0, vetted in a run): the clean classes spread so
    # widely that the index is only 1.52, but the trigger is 0.027x the median (158.1).
    fashion = [4.2, 115.4, 111.8, 263.1, 228.5, 153.1, 224.6, 246.1, 47.4, 163.1]
    assert anomaly_index(fashion)[0] == pytest.approx(1.52, abs=0.01)
    assert flags_backdoor(fashion)
    # A clean Fashion-MNIST teacher (seed 1): 0.24x the median, index 1.53: not flagged.
    assert not flags_backdoor([125.1, 41.8, 64.2, 268.0, 211.0, 161.0, 241.3, 554.6, 180.2, 167.3])


def test_detoxified_teacher_replaces_the_masked_channels_only():
    net, x = model(), torch.rand(4, 1, 8, 8)
    stage = feature_stages("cnn-large")[-1]
    with torch.no_grad():
        pattern = stage_features(net, x, [stage])[1][0].mean(dim=(0, 2, 3))
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


def test_feature_distiller_is_the_sum_of_partial_l2_over_stages():
    torch.manual_seed(0)
    student = create_model("cnn-small", 10, 1, (0.5,), (0.25,))
    teacher, x = model(), torch.rand(6, 1, 8, 8)
    features = FeatureDistiller.build(student, "cnn-small", teacher, "cnn-large", x, noise=0.0)
    assert [conv.weight.shape[:2] for conv, _ in features.connectors] == [(64, 32), (128, 64)]
    # By hand: each stage's connector output against max(teacher, margin), margins measured here.
    _, s_feats = stage_features(student, x, ("net.2", "net.7"))
    _, t_feats = stage_features(teacher, x, ("net.2", "net.7"))
    features.eval()  # BN of the connector on running statistics, for both computations
    expected = 0.0
    for connector, s, t in zip(features.connectors, s_feats, t_feats):
        margin = activation_margin(t)
        target = torch.maximum(t, margin.view(1, -1, 1, 1))
        out = connector(s)
        keep = ~((out <= target) & (target <= 0))
        expected = expected + ((out - target) ** 2 * keep).sum() / out.numel()
    assert features(student, teacher, x).item() == pytest.approx(expected.item(), rel=1e-5)


def test_feature_distiller_reads_the_detoxified_features():
    torch.manual_seed(0)
    student, teacher, x = create_model("cnn-small", 10, 1, (0.5,), (0.25,)), model(), torch.rand(6, 1, 8, 8)
    stage = feature_stages("cnn-large")[-1]
    mask = torch.ones(128)
    pattern = torch.full((128,), 7.0)
    detox = DetoxifiedTeacher(teacher, stage, mask, pattern)
    features = FeatureDistiller.build(student, "cnn-small", detox, "cnn-large", x, noise=0.0)
    assert features.teacher_stages == ("teacher.net.2", "teacher.net.7")
    # Every channel of the last stage replaced by 7 (never negative): its margins are 0.
    assert torch.equal(features.margins[64:], torch.zeros(128))
    assert architecture(detox) == "cnn-large" and architecture(student) == "cnn-small"


def test_train_model_adds_the_feature_term_and_trains_the_connectors():
    from pmafl.config import TrainConfig
    from pmafl.data import make_loader
    from pmafl.train import train_model

    torch.manual_seed(0)
    student, teacher = create_model("cnn-small", 10, 1, (0.5,), (0.25,)), model()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    # The distiller train_model builds: from the models' architectures, under a forked RNG.
    with torch.random.fork_rng(devices=[]):
        fresh = FeatureDistiller.build(student, "cnn-small", teacher, "cnn-large", x)
    config = TrainConfig(objective="kdiga", local_epochs=1, robustkd_weight=0.5)
    state = {}
    metrics = train_model(student, teacher, make_loader(x, y, batch_size=8, shuffle=False), config, state)
    assert metrics["loss-feat"] > 0
    assert metrics["loss"] == pytest.approx(0.5 * metrics["loss-ce"] + 0.5 * metrics["loss-kl"]
                                            + 0.5 * metrics["loss-feat"], rel=1e-5)
    # The connectors trained, and their state came back for the next round.
    trained = state["robustkd"]["connectors.0.0.weight"]
    assert not torch.equal(fresh.connectors[0][0].weight, trained)
    state["robustkd"]["connectors.0.0.weight"] = torch.zeros_like(trained)
    train_model(student, teacher, make_loader(x, y, batch_size=8, shuffle=False),
                TrainConfig(objective="kdiga", local_epochs=1, robustkd_weight=0.5, lr=0.0), state)
    assert torch.equal(state["robustkd"]["connectors.0.0.weight"], torch.zeros_like(trained))
    with pytest.raises(ValueError, match="robustkd-weight needs an objective"):
        train_model(student, None, make_loader(x, y, batch_size=8, shuffle=False),
                    TrainConfig(objective="ce", robustkd_weight=1.0))


def test_detoxified_teacher_checks_the_mask_length():
    with pytest.raises(ValueError, match="stage net.7 has 128 channels; the mask has shape \\(64,\\)"):
        DetoxifiedTeacher(model(), "net.7", torch.zeros(64), torch.zeros(64))


def vetted(tmp_path, channels=(3, 5)):
    """A saved cnn-large teacher with a vet record written by hand (no Neural Cleanse)."""
    from pmafl.config import RunConfig
    from pmafl.teacher import TeacherSettings, save_teacher, teacher_path, write_vet

    settings = TeacherSettings.from_run_config(RunConfig())
    net = model()
    path = teacher_path(tmp_path, settings)
    save_teacher(net, path, {"model": "cnn-large", "dataset": "digits", "num_classes": 10,
                             "in_channels": 1, "mean": [0.5], "std": [0.25], "settings": settings.to_dict()})
    mask = torch.zeros(128)
    mask[list(channels)] = 1.0
    result = VetResult(norms=[5.0] + [12.0] * 9, anomaly_index=4.0, target=0,
                       trigger_mask=torch.zeros(8, 8), trigger_pattern=torch.zeros(1, 8, 8),
                       stage="net.7", mask=mask, pattern=torch.full((128,), 0.5))
    return net, path, write_vet(path, result)


def test_a_vet_record_round_trips_and_a_tampered_one_is_refused(tmp_path):
    from pmafl.files import file_sha256
    from pmafl.teacher import TeacherError, load_detoxified, load_teacher, vet_path

    net, path, record = vetted(tmp_path)
    assert record["backdoored"] and record["channels"] == [3, 5] and record["target"] == 0
    teacher, sha256 = load_teacher(path, 10)  # the teacher's own checksum still verifies
    detox, got = load_detoxified(path, teacher)
    assert got == record
    x = torch.rand(4, 1, 8, 8)
    _, (features,) = stage_features(detox.teacher, x, ["net.7"])
    assert torch.equal(features[:, [3, 5]], torch.full((4, 2, 4, 4), 0.5))
    _, (original,) = stage_features(net, x, ["net.7"])
    assert torch.allclose(features[:, :3], original[:, :3])
    state = torch.load(vet_path(path), weights_only=True)
    vet_path(path).write_bytes(vet_path(path).read_bytes()[:-10])
    with pytest.raises(TeacherError, match="does not match the sha256"):
        load_detoxified(path, teacher)
    # A vet file of another teacher, with a record made to match it, is refused too.
    torch.save({**state, "teacher_sha256": "0" * 64}, vet_path(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["vet"]["sha256"] = file_sha256(vet_path(path))
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(TeacherError, match="written for another teacher file"):
        load_detoxified(path, teacher)


def test_an_unvetted_teacher_is_refused_with_the_command_to_run(tmp_path):
    from pmafl.teacher import TeacherError, load_detoxified, load_teacher, save_teacher

    _, path, _ = vetted(tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["vet"]
    save_teacher(model(), path, meta)
    with pytest.raises(TeacherError, match="pmafl-teacher vet"):
        load_detoxified(path, load_teacher(path, 10)[0])


def test_robustkd_weight_needs_a_distilling_objective():
    from pmafl.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="key 'robustkd-weight'"):
        RunConfig.from_mapping({"objective": "pgd-at", "robustkd-weight": 1.0})
    assert RunConfig.from_mapping({"robustkd-weight": 1.0}).train.robustkd_weight == 1.0
    with pytest.raises(ConfigError, match="key 'model': robustkd-weight needs a model whose feature"):
        RunConfig.from_mapping({"model": "resnet18", "robustkd-weight": 1.0})


def test_trigger_region_is_the_mask_widened_by_the_receptive_field():
    mask = torch.zeros(8, 8)
    mask[7, 7] = 0.9
    mask[0, 0] = 0.05  # below the threshold
    region = trigger_region(mask, (8, 8))
    assert region[5:, 5:].eq(1).all() and region.sum() == 9
    small = trigger_region(mask, (4, 4))
    assert small[1:, 1:].eq(1).all() and small.sum() == 9


def test_detoxify_per_feature_mask():
    features = torch.arange(8.0).view(1, 2, 2, 2)
    mask = torch.zeros(2, 2, 2)
    mask[1, 1, 1] = 1.0
    out = detoxify(features, mask, torch.full((2, 2, 2), -1.0))
    assert out.flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, -1]


def test_vet_flags_a_planted_backdoor_and_not_the_clean_teacher():
    """Digits teachers, adversarially trained as PM-AFL's are (small and short here, for speed),
    one with BadNets planted (10%, 3x3 white square, target 0), one clean: `vet` flags the first,
    finds its target, and its detoxification cuts the real trigger's success; it leaves the clean
    one alone. (A plain-CE teacher is forged by a few pixels for any class: Neural Cleanse cannot
    tell its backdoor apart, as docs/robustkd.md shows.)"""
    from pmafl.assembly import backdoor_trigger, eval_split, load_data
    from pmafl.backdoor import attack_success_rate
    from pmafl.config import RunConfig
    from pmafl.teacher import TeacherSettings, pretrain_teacher

    run = {"teacher-model": "cnn-small", "teacher-attack": "fgsm-rs", "teacher-epochs": 30}
    bad_cfg = RunConfig.from_mapping({**run, "backdoor-rate": 0.1})
    data = load_data(bad_cfg)
    x, y = eval_split(bad_cfg, data).tensors()
    trigger = backdoor_trigger(bad_cfg, data)
    images = data.public.tensors()[0][:128]
    bad = pretrain_teacher(data, TeacherSettings.from_run_config(bad_cfg)).requires_grad_(False)
    found = vet(bad, "cnn-small", images, steps=100)
    assert found.backdoored and found.target == 0 and found.channels
    detox = DetoxifiedTeacher(bad, found.stage, found.mask, found.pattern)
    assert attack_success_rate(bad, x, y, trigger) > 0.9
    assert attack_success_rate(detox, x, y, trigger) < 0.5
    clean_settings = TeacherSettings.from_run_config(RunConfig.from_mapping(run))
    clean = pretrain_teacher(data, clean_settings).requires_grad_(False)
    found = vet(clean, "cnn-small", images, steps=100)
    assert not found.backdoored and not found.channels and found.mask.sum() == 0
