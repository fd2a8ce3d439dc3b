"""The default federation in one process, without Ray or a SuperLink: every client round is the
ClientApp's own (`client_app.handlers.train`, each node with its own Flower `Context`), and the
server averages the replies with the strategy's aggregation functions.

Same data, partitions, models, cached teacher, seeds and local training as `flwr run`, minus the
transport and the strategy's screening, so hyperparameters can be compared quickly (about 3 s a
round on 2 cores). Prints clean and PGD-20 test accuracy every `--every` rounds. With `--set
server-finetune=fedftg` (or `fedftg-robust`) the server fine-tunes every aggregate with FedFTG,
and each printed line also gives the server's fine-tuning time as a ratio to the slowest client's
local training and to the whole round.

    python bench/inprocess_federation.py --rounds 30 --set lambda-alg=0.1 --set grad-clip=0
    python bench/inprocess_federation.py --rounds 30 --set server-finetune=fedftg --set dirichlet-alpha=0.1
    python bench/inprocess_federation.py --malicious 2 --attack scale --set aggregation=median
    python bench/inprocess_federation.py --set backdoor-rate=0.1      # the ASR a backdoored teacher hands on
    python bench/inprocess_federation.py --set backdoor-rate=0.1 --set robustkd-weight=1   # with RobustKD

`--malicious N --attack ...` makes the first N clients send a malicious update, and the server
aggregates as the `aggregation`, `trim-fraction`, `clip-factor` and `weight-cap` keys say
(bench/hostile.py runs the real ServerApp, screening included, against hostile nodes).
"""

from __future__ import annotations

import argparse
import ast
import copy
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from client_app.handlers import train as client_round
from pmafl.assembly import (
    backdoor_trigger,
    build_fedftg,
    build_model,
    eval_split,
    load_data,
)
from pmafl.backdoor import attack_success_rate
from pmafl.compression import decode_update
from pmafl.config import RunConfig
from pmafl.evaluate import evaluate
from pmafl.objectives import needs_teacher
from pmafl.protocol import ARRAYS, CONFIG, LABEL_COUNTS, METRICS, NUM_EXAMPLES, SERVER_ROUND
from pmafl.teacher import load_detoxified, prepare_teacher, vet_summary
from pmafl.train import warmup_eps
from strategies.aggregation import capped_weights, clip_updates, robust_aggregate

MALICIOUS = ("scale", "sign-flip")


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
                        help="what malicious clients do: scale (their update x100) or sign-flip "
                             "(the update negated)")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    cfg = RunConfig.from_mapping({k: parse_value(v) for k, v in overrides.items()})
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    global_model = build_model(cfg, data)
    if needs_teacher(cfg.train.objective):
        # Prepared before round 1 as the ServerApp does (vetted too, with robustkd-weight > 0);
        # each client round then loads it from the cache.
        teacher, _, path = prepare_teacher(cfg, data)
        if cfg.train.robustkd_weight > 0:
            _, record = load_detoxified(path, teacher)
            print(f"teacher {path.name}: {vet_summary(record)}")
    # One Context per node, as a SuperNode keeps one: its state carries the node's data, the
    # teacher's logits and the add-ons' modules across rounds.
    contexts = [Context(run_id=1, node_id=pid + 1, state=RecordDict(), run_config=cfg.to_dict(),
                        node_config={"partition-id": pid, "num-partitions": args.clients})
                for pid in range(args.clients)]
    test_images, test_labels = eval_split(cfg, data).tensors()
    trigger = backdoor_trigger(cfg, data)  # a backdoored teacher's trigger: its ASR is printed
    fedftg = build_fedftg(cfg, data) if cfg.server_finetune != "off" else None
    times = {"slowest": 0.0, "server": 0.0, "round": 0.0}
    print(f"in-process federation: {args.clients} clients ({args.malicious} malicious: {args.attack}), "
          f"{args.rounds} rounds, overrides {overrides}")
    start = time.time()
    for server_round in range(1, args.rounds + 1):
        round_start = time.time()
        sent = ArrayRecord(global_model.state_dict())
        config = ConfigRecord({**cfg.train.to_record(), SERVER_ROUND: server_round,
                               "eps": warmup_eps(cfg.train.eps, cfg.eps_warmup_rounds, server_round),
                               **({LABEL_COUNTS: True} if fedftg else {})})
        records, claims, counts, slowest = [], [], [], 0.0
        for pid, context in enumerate(contexts):
            client_start = time.time()
            reply = client_round(RecordDict({ARRAYS: sent, CONFIG: config}), context)
            metrics = reply[METRICS]
            record = reply[ARRAYS]
            if cfg.train.update_compression != "none":
                record = ArrayRecord(torch_state_dict=decode_update(
                    record.to_torch_state_dict(), sent.to_torch_state_dict(),
                    cfg.train.update_compression))
            if pid < args.malicious:
                record = malicious_update(record, sent, 100.0 if args.attack == "scale" else -1.0)
            records.append(record)
            claims.append(metrics[NUM_EXAMPLES])
            if fedftg:
                counts.append(metrics[LABEL_COUNTS])
            slowest = max(slowest, time.time() - client_start)
        if cfg.clip_factor > 0:
            records, _ = clip_updates(records, sent, cfg.clip_factor)
        weights = capped_weights(claims, cfg.weight_cap)
        aggregate = robust_aggregate(records, weights, cfg.aggregation, cfg.trim_fraction)
        global_model.load_state_dict(aggregate.to_torch_state_dict())
        server_start = time.time()
        if fedftg is not None:
            # The ensemble is the models as they were averaged (malicious, clipped), as in FedFTG.
            models = []
            for record in records:
                model = copy.deepcopy(global_model)
                model.load_state_dict(record.to_torch_state_dict())
                models.append(model)
            fedftg.finetune(global_model, models, torch.tensor(counts, dtype=torch.float64),
                            server_round)
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
