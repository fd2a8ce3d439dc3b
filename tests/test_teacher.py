"""The teacher cache: round trip, tamper and mismatch detection, build-once."""

import dataclasses
import json
import os
import stat

import pytest
import torch

from pmafl.config import RunConfig
from pmafl.data import load_dataset
from pmafl.files import file_sha256
from pmafl.models import create_model
from pmafl.teacher import (
    TeacherError,
    TeacherSettings,
    ensure_teacher,
    get_teacher,
    load_teacher,
    save_teacher,
    teacher_path,
)

SETTINGS = TeacherSettings.from_run_config(RunConfig.from_mapping({"teacher-model": "cnn-small"}))
META = {"model": "cnn-small", "dataset": "digits", "num_classes": 10, "in_channels": 1,
        "mean": [0.3], "std": [0.4], "settings": SETTINGS.to_dict()}


def saved_teacher(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn-small", 10, 1, [0.3], [0.4])
    path = teacher_path(tmp_path, SETTINGS)
    return model, path, save_teacher(model, path, META)


def test_import_completes_a_record_written_before_the_key_held_every_setting(tmp_path, capsys):
    """A record from before the cache key held the optimiser's and attack's settings lists only
    the first eight; import files the teacher under its full name, the missing settings at the
    defaults that pre-training used."""
    from pmafl.teacher import write_record
    from pmafl.teacher.cli import main

    _, source, _ = saved_teacher(tmp_path / "old")
    record = json.loads(source.with_suffix(".json").read_text())
    old = ("dataset", "model", "objective", "attack", "epochs", "eps", "public_fraction", "split_seed")
    record["settings"] = {k: record["settings"][k] for k in old}
    write_record(source, {k: v for k, v in record.items() if k not in ("sha256", "file")})
    assert main(["import", str(source), "--cache-dir", str(tmp_path / "node")]) == 0
    target = teacher_path(tmp_path / "node", SETTINGS)
    assert target.read_bytes() == source.read_bytes()
    assert json.loads(target.with_suffix(".json").read_text())["settings"] == SETTINGS.to_dict()
    load_teacher(target, 10, settings=SETTINGS)


def test_round_trip_restores_weights_and_freezes_the_teacher(tmp_path):
    model, path, sha256 = saved_teacher(tmp_path)
    assert sha256 == file_sha256(path)
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == sha256
    loaded, loaded_sha = load_teacher(path, 10, expected_sha256=sha256)
    assert loaded_sha == sha256 and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(loaded(x), model.eval()(x))


def test_teacher_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    # mkstemp makes 0o600 files; a teacher copied into a container that runs as another user
    # (Flower's images run as uid 49999) must stay readable.
    old = os.umask(0o022)
    try:
        _, path, _ = saved_teacher(tmp_path)
    finally:
        os.umask(old)
    for file in (path, path.with_suffix(".json")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


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
    settings = dataclasses.replace(SETTINGS, objective="ce", epochs=1)
    path = teacher_path(tmp_path, settings)
    _, sha256 = ensure_teacher(path, data, settings, data.test)
    built = path.stat().st_mtime_ns
    _, again = ensure_teacher(path, data, settings, data.test)
    assert again == sha256 and path.stat().st_mtime_ns == built
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["dataset"] == "digits" and 0.0 <= record["test_clean_acc"] <= 1.0
    assert record["settings"] == settings.to_dict() and record["test_examples"] == len(data.test)


def other_value(value):
    """A value of the same kind that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return {"rate": 0.1, "target": 1, "patch": 2, "value": 1.0, "position": "top-left"}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TeacherSettings)])
def test_every_pretraining_setting_is_in_the_cache_key(field):
    """Each field of TeacherSettings, the optimiser's and the attack's included, changes the
    file a run looks for: a changed default never serves a teacher trained otherwise."""
    changed = dataclasses.replace(SETTINGS, **{field: other_value(getattr(SETTINGS, field))})
    assert changed.key() != SETTINGS.key()
    assert teacher_path("", changed) != teacher_path("", SETTINGS)


def test_run_config_changes_that_define_the_teacher_change_its_settings():
    base = TeacherSettings.from_run_config(RunConfig())
    for overrides in ({"eps": 0.1}, {"teacher-objective": "ce"}, {"teacher-epochs": 3},
                      {"public-fraction": 0.2}, {"teacher-attack": "fgsm-rs"}):
        assert TeacherSettings.from_run_config(RunConfig.from_mapping(overrides)) != base, overrides
    assert TeacherSettings.from_run_config(RunConfig.from_mapping({"lr": 0.1, "seed": 4})) == base


def test_a_record_with_other_settings_is_refused_by_name(tmp_path):
    _, path, _ = saved_teacher(tmp_path)
    expected = "other settings than the run's \\(eps: 0.2 recorded, 0.1 wanted\\)"
    with pytest.raises(TeacherError, match=expected):
        load_teacher(path, 10, settings=dataclasses.replace(SETTINGS, eps=0.1))


def test_a_node_never_pretrains_inside_a_round(tmp_path):
    """get_teacher (the ClientApp's) refuses a missing teacher with the command that prepares it."""
    cfg = RunConfig.from_mapping({"teacher-cache-dir": str(tmp_path)})
    with pytest.raises(TeacherError, match="pmafl-teacher pretrain"):
        get_teacher(cfg, 10)
    assert not list(tmp_path.glob("*.pt"))


def test_pretrain_command_builds_the_teacher_a_run_looks_for(tmp_path, capsys):
    from pmafl.teacher.cli import main

    overrides = "teacher-model='cnn-small' teacher-objective='ce' teacher-epochs=1"
    assert main(["pretrain", "--cache-dir", str(tmp_path), "--run-config", overrides]) == 0
    out = capsys.readouterr().out
    cfg = RunConfig.from_mapping({"teacher-model": "cnn-small", "teacher-objective": "ce",
                                  "teacher-epochs": 1, "teacher-cache-dir": str(tmp_path)})
    path = teacher_path(tmp_path, TeacherSettings.from_run_config(cfg))
    assert f"Teacher {path}" in out and f"sha256 {file_sha256(path)}" in out
    assert get_teacher(cfg, 10)[1] == file_sha256(path)
    assert main(["pretrain", "--run-config", "eps=-1"]) == 1
    assert "--run-config key 'eps': expected a number >= 0" in capsys.readouterr().err


def test_import_command_copies_the_exact_file_and_prints_its_checksum(tmp_path, capsys):
    from pmafl.teacher.cli import main

    model, source, sha256 = saved_teacher(tmp_path / "elsewhere")
    record = json.loads(source.with_suffix(".json").read_text())
    assert record["settings"] == SETTINGS.to_dict()
    assert main(["import", str(source), "--cache-dir", str(tmp_path / "node")]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {sha256}" in out and f"teacher-sha256='{sha256}'" in out
    target = teacher_path(tmp_path / "node", SETTINGS)
    assert target.read_bytes() == source.read_bytes()
    loaded, loaded_sha = load_teacher(target, 10, sha256)  # what a node's run does
    assert loaded_sha == sha256
    assert main(["show", "--cache-dir", str(tmp_path / "node")]) == 0
    assert f"ok           {sha256}" in capsys.readouterr().out
    # The same file under another name (as a cache written before the key held every setting).
    old = target.with_name("digits--cnn-small--0123456789.pt")
    old.write_bytes(target.read_bytes())
    old.with_suffix(".json").write_text(target.with_suffix(".json").read_text())
    assert main(["show", "--cache-dir", str(tmp_path / "node")]) == 0
    assert f"OLD NAME     {sha256}  {old}" in capsys.readouterr().out


def test_import_command_refuses_bad_files_with_the_reason(tmp_path, capsys):
    from pmafl.teacher.cli import main

    _, source, _ = saved_teacher(tmp_path / "elsewhere")
    bare = tmp_path / "weights.pt"
    bare.write_bytes(source.read_bytes())
    assert main(["import", str(bare), "--cache-dir", str(tmp_path / "node")]) == 1
    assert "pass --run-config with the run it is for" in capsys.readouterr().err
    # No record: the settings come from the run config, and the architecture must fit the weights.
    assert main(["import", str(bare), "--cache-dir", str(tmp_path / "node"), "--run-config",
                 "teacher-model='cnn-large'"]) == 1
    assert "does not fit architecture 'cnn-large'" in capsys.readouterr().err
    assert main(["import", str(bare), "--cache-dir", str(tmp_path / "node"), "--run-config",
                 "teacher-model='cnn-small'"]) == 0
    assert f"sha256 {file_sha256(bare)}" in capsys.readouterr().out
    assert teacher_path(tmp_path / "node", SETTINGS).read_bytes() == bare.read_bytes()
    # A file that no longer matches its own record is refused.
    with source.open("ab") as f:
        f.write(b"x")
    assert main(["import", str(source), "--cache-dir", str(tmp_path / "other")]) == 1
    assert "does not match the sha256" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


class Payload:
    """Pickles as a call of `os.system`: what a malicious teacher file would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_teacher_file_that_pickles_code_is_refused_without_running_it(tmp_path):
    from pmafl.teacher import write_record

    model, path, _ = saved_teacher(tmp_path)
    marker = tmp_path / "ran"
    torch.save({**model.state_dict(), "evil": Payload(marker)}, path)
    write_record(path, META)  # a record that matches the file: only the loader stands in the way
    with pytest.raises(TeacherError, match="is not a plain state dict"):
        load_teacher(path, 10)
    assert not marker.exists()


def test_a_truncated_teacher_with_a_matching_record_is_refused_by_name(tmp_path):
    from pmafl.teacher import write_record

    _, path, _ = saved_teacher(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    write_record(path, META)
    with pytest.raises(TeacherError, match=f"teacher file {path} is not a plain state dict"):
        load_teacher(path, 10)


def test_vet_command_writes_the_detoxification_beside_the_teacher(tmp_path, capsys):
    """The wiring of `pmafl-teacher vet` (a few Neural Cleanse steps; whether it detects a planted
    backdoor is tested in test_robustkd.py): it prints the verdict, writes the vet file and its
    sha256 into the record, and a run with robustkd-weight then loads the detoxified teacher."""
    from pmafl.robustkd import DetoxifiedTeacher
    from pmafl.teacher.cli import main

    overrides = "teacher-model='cnn-small' teacher-objective='ce' teacher-epochs=1"
    assert main(["pretrain", "--cache-dir", str(tmp_path), "--run-config", overrides]) == 0
    cfg = RunConfig.from_mapping({"teacher-model": "cnn-small", "teacher-objective": "ce",
                                  "teacher-epochs": 1, "teacher-cache-dir": str(tmp_path),
                                  "robustkd-weight": 1.0})
    path = teacher_path(tmp_path, TeacherSettings.from_run_config(cfg))
    sha256 = file_sha256(path)
    with pytest.raises(TeacherError, match="has not been vetted"):
        get_teacher(cfg, 10)
    capsys.readouterr()
    assert main(["vet", str(path), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    record = json.loads(path.with_suffix(".json").read_text())
    vet = record["vet"]
    assert record["sha256"] == sha256 == file_sha256(path)  # the teacher file is untouched
    assert vet["sha256"] == file_sha256(path.with_suffix(".vet.pt")) and len(vet["norms"]) == 10
    assert ("looks BACKDOORED" if vet["backdoored"] else "looks clean") in out
    assert f"written: {path.with_suffix('.vet.pt')}" in out
    teacher, key = get_teacher(cfg, 10)
    assert isinstance(teacher, DetoxifiedTeacher) and key == f"{sha256}+vet:{vet['sha256']}"
    assert main(["vet", str(tmp_path / "absent.pt")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_vetted_teacher_is_imported_with_its_detoxification(tmp_path):
    from pmafl.robustkd import VetResult
    from pmafl.teacher import load_detoxified, vet_path, write_vet
    from pmafl.teacher.cli import import_teacher

    _, source, sha256 = saved_teacher(tmp_path / "elsewhere")
    mask = torch.zeros(32, 8, 8)
    mask[1] = 1.0
    vet = write_vet(source, VetResult([4.0] + [10.0] * 9, 5.0, 0, torch.zeros(8, 8),
                                      torch.zeros(1, 8, 8), "net.2", mask, torch.zeros(32, 8, 8)))
    target, _ = import_teacher(source, str(tmp_path / "node"))
    assert vet_path(target).read_bytes() == vet_path(source).read_bytes()
    detox, record = load_detoxified(target, load_teacher(target, 10, sha256)[0])
    assert record["sha256"] == vet["sha256"] and record["channels"] == [1]
    vet_path(source).write_bytes(b"tampered")
    with pytest.raises(TeacherError, match="vet file .* does not match"):
        import_teacher(source, str(tmp_path / "other"))


def test_settings_from_a_record_refuse_a_backdoor_that_is_no_object():
    with pytest.raises(ValueError, match="'backdoor' setting must be an object"):
        TeacherSettings.from_dict({**SETTINGS.to_dict(), "backdoor": 3}, "record r.json")
