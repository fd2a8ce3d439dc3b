"""PMAFL strategy: broadcast config, weighted mean against a manual one, bad replies left out, and
no single node able to crash or steer the round."""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from pmafl.config import TrainConfig
from pmafl.train import train_metric_names
from strategies import PMAFL
from strategies.round_loop import exchange
from strategies.screening import error_summary

# What a default train reply carries besides num-examples (train_model's loss terms).
LOSSES = sorted(train_metric_names(TrainConfig()) - {"num-examples"})


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = node_ids

    def get_node_ids(self):
        return list(self.node_ids)


GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def _arrays(values):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def configured(strategy, nodes=(11, 12, 13)):
    """The round-1 train messages, by destination node."""
    messages = strategy.configure_train(1, _arrays(GLOBAL), ConfigRecord(), FakeGrid(nodes))
    return {m.metadata.dst_node_id: m for m in messages}


def reply(instruction, arrays, num_examples, **metrics):
    """A train reply: `arrays`, and every loss term the server expects (1.0 unless given)."""
    losses = {key: 1.0 for key in LOSSES}
    content = RecordDict({"arrays": _arrays(arrays),
                          "metrics": MetricRecord({**losses, "num-examples": num_examples, **metrics})})
    return Message(content, reply_to=instruction)


def test_configure_train_broadcasts_the_train_config_and_round():
    strategy = PMAFL(TrainConfig(alpha=0.25, objective="pmafl"), min_available_nodes=3, min_train_nodes=2)
    sent = configured(strategy)
    assert sorted(sent) == [11, 12, 13]
    config = sent[11].content["config"]
    assert config["alpha"] == 0.25 and config["objective"] == "pmafl" and config["server-round"] == 1
    assert TrainConfig.from_mapping(dict(config)) == TrainConfig(alpha=0.25)


@pytest.mark.parametrize("weight_cap, weights", [(0.0, (10, 30, 60)), (1.0, (10, 30, 30))])
def test_aggregate_is_the_example_weighted_mean(weight_cap, weights):
    """Weighted by `num-examples` (10, 30, 60); by default no weight above the median claim, 30."""
    strategy = PMAFL(min_available_nodes=3, min_train_nodes=2, weight_cap=weight_cap)
    sent = configured(strategy)
    w = {11: np.full((2, 3), 1.0), 12: np.full((2, 3), 4.0), 13: np.arange(6.0).reshape(2, 3)}
    n = {11: 10, 12: 30, 13: 60}
    replies = [reply(sent[i], {"w": w[i].astype(np.float32), "b": np.full(3, float(i), np.float32)},
                     n[i], loss=float(i)) for i in sent]
    arrays, metrics = strategy.aggregate_train(1, replies)
    a, b, c = weights
    assert np.allclose(arrays["w"].numpy(), (a * w[11] + b * w[12] + c * w[13]) / (a + b + c))
    assert np.allclose(arrays["b"].numpy(), (a * 11 + b * 12 + c * 13) / (a + b + c))
    assert metrics["loss"] == pytest.approx((a * 11 + b * 12 + c * 13) / (a + b + c))
    assert strategy.failures == {}


def test_aggregate_does_not_depend_on_reply_order():
    """Bit for bit: a float64 sum cast to float32 still flips a last bit now and then with the
    order of its terms, so replies are summed in an order fixed by their content."""
    nodes = tuple(range(11, 19))
    strategy = PMAFL(min_available_nodes=8, min_train_nodes=8, clip_factor=0)
    rng = np.random.default_rng(0)
    shapes = {"w": (200, 100), "b": (100,)}
    sent = configured(strategy, nodes)
    strategy._sent_arrays = {k: (shape, "float32") for k, shape in shapes.items()}
    replies = [reply(sent[i], {k: (rng.standard_normal(shape) * 10 ** rng.uniform(-3, 3)).astype(np.float32)
                               for k, shape in shapes.items()},
                     int(rng.integers(1, 100)), loss=float(rng.random()))
               for i in nodes]
    first, first_metrics = strategy.aggregate_train(1, replies)
    for _ in range(5):
        order = rng.permutation(len(replies))
        arrays, metrics = strategy.aggregate_train(1, [replies[i] for i in order])
        assert metrics["loss"] == first_metrics["loss"]
        for key in shapes:
            assert arrays[key].numpy().dtype == np.float32
            assert np.array_equal(arrays[key].numpy(), first[key].numpy())


def evaluate_reply(instruction, num_examples, **metrics):
    scores = {"clean_acc": 0.5, "clean_loss": 1.0, "fgsm_acc": 0.5, "pgd_acc": 0.5, **metrics}
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": num_examples, **scores})}),
                   reply_to=instruction)


def test_federated_evaluation_reports_the_weighted_mean_and_the_worst_node():
    strategy = PMAFL(evaluate_every=2, min_available_nodes=3, min_evaluate_nodes=3)
    strategy.num_rounds = 10  # set by start()
    sent = {m.metadata.dst_node_id: m for m in
            strategy.configure_evaluate(4, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))}
    assert sorted(sent) == [11, 12, 13] and sent[11].content["config"]["eps"] == TrainConfig().eps
    assert strategy.configure_evaluate(5, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13))) == []
    assert len(strategy.configure_evaluate(10, _arrays(GLOBAL), ConfigRecord(),
                                           FakeGrid((11, 12, 13)))) == 3  # the last round
    scores = {11: (40, 0.9, 0.5), 12: (100, 0.8, 0.2), 13: (60, 0.95, 0.6)}
    replies = [evaluate_reply(sent[n], k, clean_acc=c, pgd_acc=p, clean_loss=1.0)
               for n, (k, c, p) in scores.items()]
    replies.append(Message(Error(code=2, reason="boom"), reply_to=sent[13]))
    metrics = strategy.aggregate_evaluate(4, replies[:2] + replies[3:])  # node 13 fails
    # Weights: the examples, at most the median count (70 of 40 and 100; then 60 of 40, 100, 60).
    assert metrics["clean_acc"] == pytest.approx((40 * 0.9 + 70 * 0.8) / 110)
    assert metrics["worst-pgd_acc"] == 0.2 and metrics["worst-clean_acc"] == 0.8
    assert metrics["num-clients"] == 2 and [f["node"] for f in strategy.failures[4]] == [13]
    metrics = strategy.aggregate_evaluate(4, replies[:3])
    assert metrics["pgd_acc"] == pytest.approx((40 * 0.5 + 60 * 0.2 + 60 * 0.6) / 160)
    assert metrics["worst-pgd_acc"] == 0.2 and "worst-clean_loss" not in metrics


def test_integer_arrays_stay_integers():
    strategy = PMAFL(min_available_nodes=2, min_train_nodes=2)
    sent = configured(strategy, nodes=(11, 12))
    global_shapes = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    strategy._sent_arrays["steps"] = ((), "int64")
    replies = [reply(sent[11], {**global_shapes, "steps": np.array(10, np.int64)}, 1),
               reply(sent[12], {**global_shapes, "steps": np.array(20, np.int64)}, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # Weights 1 and min(3, median 2): (10 + 2 * 20) / 3 = 16.67 -> 17
    assert arrays["steps"].numpy().dtype == np.int64 and arrays["steps"].numpy() == 17
    # A counter near the int64 limit saturates: the mean does not wrap round to negative.
    replies = [reply(sent[11], {**global_shapes, "steps": np.array(2**63 - 1, np.int64)}, 1),
               reply(sent[12], {**global_shapes, "steps": np.array(2**63 - 1, np.int64)}, 1)]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays["steps"].numpy() > 2**62


def bad_replies():
    good = {"w": np.ones((2, 3), np.float32), "b": np.ones(3, np.float32)}
    nan = {"w": np.full((2, 3), np.nan, np.float32), "b": np.ones(3, np.float32)}
    wrong_shape = {"w": np.ones((3, 2), np.float32), "b": np.ones(3, np.float32)}
    missing = {"w": np.ones((2, 3), np.float32)}
    return {
        "nan": (nan, 10, "NaN or Inf"),
        "shape": (wrong_shape, 10, "has shape (3, 2), expected (2, 3)"),
        "missing": (missing, 10, "missing ['b']"),
        "zero-examples": (good, 0, "'num-examples' must be an integer in [1, 2**53], got 0"),
    }


@pytest.mark.parametrize("kind", ["nan", "shape", "missing", "zero-examples", "error", "no-metrics",
                                  "silent"])
def test_bad_reply_is_left_out_logged_and_the_round_goes_on(kind, caplog):
    strategy = PMAFL(min_available_nodes=3, min_train_nodes=2)
    sent = configured(strategy)
    good = {"w": np.full((2, 3), 2.0, np.float32), "b": np.full(3, 3.0, np.float32)}
    replies = [reply(sent[11], good, 10, loss=1.0), reply(sent[12], good, 30, loss=1.0)]
    if kind in bad_replies():
        arrays, num, reason = bad_replies()[kind]
        replies.append(reply(sent[13], arrays, num, loss=1.0))
    elif kind == "error":
        reason = "error reply (code 2): teacher file /x is missing"
        replies.append(Message(Error(code=2, reason="teacher file /x is missing"), reply_to=sent[13]))
    elif kind == "no-metrics":
        reason = "expected exactly one MetricRecord, got 0"
        replies.append(Message(RecordDict({"arrays": _arrays(good)}), reply_to=sent[13]))
    else:
        reason = "no reply"
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["w"].numpy(), 2.0) and np.allclose(arrays["b"].numpy(), 3.0)
    assert metrics["loss"] == pytest.approx(1.0)
    [failure] = strategy.failures[1]
    assert failure["node"] == 13 and reason in failure["reason"]
    assert "node 13 left out" in caplog.text or any("node 13" in r.getMessage() for r in caplog.records)


def test_error_reason_keeps_the_clientapp_message():
    ray_reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()'>\n"
                  "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                  "pmafl.teacher.TeacherError: teacher file /t.pt is missing\n\n"
                  "Exception ClientAppException occurred. Message: teacher file /t.pt is missing\n")
    assert error_summary(ray_reason) == "teacher file /t.pt is missing"
    assert error_summary("plain reason") == "plain reason"
    assert error_summary(None) == "(no reason given)"
    assert error_summary("x" * 900).endswith("...") and len(error_summary("x" * 900)) == 500


def test_round_with_no_valid_reply_keeps_the_global_model():
    strategy = PMAFL(min_available_nodes=3, min_train_nodes=2)
    sent = configured(strategy)
    replies = [Message(Error(code=2, reason="boom"), reply_to=m) for m in sent.values()]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert sorted(f["node"] for f in strategy.failures[1]) == [11, 12, 13]


GOOD = {"w": np.full((2, 3), 2.0, np.float32), "b": np.full(3, 3.0, np.float32)}


def reasons(strategy, server_round=1):
    return {f["node"]: f["reason"] for f in strategy.failures.get(server_round, [])}


@pytest.mark.parametrize("arrays, problem", [
    ({"w": np.full((2, 3), 1e300), "b": np.full(3, 3.0, np.float32)}, "dtype float64, expected float32"),
    ({"w": np.full((2, 3), 2, np.int32), "b": np.full(3, 3.0, np.float32)}, "dtype int32, expected float32"),
])
def test_arrays_of_another_dtype_than_sent_are_left_out(arrays, problem):
    strategy = PMAFL(min_available_nodes=3, min_train_nodes=2)
    sent = configured(strategy)
    replies = [reply(sent[11], GOOD, 10, loss=1.0), reply(sent[12], GOOD, 10, loss=1.0),
               reply(sent[13], arrays, 10, loss=1.0)]
    result, _ = strategy.aggregate_train(1, replies)
    assert problem in reasons(strategy)[13]
    assert result["w"].numpy().dtype == np.float32 and np.allclose(result["w"].numpy(), 2.0)


def test_num_examples_must_be_an_integer_no_larger_than_the_first_claim():
    strategy = PMAFL(min_available_nodes=3, min_train_nodes=1)
    sent = configured(strategy)
    strategy.aggregate_train(1, [reply(sent[n], GOOD, 10, loss=1.0) for n in (11, 12, 13)])
    sent = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(2, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))}
    other = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    replies = [reply(sent[11], GOOD, 10, loss=1.0), reply(sent[12], other, 1e308, loss=1.0),
               reply(sent[13], other, 10.5, loss=1.0)]
    arrays, _ = strategy.aggregate_train(2, replies)
    found = reasons(strategy, 2)
    assert "'num-examples' must be an integer in [1, 2**53], got 1e+308" in found[12]
    assert "must be an integer in [1, 2**53], got 10.5" in found[13]
    assert np.allclose(arrays["w"].numpy(), 2.0)
    # A claim above the first round's, finite and integral, is refused too.
    sent = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(3, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))}
    strategy.aggregate_train(3, [reply(sent[11], GOOD, 10, loss=1.0), reply(sent[12], GOOD, 10, loss=1.0),
                                 reply(sent[13], other, 11, loss=1.0)])
    assert "is 11, more than the 10 this node claimed in round 1" in reasons(strategy, 3)[13]


def test_a_node_that_replies_twice_is_left_out_whatever_the_order():
    for order in ((0, 1, 2, 3), (3, 2, 1, 0)):
        strategy = PMAFL(min_available_nodes=3, min_train_nodes=2)
        sent = configured(strategy)
        other = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}
        replies = [reply(sent[11], GOOD, 10, loss=1.0), reply(sent[12], GOOD, 10, loss=1.0),
                   reply(sent[13], other, 10, loss=1.0), reply(sent[13], other, 10, loss=1.0)]
        arrays, _ = strategy.aggregate_train(1, [replies[i] for i in order])
        assert np.allclose(arrays["w"].numpy(), 2.0)
        assert "replied 2 times this round" in reasons(strategy)[13]


def test_the_server_not_the_replies_decides_the_metric_keys():
    """Two of three replies agree on an extra key: they cannot get the honest one left out."""
    for first in (11, 13):
        strategy = PMAFL(min_available_nodes=3, min_train_nodes=1)
        sent = configured(strategy)
        odd = [reply(sent[n], GOOD, 10, extra=5.0) for n in (12, 13)]
        honest = reply(sent[11], GOOD, 10)
        replies = [honest, *odd] if first == 11 else [*odd, honest]
        _, metrics = strategy.aggregate_train(1, replies)
        assert "extra" not in metrics and set(reasons(strategy)) == {12, 13}
        assert f"metric keys {sorted([*LOSSES, 'extra', 'num-examples'])} differ from the " \
               f"{sorted([*LOSSES, 'num-examples'])} this round expects" in reasons(strategy)[13]


@pytest.mark.parametrize("metrics, problem", [
    ({"loss": [1.0, 2.0]}, "metric 'loss' must be a number, got list"),
    ({"loss": float("inf")}, "metric 'loss' is not finite"),
    ({"num-examples": 10.0}, "'num-examples' must be an integer in [1, 2**53], got 10.0"),
    ({"num-examples": 2**60}, "'num-examples' must be an integer in [1, 2**53]"),
])
def test_metric_values_must_be_finite_scalars_of_the_expected_type(metrics, problem):
    strategy = PMAFL(min_available_nodes=3, min_train_nodes=2)
    sent = configured(strategy)
    replies = [reply(sent[11], GOOD, 10), reply(sent[12], GOOD, 10), reply(sent[13], GOOD, 10, **metrics)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert problem in reasons(strategy)[13] and np.allclose(arrays["w"].numpy(), 2.0)


def test_an_evaluation_reply_cannot_claim_an_accuracy_outside_0_1():
    strategy = PMAFL(min_available_nodes=2, min_evaluate_nodes=2)
    sent = {m.metadata.dst_node_id: m for m in
            strategy.configure_evaluate(1, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12)))}
    metrics = strategy.aggregate_evaluate(1, [evaluate_reply(sent[11], 10, pgd_acc=0.25),
                                              evaluate_reply(sent[12], 10, pgd_acc=-1e9)])
    assert "accuracy outside [0, 1]" in reasons(strategy)[12]
    assert metrics["pgd_acc"] == 0.25 and metrics["num-clients"] == 1


def test_a_reply_from_a_node_not_sampled_is_left_out():
    strategy = PMAFL(min_available_nodes=2, min_train_nodes=2)
    sent = configured(strategy, nodes=(11, 12))
    unasked = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=99, message_type="train")
    replies = [reply(sent[11], GOOD, 10), reply(sent[12], GOOD, 10), reply(unasked, GOOD, 5)]
    strategy.aggregate_train(1, replies)
    assert "not sampled" in reasons(strategy)[99]


def test_a_round_needs_min_train_nodes_valid_replies_and_a_stalled_run_stops():
    from strategies import FederationStalled

    strategy = PMAFL(min_available_nodes=3, min_train_nodes=2, max_idle_rounds=2)
    for server_round in (1, 2):
        sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
            server_round, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))}
        replies = [reply(sent[11], GOOD, 10, loss=1.0),
                   Message(Error(code=2, reason="boom"), reply_to=sent[12])]
        if server_round == 1:
            assert strategy.aggregate_train(server_round, replies) == (None, None)
        else:
            with pytest.raises(FederationStalled, match="2 rounds in a row with fewer than "
                                                        "min-train-nodes \\(2\\) valid replies"):
                strategy.aggregate_train(server_round, replies)
    # A valid round in between resets the count.
    strategy = PMAFL(min_available_nodes=3, min_train_nodes=2, max_idle_rounds=2)
    for server_round, good in ((1, 1), (2, 2), (3, 1)):
        sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
            server_round, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))}
        replies = [reply(sent[n], GOOD, 10, loss=1.0) for n in (11, 12)[:good]]
        strategy.aggregate_train(server_round, replies)


def test_too_few_nodes_for_longer_than_the_wait_stops_the_run():
    from strategies import FederationStalled

    strategy = PMAFL(min_available_nodes=4, min_train_nodes=2, node_wait_timeout=0.2)
    with pytest.raises(FederationStalled, match="3 nodes connected, fewer than 4 \\(min-available-nodes "
                                                "4\\), for 0.2s \\(node-wait-timeout\\)"):
        strategy.configure_train(1, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))


def _record(values):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def test_trimmed_mean_and_median_are_coordinate_wise_and_unweighted():
    from strategies.aggregation import robust_aggregate

    w = [np.array([1.0, 10.0], np.float32), np.array([2.0, 20.0], np.float32),
         np.array([3.0, 30.0], np.float32), np.array([4.0, 40.0], np.float32),
         np.array([1000.0, -1000.0], np.float32)]
    records = [_record({"w": v, "n": np.array(i, np.int64)}) for i, v in enumerate(w)]
    weights = [1, 1, 1, 1, 100]
    median = robust_aggregate(records, weights, "median")
    assert median["w"].numpy().tolist() == [3.0, 20.0] and median["n"].numpy() == 2
    trimmed = robust_aggregate(records, weights, "trimmed-mean", trim_fraction=0.2)
    # One of five cut from each end, per coordinate: [2, 3, 4] and [10, 20, 30].
    assert trimmed["w"].numpy().tolist() == pytest.approx([3.0, 20.0])
    assert trimmed["w"].numpy().dtype == np.float32
    mean = robust_aggregate(records, weights, "mean")
    assert mean["w"].numpy()[0] == pytest.approx((1 + 2 + 3 + 4 + 100 * 1000) / 104)


def test_clipping_bounds_each_update_by_the_median_norm():
    from strategies.aggregation import clip_updates

    sent = _record({"w": np.zeros(2, np.float32), "n": np.array(0, np.int64)})
    updates = [np.array([3.0, 4.0]), np.array([0.0, 1.0]), np.array([0.0, 2.0]), np.array([300.0, 400.0])]
    records = [_record({"w": u.astype(np.float32), "n": np.array(7, np.int64)}) for u in updates]
    clipped, count = clip_updates(records, sent, factor=2.0)
    # norms 5, 1, 2, 500: median 3.5, bound 7: only the last is scaled, to norm 7
    assert count == 1
    assert clipped[3]["w"].numpy().tolist() == pytest.approx([300 * 7 / 500, 400 * 7 / 500])
    assert clipped[0] is records[0] and clipped[3]["n"].numpy() == 7


def test_a_scaled_malicious_update_cannot_take_over_a_robust_round():
    good = {"w": np.full((2, 3), 1.0, np.float32), "b": np.full(3, 1.0, np.float32)}
    evil = {"w": np.full((2, 3), 1e6, np.float32), "b": np.full(3, -1e6, np.float32)}
    for aggregation, clip in (("median", 0.0), ("trimmed-mean", 0.0), ("mean", 1.0)):
        strategy = PMAFL(min_available_nodes=3, min_train_nodes=2, aggregation=aggregation,
                         trim_fraction=0.34, clip_factor=clip)
        sent = configured(strategy)
        replies = [reply(sent[11], good, 10), reply(sent[12], good, 10), reply(sent[13], evil, 10)]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert np.abs(arrays["w"].numpy()).max() <= 1.0 + 1e-6, aggregation
    with pytest.raises(ValueError, match="aggregation must be one of"):
        PMAFL(aggregation="krum")


class SlowGrid:
    """Replies become available only after `ready_after` pulls; records the waits between pulls."""

    def __init__(self, ready_after):
        self.ready_after, self.pulls, self.waits = ready_after, 0, []

    def push_messages(self, messages):
        self.sent = list(messages)
        for i, msg in enumerate(self.sent):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
        return [msg.metadata.message_id for msg in self.sent]

    def pull_messages(self, ids):
        self.pulls += 1
        ready = [m for i, m in enumerate(self.sent) if self.pulls >= self.ready_after[i]]
        return [Message(RecordDict(), reply_to=m) for m in ready if m.metadata.message_id in set(ids)]


def test_exchange_polls_with_growing_waits_until_every_reply_is_in(monkeypatch):
    grid = SlowGrid(ready_after=[1, 3, 7])
    monkeypatch.setattr("strategies.round_loop.time.sleep", grid.waits.append)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 12, 13)]
    replies = exchange(grid, messages, timeout=60, first_wait=0.01, max_wait=0.05)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 7  # each reply pulled once, and no pull after the last
    assert grid.waits == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05, 0.05])


def test_exchange_returns_what_came_in_when_the_timeout_passes():
    grid = SlowGrid(ready_after=[1, 10**9])
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 12)]
    replies = exchange(grid, messages, timeout=0.3, first_wait=0.01, max_wait=0.05)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert grid.pulls >= 3


# --- One hostile node of several: it can neither crash the round nor steer it. ---

def _raw_array(data, dtype="float32", shape=(2, 3), stype="numpy.ndarray"):
    """An Array whose declared metadata says what the test wants, whatever its bytes hold."""
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def _npy(values):
    import io
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def _npz(values):
    import io
    buffer = io.BytesIO()
    np.savez(buffer, w=values)
    return buffer.getvalue()


@pytest.mark.parametrize("w, problem", [
    (_raw_array(_npy(np.full((2, 3), 1e300))), "dtype float64, expected float32"),
    (_raw_array(b"\x93NUMPY garbage"), "does not parse as a NumPy array"),
    (_raw_array(_npy(np.full((2, 3), 2.0, np.float32)), stype="torch.Tensor"),
     "serialised as 'torch.Tensor'"),
    (_raw_array(_npy(np.full((200, 300), 2.0, np.float32))), "more than the 4120"),
    (_raw_array(_npy(np.full((3, 2), 2.0, np.float32))), "has shape (3, 2), expected (2, 3)"),
    (_raw_array(_npz(np.full((2, 3), 2.0, np.float32))), "parses as an NpzFile, not an array"),
])
def test_screening_reads_the_bytes_that_would_be_averaged_not_the_declared_metadata(w, problem):
    strategy = PMAFL(min_available_nodes=3, min_train_nodes=2)
    sent = configured(strategy)
    hostile = reply(sent[13], GOOD, 10)
    hostile.content["arrays"] = ArrayRecord({"w": w, "b": Array(np.full(3, 3.0, np.float32))})
    arrays, _ = strategy.aggregate_train(1, [reply(sent[11], GOOD, 10), reply(sent[12], GOOD, 10), hostile])
    assert problem in reasons(strategy)[13]
    assert arrays["w"].numpy().dtype == np.float32 and np.allclose(arrays["w"].numpy(), 2.0)


def test_any_error_while_reading_a_reply_leaves_it_out_never_the_run(monkeypatch):
    import strategies.screened_fedavg as screened_fedavg

    screen = screened_fedavg.screen_reply

    def exploding(content, *args):
        if content.metric_records["metrics"]["loss"] == 13.0:
            raise RecursionError("a reply built to break the reader")
        return screen(content, *args)

    monkeypatch.setattr(screened_fedavg, "screen_reply", exploding)
    strategy = PMAFL(min_available_nodes=3, min_train_nodes=2)
    sent = configured(strategy)
    replies = [reply(sent[11], GOOD, 10), reply(sent[12], GOOD, 10), reply(sent[13], GOOD, 10, loss=13.0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert "unreadable reply: RecursionError: a reply built to break the reader" in reasons(strategy)[13]
    assert np.allclose(arrays["w"].numpy(), 2.0)


def _hostile_round(strategy, nodes, hostile, attack):
    """Honest nodes send the global model plus a small update; `hostile` nodes send `attack`."""
    rng = np.random.default_rng(0)
    global_model = {"w": np.full((2, 3), 10.0, np.float32), "b": np.full(3, 10.0, np.float32)}
    sent = {m.metadata.dst_node_id: m for m in
            strategy.configure_train(1, _arrays(global_model), ConfigRecord(), FakeGrid(nodes))}
    honest = {n: {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in global_model.items()}
              for n in nodes if n not in hostile}
    claims = {n: 100 + 10 * i for i, n in enumerate(nodes)}
    replies = [reply(sent[n], honest[n], claims[n]) for n in honest]
    replies += [reply(sent[n], *attack(global_model)) for n in hostile]
    arrays, _ = strategy.aggregate_train(1, replies)
    honest_mean = {k: sum(claims[n] * honest[n][k].astype(np.float64) for n in honest)
                   / sum(claims[n] for n in honest) for k in global_model}
    distance = np.sqrt(sum(((arrays[k].numpy() - honest_mean[k]) ** 2).sum() for k in global_model))
    return distance, np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in global_model.values()))


def sign_flipped_with_a_huge_claim(global_model):
    return {k: -v for k, v in global_model.items()}, 10**12


def scaled_by_1e4(global_model):
    return {k: v * 1e4 for k, v in global_model.items()}, 100


@pytest.mark.parametrize("attack", [sign_flipped_with_a_huge_claim, scaled_by_1e4])
@pytest.mark.parametrize("aggregation", ["mean", "trimmed-mean", "median"])
def test_one_hostile_node_of_ten_cannot_steer_the_default_round(attack, aggregation):
    """Default clipping and weight cap: the aggregate stays within 0.25 of the honest mean (honest
    updates have norm about 0.3, the model itself about 30; unbounded, the attacks move it by
    about 60 and 3e5)."""
    nodes = tuple(range(11, 21))
    distance, model_norm = _hostile_round(PMAFL(min_available_nodes=10, aggregation=aggregation),
                                          nodes, {11}, attack)
    assert distance < 0.25, (distance, model_norm)


def test_a_claim_far_above_the_rounds_median_is_capped():
    """Weights 10, 20 and min(10**12, 4 x 20): the manual weighted mean with the capped weight;
    by default (cap 1) no weight exceeds the median claim."""
    w = {11: np.full((2, 3), 1.0, np.float32), 12: np.full((2, 3), 4.0, np.float32),
         13: np.full((2, 3), -50.0, np.float32)}
    claims = {11: 10, 12: 20, 13: 10**12}
    for weight_cap, expected in ((4.0, (10 * 1.0 + 20 * 4.0 + 80 * -50.0) / 110), (0.0, -50.0)):
        strategy = PMAFL(min_available_nodes=3, min_train_nodes=2, clip_factor=0, weight_cap=weight_cap)
        sent = configured(strategy)
        replies = [reply(sent[n], {"w": w[n], "b": np.full(3, 3.0, np.float32)}, claims[n]) for n in sent]
        arrays, metrics = strategy.aggregate_train(1, replies)
        assert np.allclose(arrays["w"].numpy(), expected, atol=1e-6), weight_cap
    # weight_cap=0 turned the cap off: the claim owned the mean. With it, the weights were:
    strategy = PMAFL(min_available_nodes=3, min_train_nodes=2)
    sent = configured(strategy)
    strategy.aggregate_train(1, [reply(sent[n], GOOD, claims[n]) for n in sent])
    assert sorted(weight for _, _, weight in strategy.aggregated) == [10, 20, 20]


def test_evaluation_honours_the_node_wait_deadline():
    import threading

    from strategies import FederationStalled

    strategy = PMAFL(min_available_nodes=3, min_evaluate_nodes=2, node_wait_timeout=0.2)
    raised = []

    def evaluate():
        try:
            strategy.configure_evaluate(1, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11,)))
        except FederationStalled as e:
            raised.append(e)

    worker = threading.Thread(target=evaluate, daemon=True)  # Flower's sampling waits for ever
    worker.start()
    worker.join(timeout=10)
    assert raised and "1 nodes connected, fewer than 3" in str(raised[0])


def test_messages_expire_with_the_round():
    grid = SlowGrid(ready_after=[1, 1])
    messages = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (11, 12)]
    exchange(grid, messages, timeout=42.0)
    assert [m.metadata.ttl for m in grid.sent] == [42.0, 42.0]  # not Flower's 12 hours


def test_a_node_that_misses_rounds_is_skipped_for_a_while_then_tried_again():
    strategy = PMAFL(min_available_nodes=2, min_train_nodes=2, max_missed_rounds=2, skip_rounds=3)
    sampled = {}
    for server_round in range(1, 8):
        sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
            server_round, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))}
        sampled[server_round] = sorted(sent)
        strategy.aggregate_train(server_round, [reply(sent[n], GOOD, 10) for n in sent if n != 13])
    # Node 13 never answers: missed rounds 1 and 2, skipped in 3 to 5, tried in 6, skipped again.
    assert [13 in sampled[r] for r in range(1, 8)] == [True, True, False, False, False, True, False]
    # A node that answers again is sampled again for good.
    strategy.load_state_dict(PMAFL().state_dict())
    assert 13 in {m.metadata.dst_node_id for m in strategy.configure_train(
        8, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))}


def test_a_node_whose_replies_are_never_usable_is_skipped_like_a_silent_one():
    """A node that answers each round with something left out (here: a valid train reply and an
    error in evaluation, each of which could come just before the timeout) misses its rounds."""
    strategy = PMAFL(min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2,
                     max_missed_rounds=2, skip_rounds=3)
    strategy.num_rounds = 10
    sampled = {}
    for server_round in range(1, 5):
        sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
            server_round, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))}
        sampled[server_round] = sorted(sent)
        strategy.aggregate_train(server_round, [reply(sent[n], GOOD, 10) for n in sent])
        sent = {m.metadata.dst_node_id: m for m in strategy.configure_evaluate(
            server_round, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))}
        strategy.aggregate_evaluate(server_round, [
            Message(Error(code=2, reason="late garbage"), reply_to=sent[n]) if n == 13
            else evaluate_reply(sent[n], 10) for n in sent])
    assert [13 in sampled[r] for r in range(1, 5)] == [True, True, False, False]
    # A round with usable replies in every stage starts the count again.
    strategy = PMAFL(min_available_nodes=2, min_train_nodes=2, max_missed_rounds=2)
    for server_round, good in enumerate([False, True, False, True, False], start=1):
        sent = configured(strategy) if server_round == 1 else {
            m.metadata.dst_node_id: m for m in strategy.configure_train(
                server_round, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12, 13)))}
        assert 13 in sent
        strategy.aggregate_train(server_round, [reply(sent[n], GOOD if good or n != 13 else
                                                      {"w": GOOD["w"]}, 10) for n in sent])


def test_skipped_nodes_are_sampled_anyway_when_too_few_would_be_left():
    strategy = PMAFL(min_available_nodes=2, min_train_nodes=2, max_missed_rounds=1)
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12)))}
    strategy.aggregate_train(1, [reply(sent[11], GOOD, 10)])
    assert sorted(m.metadata.dst_node_id for m in strategy.configure_train(
        2, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12)))) == [11, 12]


def test_a_non_finite_aggregate_is_discarded_and_the_previous_model_kept(monkeypatch):
    """Whatever produced it (an aggregation, FedFTG's fine-tuning), a NaN aggregate never becomes
    the global model: the round is recorded as discarded and the run goes on."""
    from inprocess import InProcessGrid

    import strategies.screened_fedavg as screened_fedavg

    aggregate = screened_fedavg.robust_aggregate

    def poisoned_in_round_2(records, *args):
        result = aggregate(records, *args)
        calls.append(1)
        if len(calls) != 2:
            return result
        return ArrayRecord({k: Array(np.full(a.numpy().shape, np.nan, np.float32))
                            for k, a in result.items()})

    calls = []
    monkeypatch.setattr(screened_fedavg, "robust_aggregate", poisoned_in_round_2)

    def train(msg, context):
        arrays = {k: a.numpy() + 1.0 for k, a in msg.content["arrays"].items()}
        return reply(msg, arrays, 10)

    grid = InProcessGrid({"train": train}, {11: {}, 12: {}}, {})
    strategy = PMAFL(min_available_nodes=2, evaluate_every=0)
    models = {}
    result = strategy.start(grid, _arrays(GLOBAL), num_rounds=3, timeout=10,
                            on_round_end=lambda r, arrays, _: models.update({r: arrays["w"].numpy()}))
    assert np.allclose(models[1], 1.0) and np.allclose(models[2], 1.0) and np.allclose(models[3], 2.0)
    [discarded] = strategy.round_summary(2)["failures"]
    assert discarded["stage"] == "aggregate" and discarded["node"] is None
    assert "holds NaN or Inf values" in discarded["reason"]
    assert strategy.round_summary(3)["failures"] == []
    assert np.allclose(result.arrays["w"].numpy(), 2.0)


def test_the_round_summary_holds_the_servers_columns_in_order():
    """What a results row takes from the server: the round loop's timing and bytes, the nodes
    left out (screening's first, then a discarded aggregate), and the round's training radius."""
    from inprocess import InProcessGrid

    def train(msg, context):
        arrays = {k: a.numpy() + 1.0 for k, a in msg.content["arrays"].items()}
        return reply(msg, arrays, 10, **{"compute-seconds": 0.5})

    grid = InProcessGrid({"train": train}, {11: {}, 12: {}}, {})
    strategy = PMAFL(TrainConfig(eps=0.3), min_available_nodes=2, evaluate_every=0, eps_warmup_rounds=2)
    strategy.start(grid, _arrays(GLOBAL), num_rounds=2, timeout=10)
    summary = strategy.round_summary(1)
    assert list(summary) == ["train-seconds", "train-compute-seconds", "train-startup-seconds",
                             "train-replies", "evaluate-seconds", "evaluate-compute-seconds",
                             "evaluate-startup-seconds", "round-seconds", "bytes-sent",
                             "bytes-received", "failures", "train-eps"]
    assert summary["train-compute-seconds"] == 0.5 and summary["train-replies"] == 2
    assert summary["bytes-sent"] == summary["bytes-received"] == 2 * sum(
        len(a.data) for a in _arrays(GLOBAL).values())
    assert summary["failures"] == [] and summary["train-eps"] == pytest.approx(0.15)
    assert strategy.round_summary(2)["train-eps"] == pytest.approx(0.3)
    assert strategy.round_summary(0) == {"failures": [], "train-eps": 0.0}
    strategy.failures[2] = [{"stage": "train", "node": 12, "reason": "r"}]
    strategy.round_stats[2]["discarded"] = "why"
    assert strategy.round_summary(2)["failures"] == [
        {"stage": "train", "node": 12, "reason": "r"}, {"stage": "aggregate", "node": None, "reason": "why"}]


def test_fair_q_weights_the_mean_by_each_nodes_loss_at_the_global_model():
    """q-FFL, q 2: claims 10, 30, 60, losses 0.5, 1 and 3 (lower median 1). At cap 4 the weights
    are the claims, the factors 0.25, 1 and min(3, 4 ** 0.5) ** 2 = 4, so 2.5, 30 and 240, the last
    bounded by the largest weight, 60. At cap 1 the weights are 10, 30, 30 and no factor exceeds
    1: 2.5, 30, 30; a node that claims a huge loss gains no more than that."""
    w = {11: np.full((2, 3), 1.0, np.float32), 12: np.full((2, 3), 4.0, np.float32),
         13: np.full((2, 3), -2.0, np.float32)}
    n = {11: 10, 12: 30, 13: 60}
    for cap, losses, weights in ((4.0, {11: 0.5, 12: 1.0, 13: 3.0}, (2.5, 30, 60)),
                                 (1.0, {11: 0.5, 12: 1.0, 13: 3.0}, (2.5, 30, 30)),
                                 (1.0, {11: 0.5, 12: 1.0, 13: 1e30}, (2.5, 30, 30))):
        strategy = PMAFL(TrainConfig(fair_q=2.0), min_available_nodes=3, min_train_nodes=2,
                         clip_factor=0, weight_cap=cap)
        sent = configured(strategy)
        replies = [reply(sent[i], {"w": w[i], "b": np.zeros(3, np.float32)}, n[i],
                         **{"global-loss": losses[i]}) for i in sent]
        arrays, _ = strategy.aggregate_train(1, replies)
        a, b, c = weights
        assert np.allclose(arrays["w"].numpy(), (a * 1.0 + b * 4.0 + c * -2.0) / (a + b + c)), cap
        assert {m.metadata.src_node_id: weight for m, _, weight in strategy.aggregated} \
            == pytest.approx(dict(zip((11, 12, 13), weights, strict=True))), cap


def test_a_hostile_global_loss_neither_overflows_nor_takes_the_mean():
    """q 5: a loss of 1e300 would overflow (1e300 / 2.3) ** 5; of two replies the liar cannot set
    the median (the lower one is the honest loss), so both keep their weight; a lying low loss
    only lowers the liar's own weight. Against a manual weighted mean in each case."""
    from strategies.aggregation import fair_weights

    assert fair_weights([300.0, 300.0], [2.3, 1e300], 5.0, 1.0) == [300.0, 300.0]
    assert fair_weights([300.0, 300.0], [2.3, 0.0], 5.0, 1.0) == [300.0, 300.0]  # median 0: as is
    honest = [2.0, 2.2, 2.4, 2.6]
    weights = fair_weights([100.0] * 5, [*honest, 1e300], 5.0, 4.0)
    assert weights == pytest.approx([min(100 * (x / 2.4) ** 5, 100.0) for x in honest] + [100.0])
    weights = fair_weights([100.0] * 5, [*honest, 1e-9], 5.0, 1.0)
    assert weights[-1] == pytest.approx(100 * (1e-9 / 2.2) ** 5)
    assert weights[:4] == pytest.approx([100 * (x / 2.2) ** 5 if x < 2.2 else 100.0 for x in honest])
    with pytest.raises(ValueError, match="cap > 0"):
        fair_weights([1.0], [1.0], 5.0, 0.0)
    with pytest.raises(ValueError, match="needs aggregation 'mean' and weight_cap > 0"):
        PMAFL(TrainConfig(fair_q=1.0), aggregation="median")


def test_fair_q_replies_must_carry_a_finite_global_loss():
    strategy = PMAFL(TrainConfig(fair_q=1.0), min_available_nodes=3, min_train_nodes=2)
    sent = configured(strategy)
    replies = [reply(sent[11], GOOD, 10, **{"global-loss": 1.0}),
               reply(sent[12], GOOD, 10),  # no global-loss
               reply(sent[13], GOOD, 10, **{"global-loss": float("nan")})]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None  # one valid reply, min-train-nodes 2
    problems = reasons(strategy)
    assert "global-loss" in problems[12] and "not finite" in problems[13]


def test_fair_q_leaves_federated_evaluation_weighted_by_examples():
    """Evaluation replies carry no global-loss: their mean stays the capped example-weighted one."""
    strategy = PMAFL(TrainConfig(fair_q=1.0), min_available_nodes=2, min_train_nodes=2,
                     min_evaluate_nodes=2, weight_cap=4.0)
    strategy.num_rounds = 1
    messages = strategy.configure_evaluate(1, _arrays(GLOBAL), ConfigRecord(), FakeGrid((11, 12)))
    sent = {m.metadata.dst_node_id: m for m in messages}
    scores = {11: (10, 0.5), 12: (30, 0.9)}
    metrics = strategy.aggregate_evaluate(1, [evaluate_reply(sent[i], n, clean_acc=acc)
                                              for i, (n, acc) in scores.items()])
    assert metrics["clean_acc"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
