"""The generated results tables in README.md and docs/ match the committed result files."""

import report


def test_every_generated_table_matches_the_committed_results(capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().out


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
