"""Helpers shared by the strategies: the round loop, aggregation, and screening client replies
before they reach an average."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Collection, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.supercore import log

from pmafl.config import AGGREGATIONS
from pmafl.protocol import COMPUTE_SECONDS, STARTUP_SECONDS, TIMING_METRICS


class RoundLoop:
    """Mixin giving a strategy the project's `start`: `run_rounds`, with Flower's arguments plus
    `start_round` and `on_round_end` for resuming. `set_num_rounds` tells the strategy how many
    rounds the run has before the loop starts. After `start`, `round_stats[round]` holds each
    round's timing and bytes, and the reason when the round's aggregate was discarded (see
    `run_rounds`)."""

    round_stats: dict[int, dict[str, float | str]]

    def set_num_rounds(self, num_rounds: int) -> None:
        """Nothing to do by default; a strategy that needs the count (e.g. PMAFL's last-round
        evaluation) overrides it."""

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              start_round: int = 1,
              on_round_end: Callable[[int, ArrayRecord, Result], None] | None = None) -> Result:
        """Flower's `Strategy.start` (same arguments, same `Result`) plus resuming: see
        `run_rounds`."""
        self.set_num_rounds(num_rounds)
        self.round_stats = {}
        return run_rounds(self, grid, initial_arrays, num_rounds, timeout, train_config,
                          evaluate_config, evaluate_fn, start_round, on_round_end, self.round_stats)


def payload_bytes(messages: Iterable[Message]) -> int:
    """Bytes of array data the messages carry (the models; config and metrics are a few hundred
    bytes more, and the protocol's framing is not counted)."""
    return sum(len(array.data) for msg in messages if msg.has_content()
               for record in msg.content.array_records.values() for array in record.values())


def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None,
             first_wait: float = 0.01, max_wait: float = 0.2) -> list[Message]:
    """`grid.send_and_receive` on this project's schedule: push the messages, then pull the
    replies after `first_wait` seconds, doubling the wait up to `max_wait`, until every message has
    its reply or `timeout` seconds have passed (None: no limit). Flower's deployment Grid waits a
    fixed 3 s between pulls, so a round's replies would sit up to 3 s on the SuperLink; a pull is
    one cheap request, so polling every 0.2 s at most costs nothing.

    The messages expire with the exchange (their TTL is `timeout`, instead of Flower's 12 hours):
    a node that was slow or away does not run a round the server has given up on."""
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


def run_rounds(strategy: Strategy, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
               timeout: float = 3600, train_config: ConfigRecord | None = None,
               evaluate_config: ConfigRecord | None = None,
               evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
               start_round: int = 1,
               on_round_end: Callable[[int, ArrayRecord, Result], None] | None = None,
               stats: dict[int, dict[str, float | str]] | None = None) -> Result:
    """Flower's `Strategy.start` round loop (same arguments, same `Result`) for any strategy,
    plus two for resuming: `start_round` runs rounds start_round..num_rounds from
    `initial_arrays` (the round-0 evaluation only when starting at 1), and
    `on_round_end(round, arrays, result)` is called after every round's evaluation, e.g. to
    write a checkpoint. The one round loop of this project: `PMAFL` and `FedFTG` both run it
    through `RoundLoop.start`.

    Messages go out and replies come in through `exchange` (short polls). When `stats` is
    given, `stats[round]` gets the round's figures before `on_round_end`: `round-seconds` (wall
    time of the whole round, central evaluation included), `train-seconds` and
    `evaluate-seconds` (the train and evaluate exchanges, from sending to the last reply),
    `train-compute-seconds` and `evaluate-compute-seconds` (the slowest node's own compute, from
    the replies' `compute-seconds`), `train-startup-seconds` and `evaluate-startup-seconds` (the
    longest ClientApp start-up among the replies that carry one: `startup-seconds`, sent by a
    fresh process; 0 when none does, as in a simulation's later rounds), `train-replies` (how
    many came back, valid or not), `bytes-sent` and `bytes-received` (`payload_bytes`).

    An aggregate that is not finite, or not of the keys, shapes and dtypes of the model sent
    (`aggregate_problem`), is discarded: the global model stays as it was, and `stats[round]`
    gets the reason as `discarded`. A poisoned round then costs one round, not the run."""
    log(INFO, "Starting %s strategy, rounds %d to %d:", type(strategy).__name__, start_round, num_rounds)
    strategy.summary()
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
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        sent = payload_bytes(messages)
        t_train = time.monotonic()
        replies = exchange(grid, messages, timeout)
        round_stats: dict[str, float | str] = {
            "train-seconds": time.monotonic() - t_train,
            "train-compute-seconds": _take_seconds(replies, COMPUTE_SECONDS),
            "train-startup-seconds": _take_seconds(replies, STARTUP_SECONDS),
            "train-replies": len(replies)}
        received = payload_bytes(replies)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        problem = aggregate_problem(new_arrays, array_specs(arrays)) if new_arrays is not None else None
        if problem:
            log(WARNING, "round %d: the aggregate is discarded (%s); the global model stays as it "
                "was", server_round, problem)
            round_stats["discarded"] = problem
        elif new_arrays is not None:
            arrays = result.arrays = new_arrays
        if train_metrics is not None:
            log(INFO, "\t└──> train metrics: %s", dict(train_metrics))
            result.train_metrics_clientapp[server_round] = train_metrics
        messages = list(strategy.configure_evaluate(server_round, arrays, evaluate_config, grid))
        sent += payload_bytes(messages)
        t_evaluate = time.monotonic()
        replies = exchange(grid, messages, timeout) if messages else []
        round_stats.update({"evaluate-seconds": time.monotonic() - t_evaluate if messages else 0.0,
                            "evaluate-compute-seconds": _take_seconds(replies, COMPUTE_SECONDS),
                            "evaluate-startup-seconds": _take_seconds(replies, STARTUP_SECONDS)})
        received += payload_bytes(replies)
        evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
        if evaluate_metrics is not None:
            log(INFO, "\t└──> federated evaluation: %s", dict(evaluate_metrics))
            result.evaluate_metrics_clientapp[server_round] = evaluate_metrics
        if evaluate_fn:
            metrics = evaluate_fn(server_round, arrays)
            if metrics is not None:
                result.evaluate_metrics_serverapp[server_round] = metrics
        round_stats.update({"round-seconds": time.monotonic() - t_round, "bytes-sent": sent,
                            "bytes-received": received})
        if stats is not None:
            stats[server_round] = round_stats
        if on_round_end:
            on_round_end(server_round, arrays, result)
    log(INFO, "Strategy finished rounds %d to %d in %.2fs", start_round, num_rounds,
        time.time() - t_start)
    return result


def weighted_mean(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """sum_k w_k * arrays_k / sum_k w_k, key by key, accumulated in float64 and cast back to each
    array's dtype (integers rounded). Unlike a float32 running sum, the result does not depend on
    the order in which replies arrived."""
    total = float(sum(weights))
    mean = {}
    for key, first in records[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for record, weight in zip(records, weights, strict=True):
            acc += record[key].numpy().astype(np.float64) * (weight / total)
        dtype = first.numpy().dtype
        mean[key] = _cast(acc, dtype)
    return ArrayRecord(mean)


def _cast(values: np.ndarray, dtype: np.dtype) -> Array:
    """A float64 aggregate back in the clients' dtype, integers (e.g. BatchNorm counters) rounded
    and kept inside the dtype's range (a cast would wrap a hostile 2**63 round to negative)."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = np.clip(values.round(), info.min, np.nextafter(float(info.max), 0))
    return Array(np.asarray(values.round() if dtype.kind == "b" else values, dtype=dtype))


def coordinate_wise(records: list[ArrayRecord], reduce: Callable[[np.ndarray], np.ndarray]
                    ) -> ArrayRecord:
    """`reduce` over the stacked client arrays (axis 0), key by key, in float64, cast back to each
    array's dtype (integers rounded): the coordinate-wise trimmed mean or median."""
    out = {}
    for key, first in records[0].items():
        stacked = np.stack([record[key].numpy().astype(np.float64) for record in records])
        value = reduce(stacked)
        dtype = first.numpy().dtype
        out[key] = _cast(value, dtype)
    return ArrayRecord(out)


def robust_aggregate(records: list[ArrayRecord], weights: list[float], method: str,
                     trim_fraction: float = 0.2) -> ArrayRecord:
    """The round's aggregate: `mean` (FedAvg, example-weighted), or the unweighted coordinate-wise
    `trimmed-mean` (`trim_fraction` cut from each end, Flower's `FedTrimmedAvg` logic) or
    `median` (Flower's `FedMedian`): a few arbitrary updates cannot move those far."""
    if method == "mean":
        return weighted_mean(records, weights)
    if method == "trimmed-mean":
        return coordinate_wise(records, lambda stacked: trim_mean(stacked, trim_fraction))
    if method == "median":
        return coordinate_wise(records, lambda stacked: np.median(stacked, axis=0))
    raise ValueError(f"unknown aggregation {method!r}; known: {', '.join(AGGREGATIONS)}")


def clip_updates(records: list[ArrayRecord], sent: ArrayRecord, factor: float
                 ) -> tuple[list[ArrayRecord], int]:
    """Norm-bounded updates: each client's delta from the global model it was sent, scaled down
    to at most `factor` times the median delta norm of the round (float arrays only; integer
    buffers pass unchanged). Returns the records and how many were clipped."""
    keys = [k for k, a in sent.items() if a.numpy().dtype.kind == "f"]
    base = {k: sent[k].numpy().astype(np.float64) for k in keys}
    deltas = [{k: r[k].numpy().astype(np.float64) - base[k] for k in keys} for r in records]
    norms = [math.sqrt(sum(float((d**2).sum()) for d in delta.values())) for delta in deltas]
    bound = factor * float(np.median(norms))
    out, clipped = [], 0
    for record, delta, norm in zip(records, deltas, norms, strict=True):
        if norm <= bound or norm == 0:
            out.append(record)
            continue
        clipped += 1
        scale = bound / norm
        arrays = {k: record[k] for k in record.keys()}
        for k in keys:
            arrays[k] = Array(np.asarray(base[k] + scale * delta[k], dtype=record[k].numpy().dtype))
        out.append(ArrayRecord(arrays))
    return out, clipped


def canonical_order(contents: list[RecordDict]) -> list[RecordDict]:
    """`contents` sorted by what they hold, not by when or from whom they arrived: the float sums
    of an average then round the same way in every run (arrival order differs between runs, and
    with it the last bit of a float32 aggregate, which grows into visible drift over rounds)."""
    def key(content: RecordDict) -> str:
        digest = hashlib.sha1()
        for record in content.array_records.values():
            for name, array in record.items():
                digest.update(name.encode())
                digest.update(array.data)
        for record in content.metric_records.values():
            digest.update(repr(sorted(record.items())).encode())
        return digest.hexdigest()

    return sorted(contents, key=key)


def worst_client(contents: list[RecordDict], suffix: str = "acc") -> dict[str, float]:
    """{"worst-<key>": min over clients} for every metric whose name ends in `suffix`."""
    metrics = [next(iter(c.metric_records.values())) for c in contents]
    keys = sorted(k for k in metrics[0] if k.endswith(suffix))
    return {f"worst-{key}": float(min(m[key] for m in metrics)) for key in keys}


def error_summary(reason: str | None, limit: int = 500) -> str:
    """The gist of an error reply's reason. Under Ray the reason is a whole traceback ending in
    "... occurred. Message: <the ClientApp's exception message>"; keep that message."""
    reason = (reason or "").strip()
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1]
    lines = [line for line in reason.splitlines() if line.strip()]
    gist = lines[-1].strip() if lines else "(no reason given)"
    return gist if len(gist) <= limit else gist[: limit - 3] + "..."


Specs = dict[str, tuple[tuple[int, ...], str]]
# A reply's `num-examples` above this is no count of images (and no longer exact as a float).
MAX_NUM_EXAMPLES = 2**53


class BadReply(ValueError):
    """Why a reply cannot be averaged."""


def array_specs(arrays: ArrayRecord) -> Specs:
    """{key: (shape, dtype)} of the arrays sent, as parsed from their bytes: what every train
    reply must give back."""
    specs = {}
    for key, array in arrays.items():
        values = array.numpy()
        specs[key] = (values.shape, str(values.dtype))
    return specs


def parse_arrays(arrays: ArrayRecord, expected: Specs) -> ArrayRecord:
    """The arrays as their bytes say, checked against what was sent: the same keys, each a NumPy
    serialisation (not pickled, not another `stype`) of at most the bytes the sent array takes
    (plus a header), that parses to the shape and dtype sent, with no NaN or Inf. The declared
    metadata of an `Array` is never trusted: the result is built from the parsed values, so what
    is averaged is exactly what was checked. Raises `BadReply`."""
    missing = sorted(set(expected) - set(arrays.keys()))
    extra = sorted(set(arrays.keys()) - set(expected))
    if missing or extra:
        raise BadReply(f"array keys differ from the global model's: missing {missing}, unexpected {extra}")
    parsed = {}
    for key, array in arrays.items():
        shape, dtype = expected[key]
        if array.stype != SType.NUMPY:
            raise BadReply(f"array '{key}' is serialised as {array.stype!r}, expected {SType.NUMPY!r}")
        limit = math.prod(shape) * np.dtype(dtype).itemsize + 4096  # npy headers are < 4 kB
        if len(array.data) > limit:
            raise BadReply(f"array '{key}' carries {len(array.data)} bytes, more than the {limit} "
                           f"an array of shape {shape} and dtype {dtype} takes")
        try:
            values = array.numpy()
        except Exception as e:  # noqa: BLE001 - whatever the bytes are, they are not an array
            raise BadReply(f"array '{key}' does not parse as a NumPy array ({type(e).__name__}: "
                           f"{str(e)[:200]})") from None
        if not isinstance(values, np.ndarray):  # `.npz` bytes load as an archive
            raise BadReply(f"array '{key}' parses as an {type(values).__name__}, not an array")
        if values.shape != shape:
            raise BadReply(f"array '{key}' has shape {values.shape}, expected {shape}")
        if str(values.dtype) != dtype:
            raise BadReply(f"array '{key}' has dtype {values.dtype}, expected {dtype} (as sent)")
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            raise BadReply(f"array '{key}' holds NaN or Inf values")
        parsed[key] = Array(values)
    return ArrayRecord(parsed)


def aggregate_problem(arrays: ArrayRecord, expected: Specs) -> str | None:
    """Why an aggregate cannot become the global model (`parse_arrays`' checks), or None."""
    try:
        parse_arrays(arrays, expected)
    except BadReply as e:
        return str(e)
    return None


def check_metrics(metrics: MetricRecord, expected: Collection[str] | None, weighted_by_key: str) -> None:
    """A reply's metrics: exactly the keys `expected` (None: any keys, and `weighted_by_key`),
    besides the timing the round loop takes out (`TIMING_METRICS`); every value a finite number
    (accuracies, `..._acc`, within [0, 1]); `weighted_by_key` an integer in [1, 2**53]. Raises
    `BadReply`."""
    keys = set(metrics.keys()) - TIMING_METRICS
    wanted = set(expected) if expected is not None else keys | {weighted_by_key}
    if keys != wanted:
        raise BadReply(f"metric keys {sorted(keys)} differ from the {sorted(wanted)} this round expects")
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadReply(f"metric '{key}' must be a number, got {type(value).__name__} "
                           f"{repr(value)[:100]}")
        if not math.isfinite(value):
            raise BadReply(f"metric '{key}' is not finite ({value!r})")
        if key.endswith("_acc") and not 0 <= value <= 1:
            raise BadReply(f"metric '{key}' is an accuracy outside [0, 1] ({value!r})")
    weight = metrics[weighted_by_key]
    if not isinstance(weight, int) or not 0 < weight <= MAX_NUM_EXAMPLES:
        raise BadReply(f"metric '{weighted_by_key}' must be an integer in [1, 2**53], got {weight!r}")


def screen_reply(content: RecordDict, expected_arrays: Specs | None, weighted_by_key: str,
                 metric_keys: Collection[str] | None = None) -> RecordDict:
    """The reply's content fit to average, or `BadReply`: exactly one MetricRecord
    (`check_metrics`) and, for a train reply (`expected_arrays` given), exactly one ArrayRecord
    (`parse_arrays`), returned as parsed."""
    if len(content.metric_records) != 1:
        raise BadReply(f"expected exactly one MetricRecord, got {len(content.metric_records)}")
    (metrics_key, metrics), = content.metric_records.items()
    check_metrics(metrics, metric_keys, weighted_by_key)
    if expected_arrays is None:
        return RecordDict({metrics_key: metrics})
    if len(content.array_records) != 1:
        raise BadReply(f"expected exactly one ArrayRecord, got {len(content.array_records)}")
    (arrays_key, arrays), = content.array_records.items()
    return RecordDict({arrays_key: parse_arrays(arrays, expected_arrays), metrics_key: metrics})


def capped_weights(claims: list[int], cap: float) -> list[float]:
    """Each reply's weight in the mean: its `num-examples` claim, at most `cap` times the round's
    median claim (0: uncapped). A node cannot buy the average by claiming more data than it has:
    at cap 1, none weighs more than the median node, and larger honest partitions weigh as much
    as the median one."""
    if cap <= 0:
        return [float(c) for c in claims]
    bound = cap * float(np.median(claims))
    return [float(min(c, bound)) for c in claims]


def weighted_metrics(contents: list[RecordDict], weights: list[float], weighted_by_key: str
                     ) -> MetricRecord:
    """sum_k w_k * metrics_k / sum_k w_k, key by key (`weighted_by_key` left out): Flower's
    `aggregate_metricrecords` with the weights given (the capped ones), not the replies' claims."""
    total = float(sum(weights))
    mean = MetricRecord()
    for content, weight in zip(contents, weights, strict=True):
        factor = weight / total
        for key, value in next(iter(content.metric_records.values())).items():
            if key != weighted_by_key:
                mean[key] = mean[key] + value * factor if key in mean else value * factor
    return mean
