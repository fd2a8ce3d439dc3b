"""PM-AFL strategy: FedAvg that broadcasts PM-AFL's local-training hyperparameters and never lets
one bad client reply end the run."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from pmafl.compression import decode_update
from pmafl.config import AGGREGATIONS, TrainConfig
from pmafl.train import warmup_eps
from strategies.strategy_utils import (
    RoundLoop,
    array_specs,
    canonical_order,
    clip_updates,
    error_summary,
    expected_metric_keys,
    reply_problem,
    robust_aggregate,
    worst_client,
)


class FederationStalled(RuntimeError):
    """The federation cannot make progress: too few nodes, or too few valid replies."""


class PMAFL(RoundLoop, FedAvg):
    """Pre-trained Model guided Adversarial Federated Learning, server side.

    Each round it sends the global model and the local-training hyperparameters (`train_config`,
    merged under any `train_config` given to `start`) to the sampled nodes, screens the replies and
    averages the valid ones weighted by `num-examples` (FedAvg, accumulated in float64 so that
    the result does not depend on the order replies arrive in). A reply is left out, and logged
    with its node id and the reason, when it is an error reply, lacks the arrays or the
    `num-examples` metric, or carries arrays of the wrong keys or shapes, or NaN/Inf values; a
    sampled node that does not answer is logged as missing. `failures` keeps every left-out reply
    per round. A round counts only with at least `min_train_nodes` valid replies; otherwise the
    global model stays as it was, and after `max_idle_rounds` such rounds in a row the run stops
    with `FederationStalled`. So it does when fewer than `min_available_nodes` nodes are
    connected for longer than `node_wait_timeout` seconds (Flower's sampling would wait for ever).
    The checkpoint of the last completed round stays intact either way. With
    `train_config.update_compression` other than `none`, clients reply with a compressed update
    (`pmafl.compression`) that is decoded against the global model sent before it is screened; one
    that cannot be decoded is left out like any malformed reply.

    Parameters
    ----------
    train_config : TrainConfig (default: TrainConfig())
        Local-training hyperparameters broadcast in every train message (objective, alpha,
        lambda-alg, tau, mixup-alpha, eps, PGD steps, optimiser settings, ...).
    eps_warmup_rounds : int (default: 0)
        Ramp the training radius: round r trains at eps * min(1, r / eps_warmup_rounds); 0
        trains at the full eps from round 1.
    evaluate_every : int (default: 1)
        Federated evaluation (each sampled node on its local test split) every this many rounds
        and in the last round; 0 turns it off, as does fraction_evaluate=0. Its metrics are the
        weighted mean over nodes plus `worst-<key>` for every accuracy.
    aggregation : str (default: "mean")
        `mean` (FedAvg, example-weighted), `trimmed-mean` or `median` (coordinate-wise,
        unweighted: robust to a minority of arbitrary updates).
    trim_fraction : float (default: 0.2)
        Share cut from each end by `trimmed-mean`.
    clip_factor : float (default: 0)
        Norm-bounded updates: each client's delta from the global model is scaled down to at most
        this many times the round's median delta norm before aggregation; 0 turns it off.
    node_wait_timeout : float (default: 3600)
        Seconds to wait for `min_available_nodes` connected nodes before a round, then stop.
    max_idle_rounds : int (default: 3)
        Stop after this many rounds in a row with fewer than `min_train_nodes` valid replies.
    **fedavg_kwargs
        Passed to Flower's `FedAvg`: fraction_train (1.0), fraction_evaluate (1.0),
        min_train_nodes (2), min_evaluate_nodes (2), min_available_nodes (2),
        weighted_by_key ("num-examples"), arrayrecord_key ("arrays"), configrecord_key ("config"),
        train_metrics_aggr_fn, evaluate_metrics_aggr_fn.
    """

    def __init__(self, train_config: TrainConfig | None = None, evaluate_every: int = 1,
                 eps_warmup_rounds: int = 0, aggregation: str = "mean", trim_fraction: float = 0.2,
                 clip_factor: float = 0.0, node_wait_timeout: float = 3600.0,
                 max_idle_rounds: int = 3, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        self.aggregation, self.trim_fraction, self.clip_factor = aggregation, trim_fraction, clip_factor
        self._sent_global = ArrayRecord()
        self._sent_torch: dict[str, Any] | None = None
        self.train_config = train_config or TrainConfig()
        self.evaluate_every = evaluate_every
        self.eps_warmup_rounds = eps_warmup_rounds
        self.node_wait_timeout, self.max_idle_rounds = node_wait_timeout, max_idle_rounds
        self._idle_rounds = 0
        self.num_rounds = 0
        self.failures: dict[int, list[dict[str, Any]]] = {}
        self._sent_arrays: dict[str, tuple[tuple[int, ...], str]] = {}
        self._sampled: dict[str, list[int]] = {"train": [], "evaluate": []}
        self._claims: dict[tuple[str, int], tuple[int, int]] = {}
        # The train replies the last round averaged, each with its model as it entered the
        # aggregate (the update clipped when clip_factor is set).
        self.aggregated: list[tuple[Message, ArrayRecord]] = []

    def summary(self) -> None:
        log(INFO, "\t├──> PM-AFL local training (broadcast each round):")
        for key, value in self.train_config.to_record().items():
            log(INFO, "\t│\t├── %s: %s", key, value)
        super().summary()

    def state_dict(self) -> dict[str, Any]:
        """What screening remembers across rounds (each node's first `num-examples` claim), for a
        checkpoint: a resumed run screens replies as an uninterrupted one."""
        return {"claims": [[stage, node, claim, first] for (stage, node), (claim, first)
                           in sorted(self._claims.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._claims = {(stage, node): (claim, first) for stage, node, claim, first in state["claims"]}

    def round_eps(self, server_round: int) -> float:
        """The training radius of a round, after the warm-up ramp."""
        return warmup_eps(self.train_config.eps, self.eps_warmup_rounds, server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes; send them the global model and the local-training hyperparameters (eps
        ramped during the warm-up)."""
        config = ConfigRecord({**self.train_config.to_record(), "eps": self.round_eps(server_round),
                               **config})
        self._wait_for_nodes(server_round, grid)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent_arrays, self._sent_global, self._sent_torch = array_specs(arrays), arrays, None
        self._sampled["train"] = [msg.metadata.dst_node_id for msg in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The valid replies' aggregate (weighted mean, or the robust `aggregation`, after optional
        norm clipping) and their metrics' weighted mean."""
        valid = self._screen(server_round, "train", replies, self._sent_arrays)
        self.aggregated = []
        if len(valid) < self.min_train_nodes:
            self._idle_rounds += 1
            log(WARNING, "round %d: %d valid train replies, fewer than min-train-nodes (%d); the "
                "global model stays as it was (%d such rounds in a row)", server_round, len(valid),
                self.min_train_nodes, self._idle_rounds)
            if self._idle_rounds >= self.max_idle_rounds:
                raise FederationStalled(
                    f"{self._idle_rounds} rounds in a row with fewer than min-train-nodes "
                    f"({self.min_train_nodes}) valid replies (max-idle-rounds): stopping; the "
                    f"checkpoint of the last completed round is intact. Last round's failures: "
                    f"{self.failures.get(server_round, [])}")
            return None, None
        self._idle_rounds = 0
        contents = canonical_order([msg.content for msg in valid])
        records = [next(iter(c.array_records.values())) for c in contents]
        if self.clip_factor > 0:
            records, clipped = clip_updates(records, self._sent_global, self.clip_factor)
            if clipped:
                log(INFO, "round %d: %d of %d updates clipped to %g x the median update norm",
                    server_round, clipped, len(records), self.clip_factor)
        by_content = {id(c): r for c, r in zip(contents, records, strict=True)}
        self.aggregated = [(msg, by_content[id(msg.content)]) for msg in valid]
        arrays = robust_aggregate(records, [next(iter(c.metric_records.values()))[self.weighted_by_key]
                                            for c in contents], self.aggregation, self.trim_fraction)
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample nodes for federated evaluation (every `evaluate_every` rounds and the last one);
        send them the global model and the train config (its eps is the attack radius)."""
        due = self.evaluate_every > 0 and (server_round % self.evaluate_every == 0
                                           or server_round == self.num_rounds)
        if not due:
            self._sampled["evaluate"] = []
            return []
        config = ConfigRecord({**self.train_config.to_record(), **config})
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._sampled["evaluate"] = [msg.metadata.dst_node_id for msg in messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean of the valid replies' metrics, plus `worst-<key>`, the lowest client
        value of every accuracy (`...acc`) metric: non-IID robustness is uneven across clients."""
        valid = self._screen(server_round, "evaluate", replies, None)
        if not valid:
            return None
        contents = canonical_order([msg.content for msg in valid])
        metrics = self.evaluate_metrics_aggr_fn(contents, self.weighted_by_key)
        metrics.update(worst_client(contents))
        metrics["num-clients"] = len(contents)
        return metrics

    def set_num_rounds(self, num_rounds: int) -> None:
        """Called by `start`: the last round always gets a federated evaluation."""
        self.num_rounds = num_rounds

    def _screen(self, server_round: int, stage: str, replies: Iterable[Message],
                expected_arrays: dict[str, tuple[tuple[int, ...], str]] | None) -> list[Message]:
        """The replies fit to average; log and record the others, and the nodes that never answered.

        Order-independent by construction: a node that replied more than once has all its replies
        left out, and the metric keys a reply must carry are the ones most replies carry."""
        replies = list(replies)
        valid: list[Message] = []
        answered: set[int] = set()
        sampled = self._sampled[stage]
        times = Counter(msg.metadata.src_node_id for msg in replies if not msg.has_error())
        metric_keys = expected_metric_keys([msg.content for msg in replies if not msg.has_error()])
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                # An unreachable node's error comes from the SuperLink, not from the node: it is
                # then reported below as missing, by the ids that were sampled.
                if node in sampled:
                    answered.add(node)
                    self._fail(server_round, stage, node,
                               f"error reply (code {msg.error.code}): {error_summary(msg.error.reason)}")
                continue
            if node not in sampled:
                self._fail(server_round, stage, node, "reply from a node not sampled this round")
                continue
            answered.add(node)
            if times[node] > 1:
                self._fail(server_round, stage, node, f"replied {times[node]} times this round; "
                           "every reply of it is left out")
                continue
            problem = ((self._decode(msg) if expected_arrays is not None else None)
                       or reply_problem(msg.content, expected_arrays, self.weighted_by_key, metric_keys)
                       or self._claim_problem(server_round, stage, node, msg))
            if problem:
                self._fail(server_round, stage, node, f"malformed reply: {problem}")
                continue
            valid.append(msg)
        for node in sorted(set(sampled) - answered):
            self._fail(server_round, stage, node, "no reply (node unreachable or round timed out)")
        if sampled:
            log(INFO, "round %d %s: %d of %d sampled nodes' replies aggregated", server_round,
                stage, len(valid), len(sampled))
        return valid

    def _decode(self, msg: Message) -> str | None:
        """With `update-compression`, replace the reply's encoded update by the model it stands
        for (`pmafl.compression.decode_update` against the global model sent); the reason when it
        cannot be decoded."""
        method = self.train_config.update_compression
        if method == "none" or len(msg.content.array_records) != 1:
            return None
        (key, record), = msg.content.array_records.items()
        if self._sent_torch is None:
            self._sent_torch = self._sent_global.to_torch_state_dict()
        try:
            model = decode_update(record.to_torch_state_dict(), self._sent_torch, method)
        except ValueError as e:
            return str(e)
        msg.content[key] = ArrayRecord(torch_state_dict=model)
        return None

    def _wait_for_nodes(self, server_round: int, grid: Grid) -> None:
        """Wait until `min_available_nodes` are connected, at most `node_wait_timeout` seconds."""
        deadline = time.monotonic() + self.node_wait_timeout
        logged = False
        while (connected := len(list(grid.get_node_ids()))) < self.min_available_nodes:
            if time.monotonic() >= deadline:
                raise FederationStalled(
                    f"round {server_round}: {connected} nodes connected, fewer than "
                    f"min-available-nodes ({self.min_available_nodes}), for {self.node_wait_timeout:g}s "
                    "(node-wait-timeout): stopping; the checkpoint of the last completed round "
                    "is intact")
            if not logged:
                log(INFO, "round %d: waiting for %d nodes (%d connected), at most %gs",
                    server_round, self.min_available_nodes, connected, self.node_wait_timeout)
                logged = True
            time.sleep(min(1.0, self.node_wait_timeout))

    def _claim_problem(self, server_round: int, stage: str, node: int, msg: Message) -> str | None:
        """A node's data does not grow: its `num-examples` may not exceed what it claimed in the
        first round it answered (a reply claiming far more would take the average's weight)."""
        claim = next(iter(msg.content.metric_records.values()))[self.weighted_by_key]
        first = self._claims.setdefault((stage, node), (claim, server_round))
        if claim > first[0]:
            return (f"'{self.weighted_by_key}' is {claim!r}, more than the {first[0]!r} this node "
                    f"claimed in round {first[1]}")
        return None

    def _fail(self, server_round: int, stage: str, node: int, reason: str) -> None:
        log(WARNING, "round %d %s: node %d left out: %s", server_round, stage, node, reason)
        self.failures.setdefault(server_round, []).append(
            {"stage": stage, "node": node, "reason": reason})
