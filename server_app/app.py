"""ServerApp: validates the run config, runs the PM-AFL strategy with central (clean + PGD-20)
evaluation of the global model after every round, and writes the results folder."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from pmafl.config import RunConfig
from pmafl.data import Split
from pmafl.evaluate import evaluate
from pmafl.results import new_results_folder, write_results
from pmafl.task import build_model, load_data, resolve_device
from strategies import PMAFL

app = ServerApp()


class CentralEvaluator:
    """`evaluate_fn` of the strategy: clean and PGD accuracy of the global model on the held-out
    test split, logged with the run's progress."""

    def __init__(self, model: torch.nn.Module, test: Split, cfg: RunConfig) -> None:
        self.model, self.cfg = model, cfg
        self.images, self.labels = test.tensors()
        self.start = time.time()
        self.first_round_end = 0.0

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        train = self.cfg.train
        scores = evaluate(self.model, self.images, self.labels, train.eps, train.pgd_step,
                          self.cfg.eval_steps, self.cfg.batch_size * 8)
        now = time.time()
        elapsed, rounds = now - self.start, self.cfg.num_server_rounds
        # Round 1 also pays for one-off work (teacher pre-training, Ray start-up): estimate the
        # time left from the rounds after it.
        if server_round == 1:
            self.first_round_end = now
        left = ""
        if server_round > 1:
            per_round = (now - self.first_round_end) / (server_round - 1)
            left = f", about {per_round * (rounds - server_round):.0f}s left"
        log(INFO, "[round %d/%d] global model on test: clean acc %.3f, PGD-%d acc %.3f "
            "(eps %g) | %.0fs elapsed%s", server_round, rounds, scores["clean_acc"],
            self.cfg.eval_steps, scores["pgd_acc"], train.eps, elapsed, left)
        return MetricRecord(scores)


def collect_rounds(result: Any, strategy: PMAFL, num_rounds: int) -> list[dict[str, Any]]:
    """One dict a round: central scores, mean local loss terms, federated evaluation (`fed_`
    keys: mean and worst node) when it ran, and the nodes left out."""
    rounds = []
    for r in range(num_rounds + 1):
        row: dict[str, Any] = {"round": r}
        row.update(result.evaluate_metrics_serverapp.get(r, {}))
        train = result.train_metrics_clientapp.get(r, {})
        row.update({key.replace("-", "_"): value for key, value in train.items()})
        federated = result.evaluate_metrics_clientapp.get(r, {})
        row.update({"fed_" + key.replace("-", "_"): value for key, value in federated.items()})
        row["failures"] = strategy.failures.get(r, [])
        rounds.append(row)
    return rounds


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)  # stops the run here on a bad key
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    log(INFO, "pmafl: objective %s, dataset %s (%d pool / %d public / %d test images), model %s",
        cfg.train.objective, cfg.dataset, len(data.pool), len(data.public), len(data.test), cfg.model)

    strategy = PMAFL(train_config=cfg.train, evaluate_every=cfg.federated_eval_every,
                     fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                     min_train_nodes=cfg.min_train_nodes, min_evaluate_nodes=cfg.min_train_nodes,
                     min_available_nodes=cfg.min_available_nodes)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
                            evaluate_fn=CentralEvaluator(model, data.test, cfg))

    if len(result.arrays) > 0:  # empty when no round produced a valid aggregate
        model.load_state_dict(result.arrays.to_torch_state_dict())
    rounds = collect_rounds(result, strategy, cfg.num_server_rounds)
    folder = new_results_folder(Path(cfg.results_dir), cfg.train.objective, cfg.seed)
    write_results(folder, cfg.to_dict(), rounds, model)
    first, last = rounds[0], rounds[-1]
    log(INFO, "Summary: %s on %s, %d rounds: clean acc %.3f -> %.3f, PGD-%d acc %.3f -> %.3f",
        cfg.train.objective, cfg.dataset, cfg.num_server_rounds, first["clean_acc"],
        last["clean_acc"], cfg.eval_steps, first["pgd_acc"], last["pgd_acc"])
    log(INFO, "Results written to %s", folder.resolve())
