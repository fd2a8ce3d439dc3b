"""Screening: whether a client's reply is fit to average, read from what would be averaged.

A reply is screened against what the server sent and expects, never against the other replies:
its arrays are parsed from their bytes (a NumPy serialisation, no pickle) and must have the keys,
shapes and dtypes of the model sent, all finite; its metrics must be the keys this server expects,
finite numbers, with an integer `num-examples`. What fails raises `BadReply`, with the reason.
`strategies.screened_fedavg.ScreenedFedAvg` applies this to every reply of a round."""

from __future__ import annotations

import math
from collections.abc import Collection

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common.constant import SType

from pmafl.protocol import TIMING_METRICS

# {key: (shape, dtype)} of the arrays a reply must give back.
Specs = dict[str, tuple[tuple[int, ...], str]]
# A reply's `num-examples` above this is no count of images (and no longer exact as a float).
MAX_NUM_EXAMPLES = 2**53


class BadReply(ValueError):
    """Why a reply cannot be averaged."""


def array_specs(arrays: ArrayRecord) -> Specs:
    """{key: (shape, dtype)} of the arrays sent, as parsed from their bytes: what every train
    reply must give back.

    Parameters
    ----------
    arrays : ArrayRecord
        The global model sent.

    Returns
    -------
    Specs
        The shape and dtype of each array, by key.
    """
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
    is averaged is exactly what was checked.

    Parameters
    ----------
    arrays : ArrayRecord
        A reply's arrays (or an aggregate).
    expected : Specs
        What was sent (`array_specs`).

    Returns
    -------
    ArrayRecord
        The arrays as parsed.

    Raises
    ------
    BadReply
        With the first problem found.
    """
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
    """Why an aggregate cannot become the global model (`parse_arrays`' checks), or None.

    Parameters
    ----------
    arrays : ArrayRecord
        A round's aggregate.
    expected : Specs
        The global model's specs (`array_specs`).

    Returns
    -------
    str | None
        The reason, or None when the aggregate fits.
    """
    try:
        parse_arrays(arrays, expected)
    except BadReply as e:
        return str(e)
    return None


def check_metrics(metrics: MetricRecord, expected: Collection[str] | None, weighted_by_key: str) -> None:
    """A reply's metrics: exactly the keys `expected` (None: any keys, and `weighted_by_key`),
    besides the timing the round loop takes out (`TIMING_METRICS`); every value a finite number
    (accuracies, `..._acc`, within [0, 1]); `weighted_by_key` an integer in [1, 2**53].

    Parameters
    ----------
    metrics : MetricRecord
        A reply's metrics.
    expected : Collection[str] | None
        The keys this server expects (with `weighted_by_key`), or None for any.
    weighted_by_key : str
        The metric holding the reply's claim (`num-examples`).

    Raises
    ------
    BadReply
        With the first problem found.
    """
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
    """The reply's content fit to average: exactly one MetricRecord (`check_metrics`) and, for a
    train reply (`expected_arrays` given), exactly one ArrayRecord (`parse_arrays`).

    Parameters
    ----------
    content : RecordDict
        A reply's content.
    expected_arrays : Specs | None
        The specs of the model sent (a train reply), or None (an evaluate reply: no arrays).
    weighted_by_key : str
        The metric holding the reply's claim (`num-examples`).
    metric_keys : Collection[str] | None (default: None)
        The metric keys this server expects (with `weighted_by_key`), or None for any.

    Returns
    -------
    RecordDict
        The content as screened: its metrics, and its arrays as parsed.

    Raises
    ------
    BadReply
        With the first problem found.
    """
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


def error_summary(reason: str | None, limit: int = 500) -> str:
    """The gist of an error reply's reason. Under Ray the reason is a whole traceback ending in
    "... occurred. Message: <the ClientApp's exception message>"; keep that message.

    Parameters
    ----------
    reason : str | None
        The error reply's `error.reason`.
    limit : int (default: 500)
        The longest gist returned (cut with "...").

    Returns
    -------
    str
        The last non-empty line of the reason, or "(no reason given)".
    """
    reason = (reason or "").strip()
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1]
    lines = [line for line in reason.splitlines() if line.strip()]
    gist = lines[-1].strip() if lines else "(no reason given)"
    return gist if len(gist) <= limit else gist[: limit - 3] + "..."
