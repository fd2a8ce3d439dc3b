"""Why does the worst node lag? Scores a finished run's global model on every node's local test
split and sets each node's score beside what explains it: its local data size, its class mix,
and the score its class mix predicts from the model's per-class accuracy on the shared test set.

    python bench/worst_node.py results/<run>                      # a run folder (results.json, model.pt)
    python bench/worst_node.py results/<run> --out worst-node.json --test-n 2000

Each node's partition and local test split are rebuilt from the run's recorded config, exactly as
its ClientApp built them (`pmafl.assembly.node_data`). A node's predicted accuracy is
sum_c share_c * acc_c: share_c the share of class c in its local test split, acc_c the global
model's PGD-20 accuracy on class c of the first `--test-n` test images (a class-stratified subset).
When the prediction tracks the nodes' scores, a node lags because of the classes it holds, not
because of anything else about it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pmafl.assembly import build_model, load_data, node_data  # noqa: E402
from pmafl.attacks import eval_pgd  # noqa: E402
from pmafl.config import RunConfig  # noqa: E402
from pmafl.data import evaluation_subset  # noqa: E402
from pmafl.models import load_weights  # noqa: E402
from pmafl.objectives import needs_teacher  # noqa: E402
from pmafl.teacher import get_teacher  # noqa: E402


def correct(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
            batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per image: classified correctly clean, and after PGD-20 (the evaluation attack)."""
    model.eval()
    attack = eval_pgd(model, eps)
    clean, robust = [], []
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        with torch.no_grad():
            clean.append((model(x).argmax(1) == y).numpy())
        x_adv = attack(x, y)
        with torch.no_grad():
            robust.append((model(x_adv).argmax(1) == y).numpy())
    return np.concatenate(clean), np.concatenate(robust)


def pearson(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else float("nan")


def analyse(run: Path, test_n: int, nodes: int | None = None) -> dict:
    record = json.loads((run / "results.json").read_text())
    cfg = RunConfig.from_mapping(record["config"], where=f"{run / 'results.json'} config")
    nodes = nodes or int(max(r.get("fed_num_clients", 0) for r in record["rounds"]))
    if nodes < 1:
        raise SystemExit(f"{run / 'results.json'} records no federated evaluation; pass --nodes")
    data = load_data(cfg)
    model = build_model(cfg, data)
    load_weights(model, run / "model.pt", cfg.model)
    torch.manual_seed(cfg.seed)

    test = evaluation_subset(data.test, test_n)
    x, y = test.tensors()
    clean, robust = correct(model, x, y, cfg.train.eps)
    labels = y.numpy()
    per_class = [{"class": c, "n": int((labels == c).sum()), "clean_acc": float(clean[labels == c].mean()),
                  "pgd20_acc": float(robust[labels == c].mean())} for c in range(data.num_classes)]
    class_pgd = np.array([p["pgd20_acc"] for p in per_class])
    class_clean = np.array([p["clean_acc"] for p in per_class])

    rows = []
    for pid in range(nodes):
        node = node_data(cfg, pid, nodes)
        train_counts = np.bincount(node.train.labels.numpy(), minlength=data.num_classes)
        test_labels = node.test.labels.numpy()
        share = np.bincount(test_labels, minlength=data.num_classes) / len(test_labels)
        c, r = correct(model, *node.test.tensors(), cfg.train.eps)
        rows.append({"node": pid, "train_examples": int(train_counts.sum()),
                     "train_class_counts": train_counts.tolist(), "test_examples": len(test_labels),
                     # exp(entropy): how many classes the node effectively holds
                     "effective_classes": float(np.exp(-sum(p * np.log(p) for p in
                                                            train_counts / train_counts.sum() if p > 0))),
                     "clean_acc": float(c.mean()), "pgd20_acc": float(r.mean()),
                     "predicted_clean_acc": float(share @ class_clean),
                     "predicted_pgd20_acc": float(share @ class_pgd)})
    pgd = [r["pgd20_acc"] for r in rows]
    found = {"run": str(run), "dataset": cfg.dataset, "objective": cfg.train.objective, "seed": cfg.seed,
             "test_n": len(labels), "pgd20_acc": float(robust.mean()), "per_class": per_class,
             "nodes": rows,
             "corr_pgd20_predicted": pearson(pgd, [r["predicted_pgd20_acc"] for r in rows]),
             "corr_pgd20_train_examples": pearson(pgd, [r["train_examples"] for r in rows]),
             "corr_pgd20_effective_classes": pearson(pgd, [r["effective_classes"] for r in rows])}
    if needs_teacher(cfg.train.objective):
        # The run's teacher on the same images and PGD seed: is a class weak in the student
        # because it is weak in the teacher?
        teacher, _ = get_teacher(cfg, data.num_classes)
        torch.manual_seed(cfg.seed)
        _, teacher_robust = correct(teacher, x, y, cfg.train.eps)
        teacher_class = [float(teacher_robust[labels == c].mean()) for c in range(data.num_classes)]
        for entry, acc in zip(per_class, teacher_class, strict=True):
            entry["teacher_pgd20_acc"] = acc
        found["teacher_pgd20_acc"] = float(teacher_robust.mean())
        found["corr_class_pgd20_teacher"] = pearson(list(class_pgd), teacher_class)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run", type=Path, help="a run's results folder (results.json and model.pt)")
    parser.add_argument("--test-n", type=int, default=2000,
                        help="test images of the per-class accuracy (default 2000; 0: all)")
    parser.add_argument("--nodes", type=int, default=None,
                        help="nodes of the run (default: as its federated evaluation recorded)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: <run>/worst-node.json)")
    args = parser.parse_args(argv)
    for name in ("results.json", "model.pt"):
        if not (args.run / name).is_file():
            parser.error(f"{args.run} holds no {name}: pass a finished run's results folder")
    result = analyse(args.run, args.test_n, args.nodes)
    out = args.out or args.run / "worst-node.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['objective']} seed {result['seed']} on {result['dataset']}: PGD-20 "
          f"{result['pgd20_acc']:.3f} on {result['test_n']} test images; per class: "
          + " ".join(f"{p['class']}:{p['pgd20_acc']:.2f}" for p in result["per_class"]))
    print(f"{'node':>4} {'train':>6} {'classes':>7} {'clean':>6} {'PGD-20':>6} {'predicted':>9}")
    for r in sorted(result["nodes"], key=lambda r: r["pgd20_acc"]):
        print(f"{r['node']:>4} {r['train_examples']:>6} {r['effective_classes']:>7.1f} "
              f"{r['clean_acc']:>6.3f} {r['pgd20_acc']:>6.3f} {r['predicted_pgd20_acc']:>9.3f}")
    print(f"correlation of a node's PGD-20 with: its prediction from its class mix "
          f"{result['corr_pgd20_predicted']:.2f}, its data size {result['corr_pgd20_train_examples']:.2f},"
          f" its effective number of classes {result['corr_pgd20_effective_classes']:.2f}")
    if "teacher_pgd20_acc" in result:
        print(f"the run's teacher: PGD-20 {result['teacher_pgd20_acc']:.3f}; per class: "
              + " ".join(f"{p['class']}:{p['teacher_pgd20_acc']:.2f}" for p in result["per_class"])
              + f"; correlation of the student's per-class PGD-20 with the teacher's "
              f"{result['corr_class_pgd20_teacher']:.2f}")
    print(f"Written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
