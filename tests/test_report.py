"""The generated results tables in README.md and docs/ match the committed result files, and no
results table is written by hand."""

import json
import re

import report

# An accuracy as the tables print it: 0.xxx or 1.000.
ACCURACY = re.compile(r"(?<![\d.])[01]\.\d{3}(?![\d])")


def test_every_generated_table_matches_the_committed_results(capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().out


def test_no_results_table_is_written_by_hand():
    """A table of accuracies outside `<!-- table: NAME -->` markers would drift from its data."""
    by_hand = []
    for path in report.DOCS:
        text = report._BLOCK.sub("", path.read_text())
        for block in re.findall(r"(?:^ *\|.*\n)+", text, re.M):
            if ACCURACY.search(block):
                by_hand.append(f"{path.relative_to(report.ROOT)}: {block.splitlines()[0][:80]}")
    assert not by_hand, "results tables outside the generator's markers:\n" + "\n".join(by_hand)


def test_a_table_that_drifted_from_its_data_is_found(tmp_path, monkeypatch):
    doc = tmp_path / "page.md"
    real = report.TABLES["defaults-cost"]()
    edited = real.replace("| digits |", "| digits (edited) |", 1)
    doc.write_text(f"text\n<!-- table: defaults-cost -->\n{edited}<!-- /table -->\nmore\n")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report, "DOCS", [doc])
    assert report.main(["--check"]) == 1
    assert report.main([]) == 0
    assert doc.read_text() == f"text\n<!-- table: defaults-cost -->\n{real}<!-- /table -->\nmore\n"


def _cell(root, folder, method, seed, **values):
    path = root / folder / "runs" / f"{method}_alpha0.5_seed{seed}" / "final.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"cell": {"method": method, "alpha": 0.5, "seed": seed}, "dataset": "digits",
                                "num_examples": 359, "autoattack_n": 200, **values}))


def test_grid_and_paired_tables_against_hand_computed_values(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    monkeypatch.setitem(report.GRIDS, "g", "python bench/compare.py --methods a,b")
    _cell(tmp_path, "g", "a", 0, clean_acc=0.70, autoattack_acc=0.40)
    _cell(tmp_path, "g", "a", 1, clean_acc=0.80, autoattack_acc=0.30)
    _cell(tmp_path, "g", "b", 0, clean_acc=0.90, autoattack_acc=0.10)
    _cell(tmp_path, "g", "b", 1, clean_acc=0.60, autoattack_acc=0.20)
    text = report.grid([("A", "g", "a"), ("B", "g", "b")], columns=("clean", "aa"))()
    # a: mean 0.75, sample std sqrt(((0.05)^2 * 2) / 1) = 0.0707; b: 0.75 and 0.2121; AA 0.35 / 0.15
    assert "| A | 2 | **0.750 ± 0.071** | **0.350 ± 0.071** |" in text
    assert "| B | 2 | **0.750 ± 0.212** | 0.150 ± 0.071 |" in text
    assert "- `docs/results/g` (digits, 359 test images, AutoAttack on the first 200; seeds 0, 1): " \
           "`python bench/compare.py --methods a,b --out docs/results/g`" in text
    changes = report.paired([("b - a", ("g", "b"), ("g", "a"))], columns=("clean", "aa"))()
    # clean: +20 and -20 points, mean 0; AA: -30 and -10, mean -20
    assert "| b - a | 0, 1 | +0.0 (+20.0, -20.0) | -20.0 (-30.0, -10.0) |" in changes


def test_a_missing_cell_is_an_error_naming_folder_and_method(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    try:
        report.grid([("A", "nowhere", "pmafl")])()
    except SystemExit as e:
        assert "docs/results/nowhere" in str(e) and "'pmafl'" in str(e)
    else:
        raise AssertionError("a table of missing data was written")


def test_the_default_rule_against_hand_computed_margins(tmp_path, monkeypatch):
    """docs/fashion-mnist.md's rule: AutoAttack lead above the larger std over every baseline, at
    most 2 clean points behind the best, digits no worse than the default's mean minus its std;
    decided only on every seed, the pick only when no candidate is open."""
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    for name in ("g", "d", "da", "db", *"abcef"):
        monkeypatch.setitem(report.GRIDS, name, f"python bench/compare.py # {name}")
    for seed, (clean, aa) in enumerate([(0.90, 0.40), (0.92, 0.42), (0.94, 0.44)]):
        _cell(tmp_path, "d", "pmafl", seed, clean_acc=clean, autoattack_acc=aa)  # floor 0.900 / 0.400
    baselines = {"x": (0.80, [0.50, 0.52, 0.54]),  # AutoAttack mean 0.52, std 0.02
                 "y": (0.81, [0.50, 0.53, 0.56])}  # mean 0.53, std 0.03; the best clean
    candidates = {"a": (0.79, [0.56, 0.57, 0.58], "da"), "b": (0.77, [0.52, 0.53, 0.54], "db"),
                  "e": (0.81, [0.53, 0.56, 0.59], "da"), "f": (0.81, [0.59, 0.60, 0.61], "da")}
    for seed in range(3):
        for m, (clean, aa) in baselines.items():
            _cell(tmp_path, "g", m, seed, clean_acc=clean, autoattack_acc=aa[seed])
        for folder, (clean, aa, _) in candidates.items():
            _cell(tmp_path, folder, "pmafl", seed, clean_acc=clean, autoattack_acc=aa[seed])
        _cell(tmp_path, "da", "pmafl", seed, clean_acc=0.90, autoattack_acc=0.41)  # on the floor: passes
        _cell(tmp_path, "db", "pmafl", seed, clean_acc=0.89, autoattack_acc=0.41)
    _cell(tmp_path, "c", "pmafl", 0, clean_acc=0.85, autoattack_acc=0.70)
    _cell(tmp_path, "g", "z", 0, clean_acc=0.50, autoattack_acc=0.10)
    rows = [(f.upper(), f, digits) for f, (_, _, digits) in candidates.items()]
    text = report.rule(rows, "g", ("x", "y"), "d")()
    # A: 5.0 over x (std 2.0) but 4.0 over y (std 3.0): y decides; clean 0.79 - 0.81 = -2.0, allowed
    assert ("| A | 3 | +4.0 over `y` (needs more than 3.0) | -2.0 (allowed -2.0) | "
            "0.900 (≥ 0.900) / 0.410 (≥ 0.400) | qualifies |") in text
    # B: level with y; clean -4.0; digits clean below the floor
    assert "| B | 3 | +0.0 over `y` (needs more than 3.0) | -4.0 (allowed -2.0) | 0.890 (< 0.900)" in text
    assert "| fails on AutoAttack, clean, digits clean |" in text
    # E: exactly the larger std over y (3.0) is not more than it
    assert "| E | 3 | +3.0 over `y` (needs more than 3.0) | +0.0 (allowed -2.0) |" in text
    assert "| fails on AutoAttack |" in text
    # F and A qualify; F has the higher AutoAttack mean
    assert "| F | 3 | +7.0 over `y` (needs more than 3.0)" in text and "The rule picks F." in text
    # C: one seed and no digits cells, however far ahead: open, and the pick waits for it
    with_c = report.rule([*rows, ("C", "c", "nowhere")], "g", ("x", "y"), "d")()
    assert "| C | 1 | +17.0 over `y` (needs more than 3.0) | +4.0 (allowed -2.0) | - | " \
           "open; needs its seeds 1, 2, its digits cells |" in with_c
    assert "Not decided yet (C open; F qualifies so far): the default stays `pmafl`." in with_c
    # a baseline still missing seeds leaves even a complete candidate open
    with_z = report.rule(rows[:1], "g", ("x", "y", "z"), "d")()
    assert with_z.count("| open |") == 1 and "Baseline cells still to run: `z` seeds 1, 2." in with_z
