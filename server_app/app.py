"""ServerApp: validates the run config, runs the PM-AFL strategy (wrapped in FedFTG when
`server-finetune` asks for it) with central (clean + PGD-20) evaluation of the global model after
every round, checkpoints every round into the results folder (`resume-from` continues an
interrupted run from it), and writes the results."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from pmafl.assembly import (
    backdoor_trigger,
    build_fedftg,
    build_model,
    client_seed,
    eval_split,
    load_data,
    resolve_device,
)
from pmafl.backdoor import Trigger, attack_success_rate
from pmafl.config import RunConfig
from pmafl.data import Split
from pmafl.evaluate import catastrophic_overfitting, evaluate
from pmafl.objectives import needs_teacher
from pmafl.results import (
    CheckpointError,
    checkpoint_files,
    load_checkpoint,
    new_results_folder,
    save_checkpoint,
    write_results,
)
from pmafl.teacher import prepare_teacher
from strategies import PMAFL, FederationStalled, FedFTG

app = ServerApp()


class CentralEvaluator:
    """`evaluate_fn` of the strategy: clean, FGSM and PGD accuracy of the global model on the
    evaluation images (`eval-examples` of the held-out test split) at the full eps, logged with
    the run's progress."""

    def __init__(self, model: torch.nn.Module, test: Split, cfg: RunConfig,
                 trigger: Trigger | None = None) -> None:
        self.model, self.cfg, self.trigger = model, cfg, trigger
        self.images, self.labels = test.tensors()
        self.start = time.time()
        self.first_round_end = 0.0

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        train = self.cfg.train
        # PGD's random start is seeded per round: a resumed run evaluates as an uninterrupted one.
        torch.manual_seed(client_seed(self.cfg.seed, server_round, -1))
        scores = evaluate(self.model, self.images, self.labels, train.eps, self.cfg.eval_steps,
                          self.cfg.batch_size * 8)
        asr = ""
        if self.trigger is not None:  # a backdoored teacher: does the global model inherit it?
            scores["asr"] = attack_success_rate(self.model, self.images, self.labels, self.trigger)
            asr = f", backdoor ASR {scores['asr']:.3f}"
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
        log(INFO, "[round %d/%d] global model on %d test images: clean acc %.3f, FGSM acc %.3f, "
            "PGD-%d acc %.3f (eps %g)%s | %.0fs elapsed%s", server_round, rounds, len(self.labels),
            scores["clean_acc"], scores["fgsm_acc"], self.cfg.eval_steps, scores["pgd_acc"],
            train.eps, asr, elapsed, left)
        return MetricRecord({**scores, "eval_examples": len(self.labels)})


def round_row(server_round: int, result: Any, strategy: PMAFL | FedFTG) -> dict[str, Any]:
    """One round's row: mean local loss terms (and FedFTG's server terms), federated evaluation
    (`fed_` keys: mean and worst node) when it ran, central scores, then the server's columns,
    `strategy.round_summary` of the strategy that ran the rounds (the outermost): the round's
    timing and bytes, the nodes left out (of the average, or of FedFTG's ensemble; a discarded
    aggregate as stage `aggregate`) and `train_eps`. The server's own columns are written last:
    no client metric can stand in for them. Only the `..._seconds` keys differ between two runs
    with one seed."""
    def snake(metrics: Any, prefix: str = "") -> dict[str, Any]:  # results.json keys: a_b, not a-b
        return {prefix + key.replace("-", "_"): value for key, value in metrics.items()}

    row: dict[str, Any] = {}
    row.update(snake(result.train_metrics_clientapp.get(server_round, {})))
    row.update(snake(result.evaluate_metrics_clientapp.get(server_round, {}), "fed_"))
    row.update(result.evaluate_metrics_serverapp.get(server_round, {}))
    row.update(snake(strategy.round_summary(server_round)))
    row.pop("round", None)
    return {"round": server_round, **row}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_mapping(context.run_config)  # stops the run here on a bad key
    device = resolve_device(cfg.device)
    data = load_data(cfg)
    trigger = backdoor_trigger(cfg, data)  # stops the run here on a target class out of range
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    log(INFO, "pmafl: objective %s, dataset %s (%d pool / %d public / %d test images, %d of them "
        "evaluated each round), model %s, eps %g, training attack %s", cfg.train.objective,
        cfg.dataset, len(data.pool), len(data.public), len(data.test), len(eval_split(cfg, data)),
        cfg.model, cfg.train.eps, cfg.train.train_attack)
    rows: list[dict[str, Any]] = []
    start_round = 1
    if cfg.resume_from:
        checkpoint = load_checkpoint(cfg.resume_from, cfg.to_dict())  # stops here if it does not fit
        folder, rows, start_round = checkpoint["folder"], checkpoint["rounds"], checkpoint["round"] + 1
        model.load_state_dict(checkpoint["model"])
        log(INFO, "Resuming %s after round %d", folder, checkpoint["round"])
    else:
        folder = new_results_folder(Path(cfg.results_dir), cfg.train.objective, cfg.seed)

    if needs_teacher(cfg.train.objective) and not cfg.teacher_sha256:
        # Pre-training a missing teacher is long: it happens here, before round 1, not inside a
        # round's timeout. Simulated nodes share this cache. A run that names `teacher-sha256`
        # has imported that file into its nodes' caches (`pmafl-teacher import`): nothing to prepare here.
        _, sha256, path = prepare_teacher(cfg, data, device=device)
        log(INFO, "pmafl: teacher %s (sha256 %s)", path, sha256)

    strategy = PMAFL(train_config=cfg.train, evaluate_every=cfg.federated_eval_every,
                     eps_warmup_rounds=cfg.eps_warmup_rounds,
                     fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                     aggregation=cfg.aggregation, trim_fraction=cfg.trim_fraction,
                     clip_factor=cfg.clip_factor, weight_cap=cfg.weight_cap,
                     node_wait_timeout=cfg.node_wait_timeout, max_idle_rounds=cfg.max_idle_rounds,
                     max_missed_rounds=cfg.max_missed_rounds, skip_rounds=cfg.skip_rounds,
                     min_train_nodes=cfg.min_train_nodes, min_evaluate_nodes=cfg.min_train_nodes,
                     min_available_nodes=cfg.min_available_nodes)

    if cfg.resume_from and "pmafl" in checkpoint["server_state"]:
        strategy.load_state_dict(checkpoint["server_state"]["pmafl"])
    fedftg = None
    if cfg.server_finetune != "off":
        server = build_fedftg(cfg, data, device)
        if cfg.resume_from:
            if "fedftg" not in checkpoint["server_state"]:
                raise CheckpointError(f"run config key 'resume-from': the checkpoint in {folder} "
                                      "holds no FedFTG generator state")
            server.load_state_dict(checkpoint["server_state"]["fedftg"])
        fedftg = FedFTG(strategy, lambda: build_model(cfg, data), server, data.num_classes)

    def on_round_end(server_round: int, arrays: ArrayRecord, result: Any) -> None:
        if not rows:
            rows.append(round_row(0, result, fedftg or strategy))
        rows.append(round_row(server_round, result, fedftg or strategy))
        warning = catastrophic_overfitting(rows)
        if warning:
            log(WARNING, "round %d: %s", server_round, warning)
            rows[-1]["warning"] = warning
        server_state = {"pmafl": strategy.state_dict()}
        if fedftg:
            server_state["fedftg"] = fedftg.server.state_dict()
        save_checkpoint(folder, server_round, arrays.to_torch_state_dict(), rows, cfg.to_dict(),
                        server_state, keep=cfg.keep_checkpoints)

    try:
        result = (fedftg or strategy).start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout, start_round=start_round, on_round_end=on_round_end,
            evaluate_fn=CentralEvaluator(model, eval_split(cfg, data), cfg, trigger))
    except FederationStalled as e:
        # What the completed rounds found is kept: the rows, and the model of the last one.
        stopped = str(e)
        if checkpoint_files(folder):
            try:
                model.load_state_dict(load_checkpoint(folder, cfg.to_dict())["model"])
            except CheckpointError as unreadable:
                stopped += f"; model.pt is the model the run started from ({unreadable})"
        write_results(folder, cfg.to_dict(), rows, model, stopped=stopped)
        log(WARNING, "Stopped: %s. Results of the completed rounds written to %s", e, folder.resolve())
        raise

    if len(result.arrays) > 0:  # empty when no round produced a valid aggregate
        model.load_state_dict(result.arrays.to_torch_state_dict())
    write_results(folder, cfg.to_dict(), rows, model)
    first, last = rows[0], rows[-1]
    log(INFO, "Summary: %s on %s, %d rounds: clean acc %.3f -> %.3f, PGD-%d acc %.3f -> %.3f",
        cfg.train.objective, cfg.dataset, cfg.num_server_rounds, first["clean_acc"],
        last["clean_acc"], cfg.eval_steps, first["pgd_acc"], last["pgd_acc"])
    log(INFO, "Results written to %s", folder.resolve())
