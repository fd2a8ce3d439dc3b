"""Aggregation: how the screened replies of a round become one model and one set of metrics.

Every function here works on replies already screened (`strategies.screening`): their arrays
parsed and checked against the model sent, their `num-examples` checked. Sums run in float64 and
in an order fixed by content (`canonical_order`), so that a rerun aggregates bit-identically."""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from pmafl.config import AGGREGATIONS


def weighted_mean(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """sum_k w_k * arrays_k / sum_k w_k, key by key, accumulated in float64 and cast back to each
    array's dtype (integers rounded). Unlike a float32 running sum, the result does not depend on
    the order in which replies arrived.

    Parameters
    ----------
    records : list[ArrayRecord]
        The replies' arrays, all with the keys, shapes and dtypes of the first.
    weights : list[float]
        One weight per record (e.g. its capped `num-examples`).

    Returns
    -------
    ArrayRecord
        The weighted mean, in the records' dtypes.
    """
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
    array's dtype (integers rounded): the coordinate-wise trimmed mean or median.

    Parameters
    ----------
    records : list[ArrayRecord]
        The replies' arrays, all with the keys, shapes and dtypes of the first.
    reduce : Callable[[np.ndarray], np.ndarray]
        Reduces an array stacked over clients (axis 0) to one array of the client arrays' shape.

    Returns
    -------
    ArrayRecord
        The reduced arrays, in the records' dtypes.
    """
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
    `median` (Flower's `FedMedian`): a few arbitrary updates cannot move those far.

    Parameters
    ----------
    records : list[ArrayRecord]
        The replies' arrays, all with the keys, shapes and dtypes of the first.
    weights : list[float]
        One weight per record; only `mean` uses them.
    method : str
        One of `pmafl.config.AGGREGATIONS`: `mean`, `trimmed-mean` or `median`.
    trim_fraction : float (default: 0.2)
        Share cut from each end by `trimmed-mean`.

    Returns
    -------
    ArrayRecord
        The aggregate, in the records' dtypes.
    """
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
    buffers pass unchanged).

    Parameters
    ----------
    records : list[ArrayRecord]
        The replies' arrays, of the keys, shapes and dtypes of `sent`.
    sent : ArrayRecord
        The global model the clients were sent.
    factor : float
        The bound, in multiples of the round's median update norm.

    Returns
    -------
    tuple[list[ArrayRecord], int]
        The records (those within the bound as they were, the others scaled) and how many were
        clipped.
    """
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


def capped_weights(claims: list[int], cap: float) -> list[float]:
    """Each reply's weight in the mean: its `num-examples` claim, at most `cap` times the round's
    median claim (0: uncapped). A node cannot buy the average by claiming more data than it has:
    at cap 1, none weighs more than the median node, and larger honest partitions weigh as much
    as the median one.

    Parameters
    ----------
    claims : list[int]
        The replies' `num-examples`.
    cap : float
        The bound, in multiples of the round's median claim; 0 turns it off.

    Returns
    -------
    list[float]
        One weight per claim.
    """
    if cap <= 0:
        return [float(c) for c in claims]
    bound = cap * float(np.median(claims))
    return [float(min(c, bound)) for c in claims]


def fair_weights(weights: list[float], losses: list[float], q: float, cap: float) -> list[float]:
    """q-FFL's reweighting (Li, Sanjabi, Beirami and Smith 2020, "Fair Resource Allocation in
    Federated Learning", in its weighted-mean form): each weight times (loss_k / median loss)^q,
    so that the nodes the global model serves worst weigh more against the others. Bounded for a
    hostile reply: the median is the lower median (of two replies, the smaller loss, which a liar
    cannot raise), the factor is at most `cap`, and no final weight exceeds the largest of
    `weights`, so that no node weighs more against the median node than `weight-cap` allows
    without fairness. At cap 1 no factor exceeds 1: the better-served half of the nodes weighs
    less, none more. With a median loss of 0 (every node fits), the weights stay.

    Parameters
    ----------
    weights : list[float]
        The replies' weights (their capped `num-examples`).
    losses : list[float]
        The replies' `global-loss`, finite (screened); a negative one counts as 0.
    q : float
        The fairness exponent, > 0.
    cap : float
        The bound (`weight-cap`), > 0.

    Returns
    -------
    list[float]
        One weight per reply.
    """
    if q <= 0 or cap <= 0:
        raise ValueError(f"fair_weights needs q > 0 and cap > 0, got q={q!r}, cap={cap!r}")
    median = statistics.median_low(losses)
    if median <= 0:
        return list(weights)
    # The ratio is bounded before the power: (1e300 / median) ** 5 would overflow.
    top, bound = cap ** (1 / q), max(weights)
    return [min(w * min(max(loss, 0.0) / median, top) ** q, bound)
            for w, loss in zip(weights, losses, strict=True)]


def weighted_metrics(contents: list[RecordDict], weights: list[float], weighted_by_key: str
                     ) -> MetricRecord:
    """sum_k w_k * metrics_k / sum_k w_k, key by key (`weighted_by_key` left out): Flower's
    `aggregate_metricrecords` with the weights given (the capped ones), not the replies' claims.

    Parameters
    ----------
    contents : list[RecordDict]
        The screened replies, each with exactly one MetricRecord of the same keys.
    weights : list[float]
        One weight per reply.
    weighted_by_key : str
        The metric holding the claim (`num-examples`), left out of the mean.

    Returns
    -------
    MetricRecord
        The weighted mean of every other metric.
    """
    total = float(sum(weights))
    mean = MetricRecord()
    for content, weight in zip(contents, weights, strict=True):
        factor = weight / total
        for key, value in next(iter(content.metric_records.values())).items():
            if key != weighted_by_key:
                mean[key] = mean[key] + value * factor if key in mean else value * factor
    return mean


def worst_client(contents: list[RecordDict], suffix: str = "acc") -> dict[str, float]:
    """{"worst-<key>": min over clients} for every metric whose name ends in `suffix`: non-IID
    robustness is uneven across clients, and a mean hides the weakest.

    Parameters
    ----------
    contents : list[RecordDict]
        The screened replies, each with exactly one MetricRecord of the same keys.
    suffix : str (default: "acc")
        Which metrics get a worst value.

    Returns
    -------
    dict[str, float]
        The lowest client value of each such metric, under `worst-<key>`.
    """
    metrics = [next(iter(c.metric_records.values())) for c in contents]
    keys = sorted(k for k in metrics[0] if k.endswith(suffix))
    return {f"worst-{key}": float(min(m[key] for m in metrics)) for key in keys}


def canonical_order(contents: list[RecordDict]) -> list[RecordDict]:
    """`contents` sorted by what they hold, not by when or from whom they arrived: the float sums
    of an average then round the same way in every run (arrival order differs between runs, and
    with it the last bit of a float32 aggregate, which grows into visible drift over rounds).

    Parameters
    ----------
    contents : list[RecordDict]
        The replies' contents.

    Returns
    -------
    list[RecordDict]
        The same contents, sorted by a digest of their arrays and metrics.
    """
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
