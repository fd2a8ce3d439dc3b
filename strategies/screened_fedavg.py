"""ScreenedFedAvg: Flower's FedAvg that no node can crash or take over. Every reply is screened,
every weight bounded, nodes that keep missing rounds are skipped for a while, and a federation
that cannot progress stops with `FederationStalled` instead of waiting for ever."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Collection, Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from pmafl.config import AGGREGATIONS
from pmafl.protocol import SERVER_ROUND
from strategies.aggregation import (
    canonical_order,
    capped_weights,
    clip_updates,
    robust_aggregate,
    weighted_metrics,
    worst_client,
)
from strategies.round_loop import RoundLoop
from strategies.screening import BadReply, Specs, array_specs, error_summary, screen_reply


class FederationStalled(RuntimeError):
    """The federation cannot make progress: too few nodes, or too few valid replies."""


class ScreenedFedAvg(RoundLoop, FedAvg):
    """FedAvg, run by this project's round loop, that screens every reply and bounds every weight.

    Each round it samples nodes, sends them the global model, screens their replies and averages
    the valid ones. Safe by default: one hostile node of ten can neither crash the run nor take
    over the model.

    * Screening (`strategies.screening.screen_reply`) reads what is averaged: each array is parsed
      from its bytes (a NumPy serialisation, no pickle) and must have the key, shape and dtype of
      the array sent, all finite; the metrics must be exactly the keys this server expects
      (`train_metric_keys`, `evaluate_metric_keys`; None: any keys), finite numbers, with a
      positive integer `num-examples` no larger than the node's first claim. A reply that fails,
      that raises anything while it is read, that comes from a node not sampled, or from a node
      that replied twice, is left out and logged with the node id and the reason, and the round
      goes on. `failures` keeps them per round; a sampled node that does not answer is logged as
      missing.
    * Bounded weights: a reply's weight in the mean is its `num-examples`, at most `weight_cap`
      times the round's median claim, and its update (the difference from the global model sent)
      is scaled down to at most `clip_factor` times the round's median update norm.
    * A round counts only with at least `min_train_nodes` valid replies; otherwise the global model
      stays as it was, and after `max_idle_rounds` such rounds in a row the run stops with
      `FederationStalled`, as it does when fewer than `min_available_nodes` nodes are connected for
      longer than `node_wait_timeout` seconds (before training and before evaluation alike).
    * A node that missed `max_missed_rounds` of its rounds in a row (no usable reply, in training
      or evaluation: none within the round's timeout, an error, or one left out) is not sampled
      for the next `skip_rounds` rounds (logged), so neither a silent node nor one that answers
      garbage at the last moment costs every round its full timeout; when skipping would leave
      too few nodes, it is sampled anyway.

    A subclass sets `train_metric_keys` and `evaluate_metric_keys` to what its clients return,
    adds its own config to `configure_train` / `configure_evaluate`, and overrides
    `decode_train_reply` when its clients send a train reply in another form than the model.

    Parameters
    ----------
    evaluate_every : int (default: 1)
        Federated evaluation (each sampled node on its local test split) every this many rounds
        and in the last round; 0 turns it off, as does fraction_evaluate=0. Its metrics are the
        weighted mean over nodes plus `worst-<key>` for every accuracy.
    aggregation : str (default: "mean")
        `mean` (FedAvg, example-weighted), `trimmed-mean` or `median` (coordinate-wise,
        unweighted: robust to a minority of arbitrary updates).
    trim_fraction : float (default: 0.2)
        Share cut from each end by `trimmed-mean`.
    clip_factor : float (default: 2.0)
        Norm-bounded updates: each client's delta from the global model is scaled down to at most
        this many times the round's median delta norm before aggregation; 0 turns it off.
    weight_cap : float (default: 1.0)
        A reply's weight in the mean (and in the metrics' means) is at most this many times the
        round's median `num-examples`; 0 turns the cap off. At 1, no node weighs more than the
        median node: at 4, one node of ten that claims 10**12 examples and sends its weights
        negated still cost the default digits federation 8.6 clean points (docs/deployment.md).
    node_wait_timeout : float (default: 3600)
        Seconds to wait for `min_available_nodes` connected nodes before a round's training or
        evaluation, then stop.
    max_idle_rounds : int (default: 3)
        Stop after this many rounds in a row with fewer than `min_train_nodes` valid replies.
    max_missed_rounds : int (default: 2)
        Rounds in a row a node may miss before it is skipped; 0: never skip.
    skip_rounds : int (default: 3)
        Rounds a node that missed `max_missed_rounds` rounds in a row is not sampled.
    **fedavg_kwargs
        Passed to Flower's `FedAvg`: fraction_train (1.0), fraction_evaluate (1.0),
        min_train_nodes (2), min_evaluate_nodes (2), min_available_nodes (2),
        weighted_by_key ("num-examples"), arrayrecord_key ("arrays"), configrecord_key ("config").
        Metrics are averaged with the capped weights: `train_metrics_aggr_fn` and
        `evaluate_metrics_aggr_fn` are refused.

    Attributes
    ----------
    train_metric_keys, evaluate_metric_keys : Collection[str] | None
        The metric keys a train or evaluate reply must carry (with `weighted_by_key`); None
        (the default): any keys.
    failures : dict[int, list[dict[str, Any]]]
        The replies and nodes left out of each round, each {"stage", "node", "reason"}.
    aggregated : list[tuple[Message, ArrayRecord, float]]
        The train replies the last round averaged: each with its model as it entered the
        aggregate (parsed, and clipped when clip_factor is set) and its weight there
        (`strategies.wrapped.WrappedStrategy`).
    """

    def __init__(self, evaluate_every: int = 1, aggregation: str = "mean", trim_fraction: float = 0.2,
                 clip_factor: float = 2.0, weight_cap: float = 1.0, node_wait_timeout: float = 3600.0,
                 max_idle_rounds: int = 3, max_missed_rounds: int = 2, skip_rounds: int = 3,
                 **fedavg_kwargs: Any) -> None:
        for key in ("train_metrics_aggr_fn", "evaluate_metrics_aggr_fn"):
            if key in fedavg_kwargs:
                raise TypeError(f"{type(self).__name__} averages metrics with the capped weights "
                                f"itself: {key} is not supported")
        super().__init__(**fedavg_kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
        self.aggregation, self.trim_fraction = aggregation, trim_fraction
        self.clip_factor, self.weight_cap = clip_factor, weight_cap
        self.evaluate_every = evaluate_every
        self.node_wait_timeout, self.max_idle_rounds = node_wait_timeout, max_idle_rounds
        self.max_missed_rounds, self.skip_rounds = max_missed_rounds, skip_rounds
        self.train_metric_keys: Collection[str] | None = None
        self.evaluate_metric_keys: Collection[str] | None = None
        self.num_rounds = 0
        self.failures: dict[int, list[dict[str, Any]]] = {}
        self.aggregated: list[tuple[Message, ArrayRecord, float]] = []
        self._idle_rounds = 0
        self._sent_global = ArrayRecord()
        self._sent_arrays: Specs = {}
        self._sampled: dict[str, list[int]] = {"train": [], "evaluate": []}
        self._claims: dict[tuple[str, int], tuple[int, int]] = {}
        self._missed: dict[int, tuple[int, int]] = {}  # node: (rounds missed in a row, the last)
        self._usable: dict[int, tuple[int, int]] = {}  # node: (last round with a usable reply, one before)
        self._skip_until: dict[int, int] = {}  # node: the last round it is not sampled

    def summary(self) -> None:
        """Log the aggregation and its bounds, then FedAvg's sampling settings."""
        log(INFO, "\t├──> Aggregation: %s (trim fraction %g), updates clipped at %g x the median "
            "norm, weights capped at %g x the median claim (0: off)", self.aggregation,
            self.trim_fraction, self.clip_factor, self.weight_cap)
        super().summary()

    def state_dict(self) -> dict[str, Any]:
        """What screening and sampling remember across rounds, for a checkpoint: a resumed run
        screens and samples as an uninterrupted one.

        Returns
        -------
        dict[str, Any]
            Each node's first `num-examples` claim per stage, its missed rounds, its last rounds
            with a usable reply, and the round until which it is skipped (JSON-serialisable).
        """
        return {"claims": [[stage, node, claim, first] for (stage, node), (claim, first)
                           in sorted(self._claims.items())],
                "missed": sorted([node, count, last] for node, (count, last) in self._missed.items()),
                "usable": sorted([node, last, before] for node, (last, before) in self._usable.items()),
                "skip-until": sorted([node, last] for node, last in self._skip_until.items())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (a checkpoint written before `missed`, `usable` or
        `skip-until` existed restores them empty).

        Parameters
        ----------
        state : dict[str, Any]
            A `state_dict()`.
        """
        self._claims = {(stage, node): (claim, first) for stage, node, claim, first in state["claims"]}
        self._missed = {node: (count, last) for node, count, last in state.get("missed", [])}
        self._usable = {node: (last, before) for node, last, before in state.get("usable", [])}
        self._skip_until = {node: last for node, last in state.get("skip-until", [])}

    def set_num_rounds(self, num_rounds: int) -> None:
        """Called by `start`: the last round always gets a federated evaluation."""
        self.num_rounds = num_rounds

    def round_summary(self, server_round: int) -> dict[str, Any]:
        """The round loop's figures of a round (`RoundLoop.round_summary`), with the replies and
        nodes screening left out of it first in `failures`."""
        summary = super().round_summary(server_round)
        summary["failures"] = self.failures.get(server_round, []) + summary["failures"]
        return summary

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes (`_sample`) and send them the global model and `config`; remember what was
        sent, which every reply is screened against."""
        messages = self._messages(server_round, "train", arrays, config, grid)
        self._sent_arrays, self._sent_global = array_specs(arrays), arrays
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The valid replies' aggregate (weighted mean with capped weights, or the robust
        `aggregation`, after norm clipping) and their metrics' weighted mean.

        Parameters
        ----------
        server_round : int
            The round.
        replies : Iterable[Message]
            The train replies that came in.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The aggregate and the metrics, or (None, None) with fewer than `min_train_nodes`
            valid replies.

        Raises
        ------
        FederationStalled
            After `max_idle_rounds` rounds in a row with too few valid replies.
        """
        # Screen; too few valid replies leave the global model as it was.
        valid = self._screen(server_round, "train", replies)
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
                    f"checkpoints of the last completed rounds are intact. Last round's failures: "
                    f"{self.failures.get(server_round, [])}")
            return None, None
        self._idle_rounds = 0

        # Bound the weights and the updates, in an order fixed by content, then aggregate.
        senders = {id(content): msg for msg, content in valid}
        contents = canonical_order([content for _, content in valid])
        records = [next(iter(c.array_records.values())) for c in contents]
        weights = self.train_weights(server_round, contents)
        if self.clip_factor > 0:
            records, clipped = clip_updates(records, self._sent_global, self.clip_factor)
            if clipped:
                log(INFO, "round %d: %d of %d updates clipped to %g x the median update norm",
                    server_round, clipped, len(records), self.clip_factor)
        self.aggregated = [(senders[id(c)], r, w) for c, r, w in zip(contents, records, weights, strict=True)]
        arrays = robust_aggregate(records, weights, self.aggregation, self.trim_fraction)
        return arrays, weighted_metrics(contents, weights, self.weighted_by_key)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample nodes for federated evaluation (every `evaluate_every` rounds and the last one);
        send them the global model and `config`."""
        due = self.evaluate_every > 0 and self.fraction_evaluate > 0 and (
            server_round % self.evaluate_every == 0 or server_round == self.num_rounds)
        if not due:
            self._sampled["evaluate"] = []
            return []
        return self._messages(server_round, "evaluate", arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean (capped weights) of the valid replies' metrics, plus `worst-<key>`, the
        lowest client value of every accuracy (`...acc`) metric: non-IID robustness is uneven
        across clients.

        Parameters
        ----------
        server_round : int
            The round.
        replies : Iterable[Message]
            The evaluate replies that came in.

        Returns
        -------
        MetricRecord | None
            The metrics and `num-clients`, or None when no reply is valid.
        """
        valid = self._screen(server_round, "evaluate", replies)
        if not valid:
            return None
        contents = canonical_order([content for _, content in valid])
        metrics = weighted_metrics(contents, self._weights(server_round, contents), self.weighted_by_key)
        metrics.update(worst_client(contents))
        metrics["num-clients"] = len(contents)
        return metrics

    def decode_train_reply(self, content: RecordDict) -> RecordDict:
        """A train reply's content as the model it stands for, before it is screened; as it came
        by default. Raise `BadReply` for a reply that cannot be decoded.

        Parameters
        ----------
        content : RecordDict
            The reply's content, unscreened.

        Returns
        -------
        RecordDict
            The content to screen.
        """
        return content

    def _messages(self, server_round: int, stage: str, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid) -> list[Message]:
        """One message of the round's model and config for each sampled node (`_sample`)."""
        fraction = self.fraction_train if stage == "train" else self.fraction_evaluate
        least = self.min_train_nodes if stage == "train" else self.min_evaluate_nodes
        nodes = self._sample(server_round, stage, grid, fraction, least)
        config = ConfigRecord({**config, SERVER_ROUND: server_round})
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        message_type = MessageType.TRAIN if stage == "train" else MessageType.EVALUATE
        self._sampled[stage] = nodes
        return [Message(content=content, message_type=message_type, dst_node_id=node) for node in nodes]

    def _sample(self, server_round: int, stage: str, grid: Grid, fraction: float, least: int
                ) -> list[int]:
        """`fraction` of the connected nodes (at least `least`, all of them at most), in random
        order, as Flower's FedAvg samples, less the nodes skipped this round for missing
        exchanges (all connected nodes when too few are left)."""
        connected = self._wait_for_nodes(server_round, grid, max(self.min_available_nodes, least))
        eligible = [n for n in connected if self._skip_until.get(n, 0) < server_round]
        if len(eligible) < least:
            eligible = connected
        elif len(eligible) < len(connected):
            log(INFO, "round %d %s: nodes %s skipped (no usable reply in %d of their rounds in a "
                "row)", server_round, stage, sorted(set(connected) - set(eligible)),
                self.max_missed_rounds)
        size = min(len(eligible), max(int(len(eligible) * fraction), least))
        nodes = random.sample(eligible, size)
        log(INFO, "configure_%s: sampled %d nodes (out of %d connected)", stage, len(nodes), len(connected))
        return nodes

    def _wait_for_nodes(self, server_round: int, grid: Grid, count: int) -> list[int]:
        """The connected nodes, once at least `count` are; at most `node_wait_timeout` seconds."""
        deadline = time.monotonic() + self.node_wait_timeout
        logged = False
        while len(connected := list(grid.get_node_ids())) < count:
            if time.monotonic() >= deadline:
                raise FederationStalled(
                    f"round {server_round}: {len(connected)} nodes connected, fewer than "
                    f"{count} (min-available-nodes {self.min_available_nodes}), for "
                    f"{self.node_wait_timeout:g}s (node-wait-timeout): stopping; the checkpoints "
                    "of the last completed rounds are intact")
            if not logged:
                log(INFO, "round %d: waiting for %d nodes (%d connected), at most %gs",
                    server_round, count, len(connected), self.node_wait_timeout)
                logged = True
            time.sleep(min(1.0, self.node_wait_timeout))
        return connected

    def train_weights(self, server_round: int, contents: list[RecordDict]) -> list[float]:
        """The train replies' weights in the mean (`_weights`); a subclass may reweight them."""
        return self._weights(server_round, contents)

    def _weights(self, server_round: int, contents: list[RecordDict]) -> list[float]:
        """The replies' weights: `num-examples`, capped (`capped_weights`); logged when capped."""
        claims = [next(iter(c.metric_records.values()))[self.weighted_by_key] for c in contents]
        weights = capped_weights(claims, self.weight_cap)
        capped = sum(w < c for w, c in zip(weights, claims, strict=True))
        if capped:
            # INFO, not WARNING: at the default cap (1) half of an honest round is capped.
            log(INFO, "round %d: %d of %d replies weigh more than %g x the median '%s' "
                "(%s); their weight is capped", server_round, capped, len(claims),
                self.weight_cap, self.weighted_by_key, sorted(claims))
        return weights

    def _screen(self, server_round: int, stage: str, replies: Iterable[Message]
                ) -> list[tuple[Message, RecordDict]]:
        """The replies fit to average, each with its content as screened (arrays parsed); log
        and record the others, and the nodes that never answered. Reading a reply cannot raise:
        whatever goes wrong leaves that reply out.

        Order-independent by construction: a node that replied more than once has all its replies
        left out, and what a reply must carry is fixed by this server, not by the other replies."""
        replies = list(replies)
        valid: list[tuple[Message, RecordDict]] = []
        answered: set[int] = set()
        sampled = self._sampled[stage]
        times = Counter(msg.metadata.src_node_id for msg in replies if not msg.has_error())
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
            try:
                content = self._read(server_round, stage, node, msg)
            except BadReply as e:
                self._fail(server_round, stage, node, f"malformed reply: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - a hostile reply must never end the run
                self._fail(server_round, stage, node,
                           f"unreadable reply: {type(e).__name__}: {str(e)[:300]}")
                continue
            valid.append((msg, content))
        self._count_misses(server_round, sampled, {msg.metadata.src_node_id for msg, _ in valid})
        for node in sorted(set(sampled) - answered):
            self._fail(server_round, stage, node, "no reply (node unreachable or round timed out)")
        if sampled:
            log(INFO, "round %d %s: %d of %d sampled nodes' replies aggregated", server_round,
                stage, len(valid), len(sampled))
        return valid

    def _read(self, server_round: int, stage: str, node: int, msg: Message) -> RecordDict:
        """The reply's content as screened (`screen_reply`, after `decode_train_reply`), its
        `num-examples` no larger than the node's first claim; raises `BadReply`."""
        content = msg.content
        if stage == "train":
            content = self.decode_train_reply(content)
        keys = self.train_metric_keys if stage == "train" else self.evaluate_metric_keys
        content = screen_reply(content, self._sent_arrays if stage == "train" else None,
                               self.weighted_by_key, keys)
        claim = next(iter(content.metric_records.values()))[self.weighted_by_key]
        first = self._claims.setdefault((stage, node), (claim, server_round))
        if claim > first[0]:
            # A node's data does not grow: a claim above its first would take the mean's weight.
            raise BadReply(f"'{self.weighted_by_key}' is {claim!r}, more than the {first[0]!r} "
                           f"this node claimed in round {first[1]}")
        return content

    def _count_misses(self, server_round: int, sampled: list[int], usable: set[int]) -> None:
        """A sampled node without a usable reply in a stage (none, an error, or one left out)
        missed the round, once per round whichever stages it missed. Its count starts again after
        a round it was sampled in and missed nothing; rounds it was not sampled in do not break the
        row, so a node back from being skipped that misses again is skipped again. After
        `max_missed_rounds` in a row it is skipped for `skip_rounds` rounds."""
        for node in sampled:
            last, before = self._usable.get(node, (0, 0))
            if node in usable:
                if last != server_round:
                    self._usable[node] = (server_round, last)
                continue
            count, missed = self._missed.get(node, (0, 0))
            if missed == server_round:
                continue
            # The last round with a usable reply before this one; it missed nothing if it came
            # after the last miss (a miss later in that round would be the last miss).
            usable_before = last if last != server_round else before
            count = 1 if usable_before > missed else count + 1
            self._missed[node] = (count, server_round)
            if 0 < self.max_missed_rounds <= count:
                self._skip_until[node] = server_round + self.skip_rounds
                log(WARNING, "round %d: node %d missed %d of its rounds in a row; it is not "
                    "sampled in rounds %d to %d", server_round, node, count, server_round + 1,
                    server_round + self.skip_rounds)

    def _fail(self, server_round: int, stage: str, node: int, reason: str) -> None:
        """Log a reply or node left out of the round, and keep it in `failures`."""
        log(WARNING, "round %d %s: node %d left out: %s", server_round, stage, node, reason)
        self.failures.setdefault(server_round, []).append(
            {"stage": stage, "node": node, "reason": reason})
