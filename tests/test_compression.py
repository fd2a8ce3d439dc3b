"""Compressed updates: each encoding against a hand computation, error feedback that loses nothing,
bad encoded replies refused with the array named, and the strategy averaging decoded models."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from pmafl.compression import decode_update, encode_update
from pmafl.config import ConfigError, RunConfig, TrainConfig
from pmafl.train import train_metric_names
from strategies import PMAFL
from strategies.round_loop import payload_bytes

SENT = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "n": torch.tensor(7)}


def _local(delta, n=9):
    return {"w": SENT["w"] + torch.tensor(delta), "n": torch.tensor(n)}


def test_none_sends_the_model_itself():
    encoded, residual = encode_update(_local([0.5, 0, 0, 0]), SENT, "none")
    assert set(encoded) == {"w", "n"} and residual == {}
    assert torch.equal(encoded["w"], torch.tensor([1.5, 2.0, 3.0, 4.0]))
    assert decode_update(encoded, SENT, "none")["w"] is encoded["w"]


def test_int8_is_the_delta_over_its_peak_times_127():
    delta = [0.5, -1.27, 0.0, 0.1]  # peak 1.27: scale 0.01, q = 50, -127, 0, 10
    encoded, residual = encode_update(_local(delta), SENT, "int8")
    assert encoded["w"].dtype == torch.int8
    assert encoded["w"].tolist() == [50, -127, 0, 10]
    assert encoded["w|scale"].item() == pytest.approx(0.01)
    assert torch.equal(encoded["n"], torch.tensor(9))  # integer buffers travel as they are
    model = decode_update(encoded, SENT, "int8")
    assert torch.allclose(model["w"], SENT["w"] + torch.tensor(delta), atol=1e-6)
    assert model["n"].item() == 9 and model["n"].dtype == torch.int64
    assert torch.allclose(residual["w"], torch.zeros(4), atol=1e-6)


def test_int8_rounding_error_goes_to_the_residual():
    delta = torch.tensor([1.0, 0.004, -0.0061, 0.0])  # scale 1/127: 0.004 -> 1 step, -0.0061 -> -1
    encoded, residual = encode_update(_local(delta.tolist()), SENT, "int8")
    scale = 1 / 127
    assert encoded["w"].tolist() == [127, 1, -1, 0]
    expected = delta - torch.tensor([127, 1, -1, 0]) * scale
    assert torch.allclose(residual["w"], expected, atol=1e-7)


def test_fp16_sends_the_delta_in_half_precision():
    local = _local([1e-4, -0.3, 2.0, 1 / 3])
    encoded, residual = encode_update(local, SENT, "fp16")
    assert encoded["w"].dtype == torch.float16
    delta = local["w"] - SENT["w"]  # in float32, as the client computes it
    half = delta.half().float()
    assert torch.equal(decode_update(encoded, SENT, "fp16")["w"], SENT["w"] + half)
    assert torch.equal(residual["w"], delta - half) and residual["w"].abs().max() > 0


def test_topk_keeps_the_largest_entries_and_the_rest_waits():
    sent = {"w": torch.zeros(5)}
    local = {"w": torch.tensor([0.1, -0.5, 0.3, 0.0, 0.2])}
    encoded, residual = encode_update(local, sent, "topk", topk_fraction=0.4)  # ceil(2.0) = 2
    assert encoded["w|index"].tolist() == [1, 2] and encoded["w|index"].dtype == torch.int32
    assert encoded["w|value"].tolist() == pytest.approx([-0.5, 0.3])
    assert decode_update(encoded, sent, "topk")["w"].tolist() == pytest.approx([0, -0.5, 0.3, 0, 0])
    assert residual["w"].tolist() == pytest.approx([0.1, 0, 0, 0, 0.2])
    # Next round the residual joins a zero update: 0.1 and 0.2 now go out.
    encoded, residual = encode_update(sent, sent, "topk", topk_fraction=0.4, residual=residual)
    assert encoded["w|index"].tolist() == [0, 4]
    assert residual["w"].abs().sum().item() == pytest.approx(0)


@pytest.mark.parametrize("method", ["fp16", "int8", "topk"])
def test_error_feedback_loses_nothing_over_rounds(method):
    """What was decoded over the rounds plus the last residual is exactly what was learnt."""
    gen = torch.Generator().manual_seed(0)
    sent = {"w": torch.zeros(50)}
    residual, decoded_sum, delta_sum = None, torch.zeros(50), torch.zeros(50)
    for _ in range(4):
        delta = torch.randn(50, generator=gen)
        encoded, residual = encode_update({"w": delta}, sent, method, 0.1, residual)
        decoded_sum += decode_update(encoded, sent, method)["w"]
        delta_sum += delta
    assert torch.allclose(decoded_sum + residual["w"], delta_sum, atol=1e-5)


def test_bytes_shrink_as_documented():
    sent = {"w": torch.zeros(1000)}
    local = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(1))}

    def size(method):
        encoded, _ = encode_update(local, sent, method, 0.1)
        return sum(t.numel() * t.element_size() for t in encoded.values())

    assert size("none") == 4000 and size("fp16") == 2000 and size("int8") == 1004
    assert size("topk") == 100 * (4 + 4)


@pytest.mark.parametrize("method, tamper, message", [
    ("int8", lambda e: e.pop("w|scale"), "missing ['w|scale']"),
    ("int8", lambda e: e.update({"w": e["w"].float()}), "array 'w' has dtype torch.float32"),
    ("fp16", lambda e: e.update({"w": e["w"][:2]}), "array 'w' has shape (2,), expected (4,)"),
    ("fp16", lambda e: e.update({"w": torch.full((4,), float("nan")).half()}), "NaN or Inf"),
    ("fp16", lambda e: e.update({"extra": torch.zeros(1)}), "unexpected ['extra']"),
    ("topk", lambda e: e.update({"w|index": torch.tensor([0, 9], dtype=torch.int32)}),
     "indices outside [0, 4)"),
    ("topk", lambda e: e.update({"w|index": torch.tensor([1, 1], dtype=torch.int32)}),
     "repeats an index"),
    ("topk", lambda e: e.update({"w|value": torch.zeros(3)}), "must be 1-D of one length"),
])
def test_a_bad_encoded_update_names_the_array(method, tamper, message):
    encoded, _ = encode_update(_local([0.5, -0.2, 0.1, 0.0]), SENT, method, 0.5)
    tamper(encoded)
    with pytest.raises(ValueError) as info:
        decode_update(encoded, SENT, method)
    assert message in str(info.value)


def test_the_keys_are_validated():
    assert RunConfig.from_mapping({"update-compression": "topk", "topk-fraction": 0.05}).train \
        == TrainConfig(update_compression="topk", topk_fraction=0.05)
    with pytest.raises(ConfigError, match="'update-compression': expected one of"):
        RunConfig.from_mapping({"update-compression": "zip"})
    with pytest.raises(ConfigError, match="'topk-fraction'"):
        RunConfig.from_mapping({"topk-fraction": 0.0})


class _Grid:
    def get_node_ids(self):
        return [11, 12, 13]


def _encoded_reply(instruction, local, sent, method, num_examples):
    encoded, _ = encode_update(local, sent, method, 0.5)
    losses = {key: 1.0 for key in train_metric_names(TrainConfig()) if key != "num-examples"}
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=encoded),
                          "metrics": MetricRecord({"num-examples": num_examples, **losses})})
    return Message(content, reply_to=instruction)


def test_the_strategy_averages_the_decoded_models_and_leaves_out_a_bad_one():
    sent = {"w": torch.zeros(2, 2), "n": torch.tensor(3)}
    strategy = PMAFL(TrainConfig(update_compression="int8"), min_available_nodes=3, min_train_nodes=2)
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, ArrayRecord(torch_state_dict=sent), ConfigRecord(), _Grid())}
    assert messages[11].content["config"]["update-compression"] == "int8"
    # Entries on each update's quantisation grid (scales 0.01 and 0.02): int8 is exact here.
    locals_ = {11: torch.tensor([[1.27, -0.5], [0.25, 0.0]]), 12: torch.tensor([[-2.54, 0.0], [0.02, 1.0]])}
    replies = [_encoded_reply(messages[i], {"w": locals_[i], "n": torch.tensor(5)}, sent, "int8", n)
               for i, n in ((11, 10), (12, 30))]
    bad = _encoded_reply(messages[13], {"w": torch.ones(2, 2), "n": torch.tensor(5)}, sent, "int8", 60)
    bad.content["arrays"] = ArrayRecord({"w": Array(np.zeros((2, 2), np.int8)),
                                         "n": Array(np.asarray(5))})  # its scale is missing
    received = payload_bytes(replies)
    # Per reply: int8 weights (4 bytes), a float32 scale (4), the int64 counter (8), and the
    # 128-byte .npy header of each of the three arrays.
    assert received == 2 * (4 + 4 + 8 + 3 * 128)
    arrays, _ = strategy.aggregate_train(1, [*replies, bad])
    manual = (10 * locals_[11] + 20 * locals_[12]) / 30  # 30 examples weigh the median claim, 20
    assert np.allclose(arrays["w"].numpy(), manual.numpy(), atol=1e-5)
    assert arrays["n"].numpy() == 5 and arrays["w"].dtype == "float32"
    (failure,) = strategy.failures[1]
    assert failure["node"] == 13 and "int8 update: arrays missing ['w|scale']" in failure["reason"]
