"""Accuracy per round, method by method: are the rounds enough? Reads the per-round central
evaluation (clean and PGD-20 on the run's `eval-examples` test images) that every cell's
final.json of a `bench/compare.py` grid keeps, averages it over the seeds, and writes a plot and
the numbers behind it.

    python bench/curves.py --run pgd-at=docs/results/fashion-mnist:pgd-at \\
        --run "pmafl + KDIGA=docs/results/kdiga-fashion/weight1:pmafl" \\
        --out docs/results/curves/fashion-2000.json

A run is `LABEL=GRID:METHOD` (repeatable): the cells of METHOD in the grid folder GRID, one per
seed; or `LABEL=FILE`, the results.json of one `flwr run` (a run cut short before its attack
suite included), as one seed. Writes `--out` with the suffix .json (per run: the rounds, mean
and std over seeds of clean and PGD-20 accuracy) and with the suffix .png (both curves, mean and
a band of one std).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def evaluated_rounds(record: dict) -> list[dict]:
    """The rounds of a final.json or results.json that carry a central evaluation."""
    return [row for row in record.get("rounds", []) if "clean_acc" in row]


def load_run(grid: Path, method: str) -> list[list[dict]]:
    """Each seed's per-round rows of METHOD in the grid folder, by seed."""
    paths = sorted((grid / "runs").glob(f"{method}_alpha*_seed*/final.json"))
    if not paths:
        raise SystemExit(f"{grid}: no finished cell of method '{method}' "
                         f"(runs/{method}_alpha*_seed*/final.json)")
    finals = sorted((json.loads(p.read_text()) for p in paths), key=lambda f: f["cell"]["seed"])
    return [evaluated_rounds(f) for f in finals]


def load_results(path: Path) -> list[list[dict]]:
    """One run's per-round rows from its results.json, as a single seed."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such results file (a run's results.json)")
    rows = evaluated_rounds(json.loads(path.read_text()))
    if not rows:
        raise SystemExit(f"{path}: no round with a central evaluation ('rounds' rows with clean_acc)")
    return [rows]


def summarise(seeds: list[list[dict]]) -> dict:
    """Mean and std over seeds, round by round (the rounds every seed has)."""
    rounds = sorted(set.intersection(*({row["round"] for row in rows} for rows in seeds)))
    by_round = [{row["round"]: row for row in rows} for rows in seeds]
    out: dict = {"rounds": rounds, "seeds": len(seeds)}
    for key in ("clean_acc", "pgd_acc"):
        values = [[rows[r][key] for rows in by_round] for r in rounds]
        out[key] = [statistics.mean(v) for v in values]
        out[f"{key}_std"] = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return out


def plot(curves: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, title in zip(axes, ("clean_acc", "pgd_acc"), ("clean", "PGD-20"), strict=True):
        for label, c in curves.items():
            mean, std = c[key], c[f"{key}_std"]
            ax.plot(c["rounds"], mean, label=label)
            ax.fill_between(c["rounds"], [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], alpha=0.2)
        ax.set_title(f"{title} accuracy (mean over seeds, band: one std)")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=GRID:METHOD",
                        help="a method of a grid folder, or LABEL=FILE a run's results.json, "
                             "under a label (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="output path; its .json and .png are written")
    args = parser.parse_args(argv)
    curves = {}
    for item in args.run:
        label, sep, rest = item.partition("=")
        if sep and label and rest.endswith(".json"):
            curves[label] = {"file": rest, **summarise(load_results(Path(rest)))}
            continue
        grid, sep2, method = rest.rpartition(":")
        if not (sep and sep2 and label and grid and method):
            parser.error(f"--run takes LABEL=GRID:METHOD or LABEL=FILE.json, got {item!r}")
        curves[label] = {"grid": grid, "method": method, **summarise(load_run(Path(grid), method))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(curves, indent=1) + "\n")
    plot(curves, args.out.with_suffix(".png"))
    for label, c in curves.items():
        print(f"{label:<24} " + "  ".join(f"r{r}: {a:.3f}/{p:.3f}" for r, a, p in
                                          zip(c["rounds"], c["clean_acc"], c["pgd_acc"], strict=True)
                                          if r % 5 == 0))
    print(f"Written to {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
