"""The teacher cache: round trip, tamper and mismatch detection, build-once."""

import json

import pytest
import torch

from pmafl.data import load_dataset
from pmafl.models import create_model
from pmafl.teacher import (
    TeacherError,
    ensure_teacher,
    file_sha256,
    load_teacher,
    save_teacher,
    teacher_path,
)

META = {"model": "cnn-small", "num_classes": 10, "in_channels": 1, "mean": [0.3], "std": [0.4]}


def saved_teacher(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn-small", 10, 1, [0.3], [0.4])
    path = tmp_path / "digits--cnn-small.pt"
    return model, path, save_teacher(model, path, META)


def test_round_trip_restores_weights_and_freezes_the_teacher(tmp_path):
    model, path, sha256 = saved_teacher(tmp_path)
    assert sha256 == file_sha256(path)
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == sha256
    loaded, loaded_sha = load_teacher(path, 10, expected_sha256=sha256)
    assert loaded_sha == sha256 and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(loaded(x), model.eval()(x))


def test_tampered_file_is_refused(tmp_path):
    _, path, sha256 = saved_teacher(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(TeacherError, match=f"cache recorded {sha256}: the file was modified"):
        load_teacher(path, 10)


def test_missing_file_and_missing_record_are_refused(tmp_path):
    with pytest.raises(TeacherError, match="is missing"):
        load_teacher(tmp_path / "absent.pt", 10)
    _, path, _ = saved_teacher(tmp_path)
    path.with_suffix(".json").unlink()
    with pytest.raises(TeacherError, match="record .* is missing"):
        load_teacher(path, 10)


def test_checksum_other_than_the_run_expects_is_refused(tmp_path):
    _, path, _ = saved_teacher(tmp_path)
    with pytest.raises(TeacherError, match="the run expects " + "0" * 64):
        load_teacher(path, 10, expected_sha256="0" * 64)


def test_wrong_number_of_classes_is_refused(tmp_path):
    _, path, _ = saved_teacher(tmp_path)
    with pytest.raises(TeacherError, match="predicts 10 classes, the dataset has 100"):
        load_teacher(path, 100)


def test_ensure_teacher_builds_once_then_reuses(tmp_path):
    data = load_dataset("digits")
    path = teacher_path(tmp_path, "digits", "cnn-small")
    _, sha256 = ensure_teacher(path, data, "digits", "cnn-small", "ce", epochs=1, eps=0.2, pgd_step=0.05)
    built = path.stat().st_mtime_ns
    _, again = ensure_teacher(path, data, "digits", "cnn-small", "ce", epochs=1, eps=0.2, pgd_step=0.05)
    assert again == sha256 and path.stat().st_mtime_ns == built
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["dataset"] == "digits" and 0.0 <= record["test_clean_acc"] <= 1.0


def test_seed_command_copies_the_exact_file_and_prints_its_checksum(tmp_path, capsys):
    from pmafl.teacher_cli import main

    model, source, sha256 = saved_teacher(tmp_path / "elsewhere")
    record = json.loads(source.with_suffix(".json").read_text())
    source.with_suffix(".json").write_text(json.dumps({**record, "dataset": "digits"}))
    assert main(["seed", str(source), "--cache-dir", str(tmp_path / "node")]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {sha256}" in out and f"teacher-sha256='{sha256}'" in out
    target = teacher_path(tmp_path / "node", "digits", "cnn-small")
    assert target.read_bytes() == source.read_bytes()
    loaded, loaded_sha = load_teacher(target, 10, sha256)  # what a node's run does
    assert loaded_sha == sha256
    assert main(["show", "--cache-dir", str(tmp_path / "node")]) == 0
    assert f"ok           {sha256}" in capsys.readouterr().out


def test_seed_command_refuses_bad_files_with_the_reason(tmp_path, capsys):
    from pmafl.teacher_cli import main

    _, source, _ = saved_teacher(tmp_path / "elsewhere")
    bare = tmp_path / "weights.pt"
    bare.write_bytes(source.read_bytes())
    assert main(["seed", str(bare), "--cache-dir", str(tmp_path / "node")]) == 1
    assert "pass --dataset and --model" in capsys.readouterr().err
    # No record: the architecture comes from the flags, and must fit the weights.
    assert main(["seed", str(bare), "--cache-dir", str(tmp_path / "node"), "--dataset", "digits",
                 "--model", "cnn-large"]) == 1
    assert "is not a state dict of 'cnn-large' for digits" in capsys.readouterr().err
    assert main(["seed", str(bare), "--cache-dir", str(tmp_path / "node"), "--dataset", "digits",
                 "--model", "cnn-small"]) == 0
    assert f"sha256 {file_sha256(bare)}" in capsys.readouterr().out
    # A file that no longer matches its own record is refused.
    with source.open("ab") as f:
        f.write(b"x")
    assert main(["seed", str(source), "--cache-dir", str(tmp_path / "other")]) == 1
    assert "does not match the sha256" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
