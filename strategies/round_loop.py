"""The round loop: Flower's `Strategy.start` with resuming, short polls, per-round timing and
bytes, and a guard that keeps a non-finite or misshapen aggregate out of the global model. The one
round loop of this project: `PMAFL` and `FedFTG` both run it."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from pmafl.protocol import COMPUTE_SECONDS, STARTUP_SECONDS
from strategies.screening import aggregate_problem, array_specs


class RoundLoop(Strategy):
    """A Flower strategy whose `start` is this project's round loop: Flower's arguments plus
    `start_round` and `on_round_end` for resuming, messages exchanged by short polls
    (`exchange`), and each round's figures kept for `round_summary`.

    A subclass implements Flower's `configure_train`, `aggregate_train`, `configure_evaluate`,
    `aggregate_evaluate` and `summary`; it overrides `set_num_rounds` if it needs the number of
    rounds, and extends `round_summary` with what it knows of a round (its failures, ...).
    `round_stats[round]` holds the loop's own figures of each round since `start` (see `start`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.round_stats: dict[int, dict[str, float | str]] = {}

    def set_num_rounds(self, num_rounds: int) -> None:
        """Tell the strategy how many rounds the run has; `start` calls it before the first round.
        Nothing to do by default: a strategy that needs the count (e.g. for a federated evaluation
        in the last round) overrides it.

        Parameters
        ----------
        num_rounds : int
            The run's last round.
        """

    def round_summary(self, server_round: int) -> dict[str, Any]:
        """The server's figures of a round, as a results row holds them (keys in Flower's
        hyphenated form).

        Parameters
        ----------
        server_round : int
            The round; 0 (before training) has no figures.

        Returns
        -------
        dict[str, Any]
            The loop's figures (`start`: `train-seconds` ... `bytes-received`, in that order;
            none for a round the loop has not run), then `failures`: the replies and nodes left
            out of the round, each {"stage", "node", "reason"}. Here only an aggregate the loop
            discarded, as {"stage": "aggregate", "node": None, "reason": why}; a subclass puts
            its own failures before it and may add keys after it.
        """
        figures = dict(self.round_stats.get(server_round, {}))
        discarded = figures.pop("discarded", None)
        failures = [{"stage": "aggregate", "node": None, "reason": discarded}] if discarded else []
        return {**figures, "failures": failures}

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              start_round: int = 1,
              on_round_end: Callable[[int, ArrayRecord, Result], None] | None = None) -> Result:
        """Flower's `Strategy.start` round loop (same arguments, same `Result`), plus resuming.

        Messages go out and replies come in through `exchange` (short polls). `round_stats[round]`
        gets the round's figures before `on_round_end`: `train-seconds` and `evaluate-seconds`
        (the train and evaluate exchanges, from sending to the last reply),
        `train-compute-seconds` and `evaluate-compute-seconds` (the slowest node's own compute,
        from the replies' `compute-seconds`), `train-startup-seconds` and
        `evaluate-startup-seconds` (the longest ClientApp start-up among the replies that carry
        one: `startup-seconds`, sent by a fresh process; 0 when none does, as in a simulation's
        later rounds), `train-replies` (how many came back, valid or not), `round-seconds` (wall
        time of the whole round, central evaluation included), `bytes-sent` and
        `bytes-received` (`payload_bytes`). The timing metrics are taken out of the replies
        before the strategy aggregates them.

        An aggregate that is not finite, or not of the keys, shapes and dtypes of the model sent
        (`screening.aggregate_problem`), is discarded: the global model stays as it was, and
        `round_stats[round]` gets the reason as `discarded`. A poisoned round then costs one
        round, not the run.

        Parameters
        ----------
        grid : Grid
            Sends messages to the nodes and receives their replies.
        initial_arrays : ArrayRecord
            The global model the first round starts from.
        num_rounds : int (default: 3)
            The last round.
        timeout : float (default: 3600)
            Seconds each exchange (train, evaluate) waits for replies; the messages expire with it.
        train_config : ConfigRecord, optional
            Sent to the nodes with every train message (default: an empty one).
        evaluate_config : ConfigRecord, optional
            Sent to the nodes with every evaluate message (default: an empty one).
        evaluate_fn : Callable[[int, ArrayRecord], MetricRecord | None], optional
            Central evaluation of the global model, after every round (and before the first
            when `start_round` is 1).
        start_round : int (default: 1)
            Runs rounds start_round..num_rounds from `initial_arrays`: a resumed run.
        on_round_end : Callable[[int, ArrayRecord, Result], None], optional
            Called as `on_round_end(round, arrays, result)` after every round's evaluation, e.g.
            to write a checkpoint.

        Returns
        -------
        Result
            The last valid aggregate and the metrics of every round run.
        """
        self.set_num_rounds(num_rounds)
        self.round_stats = {}
        log(INFO, "Starting %s strategy, rounds %d to %d:", type(self).__name__, start_round, num_rounds)
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result, arrays = Result(), initial_arrays
        t_start = time.time()
        if evaluate_fn and start_round == 1:
            metrics = evaluate_fn(0, arrays)
            if metrics is not None:
                result.evaluate_metrics_serverapp[0] = metrics
        for server_round in range(start_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %d/%d]", server_round, num_rounds)
            t_round = time.monotonic()

            # Training: exchange, take the timing out of the replies, aggregate, keep the
            # aggregate only if it fits the model sent.
            messages = list(self.configure_train(server_round, arrays, train_config, grid))
            sent = payload_bytes(messages)
            t_train = time.monotonic()
            replies = exchange(grid, messages, timeout)
            figures: dict[str, float | str] = {
                "train-seconds": time.monotonic() - t_train,
                "train-compute-seconds": _take_seconds(replies, COMPUTE_SECONDS),
                "train-startup-seconds": _take_seconds(replies, STARTUP_SECONDS),
                "train-replies": len(replies)}
            received = payload_bytes(replies)
            new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            problem = aggregate_problem(new_arrays, array_specs(arrays)) if new_arrays is not None else None
            if problem:
                log(WARNING, "round %d: the aggregate is discarded (%s); the global model stays as it "
                    "was", server_round, problem)
                figures["discarded"] = problem
            elif new_arrays is not None:
                arrays = result.arrays = new_arrays
            if train_metrics is not None:
                log(INFO, "\t└──> train metrics: %s", dict(train_metrics))
                result.train_metrics_clientapp[server_round] = train_metrics

            # Federated evaluation (the strategy may send no message this round).
            messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
            sent += payload_bytes(messages)
            t_evaluate = time.monotonic()
            replies = exchange(grid, messages, timeout) if messages else []
            figures.update({"evaluate-seconds": time.monotonic() - t_evaluate if messages else 0.0,
                            "evaluate-compute-seconds": _take_seconds(replies, COMPUTE_SECONDS),
                            "evaluate-startup-seconds": _take_seconds(replies, STARTUP_SECONDS)})
            received += payload_bytes(replies)
            evaluate_metrics = self.aggregate_evaluate(server_round, replies)
            if evaluate_metrics is not None:
                log(INFO, "\t└──> federated evaluation: %s", dict(evaluate_metrics))
                result.evaluate_metrics_clientapp[server_round] = evaluate_metrics

            # Central evaluation, the round's figures, then the caller's hook (a checkpoint).
            if evaluate_fn:
                metrics = evaluate_fn(server_round, arrays)
                if metrics is not None:
                    result.evaluate_metrics_serverapp[server_round] = metrics
            figures.update({"round-seconds": time.monotonic() - t_round, "bytes-sent": sent,
                            "bytes-received": received})
            self.round_stats[server_round] = figures
            if on_round_end:
                on_round_end(server_round, arrays, result)
        log(INFO, "Strategy finished rounds %d to %d in %.2fs", start_round, num_rounds,
            time.time() - t_start)
        return result


def payload_bytes(messages: Iterable[Message]) -> int:
    """Bytes of array data the messages carry (the models; config and metrics are a few hundred
    bytes more, and the protocol's framing is not counted).

    Parameters
    ----------
    messages : Iterable[Message]
        Messages or replies (error replies count 0).

    Returns
    -------
    int
        The bytes of all their arrays.
    """
    return sum(len(array.data) for msg in messages if msg.has_content()
               for record in msg.content.array_records.values() for array in record.values())


def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None,
             first_wait: float = 0.01, max_wait: float = 0.2) -> list[Message]:
    """`grid.send_and_receive` on this project's schedule: push the messages, then pull the
    replies after `first_wait` seconds, doubling the wait up to `max_wait`, until every message has
    its reply or `timeout` seconds have passed. Flower's deployment Grid waits a fixed 3 s between
    pulls, so a round's replies would sit up to 3 s on the SuperLink; a pull is one cheap request,
    so polling every 0.2 s at most costs nothing.

    The messages expire with the exchange (their TTL is `timeout`, instead of Flower's 12 hours):
    a node that was slow or away does not run a round the server has given up on.

    Parameters
    ----------
    grid : Grid
        Pushes the messages and pulls their replies.
    messages : Iterable[Message]
        The round's messages, one per node.
    timeout : float | None
        Seconds to wait for the replies (None: no limit).
    first_wait : float (default: 0.01)
        Seconds before the first pull.
    max_wait : float (default: 0.2)
        The longest wait between two pulls.

    Returns
    -------
    list[Message]
        The replies that came in, in the order they were pulled.
    """
    messages = list(messages)
    if timeout is not None:
        for msg in messages:
            msg.metadata.ttl = timeout
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    end = time.monotonic() + timeout if timeout is not None else math.inf
    wait = first_wait
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(msg.metadata.reply_to_message_id for msg in pulled)
        if not pending or time.monotonic() >= end:
            break
        time.sleep(min(wait, max(0.0, end - time.monotonic())))
        wait = min(2 * wait, max_wait)
    return replies


def _take_seconds(replies: list[Message], key: str) -> float:
    """The largest `key` (a timing such as `compute-seconds`; 0 when no reply carries it), taken
    out of every reply's metrics: timing would otherwise enter the averaged metrics, which must
    not depend on load."""
    slowest = 0.0
    for msg in replies:
        if msg.has_content():
            for record in msg.content.metric_records.values():
                if key in record:
                    value = record.pop(key)
                    if isinstance(value, int | float) and math.isfinite(value):
                        slowest = max(slowest, float(value))
    return slowest
