"""FedFTG as a wrapper around any Flower strategy: the base strategy aggregates, then the server
fine-tunes the aggregate by data-free distillation from the round's client models
(`pmafl.fedftg`)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log
from torch import nn

from pmafl.fedftg import FedFTGServer
from pmafl.protocol import LABEL_COUNTS, NUM_EXAMPLES
from strategies.aggregation import canonical_order
from strategies.round_loop import RoundLoop
from strategies.screening import BadReply, Specs, array_specs, screen_reply
from strategies.wrapped import WrappedStrategy


def label_counts_problem(counts: Any, num_classes: int, num_examples: Any) -> str | None:
    """Why a reply's label counts cannot weigh its model in the ensemble, or None: they must be
    `num_classes` non-negative integers that add up to the reply's `num-examples`."""
    if counts is None:
        return f"no '{LABEL_COUNTS}' metric"
    if not isinstance(counts, list) or len(counts) != num_classes:
        return f"'{LABEL_COUNTS}' must be a list of {num_classes} counts, got {counts!r}"
    if not all(isinstance(c, int | float) and math.isfinite(c) and c >= 0 and c == int(c)
               for c in counts):
        return f"'{LABEL_COUNTS}' must hold non-negative integers, got {counts!r}"
    if sum(counts) != num_examples:
        return f"'{LABEL_COUNTS}' add up to {sum(counts):g}, but num-examples is {num_examples!r}"
    return None


class FedFTG(RoundLoop):
    """FedFTG (Zhang et al., CVPR 2022) around a base strategy: `FedFTG(PMAFL(...), ...)` or
    `FedFTG(FedAvg(), ...)`.

    Train messages ask clients for their label counts (config flag `label-counts`), which they
    return as a list metric of that name. The wrapper takes that metric out of every reply, hands
    the replies to the base strategy to aggregate, and then fine-tunes the aggregate on the
    server with the round's client models as teachers (`FedFTGServer.finetune`). A reply enters
    that ensemble only if the base strategy averaged it (a `WrappedStrategy` such as `PMAFL` says
    which replies it averaged, and with which weights; for a base without screening, such as
    Flower's `FedAvg`, every reply fit to average) and its label counts have one entry per class
    and add up to its `num-examples`; every other averaged reply is logged with its node id and
    the reason, and listed in the round's `failures` (`round_summary`, stage `fedftg`; `left_out`
    keeps them per round). A member teaches with its model as the base averaged it: under
    PMAFL's `clip_factor`, a boosted update teaches clipped, as it was averaged. With no member
    the round's aggregate is returned as it is. The round's metrics gain `fedftg-loss-md`,
    `-loss-cls`, `-loss-div`, `-loss-kd`, `fedftg-clients` and `fedftg-seconds` (the server's
    fine-tuning time: the one figure that differs between two runs with one seed).

    Parameters
    ----------
    strategy : Strategy
        The base strategy; configures the rounds, aggregates, evaluates. When it is a
        `strategies.wrapped.WrappedStrategy` (`PMAFL`), the wrapper also takes from it the
        replies it averaged with their weights, tells it the number of rounds, and merges its
        `round_summary` into its own.
    model_fn : Callable[[], nn.Module]
        Builds the global model's architecture (for the global model and each client model).
    server : FedFTGServer
        The generator, its optimiser and FedFTG's hyperparameters; `server.state_dict()` belongs
        in a checkpoint for a resumed run to fine-tune as an uninterrupted one.
    num_classes : int
        Classes of the task: the length every client's label counts must have.
    """

    def __init__(self, strategy: Strategy, model_fn: Callable[[], nn.Module], server: FedFTGServer,
                 num_classes: int) -> None:
        super().__init__()
        self.strategy, self.model_fn, self.server = strategy, model_fn, server
        self.num_classes = num_classes
        self.left_out: dict[int, list[dict[str, Any]]] = {}
        self._sent_arrays: Specs = {}
        self._template: nn.Module | None = None

    def summary(self) -> None:
        """Log FedFTG's hyperparameters, then the base strategy's summary."""
        log(INFO, "\t├──> FedFTG server fine-tuning after aggregation:")
        for key, value in vars(self.server.cfg).items():
            log(INFO, "\t│\t├── %s: %s", key, value)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The base strategy's train messages, asking for label counts."""
        self._sent_arrays = array_specs(arrays)
        config = ConfigRecord({**config, LABEL_COUNTS: True})
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The base strategy's aggregate, fine-tuned by FedFTG on the valid replies' models."""
        replies = list(replies)
        # Taken out first, so that the base strategy aggregates only what it knows.
        counts = {id(msg): _pop_label_counts(msg) for msg in replies if not msg.has_error()}
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        members = self._ensemble(server_round, replies, counts)
        if not members:
            log(WARNING, "round %d FedFTG: no client model for the ensemble; the aggregate is "
                "not fine-tuned", server_round)
            return arrays, metrics
        start = time.time()
        device = self.server.device
        global_model = self._model(arrays, device)
        clients = [self._model(a, device) for a, _ in members]
        counts = torch.tensor([c for _, c in members], dtype=torch.float64)
        losses = self.server.finetune(global_model, clients, counts, server_round)
        seconds = time.time() - start
        log(INFO, "round %d FedFTG: fine-tuned on %d client models in %.2fs: %s", server_round,
            len(clients), seconds, ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        metrics = MetricRecord({**(metrics or {}), **{f"fedftg-{k}": v for k, v in losses.items()},
                                "fedftg-clients": len(clients), "fedftg-seconds": seconds})
        state = {k: v.cpu() for k, v in global_model.state_dict().items()}
        return ArrayRecord(state), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The base strategy's evaluate messages."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The base strategy's federated evaluation."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def set_num_rounds(self, num_rounds: int) -> None:
        """Called by `start`: a `WrappedStrategy` base (`PMAFL`) is told how many rounds."""
        if isinstance(self.strategy, WrappedStrategy):
            self.strategy.set_num_rounds(num_rounds)

    def round_summary(self, server_round: int) -> dict[str, Any]:
        """The round's figures: the round loop's (this wrapper runs it), then `failures`: the
        base strategy's, the replies left out of the ensemble (stage `fedftg`), and a discarded
        aggregate, in that order; then whatever else a `WrappedStrategy` base reports (`PMAFL`'s
        `train-eps`).

        Parameters
        ----------
        server_round : int
            The round; 0 (before training) has no figures.

        Returns
        -------
        dict[str, Any]
            As `RoundLoop.round_summary`.
        """
        summary = super().round_summary(server_round)
        base = dict(self.strategy.round_summary(server_round)) if isinstance(
            self.strategy, WrappedStrategy) else {}
        failures = base.pop("failures", []) + self.left_out.get(server_round, []) + summary.pop("failures")
        return {**summary, "failures": failures, **{k: v for k, v in base.items() if k not in summary}}

    def _model(self, arrays: ArrayRecord, device: torch.device) -> nn.Module:
        """A model of the task's architecture holding `arrays`, on `device`."""
        if self._template is None:
            self._template = self.model_fn()
        model = copy.deepcopy(self._template)
        model.load_state_dict(arrays.to_torch_state_dict())
        return model.to(device)

    def _ensemble(self, server_round: int, replies: list[Message], counts: dict[int, Any]
                  ) -> list[tuple[ArrayRecord, list[float]]]:
        """(arrays as averaged, label counts) of every reply the base strategy averaged (PMAFL's
        screened replies; for a base without screening, such as FedAvg, every reply fit to
        average) whose label counts are valid, in an order fixed by content (as the base's
        average is): reruns fine-tune bit-identically. A member's counts are scaled to its weight
        in the average: a node whose `num-examples` the base capped weighs no more here."""
        if isinstance(self.strategy, WrappedStrategy):
            weighted_by_key, averaged = self.strategy.weighted_by_key, self.strategy.aggregated
        else:
            is_fedavg = isinstance(self.strategy, FedAvg)
            weighted_by_key = self.strategy.weighted_by_key if is_fedavg else NUM_EXAMPLES
            averaged = self._fit_to_average(replies, weighted_by_key)
        found: dict[int, tuple[ArrayRecord, list[float]]] = {}
        contents = []
        for msg, arrays, weight in averaged:
            num_examples = next(iter(msg.content.metric_records.values()))[weighted_by_key]
            problem = label_counts_problem(counts[id(msg)], self.num_classes, num_examples)
            if problem:
                node = msg.metadata.src_node_id
                log(WARNING, "round %d FedFTG: node %d left out of the ensemble: %s",
                    server_round, node, problem)
                self.left_out.setdefault(server_round, []).append(
                    {"stage": "fedftg", "node": node, "reason": problem})
                continue
            scale = weight / num_examples
            found[id(msg.content)] = arrays, [int(c) * scale for c in counts[id(msg)]]
            contents.append(msg.content)
        return [found[id(c)] for c in canonical_order(contents)]

    def _fit_to_average(self, replies: list[Message], weighted_by_key: str
                        ) -> list[tuple[Message, ArrayRecord, float]]:
        """For a base that does not say what it averaged: every reply fit to average
        (`screen_reply` against the model sent, any metric keys), with its arrays as parsed and
        its `weighted_by_key` as its weight."""
        averaged = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                content = screen_reply(msg.content, self._sent_arrays, weighted_by_key)
            except BadReply:
                continue
            num_examples = next(iter(content.metric_records.values()))[weighted_by_key]
            averaged.append((msg, next(iter(content.array_records.values())), float(num_examples)))
        return averaged


def _pop_label_counts(msg: Message) -> Any:
    """The reply's label-count metric, removed from it (None when absent)."""
    records = list(msg.content.metric_records.values())
    return records[0].pop(LABEL_COUNTS, None) if len(records) == 1 else None
