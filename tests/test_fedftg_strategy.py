"""The FedFTG wrapper around PMAFL and around Flower's own FedAvg: it asks for label counts,
fine-tunes the base strategy's aggregate with the replies' models, and leaves replies with bad
label counts out of the ensemble (not out of the average)."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from pmafl.config import TrainConfig
from pmafl.fedftg import FedFTGConfig, FedFTGServer
from pmafl.models import create_model
from pmafl.train import train_metric_names
from strategies import PMAFL, FedFTG
from strategies.aggregation import weighted_mean
from strategies.fedftg import label_counts_problem

NODES = (11, 12, 13)
TERMS = {key: 0.0 for key in train_metric_names(TrainConfig()) if key != "num-examples"}
CFG = FedFTGConfig(iterations=2, global_steps=2, batch_size=8, noise_dim=8)


class FakeGrid:
    def get_node_ids(self):
        return list(NODES)


def model_fn():
    return create_model("cnn-small", 3, 1, (0.5,), (0.25,))


def state(seed):
    torch.manual_seed(seed)
    return model_fn().state_dict()


def wrap(base, seed=0):
    return FedFTG(base, model_fn, FedFTGServer(3, 1, 8, CFG, seed=seed), num_classes=3)


def replies_to(strategy, counts, num_examples=(10, 20, 30)):
    sent = strategy.configure_train(1, ArrayRecord(state(0)), ConfigRecord(), FakeGrid())
    sent = {m.metadata.dst_node_id: m for m in sent}
    assert all(m.content["config"]["label-counts"] is True for m in sent.values())
    replies = []
    for i, node in enumerate(NODES):
        # The loss terms a default PMAFL expects, `loss` differing between nodes.
        metrics = {"num-examples": num_examples[i], **TERMS, "loss": float(i)}
        if counts[i] is not None:
            metrics["label-counts"] = counts[i]
        content = RecordDict({"arrays": ArrayRecord(state(node)), "metrics": MetricRecord(metrics)})
        replies.append(Message(content, reply_to=sent[node]))
    return replies


GOOD = ([5, 5, 0], [0, 10, 10], [10, 10, 10])


def plain_mean():
    return weighted_mean([ArrayRecord(state(n)) for n in NODES], [10, 20, 30])


@pytest.mark.parametrize("base", [
    # Uncapped weights, as FedAvg's: the test's manual mean is the plain weighted one.
    lambda: PMAFL(min_available_nodes=3, min_train_nodes=2, weight_cap=0),
    lambda: FedAvg(min_available_nodes=3, min_train_nodes=2),
], ids=["PMAFL", "FedAvg"])
def test_wrapper_finetunes_the_base_aggregate(base):
    strategy = wrap(base())
    arrays, metrics = strategy.aggregate_train(1, replies_to(strategy, GOOD))
    assert "label-counts" not in metrics
    assert metrics["loss"] == pytest.approx((10 * 0 + 20 * 1 + 30 * 2) / 60)
    assert metrics["fedftg-clients"] == 3 and metrics["fedftg-seconds"] > 0
    assert {"fedftg-loss-md", "fedftg-loss-cls", "fedftg-loss-div", "fedftg-loss-kd"} <= set(metrics)
    # The same fine-tuning by hand, from the manual weighted mean.
    manual = model_fn()
    manual.load_state_dict(plain_mean().to_torch_state_dict())
    clients = [model_fn() for _ in NODES]
    for model, node in zip(clients, NODES):
        model.load_state_dict(state(node))
    FedFTGServer(3, 1, 8, CFG, seed=0).finetune(manual, clients, torch.tensor(GOOD, dtype=torch.float64), 1)
    got = arrays.to_torch_state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-5) for k, v in manual.state_dict().items())
    mean = plain_mean().to_torch_state_dict()
    assert not torch.allclose(got["net.0.weight"], mean["net.0.weight"])


def test_bad_label_counts_leave_the_ensemble_not_the_average(caplog):
    strategy = wrap(PMAFL(min_available_nodes=3, min_train_nodes=2, weight_cap=0))
    counts = (None, [10, 10], [10, 10, 10])
    arrays, metrics = strategy.aggregate_train(1, replies_to(strategy, counts, (10, 20, 29)))
    reasons = {f["node"]: f["reason"] for f in strategy.left_out[1]}
    assert "no 'label-counts' metric" in reasons[11]
    assert "must be a list of 3 counts" in reasons[12]
    assert "add up to 30, but num-examples is 29" in reasons[13]
    # Every reply was still averaged by PMAFL, and with no ensemble member nothing is fine-tuned.
    assert strategy.strategy.failures == {}
    assert "fedftg-clients" not in metrics
    expected = weighted_mean([ArrayRecord(state(n)) for n in NODES], [10, 20, 29])
    assert all(np.allclose(arrays[k].numpy(), expected[k].numpy(), rtol=1e-6, atol=1e-7)
               for k in expected.keys())
    assert "no client model for the ensemble" in caplog.text


def test_one_valid_client_is_an_ensemble_of_one():
    strategy = wrap(FedAvg(min_available_nodes=3, min_train_nodes=2))
    _, metrics = strategy.aggregate_train(1, replies_to(strategy, (GOOD[0], None, [1, 2, 3])))
    assert metrics["fedftg-clients"] == 1
    assert sorted(f["node"] for f in strategy.left_out[1]) == [12, 13]
    # A base without screening has no failures of its own, and no training radius to report.
    assert strategy.round_summary(1) == {"failures": strategy.left_out[1]}


def test_label_counts_problem():
    assert label_counts_problem([1, 2, 3], 3, 6) is None
    assert label_counts_problem([1.0, 2.0, 3.0], 3, 6) is None
    assert "non-negative integers" in label_counts_problem([1, -2, 7], 3, 6)
    assert "non-negative integers" in label_counts_problem([1.5, 1.5, 3], 3, 6)
    assert "list of 3" in label_counts_problem(5, 3, 5)


def test_replies_pmafl_leaves_out_stay_out_of_the_ensemble():
    """A node that replies twice, or claims more examples than before, is not averaged by PMAFL,
    and so must not teach the global model either."""
    strategy = wrap(PMAFL(min_available_nodes=3, min_train_nodes=2))
    replies = replies_to(strategy, GOOD)
    replies.append(replies_to(strategy, GOOD)[2])  # node 13 again, from a second configure
    _, metrics = strategy.aggregate_train(1, replies)
    assert "replied 2 times" in {f["node"]: f["reason"] for f in strategy.strategy.failures[1]}[13]
    assert metrics["fedftg-clients"] == 2


def test_the_wrapped_strategys_contract():
    """PMAFL tells the wrapper what it averaged (`WrappedStrategy`); Flower's FedAvg does not,
    and the wrapper then screens the replies itself."""
    from strategies.wrapped import WrappedStrategy

    assert isinstance(PMAFL(), WrappedStrategy)
    assert not isinstance(FedAvg(), WrappedStrategy)
    base = PMAFL(evaluate_every=5)
    wrap(base).set_num_rounds(7)
    assert base.num_rounds == 7


def test_the_round_summary_merges_the_base_strategys_failures_and_eps():
    """One node PMAFL leaves out, one FedFTG leaves out of its ensemble, and an aggregate the round
    loop discarded: the round's failures list them in that order, and PMAFL's `train-eps` follows."""
    strategy = wrap(PMAFL(TrainConfig(eps=0.25), min_available_nodes=3, min_train_nodes=2))
    replies = replies_to(strategy, (GOOD[0], [1, 1, 1], GOOD[2]))
    replies.append(replies_to(strategy, GOOD)[2])  # node 13 replies twice: PMAFL leaves it out
    strategy.aggregate_train(1, replies)
    strategy.round_stats[1] = {"round-seconds": 2.0, "discarded": "why"}
    summary = strategy.round_summary(1)
    assert list(summary) == ["round-seconds", "failures", "train-eps"]
    assert [(f["stage"], f["node"]) for f in summary["failures"]] == [
        ("train", 13), ("train", 13), ("fedftg", 12), ("aggregate", None)]  # each reply of 13
    assert summary["round-seconds"] == 2.0 and summary["train-eps"] == 0.25


def recording(strategy):
    """Keep what the server fine-tunes: the global model it starts from and the client models."""
    seen = {}
    finetune = strategy.server.finetune

    def record(global_model, clients, counts, server_round):
        seen["global"] = {k: v.clone() for k, v in global_model.state_dict().items()}
        seen["clients"] = [{k: v.clone() for k, v in c.state_dict().items()} for c in clients]
        return finetune(global_model, clients, counts, server_round)

    strategy.server.finetune = record
    return seen


def test_robust_aggregation_composes_median():
    """FedFTG around PMAFL(aggregation='median') fine-tunes the coordinate-wise median."""
    strategy = wrap(PMAFL(min_available_nodes=3, min_train_nodes=2, aggregation="median"))
    seen = recording(strategy)
    strategy.aggregate_train(1, replies_to(strategy, GOOD))
    states = [state(n) for n in NODES]
    for key, value in seen["global"].items():
        if value.dtype.is_floating_point:
            expected = np.median(np.stack([s[key].numpy() for s in states]), axis=0)
            assert np.allclose(value.numpy(), expected, atol=1e-7), key


def test_a_clipped_update_teaches_clipped():
    """With clip_factor, a boosted update (x100) is clipped in the average and, the same, in the
    ensemble: the model that teaches is the global model plus the clipped delta."""
    strategy = wrap(PMAFL(min_available_nodes=3, min_train_nodes=2, clip_factor=2.0, weight_cap=0))
    seen = recording(strategy)
    replies = replies_to(strategy, GOOD)
    sent, boosted = state(0), state(13)
    boosted_state = {k: (sent[k] + 100 * (v - sent[k])) if v.dtype.is_floating_point else v
                     for k, v in boosted.items()}
    replies[2].content["arrays"] = ArrayRecord(boosted_state)
    strategy.aggregate_train(1, replies)
    floats = [k for k, v in sent.items() if v.dtype.is_floating_point]

    def norm(s):
        return float(torch.sqrt(sum(((s[k].double() - sent[k].double()) ** 2).sum() for k in floats)))

    states = [state(11), state(12), boosted_state]
    bound = 2.0 * float(np.median([norm(s) for s in states]))
    assert norm(boosted_state) > bound > max(norm(states[0]), norm(states[1]))
    scale = bound / norm(boosted_state)
    clipped = {k: sent[k].double() + scale * (boosted_state[k].double() - sent[k].double()) for k in floats}
    teachers = [c for c in seen["clients"]
                if torch.allclose(c["net.0.weight"].double(), clipped["net.0.weight"], atol=1e-5)]
    assert len(teachers) == 1 and len(seen["clients"]) == 3
    assert all(torch.allclose(teachers[0][k].double(), clipped[k], atol=1e-5) for k in floats)
    assert norm(teachers[0]) == pytest.approx(bound, rel=1e-5)
    # The global model fine-tuning starts from is the weighted mean of the clipped models.
    manual = weighted_mean([ArrayRecord(state(11)), ArrayRecord(state(12)),
                            ArrayRecord({k: (clipped[k].float() if k in clipped else v)
                                         for k, v in boosted_state.items()})], [10, 20, 30])
    assert all(np.allclose(seen["global"][k].numpy(), manual[k].numpy(), atol=1e-6) for k in floats)


def test_a_capped_claim_weighs_no_more_in_the_ensemble_than_in_the_average():
    """Node 13 claims 10**12 examples, with label counts to match: PMAFL caps its weight at the
    median claim (20), and FedFTG scales its counts to that weight."""
    strategy = wrap(PMAFL(min_available_nodes=3, min_train_nodes=2))
    counts = {}
    finetune = strategy.server.finetune

    def record(global_model, clients, class_counts, server_round):
        counts["seen"] = class_counts.clone()
        return finetune(global_model, clients, class_counts, server_round)

    strategy.server.finetune = record
    huge = (GOOD[0], GOOD[1], [10**12, 0, 0])
    strategy.aggregate_train(1, replies_to(strategy, huge, (10, 20, 10**12)))
    assert sorted(counts["seen"].tolist()) == [[0, 10, 10], [5, 5, 0], [20, 0, 0]]
