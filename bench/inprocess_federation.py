"""The default federation in one process, without Ray or Flower: FedAvg over `pmafl_train`.

Same data, partitions, models, cached teacher and objective as `flwr run`, minus the transport, so
hyperparameters can be compared quickly (about 3 s a round on 2 cores). Prints clean and PGD-20
test accuracy every `--every` rounds. With `--set server-finetune=fedftg` (or `fedftg-robust`)
the server fine-tunes every aggregate with FedFTG, and each printed line also gives the server's
fine-tuning time as a ratio to the slowest client's local training and to the whole round.

    python bench/inprocess_federation.py --rounds 30 --set lambda-alg=0.1 --set grad-clip=0
    python bench/inprocess_federation.py --rounds 30 --set server-finetune=fedftg --set dirichlet-alpha=0.1
    python bench/inprocess_federation.py --malicious 2 --attack scale --set aggregation=median
    python bench/inprocess_federation.py --set backdoor-rate=0.1      # the ASR a backdoored teacher hands on
    python bench/inprocess_federation.py --set backdoor-rate=0.1 --set robustkd-weight=1   # with RobustKD

`--malicious N --attack ...` makes the first N clients malicious, and the server aggregates as
the `aggregation`, `trim-fraction`, `clip-factor` and `weight-cap` keys say, with the strategy's
own functions (bench/hostile.py runs the real ServerApp against hostile nodes).
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from pmafl.backdoor import attack_success_rate
from pmafl.config import RunConfig
from pmafl.data import make_loader
from pmafl.evaluate import evaluate
from pmafl.fedftg import label_counts
from pmafl.objectives import needs_teacher
from pmafl.robustkd import FeatureDistiller
from pmafl.task import (
    backdoor_trigger,
    build_fedftg,
    build_model,
    client_seed,
    client_split,
    eval_split,
    load_data,
    prepare_teacher,
    vet_summary,
)
from pmafl.teacher import load_detoxified
from pmafl.train import pmafl_train, warmup_eps
from strategies.strategy_utils import capped_weights, clip_updates, robust_aggregate

MALICIOUS = ("scale", "sign-flip", "label-flip")


def malicious_update(record: ArrayRecord, sent: ArrayRecord, factor: float) -> ArrayRecord:
    """The update g + factor * (w - g): x100 boosts it (model replacement), -1 flips its sign."""
    out = {}
    for key in record.keys():
        w, g = record[key].numpy(), sent[key].numpy()
        out[key] = Array(np.asarray(g + factor * (w - g), dtype=w.dtype) if w.dtype.kind == "f" else w)
    return ArrayRecord(out)


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--every", type=int, default=5, help="evaluate every N rounds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config override, e.g. objective=ce (repeatable)")
    parser.add_argument("--malicious", type=int, default=0,
                        help="the first N clients are malicious (default 0)")
    parser.add_argument("--attack", choices=MALICIOUS, default="scale",
                        help="what malicious clients do: scale (their update x100), sign-flip "
                             "(the update negated), label-flip (train on label C-1-y)")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    cfg = RunConfig.from_mapping({k: parse_value(v) for k, v in overrides.items()})
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    global_model = build_model(cfg, data)
    teacher = None
    if needs_teacher(cfg.train.objective):
        teacher, _, path = prepare_teacher(cfg, data)  # vets it first, with robustkd-weight > 0
        if cfg.train.robustkd_weight > 0:
            teacher, record = load_detoxified(path, teacher)
            print(f"teacher {path.name}: {vet_summary(record)}")
    clients = []  # each client's (images, labels[, teacher logits]): the logits never change
    for pid in range(args.clients):
        tensors = list(client_split(cfg, data, pid, args.clients).tensors())
        if pid < args.malicious and args.attack == "label-flip":
            tensors[1] = data.num_classes - 1 - tensors[1]
        if teacher is not None:
            with torch.no_grad():
                tensors.append(teacher(tensors[0]))
        clients.append(tensors)
    test_images, test_labels = eval_split(cfg, data).tensors()
    trigger = backdoor_trigger(cfg, data)  # a backdoored teacher's trigger: its ASR is printed
    fedftg = None
    if cfg.server_finetune != "off":
        fedftg = build_fedftg(cfg, data)
        counts = torch.tensor([label_counts(t[1], data.num_classes) for t in clients], dtype=torch.float64)
    times = {"slowest": 0.0, "server": 0.0, "round": 0.0}
    features: dict[int, FeatureDistiller] = {}
    print(f"in-process federation: {args.clients} clients ({args.malicious} malicious: {args.attack}), "
          f"{args.rounds} rounds, overrides {overrides}")
    start = time.time()
    for server_round in range(1, args.rounds + 1):
        round_start = time.time()
        states, weights, models, slowest = [], [], [], 0.0
        for pid, tensors in enumerate(clients):
            client_start = time.time()
            torch.manual_seed(client_seed(cfg.seed, server_round, pid))
            model = copy.deepcopy(global_model)
            loader = make_loader(*tensors, batch_size=cfg.batch_size, shuffle=True, seed=pid)
            train_config = dataclasses.replace(
                cfg.train, eps=warmup_eps(cfg.train.eps, cfg.eps_warmup_rounds, server_round))
            if cfg.train.robustkd_weight > 0 and pid not in features:  # connectors stay with the client
                features[pid] = FeatureDistiller.build(model, cfg.model, teacher, cfg.teacher_model,
                                                       tensors[0], cfg.train.robustkd_noise)
            metrics = pmafl_train(model, teacher, loader, train_config, features.get(pid))
            states.append(model.state_dict())
            weights.append(metrics["num-examples"])
            models.append(model)
            slowest = max(slowest, time.time() - client_start)
        sent = ArrayRecord(global_model.state_dict())
        records = [ArrayRecord(state) for state in states]
        for pid in range(args.malicious):
            if args.attack in ("scale", "sign-flip"):
                records[pid] = malicious_update(records[pid], sent, 100.0 if args.attack == "scale" else -1.0)
        if cfg.clip_factor > 0:
            records, _ = clip_updates(records, sent, cfg.clip_factor)
        weights = capped_weights(weights, cfg.weight_cap)
        aggregate = robust_aggregate(records, weights, cfg.aggregation, cfg.trim_fraction)
        global_model.load_state_dict(aggregate.to_torch_state_dict())
        server_start = time.time()
        if fedftg is not None:
            # The ensemble is the models as they were averaged (malicious, clipped), as in FedFTG.
            for model, record in zip(models, records, strict=True):
                model.load_state_dict(record.to_torch_state_dict())
            fedftg.finetune(global_model, models, counts, server_round)
        times["server"] += time.time() - server_start
        times["slowest"] += slowest
        times["round"] += time.time() - round_start
        if server_round % args.every == 0 or server_round == args.rounds:
            scores = evaluate(global_model, test_images, test_labels, cfg.train.eps, cfg.eval_steps)
            timing = ""
            if fedftg is not None:
                timing = (f"; FedFTG server time / slowest client {times['server'] / times['slowest']:.2f}"
                          f", / in-process round {times['server'] / times['round']:.2f}")
            asr = "" if trigger is None else (
                f", backdoor ASR {attack_success_rate(global_model, test_images, test_labels, trigger):.3f}")
            print(f"round {server_round:>3}: clean acc {scores['clean_acc']:.3f}, FGSM acc "
                  f"{scores['fgsm_acc']:.3f}, PGD-{cfg.eval_steps} acc {scores['pgd_acc']:.3f}{asr} "
                  f"({len(test_labels)} test images, {time.time() - start:.0f}s{timing})", flush=True)


if __name__ == "__main__":
    main()
