"""A run's results folder: results.json, the final global model, and an accuracy plot."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn


def new_results_folder(results_dir: str | Path, objective: str, seed: int) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = Path(results_dir).expanduser() / f"{stamp}-{objective}-seed{seed}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = folder.with_name(f"{stamp}-{objective}-seed{seed}-{suffix}")
    folder.mkdir(parents=True)
    return folder


def write_results(folder: Path, config: dict[str, Any], rounds: list[dict[str, Any]],
                  model: nn.Module) -> None:
    """results.json ({"config": ..., "rounds": [...]}), model.pt (state dict) and accuracy.png."""
    (folder / "results.json").write_text(json.dumps({"config": config, "rounds": rounds}, indent=2))
    torch.save(model.state_dict(), folder / "model.pt")
    title = f"{config.get('objective')} on {config.get('dataset')}"
    plot_accuracy(rounds, folder / "accuracy.png", title=title)


def plot_accuracy(rounds: list[dict[str, Any]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r.get("clean_acc") for r in rounds], marker="o", label="clean")
    ax.plot(xs, [r.get("pgd_acc") for r in rounds], marker="s", label="PGD-20")
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(folder: Path) -> str:
    """A per-round table of a results folder, ending with the folder's path."""
    results = json.loads((Path(folder) / "results.json").read_text())
    config, rounds = results["config"], results["rounds"]
    lines = [f"{config['objective']} on {config['dataset']}, {len(rounds) - 1} rounds, "
             f"eps {config['eps']}:", "round  clean_acc  pgd_acc  local_loss  left_out"]
    for r in rounds:
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        lines.append(f"{r['round']:>5}  {r.get('clean_acc', float('nan')):>9.3f}  "
                     f"{r.get('pgd_acc', float('nan')):>7.3f}  {loss:>10}  {len(r['failures']):>8}")
    lines.append(f"Results: {Path(folder).resolve()}")
    return "\n".join(lines)


def latest_folder(results_dir: Path, newer_than: float = 0.0) -> Path | None:
    """The most recent results folder under `results_dir` written after `newer_than` (epoch s)."""
    found = [p.parent for p in Path(results_dir).glob("*/results.json") if p.stat().st_mtime > newer_than]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print the per-round summary of a pmafl results "
                                     "folder (the newest one under RESULTS_DIR with --latest).")
    parser.add_argument("path", type=Path, help="a results folder, or with --latest a results dir")
    parser.add_argument("--latest", action="store_true", help="summarise the newest folder in PATH")
    parser.add_argument("--newer-than", type=float, default=0.0,
                        help="with --latest: only folders written after this epoch time")
    args = parser.parse_args()
    folder = latest_folder(args.path, args.newer_than) if args.latest else args.path
    if folder is None:
        raise SystemExit(f"no results folder under {args.path} (the run failed: see its log above)")
    print(summary(folder))
