"""Accuracy under attack, the gradient-masking check, and the pmafl-evaluate command."""

import json

import numpy as np
import pytest
import torch

from pmafl.attacks import eval_pgd
from pmafl.data import evaluation_subset, load_dataset
from pmafl.eval_cli import run
from pmafl.evaluate import (
    accuracy,
    catastrophic_overfitting,
    evaluate,
    gradient_masking_warnings,
    sweep_radii,
)
from pmafl.models import create_model
from pmafl.teacher import save_teacher


class Fixed(torch.nn.Module):
    """Predicts class 1 for images whose mean is above 0.5, else class 0."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(50.0))

    def forward(self, x):
        score = (x.flatten(1).mean(1) - 0.5) * self.scale
        return torch.stack([-score, score], dim=1)


def test_accuracy_counts_correct_predictions():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (0.1, 0.9, 0.45, 0.7)])
    labels = torch.tensor([0, 1, 1, 1])  # the third is wrong
    assert accuracy(Fixed(), images, labels, batch_size=3) == pytest.approx(0.75)


def test_pgd_accuracy_matches_the_margin_it_can_cross():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (0.1, 0.42, 0.58, 0.9)])
    labels = torch.tensor([0, 0, 1, 1])
    scores = evaluate(Fixed(), images, labels, eps=0.1)
    # eps 0.1 flips the two images within 0.1 of the 0.5 boundary, not the other two
    assert scores["clean_acc"] == 1.0 and scores["pgd_acc"] == pytest.approx(0.5)


def test_gradient_masking_warnings():
    falling = [{"eps": e, "pgd20_acc": a} for e, a in [(0, 0.9), (0.1, 0.5), (0.2, 0.01)]]
    assert gradient_masking_warnings(falling, 100) == []
    rising = [{"eps": e, "pgd20_acc": a} for e, a in [(0, 0.9), (0.1, 0.3), (0.2, 0.4), (0.4, 0.0)]]
    [warning] = gradient_masking_warnings(rising, 100)
    assert "rises from 0.300 at eps 0.1 to 0.400 at eps 0.2" in warning
    stuck = [{"eps": e, "pgd20_acc": a} for e, a in [(0, 0.9), (1.0, 0.3)]]
    assert "still 0.300 at the largest eps 1" in gradient_masking_warnings(stuck, 100)[0]
    assert gradient_masking_warnings([{"eps": 0.0, "pgd20_acc": 0.8}], 100) == []  # clean only
    assert gradient_masking_warnings([], 100) == []


def test_cli_evaluates_a_cached_teacher_and_writes_json(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "digits--cnn-small.pt"
    save_teacher(create_model("cnn-small", 10, 1, [0.3], [0.4]), path,
                 {"model": "cnn-small", "dataset": "digits", "num_classes": 10, "in_channels": 1,
                  "mean": [0.3], "std": [0.4], "settings": {"eps": 0.2, "public_fraction": 0.3}})
    report = run([str(path), "--limit", "24", "--autoattack-n", "4", "--sweep", "0,1,2,5"])
    written = json.loads((tmp_path / "digits--cnn-small.pt.robustness.json").read_text())
    assert written == report
    assert report["eps"] == 0.2 and report["num_examples"] == 24 and report["autoattack_n"] == 4
    # PGD-20 on AutoAttack's own 4 images, the figure AutoAttack must not exceed.
    assert report["autoattack_acc"] <= report["autoattack_subset_pgd20_acc"] <= 1.0
    for key in ("clean_acc", "fgsm_acc", "pgd20_acc", "cw_acc", "autoattack_acc"):
        assert 0.0 <= report[key] <= 1.0
    # 5 x 0.2 = 1.0 proves nothing (any image reaches grey at 0.5): the sweep stops at 0.4.
    assert [row["eps"] for row in report["eps_sweep"]] == [0.0, 0.2, 0.4]
    # The teacher normalises as its record says (mean 0.3, std 0.4), on the stratified subset.
    data = load_dataset("digits")
    images, labels = evaluation_subset(data.test, 24).tensors()
    assert np.bincount(labels.numpy(), minlength=10).min() >= 2  # every class, in proportion
    model = create_model("cnn-small", 10, 1, [0.3], [0.4])
    model.load_state_dict(torch.load(path, weights_only=True))
    assert report["clean_acc"] == accuracy(model, images, labels)
    assert data.mean != (0.3,)
    assert report["eps_sweep"][0]["pgd20_acc"] == report["clean_acc"]


def test_cli_needs_an_architecture_when_nothing_records_it(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({}, path)
    with pytest.raises(SystemExit, match="no record beside .* gives --model"):
        run([str(path)])


def test_catastrophic_overfitting_is_flagged_when_pgd_collapses_as_fgsm_rises():
    rows = [{"round": 0, "clean_acc": 0.1, "fgsm_acc": 0.1, "pgd_acc": 0.1},
            {"round": 1, "fgsm_acc": 0.50, "pgd_acc": 0.40},
            {"round": 2, "fgsm_acc": 0.55, "pgd_acc": 0.42}]
    assert catastrophic_overfitting(rows) == ""
    collapsed = rows + [{"round": 3, "fgsm_acc": 0.80, "pgd_acc": 0.05}]
    assert "PGD accuracy 0.050 (best 0.420 in round 2) while FGSM accuracy rose to 0.800" in \
        catastrophic_overfitting(collapsed)
    # PGD falling with FGSM falling too is a plain bad round, not catastrophic overfitting.
    assert catastrophic_overfitting(rows + [{"round": 3, "fgsm_acc": 0.3, "pgd_acc": 0.05}]) == ""
    # Noise near zero (an untrained model) is not either.
    noise = [{"round": 0, "fgsm_acc": 0.003, "pgd_acc": 0.003},
             {"round": 1, "fgsm_acc": 0.006, "pgd_acc": 0.0}]
    assert catastrophic_overfitting(noise) == ""


def test_sweep_radii_stop_where_reaching_zero_still_proves_something():
    assert sweep_radii(0.1, [0, 1, 2, 3, 4, 5]) == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert sweep_radii(0.2, [0, 0.25, 1, 2, 3]) == pytest.approx([0, 0.05, 0.2, 0.4])


def test_evaluate_reports_fgsm_and_pgd_with_step_eps_over_4():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (0.1, 0.42, 0.58, 0.9)])
    labels = torch.tensor([0, 0, 1, 1])
    scores = evaluate(Fixed(), images, labels, eps=0.1, steps=20)
    assert scores["fgsm_acc"] == pytest.approx(0.5) and scores["pgd_acc"] == pytest.approx(0.5)
    assert eval_pgd(Fixed(), 0.1).step == pytest.approx(0.025)


def test_cli_refuses_a_truncated_or_code_carrying_model_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(create_model("cnn-small", 10, 1, [0.3], [0.4]).state_dict(), path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(SystemExit, match="model.pt is not a plain state dict"):
        run([str(path), "--model", "cnn-small", "--dataset", "digits", "--eps", "0.2"])


def test_cli_writes_its_report_into_a_folder_it_creates(tmp_path):
    """A study writes each report into a folder of its own: it need not exist yet (a missing
    folder once cost an hour of AutoAttack at the write)."""
    path = tmp_path / "digits--cnn-small.pt"
    save_teacher(create_model("cnn-small", 10, 1, [0.3], [0.4]), path,
                 {"model": "cnn-small", "dataset": "digits", "num_classes": 10, "in_channels": 1,
                  "mean": [0.3], "std": [0.4], "settings": {"eps": 0.2, "public_fraction": 0.3}})
    out = tmp_path / "study" / "teachers" / "default.json"
    report = run([str(path), "--limit", "8", "--attacks", "fgsm", "--sweep", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == report
