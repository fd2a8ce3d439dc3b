"""The ServerApp's main with real ClientApp handlers behind an in-process grid."""

import json

import pytest
import torch
from flwr.app import ArrayRecord
from inprocess import InProcessGrid

from client_app.app import evaluate, train
from pmafl.assembly import build_model, load_data
from pmafl.config import RunConfig
from pmafl.results import (
    CheckpointError,
    checkpoint_files,
    load_checkpoint,
    save_checkpoint,
    without_timing,
)
from pmafl.teacher import prepare_teacher
from server_app.app import main


def run_federation(tmp_path, shuffle_seed=None, **overrides):
    run_config = {"num-server-rounds": 2, "federated-eval-every": 1, "local-epochs": 1, "pgd-steps": 2,
                  "eval-steps": 3,
                  "teacher-epochs": 1, "teacher-objective": "ce", "results-dir": str(tmp_path / "results"),
                  "teacher-cache-dir": str(tmp_path / "teachers"), **overrides}
    nodes = {100 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}
    grid = InProcessGrid({"train": train, "evaluate": evaluate}, nodes, run_config, shuffle_seed)
    main(grid, grid.contexts[100])
    [folder] = (tmp_path / "results").iterdir()
    return folder, json.loads((folder / "results.json").read_text())


def test_federation_writes_per_round_results(tmp_path):
    folder, results = run_federation(tmp_path)
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert all(r["failures"] == [] for r in results["rounds"])
    assert all(0 <= r["clean_acc"] <= 1 and 0 <= r["pgd_acc"] <= 1 for r in results["rounds"])
    assert results["config"] == RunConfig.from_mapping(results["config"]).to_dict()
    assert (folder / "accuracy.png").exists()
    # Federated evaluation after every round: the mean over the 3 nodes and the worst of them.
    for row in results["rounds"][1:]:
        assert row["fed_num_clients"] == 3
        assert 0 <= row["fed_worst_pgd_acc"] <= row["fed_pgd_acc"] <= 1
        assert row["fed_worst_clean_acc"] <= row["fed_clean_acc"]
    # Bytes: each round sends the global model to 3 nodes to train and to 3 to evaluate, and gets
    # 3 models back; the evaluate replies carry no arrays.
    cfg = RunConfig.from_mapping(results["config"])
    model = ArrayRecord(build_model(cfg, load_data(cfg)).state_dict())
    model_bytes = sum(len(array.data) for array in model.values())
    for row in results["rounds"][1:]:
        assert row["bytes_sent"] == 6 * model_bytes and row["bytes_received"] == 3 * model_bytes
        assert row["train_replies"] == 3
        # Timing: the slowest node's own compute within its exchange, both within the round; the
        # nodes' compute-seconds never reach the averaged metrics.
        assert 0 < row["train_compute_seconds"] <= row["train_seconds"]
        assert 0 < row["evaluate_compute_seconds"] <= row["evaluate_seconds"]
        assert row["train_seconds"] + row["evaluate_seconds"] <= row["round_seconds"]
        assert "compute_seconds" not in row and "startup_seconds" not in row
        assert row["train_startup_seconds"] >= 0 and row["evaluate_startup_seconds"] >= 0


def test_an_int8_federation_receives_a_quarter_of_the_bytes_and_learns_alike(tmp_path):
    """The whole path: nodes quantise their updates, the server decodes and averages them."""
    overrides = {"objective": "ce", "num-server-rounds": 1, "federated-eval-every": 0}
    _, plain = run_federation(tmp_path / "plain", **overrides)
    _, int8 = run_federation(tmp_path / "int8", **overrides, **{"update-compression": "int8"})
    assert all(r["failures"] == [] for r in int8["rounds"])
    for p, q in zip(plain["rounds"][1:], int8["rounds"][1:], strict=True):
        assert q["bytes_sent"] == p["bytes_sent"]
        assert 0.25 < q["bytes_received"] / p["bytes_received"] < 0.3  # 1 byte a weight, and headers
        assert abs(q["clean_acc"] - p["clean_acc"]) < 0.05


def test_eps_warmup_ramps_the_radius_the_nodes_train_at(tmp_path):
    sent = []

    class Recording(InProcessGrid):
        def push_messages(self, messages):
            messages = list(messages)
            sent.extend((m.metadata.message_type, m.content["config"]["eps"]) for m in messages)
            return super().push_messages(messages)

    run_config = {"num-server-rounds": 3, "federated-eval-every": 3, "local-epochs": 1,
                  "pgd-steps": 1, "eval-steps": 2, "objective": "pgd-at", "eps-warmup-rounds": 2,
                  "results-dir": str(tmp_path / "results")}
    nodes = {100 + i: {"partition-id": i, "num-partitions": 2} for i in range(2)}
    grid = Recording({"train": train, "evaluate": evaluate}, nodes, run_config)
    main(grid, grid.contexts[100])
    assert [eps for kind, eps in sent if kind == "train"] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.2, 0.2])
    assert [eps for kind, eps in sent if kind == "evaluate"] == pytest.approx([0.2, 0.2])  # full eps
    [folder] = (tmp_path / "results").iterdir()
    rows = json.loads((folder / "results.json").read_text())["rounds"]
    assert [r["train_eps"] for r in rows] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert all(0 <= r["fgsm_acc"] <= 1 for r in rows)


def test_same_seed_same_per_round_metrics_whatever_the_reply_order(tmp_path):
    """Two runs with one seed, their replies arriving in different orders: identical metrics."""
    _, first = run_federation(tmp_path / "a", shuffle_seed=1, **{"num-server-rounds": 3})
    _, second = run_federation(tmp_path / "b", shuffle_seed=2, **{"num-server-rounds": 3})
    assert without_timing(first["rounds"]) == without_timing(second["rounds"])
    _, other_seed = run_federation(tmp_path / "c", seed=1, **{"num-server-rounds": 3})
    assert without_timing(other_seed["rounds"]) != without_timing(first["rounds"])


def test_every_node_failing_leaves_the_initial_model_and_a_record(tmp_path):
    # The nodes hold a teacher, but not the one the run names.
    cfg = RunConfig.from_mapping({"teacher-epochs": 1, "teacher-objective": "ce"})
    prepare_teacher(cfg, load_data(cfg), str(tmp_path / "teachers"))
    folder, results = run_federation(tmp_path, **{"teacher-sha256": "0" * 64, "num-server-rounds": 1})
    [failure_round] = [r for r in results["rounds"] if r["failures"]]
    assert sorted(f["node"] for f in failure_round["failures"]) == [100, 101, 102]
    assert all("the run expects " + "0" * 64 in f["reason"] for f in failure_round["failures"])
    cfg = RunConfig.from_mapping(results["config"])
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg, load_data(cfg)).state_dict()
    saved = torch.load(folder / "model.pt")
    assert all(torch.equal(initial[k], saved[k]) for k in initial)


class CrashAt(InProcessGrid):
    """Dies like a killed ServerApp when the train messages of round `crash_round` are sent."""

    def __init__(self, crash_round, *args):
        super().__init__(*args)
        self.crash_round = crash_round

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train" and \
                messages[0].content["config"]["server-round"] == self.crash_round:
            raise SystemExit("killed")
        return super().push_messages(messages)


@pytest.mark.parametrize("finetune", ["off", "fedftg"])
def test_killed_run_resumes_from_its_checkpoint_to_the_same_metrics(tmp_path, finetune):
    """With FedFTG, the checkpoint carries its generator and optimiser: the resumed run's
    server fine-tuning, and so its metrics, match the uninterrupted run's."""
    _, uninterrupted = run_federation(tmp_path / "a", **{"num-server-rounds": 3,
                                                         "server-finetune": finetune})
    run_config = {"num-server-rounds": 3, "federated-eval-every": 1, "local-epochs": 1, "pgd-steps": 2,
                  "eval-steps": 3, "teacher-epochs": 1, "teacher-objective": "ce",
                  "results-dir": str(tmp_path / "b"), "teacher-cache-dir": str(tmp_path / "a" / "teachers"),
                  "server-finetune": finetune}
    nodes = {100 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}
    grid = CrashAt(3, {"train": train, "evaluate": evaluate}, nodes, run_config)
    with pytest.raises(SystemExit):
        main(grid, grid.contexts[100])
    [folder] = (tmp_path / "b").iterdir()
    assert not (folder / "results.json").exists()
    checkpoint = load_checkpoint(folder, RunConfig.from_mapping(run_config).to_dict())
    assert checkpoint["round"] == 2 and [r["round"] for r in checkpoint["rounds"]] == [0, 1, 2]
    # A different config is refused, naming the key.
    with pytest.raises(CheckpointError, match="key 'lr' is 0.01 but the checkpoint"):
        load_checkpoint(folder, RunConfig.from_mapping({**run_config, "lr": 0.01}).to_dict())
    resumed = {**run_config, "resume-from": str(folder)}
    grid = InProcessGrid({"train": train, "evaluate": evaluate}, nodes, resumed, shuffle_seed=3)
    main(grid, grid.contexts[100])
    results = json.loads((folder / "results.json").read_text())
    # Wall-clock times differ between runs; everything else is identical.
    assert without_timing(results["rounds"]) == without_timing(uninterrupted["rounds"])
    if finetune == "fedftg":
        assert all(r["fedftg_clients"] == 3 and r["fedftg_loss_kd"] > 0 for r in results["rounds"][1:])


def test_a_crash_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, monkeypatch):
    config = RunConfig().to_dict()
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, [{"round": 0}, {"round": 1}], config)

    def dies_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, [], config)
    monkeypatch.undo()
    checkpoint = load_checkpoint(tmp_path, config)
    assert checkpoint["round"] == 1 and torch.equal(checkpoint["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-round0001.pt"]
    (tmp_path / "checkpoint-round0001.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        load_checkpoint(tmp_path, config)


def test_the_last_checkpoints_are_kept_and_a_run_can_step_back_to_one(tmp_path):
    config = {**RunConfig().to_dict(), "num-server-rounds": 10}
    for server_round in range(1, 6):
        save_checkpoint(tmp_path, server_round, {"w": torch.full((3,), float(server_round))},
                        [{"round": r} for r in range(server_round + 1)], config, keep=3)
    assert [p.name for p in checkpoint_files(tmp_path)] == [
        "checkpoint-round0003.pt", "checkpoint-round0004.pt", "checkpoint-round0005.pt"]
    assert load_checkpoint(tmp_path, config)["round"] == 5  # a folder: its newest
    older = load_checkpoint(tmp_path / "checkpoint-round0003.pt", config)
    assert older["round"] == 3 and torch.equal(older["model"]["w"], torch.full((3,), 3.0))
    # Resumed from round 3, the run's round 4 replaces the old branch's later checkpoints.
    save_checkpoint(tmp_path, 4, {"w": torch.zeros(3)}, [], config, keep=3)
    assert [p.name for p in checkpoint_files(tmp_path)] == [
        "checkpoint-round0003.pt", "checkpoint-round0004.pt"]
    assert torch.equal(load_checkpoint(tmp_path, config)["model"]["w"], torch.zeros(3))


def test_results_and_model_are_written_atomically(tmp_path, monkeypatch):
    import pmafl.results as results_module
    from pmafl.results import write_results

    model = torch.nn.Linear(2, 2)
    write_results(tmp_path, RunConfig().to_dict(), [{"round": 0, "clean_acc": 0.5, "pgd_acc": 0.1,
                                                     "failures": []}], model)
    before = {name: (tmp_path / name).read_bytes() for name in ("results.json", "model.pt")}

    def dies_half_way(obj, f):
        f.write(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        write_results(tmp_path, RunConfig().to_dict(), [], model)
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    # results.json too (written after model.pt): a file opened for writing in place would be
    # empty by the time its content fails to serialise.
    monkeypatch.undo()

    class DiesWhileSerialising:
        @staticmethod
        def dumps(*args, **kwargs):
            raise KeyboardInterrupt

    monkeypatch.setattr(results_module, "json", DiesWhileSerialising)
    with pytest.raises(KeyboardInterrupt):
        write_results(tmp_path, RunConfig().to_dict(), [], model)
    assert (tmp_path / "results.json").read_bytes() == before["results.json"]


def test_a_run_stopped_before_any_round_is_summarised(tmp_path):
    from pmafl.results import summary, write_results

    write_results(tmp_path, RunConfig().to_dict(), [], torch.nn.Linear(2, 2), stopped="no nodes")
    text = summary(tmp_path)
    assert ", 0 rounds," in text and "STOPPED before its last round: no nodes" in text


def test_a_backdoored_teachers_trigger_is_scored_every_round(tmp_path):
    from pmafl.assembly import backdoor_trigger, eval_split
    from pmafl.backdoor import attack_success_rate
    from pmafl.results import summary

    folder, results = run_federation(tmp_path, **{"backdoor-rate": 0.1, "num-server-rounds": 1})
    assert all(0 <= r["asr"] <= 1 for r in results["rounds"])
    assert "backdoor_asr" in summary(folder)
    # The last row's ASR is the final model's, computed independently on the evaluation images.
    cfg = RunConfig.from_mapping(results["config"])
    data = load_data(cfg)
    model = build_model(cfg, data)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    images, labels = eval_split(cfg, data).tensors()
    assert results["rounds"][-1]["asr"] == attack_success_rate(model, images, labels,
                                                               backdoor_trigger(cfg, data))
    # pmafl-evaluate finds the trigger in the run's results.json.
    from pmafl.eval_cli import run as evaluate_cli

    report = evaluate_cli([str(folder / "model.pt"), "--attacks", "fgsm", "--sweep", "0"])
    assert report["asr"] == results["rounds"][-1]["asr"]
    _, clean = run_federation(tmp_path / "clean", **{"num-server-rounds": 1})
    assert all("asr" not in r for r in clean["rounds"])


def test_a_checkpoint_that_pickles_code_is_refused(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"round": 1, "model": {}, "rounds": "[]", "config": "{}", "x": Payload()},
               tmp_path / "checkpoint-round0001.pt")
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        load_checkpoint(tmp_path, RunConfig().to_dict())
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_older_than_a_key_resumes_at_that_keys_default(tmp_path):
    """A checkpoint written before `robustkd-weight` existed holds no such key: it resumes a run
    that leaves the key at its default, and is refused for one that sets it."""
    config = RunConfig().to_dict()
    older = {k: v for k, v in config.items() if k != "robustkd-weight"}
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, [{"round": 1}], older)
    assert load_checkpoint(tmp_path, config)["round"] == 1
    with pytest.raises(CheckpointError, match="'robustkd-weight' is 1.0 but the checkpoint"):
        load_checkpoint(tmp_path, RunConfig.from_mapping({"robustkd-weight": 1.0}).to_dict())


def test_client_metrics_cannot_overwrite_the_servers_columns():
    from flwr.app import MetricRecord
    from flwr.serverapp.strategy import Result

    from server_app.app import round_row
    from strategies import PMAFL

    result = Result()
    result.evaluate_metrics_serverapp[1] = MetricRecord({"clean_acc": 0.5, "pgd_acc": 0.25})
    result.train_metrics_clientapp[1] = MetricRecord({"loss": 1.0, "clean-acc": 1.0, "pgd_acc": 1.0,
                                                      "round": 99.0, "train-eps": 9.0})
    strategy = PMAFL()
    strategy.round_stats = {1: {"round-seconds": 2.0, "discarded": "array 'w' holds NaN or Inf values"}}
    row = round_row(1, result, strategy)
    assert row["clean_acc"] == 0.5 and row["pgd_acc"] == 0.25 and row["loss"] == 1.0
    assert row["round"] == 1 and row["train_eps"] == strategy.round_eps(1)
    assert row["failures"] == [{"stage": "aggregate", "node": None,
                                "reason": "array 'w' holds NaN or Inf values"}]
    assert list(row)[0] == "round" and "discarded" not in row


def test_a_stalled_run_writes_the_results_of_its_completed_rounds(tmp_path):
    """Round 2's replies are all unusable (max-idle-rounds 1): the run stops, with results.json
    holding round 0 and 1 and the reason, and model.pt round 1's model."""
    from flwr.app import Error, Message

    from strategies import FederationStalled

    def failing_from_round_2(msg, context):
        if msg.content["config"]["server-round"] >= 2:
            return Message(Error(code=2, reason="node broken"), reply_to=msg)
        return train(msg, context)

    run_config = {"num-server-rounds": 3, "federated-eval-every": 0, "local-epochs": 1, "pgd-steps": 2,
                  "eval-steps": 3, "teacher-epochs": 1, "teacher-objective": "ce", "max-idle-rounds": 1,
                  "results-dir": str(tmp_path / "results"), "teacher-cache-dir": str(tmp_path / "teachers")}
    nodes = {100 + i: {"partition-id": i, "num-partitions": 3} for i in range(3)}
    grid = InProcessGrid({"train": failing_from_round_2, "evaluate": evaluate}, nodes, run_config)
    with pytest.raises(FederationStalled):
        main(grid, grid.contexts[100])
    [folder] = (tmp_path / "results").iterdir()
    results = json.loads((folder / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    assert "1 rounds in a row with fewer than min-train-nodes" in results["stopped"]
    config = RunConfig.from_mapping(run_config).to_dict()
    round_1 = load_checkpoint(folder / "checkpoint-round0001.pt", config)
    saved = torch.load(folder / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in round_1["model"].items())


def test_a_q_ffl_federation_trains_and_evaluates_every_round(tmp_path):
    """fair-q end to end: nodes report global-loss, the server reweights the train mean, and
    federated evaluation (no global-loss in its replies) still runs every round."""
    _, results = run_federation(tmp_path, **{"objective": "ce", "fair-q": 5.0})
    assert results["config"]["fair-q"] == 5.0
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    for row in results["rounds"][1:]:
        assert row["failures"] == [] and row["train_replies"] == 3 and row["fed_num_clients"] == 3
