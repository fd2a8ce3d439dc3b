"""Results tables in README.md and docs/*.md, written from the committed result files.

    python bench/report.py           # rewrite every generated table in place
    python bench/report.py --check   # exit 1, naming each table that differs from its data

A generated table sits between `<!-- table: NAME -->` and `<!-- /table -->`, NAME a key of
`TABLES`; everything outside the markers is left alone. tests/test_report.py runs `--check`, so a
table that drifts from the files in docs/results fails the tests.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

from compare import mean_std  # noqa: E402
from hostile import table as hostile_table  # noqa: E402


def hostile(*columns: tuple[str, str]) -> Callable[[], str]:
    """A `bench/hostile.py --table` of these result folders (label, folder under docs/results)."""
    return lambda: hostile_table([(label, RESULTS / folder) for label, folder in columns])


def honest_cost() -> str:
    """The default defences (clip 2, weight cap 1) against none, with no attacker: 3 seeds each,
    from `bench/compare.py` grids (the final model's clean, PGD-20 and AutoAttack accuracy)."""
    rows = [("digits", "default (clip 2, cap 1)", "defaults-digits"),
            ("digits", "`clip-factor=0 weight-cap=0`", "nodefence-digits"),
            ("Fashion-MNIST", "default (clip 2, cap 1)", "defaults-fashion"),
            ("Fashion-MNIST", "`clip-factor=0 weight-cap=0` (before issue 37)", "fashion-mnist")]
    lines = ["| data | config | seeds | clean | PGD-20 | AutoAttack | result files |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for data, label, folder in rows:
        finals = [json.loads(p.read_text())
                  for p in sorted((RESULTS / folder / "runs").glob("pmafl_alpha*_seed*/final.json"))]
        cells = [mean_std([f[key] for f in finals]) for key in ("clean_acc", "pgd20_acc", "autoattack_acc")]
        lines.append(f"| {data} | {label} | {len(finals)} | " + " | ".join(cells)
                     + f" | `docs/results/{folder}` |")
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[], str]] = {
    "hostile-readme": hostile(("digits", "hostile-digits"), ("Fashion-MNIST", "hostile-fashion")),
    "hostile-digits": hostile(("default", "hostile-digits"), ("weight-cap 4", "hostile-digits-cap4"),
                              ("median", "hostile-digits-median"),
                              ("trimmed-mean", "hostile-digits-trimmed-mean"),
                              ("no defence", "hostile-digits-nodefence")),
    "hostile-fashion": hostile(("default", "hostile-fashion")),
    "defaults-cost": honest_cost,
}

_BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str, where: str) -> str:
    """`text` with every generated table rewritten; an unknown NAME is an error naming the file."""
    def one(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"{where}: table '{name}' is not one of bench/report.py's: "
                             f"{', '.join(TABLES)}")
        return match.group(1) + TABLES[name]() + match.group(4)
    return _BLOCK.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a table differs from what its data gives")
    args = parser.parse_args(argv)
    stale, tables = [], 0
    for path in DOCS:
        text = path.read_text()
        tables += len(_BLOCK.findall(text))
        new = render(text, str(path.relative_to(ROOT)))
        if new == text:
            continue
        names = [m.group(2) for m, n in zip(_BLOCK.finditer(text), _BLOCK.finditer(new), strict=True)
                 if m.group(0) != n.group(0)]
        stale += [f"{path.relative_to(ROOT)}: {name}" for name in names]
        if not args.check:
            path.write_text(new)
    if args.check and stale:
        print("tables that differ from the committed results (python bench/report.py rewrites them):\n  "
              + "\n  ".join(stale))
        return 1
    print(f"{'checked' if args.check else 'wrote'} {tables} generated tables"
          + (f"; rewrote: {', '.join(stale)}" if stale and not args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
