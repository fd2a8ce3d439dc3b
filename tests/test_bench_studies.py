"""bench/worst_node.py and bench/teacher_study.py: the analysis against numbers recomputed here,
and argument checks before any work. (A real federation runs in tests/test_simulation.py.)"""

import json

import numpy as np
import pytest
import teacher_study
import torch
import worst_node

from pmafl.assembly import build_model, load_data, node_data
from pmafl.config import RunConfig
from pmafl.teacher import prepare_teacher


def test_worst_node_predicts_each_node_from_its_class_mix(tmp_path):
    # The run's teacher in a cache of the test's own (a one-epoch one): the user's cache may not hold it.
    cfg = RunConfig.from_mapping({"seed": 3, "teacher-cache-dir": str(tmp_path / "teachers"),
                                  "teacher-epochs": 1})
    prepare_teacher(cfg, load_data(cfg))
    torch.manual_seed(0)
    model = build_model(cfg, load_data(cfg))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "results.json").write_text(json.dumps(
        {"config": cfg.to_dict(), "rounds": [{"round": 1, "fed_num_clients": 4}]}))

    result = worst_node.analyse(tmp_path, test_n=200)

    assert result["test_n"] == 200 and len(result["nodes"]) == 4
    class_pgd = np.array([p["pgd20_acc"] for p in result["per_class"]])
    class_n = np.array([p["n"] for p in result["per_class"]])
    assert class_n.sum() == 200 and result["pgd20_acc"] == pytest.approx(class_pgd @ class_n / 200)
    pool = 0
    for row in result["nodes"]:
        node = node_data(cfg, row["node"], 4)
        labels = node.test.labels.numpy()
        share = np.bincount(labels, minlength=10) / len(labels)
        assert row["predicted_pgd20_acc"] == pytest.approx(float(share @ class_pgd))
        assert row["train_class_counts"] == np.bincount(node.train.labels.numpy(), minlength=10).tolist()
        counts = np.array(row["train_class_counts"], dtype=float)
        p = counts[counts > 0] / counts.sum()
        assert row["effective_classes"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
        x, y = node.test.tensors()
        with torch.no_grad():  # the clean score, recomputed
            clean = (model.eval()(x).argmax(1) == y).float().mean().item()
        assert row["clean_acc"] == pytest.approx(clean)
        pool += row["train_examples"]
    assert pool == len(load_data(cfg).pool)  # the four partitions cover the pool
    teacher_class = np.array([p["teacher_pgd20_acc"] for p in result["per_class"]])
    assert result["teacher_pgd20_acc"] == pytest.approx(teacher_class @ class_n / 200)


def test_worst_node_refuses_a_folder_without_a_finished_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        worst_node.main([str(tmp_path)])
    assert "holds no results.json" in capsys.readouterr().err


@pytest.mark.parametrize("variant, message", [
    ("nokeys", "NAME=KEYS"),
    ("=teacher-epochs=3", "NAME=KEYS"),
    ("x=teacher-epochs=0", "'teacher-epochs': expected an integer >= 1, got 0"),
    ("x=no-such-key=1", "no-such-key"),
])
def test_teacher_study_refuses_a_bad_variant_before_any_teacher_trains(variant, message, capsys):
    with pytest.raises(SystemExit):
        teacher_study.parse_args(["--variant", variant])
    assert message in capsys.readouterr().err


def test_teacher_study_variants_add_their_keys_to_the_shared_ones():
    args = teacher_study.parse_args(["--set", "dataset='fashion-mnist'", "--variant", "a=",
                                     "--variant", "b=teacher-epochs=30 public-fraction=0.2"])
    assert args.variants == {"a": ["dataset='fashion-mnist'"],
                             "b": ["dataset='fashion-mnist'", "teacher-epochs=30", "public-fraction=0.2"]}
    assert set(teacher_study.parse_args([]).variants) == set(teacher_study.VARIANTS)


def test_same_rounds_finds_a_changed_value_and_ignores_timing(tmp_path):
    import same_rounds

    before = {"config": {"seed": 0, "results-dir": "a"},
              "rounds": [{"round": 0, "clean_acc": 0.5, "round_seconds": 1.0},
                         {"round": 1, "clean_acc": 0.75, "round_seconds": 2.0}]}
    timing = {"config": {"seed": 0, "results-dir": "b"},
              "rounds": [{"round": 0, "clean_acc": 0.5, "round_seconds": 9.0},
                         {"round": 1, "clean_acc": 0.75, "round_seconds": 3.0}]}
    assert same_rounds.differences(before, timing) == []
    changed = json.loads(json.dumps(timing))
    changed["rounds"][1]["clean_acc"] = 0.7
    assert same_rounds.differences(before, changed) == ["round 1 clean_acc: 0.75 before, 0.7 after"]
    changed["rounds"][1] = {"clean_acc": 0.75, "round": 1}
    assert "round 1: keys ['round', 'clean_acc'] before" in same_rounds.differences(before, changed)[0]


def test_curves_average_the_seeds_round_by_round():
    import curves

    seeds = [[{"round": 0, "clean_acc": 0.1, "pgd_acc": 0.0}, {"round": 1, "clean_acc": 0.5, "pgd_acc": 0.2}],
             [{"round": 0, "clean_acc": 0.3, "pgd_acc": 0.0}, {"round": 1, "clean_acc": 0.7, "pgd_acc": 0.4},
              {"round": 2, "clean_acc": 0.9, "pgd_acc": 0.5}]]
    out = curves.summarise(seeds)
    assert out["rounds"] == [0, 1] and out["seeds"] == 2  # the rounds every seed has
    assert out["clean_acc"] == pytest.approx([0.2, 0.6])
    assert out["pgd_acc_std"] == pytest.approx([0.0, 0.1414213562])  # stdev of 0.2, 0.4


def test_curves_read_one_runs_results_file(tmp_path):
    import curves

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"config": {}, "rounds": [
        {"round": 0, "clean_acc": 0.1, "pgd_acc": 0.0}, {"round": 1, "loss": 2.0},  # no evaluation
        {"round": 2, "clean_acc": 0.6, "pgd_acc": 0.3}]}))
    out = tmp_path / "c.json"
    assert curves.main(["--run", f"probe={results}", "--out", str(out)]) == 0
    probe = json.loads(out.read_text())["probe"]
    assert probe["rounds"] == [0, 2] and probe["seeds"] == 1 and probe["clean_acc"] == [0.1, 0.6]
    with pytest.raises(SystemExit, match="no such results file"):
        curves.main(["--run", f"probe={tmp_path / 'missing.json'}", "--out", str(out)])


def test_teacher_study_reads_a_teacher_report_only_for_the_same_file_and_images(tmp_path):
    from pmafl.files import file_sha256

    teacher = tmp_path / "t.pt"
    teacher.write_bytes(b"weights")
    report = tmp_path / "teachers" / "default.json"
    report.parent.mkdir()
    report.write_text(json.dumps({"model_file": str(teacher), "num_examples": 2000, "autoattack_n": 200,
                                  "clean_acc": 0.8}))
    args = teacher_study.parse_args(["--variant", "default="])
    sha = file_sha256(teacher)
    assert teacher_study.scored_before(report, sha, args)["clean_acc"] == 0.8
    assert teacher_study.scored_before(report, "0" * 64, args) is None  # another teacher file
    args.autoattack_n = 100
    assert teacher_study.scored_before(report, sha, args) is None  # other images
    assert teacher_study.scored_before(tmp_path / "absent.json", sha, args) is None



def test_teacher_study_scores_the_whole_test_split_again(tmp_path):
    """With --test-n 0 a report cannot show which images it used: the teacher is scored again."""
    from pmafl.files import file_sha256

    teacher = tmp_path / "t.pt"
    teacher.write_bytes(b"weights")
    report = tmp_path / "default.json"
    report.write_text(json.dumps({"model_file": str(teacher), "num_examples": 10000, "autoattack_n": 200}))
    args = teacher_study.parse_args(["--variant", "default=", "--test-n", "0"])
    assert teacher_study.scored_before(report, file_sha256(teacher), args) is None
    args.test_n = 10000
    assert teacher_study.scored_before(report, file_sha256(teacher), args) is not None
