"""A run's results folder: results.json, the final global model, an accuracy plot, and the
checkpoints of the last rounds (from which an interrupted run resumes)."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pmafl.config import documented_defaults
from pmafl.files import write_atomic

CHECKPOINT = "checkpoint-round{:04d}.pt"
_CHECKPOINT_NAME = re.compile(r"checkpoint-round(\d+)\.pt")
# Keys that may differ between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("resume-from", "results-dir", "round-timeout", "num-server-rounds",
                     "keep-checkpoints")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not belong to the run that resumes it."""


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
                  model: nn.Module, stopped: str = "") -> None:
    """results.json ({"config": ..., "rounds": [...]}, and "stopped": the reason when the run
    stopped before its last round), model.pt (state dict) and accuracy.png, each written
    atomically: a crash leaves the previous file or the new one, never half of one."""
    results: dict[str, Any] = {"config": config, "rounds": rounds}
    if stopped:
        results["stopped"] = stopped
    # The model first: results.json is what marks a finished run (`./run.sh` waits for it).
    write_atomic(folder / "model.pt", lambda f: torch.save(model.state_dict(), f))
    write_atomic(folder / "results.json", lambda f: f.write(json.dumps(results, indent=2).encode()))
    title = f"{config.get('objective')} on {config.get('dataset')}"
    plot_accuracy(rounds, folder / "accuracy.png", title=title)


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoints in a results folder, oldest round first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("checkpoint-round*.pt")
             if (m := _CHECKPOINT_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(folder: Path, server_round: int, state_dict: dict[str, torch.Tensor],
                    rounds: list[dict[str, Any]], config: dict[str, Any],
                    server_state: dict[str, Any] | None = None, keep: int = 3) -> None:
    """`folder/checkpoint-round<N>.pt` after round N: the global model, the per-round rows so far,
    the run config and any state the server carries across rounds (`server_state`, e.g. FedFTG's
    generator and optimiser: tensors, numbers, lists and dicts of them). Written atomically: a
    crash while writing leaves the previous checkpoints. The `keep` newest are kept, so that a
    run can step back past a bad round; checkpoints of later rounds (left by a run that was
    resumed from an earlier one) are removed."""
    payload = {"round": server_round, "model": {k: v.detach().cpu() for k, v in state_dict.items()},
               "rounds": json.dumps(rounds), "config": json.dumps(config),
               "server_state": server_state or {}}
    path = Path(folder) / CHECKPOINT.format(server_round)
    write_atomic(path, lambda f: torch.save(payload, f))
    others = checkpoint_files(folder)
    earlier = [p for p in others if _round_of(p) < server_round]
    later = [p for p in others if _round_of(p) > server_round]
    for stale in later + earlier[:max(0, len(earlier) - (keep - 1))]:
        stale.unlink(missing_ok=True)


def _round_of(path: Path) -> int:
    return int(_CHECKPOINT_NAME.fullmatch(path.name).group(1))


def load_checkpoint(path: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at `path` (a checkpoint file, or a results folder: its newest checkpoint),
    checked against the resuming run's `config`: {"folder", "round", "model", "rounds", "config",
    "server_state"}. A key the checkpoint lacks (added to pmafl after it was written) counts as
    its default."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = checkpoint_files(path) or [path / "checkpoint.pt"]  # (pmafl before 7 Dec 2026)
        file = found[-1]
    else:
        file = path
    if not file.is_file():
        raise CheckpointError(f"run config key 'resume-from': no checkpoint at {file}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
        saved = json.loads(payload["config"])
        payload.update(rounds=json.loads(payload["rounds"]), config=saved, folder=file.parent)
        payload.setdefault("server_state", {})
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same answer
        raise CheckpointError(f"run config key 'resume-from': {file} is not a readable checkpoint "
                              f"({type(e).__name__}: {e}); an older one of the same folder can be "
                              "named instead") from e
    # A key the checkpoint predates was its default then: older checkpoints still resume.
    defaults = documented_defaults()
    for key in sorted(set(saved) | set(config)):
        if key not in RESUMABLE_CHANGES and saved.get(key, defaults.get(key)) != config.get(key):
            raise CheckpointError(f"run config key '{key}' is {config.get(key)!r} but the checkpoint "
                                  f"{file} was written with {saved.get(key)!r}; resume with the "
                                  "interrupted run's config")
    if payload["round"] >= config["num-server-rounds"]:
        raise CheckpointError(f"run config key 'resume-from': {file} is from round {payload['round']}, "
                              f"the run has only {config['num-server-rounds']} rounds: nothing to resume")
    return payload


def plot_accuracy(rounds: list[dict[str, Any]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r.get("clean_acc") for r in rounds], marker="o", label="clean")
    ax.plot(xs, [r.get("pgd_acc") for r in rounds], marker="s", label="PGD-20")
    fed = [r for r in rounds if "fed_pgd_acc" in r]
    if fed:  # federated evaluation: mean and worst node, on the nodes' local test splits
        fx = [r["round"] for r in fed]
        ax.plot(fx, [r["fed_pgd_acc"] for r in fed], "^--", label="PGD-20, mean node")
        ax.plot(fx, [r["fed_worst_pgd_acc"] for r in fed], "v:", label="PGD-20, worst node")
    ax.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def without_timing(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows without their `..._seconds` keys: what two runs with one seed agree on exactly."""
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rounds]


def summary(folder: Path) -> str:
    """A per-round table of a results folder, ending with the folder's path."""
    results = json.loads((Path(folder) / "results.json").read_text())
    config, rounds = results["config"], results["rounds"]
    test_images = rounds[-1].get("eval_examples", "the") if rounds else "the"
    lines = [f"{config['objective']} on {config['dataset']}, {max(len(rounds) - 1, 0)} rounds, "
             f"eps {config['eps']}; central = the global model on {test_images} test images, node = "
             "federated evaluation on the nodes' local test splits (mean / worst node):",
             "round  clean_acc  fgsm_acc  pgd_acc  node_pgd_mean  node_pgd_worst  local_loss  left_out"
             "  seconds  kB_sent  kB_recv"
             + ("  backdoor_asr" if any("asr" in r for r in rounds) else "")]

    def number(row: dict[str, Any], key: str, width: int, digits: int = 3) -> str:
        return f"{row[key]:>{width}.{digits}f}" if key in row else f"{'-':>{width}}"

    def kilobytes(row: dict[str, Any], key: str, width: int) -> str:
        return f"{row[key] / 1000:>{width}.0f}" if key in row else f"{'-':>{width}}"

    for r in rounds:
        lines.append(f"{r['round']:>5}  {number(r, 'clean_acc', 9)}  {number(r, 'fgsm_acc', 8)}  "
                     f"{number(r, 'pgd_acc', 7)}  "
                     f"{number(r, 'fed_pgd_acc', 13)}  {number(r, 'fed_worst_pgd_acc', 14)}  "
                     f"{number(r, 'loss', 10, 4)}  {len(r['failures']):>8}  "
                     f"{number(r, 'round_seconds', 7, 1)}  {kilobytes(r, 'bytes_sent', 7)}  "
                     f"{kilobytes(r, 'bytes_received', 7)}"
                     + (f"  {number(r, 'asr', 12)}" if "asr" in r else ""))
    lines += [f"WARNING round {r['round']}: {r['warning']}" for r in rounds if r.get("warning")]
    if results.get("stopped"):
        lines.append(f"STOPPED before its last round: {results['stopped']}")
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
