"""bench/compare.py: the report from finished cells, and argument checks. (A real grid cell runs in
tests/test_simulation.py.)"""

import json
import statistics
from pathlib import Path

import compare
import pytest


def write_final(out, cell, clean, pgd, worst):
    folder = out / "runs" / cell.name
    folder.mkdir(parents=True)
    final = {"cell": cell.__dict__, "dataset": "digits", "num_examples": 359, "eps": 0.2,
             "clean_acc": clean, "pgd20_acc": pgd, "cw_acc": pgd - 0.01, "autoattack_acc": pgd - 0.05,
             "autoattack_n": 359, "fed_worst_pgd_acc": worst, "gradient_masking_warnings": [],
             "rounds": [{"round": r, "clean_acc": clean * r / 2, "pgd_acc": pgd * r / 2} for r in range(3)]}
    (folder / "final.json").write_text(json.dumps(final))


def test_report_is_mean_and_std_over_seeds_of_finished_cells(tmp_path):
    cells = [compare.Cell(m, 0.5, s) for m in ("pgd-at", "pmafl") for s in (0, 1, 2)]
    numbers = {("pgd-at", 0): (0.95, 0.47, 0.3), ("pgd-at", 1): (0.93, 0.45, 0.2),
               ("pmafl", 0): (0.95, 0.49, 0.35), ("pmafl", 1): (0.94, 0.50, 0.25),
               ("pmafl", 2): (0.96, 0.52, 0.40)}  # pgd-at seed 2 is not finished
    for cell in cells:
        if (cell.method, cell.seed) in numbers:
            write_final(tmp_path, cell, *numbers[cell.method, cell.seed])
    text = compare.report(tmp_path, cells)
    pmafl_pgd = [0.49, 0.50, 0.52]
    expected = f"{statistics.mean(pmafl_pgd):.3f} ± {statistics.stdev(pmafl_pgd):.3f}"
    [pmafl_row] = [line for line in text.splitlines() if "| pmafl |" in line]
    assert pmafl_row.split(" | ")[4] == expected == "0.503 ± 0.015"
    [pgd_row] = [line for line in text.splitlines() if "| pgd-at |" in line]
    assert "| 2 |" in pgd_row and "0.940 ± 0.014" in pgd_row  # clean: mean 0.94, std 0.01414
    assert "Not finished: pgd-at_alpha0.5_seed2" in text
    assert (tmp_path / "report.md").read_text().strip() == text.strip()
    for plot in ("rounds.png", "robust_vs_clean.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_one_seed_shows_its_value_without_a_spread():
    assert compare.mean_std([0.8236]) == "0.824"  # not "0.824 ± 0.000": one seed has no std
    assert compare.mean_std([0.5, 0.7]) == "0.600 ± 0.141"  # sample std: 0.2 / sqrt(2)
    assert compare.mean_std([]) == "-"


def test_report_shows_the_runs_payload_megabytes_when_every_cell_has_them(tmp_path):
    cells = [compare.Cell("pmafl", 0.1, s) for s in (0, 1)]
    for cell, received in zip(cells, (3_000_000, 2_000_000)):
        write_final(tmp_path, cell, 0.9, 0.4, 0.2)
        path = tmp_path / "runs" / cell.name / "final.json"
        final = json.loads(path.read_text())
        path.write_text(json.dumps({**final, "bytes_received": received, "bytes_sent": 8_000_000}))
    [row] = [line for line in compare.report(tmp_path, cells).splitlines() if "| pmafl |" in line]
    assert "| 2.50 / 8.00 |" in row  # mean of 3 and 2 MB up; 8 MB down
    write_final(tmp_path, compare.Cell("ce", 0.1, 0), 0.9, 0.1, 0.0)  # an older cell: no bytes
    assert "MB up" not in compare.report(tmp_path, cells + [compare.Cell("ce", 0.1, 0)])


def test_bad_arguments_are_refused_before_any_run(capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["--methods", "pmafl,fedprox"])
    assert "unknown objective 'fedprox'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--methods", "pmafl+fedprox"])
    assert "unknown server fine-tuning 'fedprox'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--set", "alpha=3"])
    assert "--set key 'alpha': expected a number in [0, 1], got 3" in capsys.readouterr().err


def test_grid_cells_cover_methods_seeds_and_alphas():
    args = compare.parse_args(["--methods", "ce,pmafl", "--seeds", "0,1", "--alphas", "0.1,0.5",
                               "--set", "num-server-rounds=3"])
    assert len(args.cells) == 8 and {c.alpha for c in args.cells} == {0.1, 0.5}
    cell = compare.Cell("pmafl", 0.1, 1)
    assert compare.run_config(cell, args.overrides, Path("/r")) == (
        "num-server-rounds=3 objective='pmafl' seed=1 dirichlet-alpha=0.1 results-dir='/r'")
    # A method with server-side fine-tuning: the objective plus `server-finetune`.
    cell = compare.Cell("ce+fedftg-robust", 0.1, 0)
    assert compare.run_config(cell, args.overrides, Path("/r")) == (
        "num-server-rounds=3 objective='ce' server-finetune='fedftg-robust' seed=0 "
        "dirichlet-alpha=0.1 results-dir='/r'")


def test_a_grid_folder_under_version_control_keeps_only_what_the_report_needs(tmp_path):
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    out = tmp_path / "docs" / "grid"
    cell = compare.Cell("pmafl", 0.5, 0)
    write_final(out, cell, 0.9, 0.5, 0.3)
    run = out / "runs" / cell.name / "results" / "run"
    run.mkdir(parents=True)
    for name in ("model.pt", "checkpoint-round0001.pt", "results.json", "accuracy.png"):
        (run / name).write_text("x")
    compare.report(out, [cell])
    listed = subprocess.run(["git", "-C", str(tmp_path), "ls-files", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listed) == sorted([
        "docs/grid/.gitignore", "docs/grid/report.md", "docs/grid/rounds.png",
        "docs/grid/robust_vs_clean.png", f"docs/grid/runs/{cell.name}/final.json"])


def test_clients_share_the_gpu_only_where_there_is_one(capsys):
    import os

    import torch

    args = compare.parse_args([])
    assert args.client_gpus == (0.2 if torch.cuda.is_available() else 0.0)
    assert compare.machine(0.0) == f"CPU ({os.cpu_count()} cores)"
    with pytest.raises(SystemExit):
        compare.parse_args(["--client-gpus", "2"])
    assert "--client-gpus: expected a share of one GPU in [0, 1], got 2.0" in capsys.readouterr().err


def test_a_cell_stopped_mid_run_resumes_after_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The cell's `flwr run` gets `resume-from` naming the interrupted folder (checkpoints, no
    results.json) when its checkpoint was written with the cell's config; a checkpoint of another
    config, or no interrupted folder, starts the cell afresh; a checkpoint younger than
    LIVE_SECONDS (its run may still be going) stops the cell with the reason."""
    import os
    import subprocess

    import torch

    from pmafl.config import RunConfig, parse_overrides
    from pmafl.results import save_checkpoint

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command[command.index("--run-config") + 1])
        target = interrupted if "resume-from" in calls[-1] else folder / "results" / f"fresh{len(calls)}"
        target.mkdir(parents=True, exist_ok=True)
        (target / "results.json").write_text("{}")
        return subprocess.CompletedProcess(command, 0)

    def interrupted_run(overrides, age):
        config = RunConfig.from_mapping(parse_overrides([compare.run_config(
            cell, overrides, (folder / "results").resolve())])).to_dict()
        save_checkpoint(interrupted, 3, {"w": torch.zeros(1)}, [], config)
        for path in interrupted.glob("checkpoint-*.pt"):
            os.utime(path, (path.stat().st_mtime - age, path.stat().st_mtime - age))

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    args = compare.parse_args(["--methods", "pmafl", "--seeds", "0"])
    cell = compare.Cell("pmafl", 0.5, 0)
    folder = tmp_path / "runs" / cell.name
    interrupted = (folder / "results" / "20261207-100000-pmafl-seed0").resolve()
    interrupted_run(args.overrides, age=compare.LIVE_SECONDS + 60)
    assert compare.run_cell(cell, folder, args) == interrupted
    assert calls[-1].endswith(f" resume-from='{interrupted}'")

    (interrupted / "results.json").unlink()
    interrupted_run(args.overrides, age=5)
    with pytest.raises(RuntimeError, match="checkpointed 5 s ago, so its run may still be going"):
        compare.run_cell(cell, folder, args)

    interrupted_run({"lr": "0.01"}, age=compare.LIVE_SECONDS + 60)  # another config
    assert compare.run_cell(cell, folder, args).name == "fresh2"
    assert "resume-from" not in calls[-1] and "starts afresh" in capsys.readouterr().out

    folder = tmp_path / "runs" / "other"
    compare.run_cell(cell, folder, args)
    assert "resume-from" not in calls[-1]


def test_the_grid_folder_ignores_run_files_before_the_first_cell_runs(tmp_path, monkeypatch):
    """Stopped mid-cell, a grid under version control has no run files to commit by mistake."""
    seen = []

    def first_cell(cell, folder, args):
        seen.append((tmp_path / "grid" / ".gitignore").is_file())
        raise KeyboardInterrupt  # the session ends here

    monkeypatch.setattr(compare, "finish_cell", first_cell)
    with pytest.raises(KeyboardInterrupt):
        compare.main(["--methods", "pmafl", "--seeds", "0", "--out", str(tmp_path / "grid")])
    assert seen == [True]
