"""The ClientApp's train and evaluate handlers, in process and on the node's warm worker."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client_app.app import _process_age, evaluate, train
from pmafl.assembly import build_model, client_split, client_test_split, load_data
from pmafl.compression import decode_update
from pmafl.config import RunConfig, TrainConfig
from pmafl.evaluate import evaluate as evaluate_model
from pmafl.teacher import TeacherError, prepare_teacher

RUN = {"teacher-epochs": 1, "teacher-objective": "ce", "num-server-rounds": 1}


@pytest.fixture
def teachers(tmp_path):
    """A teacher cache holding the run's teacher, as the ServerApp prepares it before round 1."""
    prepare_teacher(RunConfig.from_mapping(RUN), load_data(RunConfig.from_mapping(RUN)), str(tmp_path))
    return tmp_path


def instruction(cfg, train_config, server_round=1):
    torch.manual_seed(0)
    model = build_model(cfg, load_data(cfg))
    config = ConfigRecord({**train_config.to_record(), "server-round": server_round})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
    return Message(content, dst_node_id=7, message_type="train"), model


def context(tmp_path, **node):
    node_config = {"partition-id": 3, "num-partitions": 10, "teacher-cache-dir": str(tmp_path), **node}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=RUN)


def test_train_handler_trains_the_partition_and_caches_teacher_logits(teachers):
    tmp_path = teachers
    cfg = RunConfig.from_mapping(RUN)
    train_config = TrainConfig(local_epochs=1, pgd_steps=2)
    msg, model = instruction(cfg, train_config)
    ctx = context(tmp_path)
    reply = train(msg, ctx)
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    partition = client_split(cfg, load_data(cfg), 3, 10)
    assert metrics["num-examples"] == len(partition)
    assert all(np.isfinite(metrics[k]) for k in ("loss", "loss-vkd", "loss-akd", "loss-alg"))
    sent, received = model.state_dict(), reply.content["arrays"].to_torch_state_dict()
    assert set(sent) == set(received)
    assert any(not torch.equal(sent[k], received[k]) for k in sent)
    # Teacher logits on the partition are computed once and kept in the node's state.
    cached = ctx.state["teacher-cache"].to_torch_state_dict()["logits"]
    assert cached.shape == (len(partition), 10)
    ctx.state["teacher-cache"] = ArrayRecord(torch_state_dict={"logits": torch.zeros_like(cached)})
    train(msg, ctx)
    assert torch.equal(ctx.state["teacher-cache"].to_torch_state_dict()["logits"], torch.zeros_like(cached))


def test_kdiga_caches_the_teachers_input_gradients_with_its_logits(teachers):
    tmp_path = teachers
    cfg = RunConfig.from_mapping(RUN)
    msg, _ = instruction(cfg, TrainConfig(objective="kdiga", kdiga_weight=1.0, local_epochs=1))
    ctx = context(tmp_path)
    metrics = train(msg, ctx).content["metrics"]
    assert metrics["loss-ga"] > 0 and np.isfinite(metrics["loss"])
    cached = ctx.state["teacher-cache"].to_torch_state_dict()
    images, labels = client_split(cfg, load_data(cfg), 3, 10).tensors()
    teacher = prepare_teacher(cfg, load_data(cfg), str(tmp_path))[0]
    x = images.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(teacher(x), labels, reduction="sum").backward()
    assert torch.allclose(cached["input-grads"], x.grad, atol=1e-6)


def test_same_seed_same_reply(tmp_path):
    cfg = RunConfig.from_mapping(RUN)
    msg, _ = instruction(cfg, TrainConfig(objective="pgd-at", local_epochs=1, pgd_steps=2))
    first = train(msg, context(tmp_path)).content["arrays"].to_torch_state_dict()
    second = train(msg, context(tmp_path)).content["arrays"].to_torch_state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_teacher_checksum_mismatch_fails_on_the_node(teachers):
    tmp_path = teachers
    run = {**RUN, "teacher-sha256": "f" * 64}
    cfg = RunConfig.from_mapping(run)
    msg, _ = instruction(cfg, TrainConfig(local_epochs=1, pgd_steps=1))
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 10,
                                                    "teacher-cache-dir": str(tmp_path)},
                  state=RecordDict(), run_config=run)
    with pytest.raises(TeacherError, match="the run expects " + "f" * 64):
        train(msg, ctx)


def test_missing_partition_id_is_explained(tmp_path):
    cfg = RunConfig.from_mapping(RUN)
    msg, _ = instruction(cfg, TrainConfig(objective="ce"))
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=RUN)
    with pytest.raises(ValueError, match="node config lacks 'partition-id'"):
        train(msg, ctx)


def test_reply_does_not_depend_on_what_the_process_loaded_before(teachers):
    tmp_path = teachers
    """Ray reuses processes across nodes: whether the teacher is already loaded in this process
    must not change a node's training."""
    from pmafl.teacher.prepare import _cached_teacher

    cfg = RunConfig.from_mapping(RUN)
    msg, _ = instruction(cfg, TrainConfig(local_epochs=1, pgd_steps=2))
    _cached_teacher.cache_clear()
    fresh = train(msg, context(tmp_path)).content["arrays"].to_torch_state_dict()  # loads it
    warm = train(msg, context(tmp_path)).content["arrays"].to_torch_state_dict()  # already loaded
    assert all(torch.equal(fresh[k], warm[k]) for k in fresh)


def test_evaluate_handler_scores_the_local_test_split(tmp_path):
    cfg = RunConfig.from_mapping(RUN)
    msg, model = instruction(cfg, TrainConfig(eps=0.1), server_round=4)
    msg = Message(msg.content, dst_node_id=7, message_type="evaluate")
    reply = evaluate(msg, context(tmp_path))
    metrics = reply.content["metrics"]
    data = load_data(cfg)
    split = client_test_split(cfg, data, 3, 10)
    # 1/10 of the 359 test images is 35: the floor of 100 applies, in the partition's proportions.
    assert metrics["num-examples"] == len(split) == 100
    partition = np.bincount(client_split(cfg, data, 3, 10).labels.numpy(), minlength=10)
    classes = np.flatnonzero(np.bincount(split.labels.numpy(), minlength=10))
    assert set(classes) <= set(np.flatnonzero(partition))
    images, labels = split.tensors()
    torch.manual_seed(0)
    clean = evaluate_model(model, images, labels, 0.1, cfg.eval_steps)
    assert metrics["clean_acc"] == clean["clean_acc"]
    assert metrics["clean_loss"] == pytest.approx(clean["clean_loss"])
    assert 0 <= metrics["pgd_acc"] <= metrics["clean_acc"]


def test_train_reply_carries_label_counts_when_fedftg_asks(tmp_path):
    cfg = RunConfig.from_mapping(RUN)
    msg, _ = instruction(cfg, TrainConfig(objective="ce", local_epochs=1))
    assert "label-counts" not in train(msg, context(tmp_path)).content["metrics"]
    msg.content["config"]["label-counts"] = True
    metrics = train(msg, context(tmp_path)).content["metrics"]
    labels = client_split(cfg, load_data(cfg), 3, 10).labels
    assert metrics["label-counts"] == [int((labels == c).sum()) for c in range(10)]
    assert sum(metrics["label-counts"]) == metrics["num-examples"]


def test_robustkd_distils_from_the_vetted_teacher_and_keeps_its_connectors(teachers):
    from pmafl.robustkd import VetResult
    from pmafl.teacher import TeacherSettings, teacher_path, write_vet

    tmp_path = teachers
    run = {**RUN, "robustkd-weight": 1.0}
    cfg = RunConfig.from_mapping(run)
    msg, _ = instruction(cfg, cfg.train)
    ctx = context(tmp_path)
    ctx.run_config = run
    with pytest.raises(TeacherError, match="pmafl-teacher vet"):
        train(msg, ctx)
    mask = torch.zeros(128)
    mask[:8] = 1.0
    write_vet(teacher_path(tmp_path, TeacherSettings.from_run_config(cfg)),
              VetResult([5.0] * 10, 3.0, 0, torch.zeros(8, 8), torch.zeros(1, 8, 8), "net.7", mask,
                        torch.zeros(128)))
    metrics = train(msg, ctx).content["metrics"]
    assert metrics["loss-feat"] > 0 and np.isfinite(metrics["loss"])
    stored = ctx.state["add-on:robustkd"].to_torch_state_dict()
    assert stored["connectors.0.0.weight"].shape == (64, 32, 1, 1)
    # The next round starts from the stored connectors, not from fresh ones.
    fresh = context(tmp_path)
    fresh.run_config = run
    zeroed = {k: torch.zeros_like(v) if k.endswith("0.weight") else v for k, v in stored.items()}
    ctx.state["add-on:robustkd"] = ArrayRecord(torch_state_dict=zeroed)
    assert train(msg, ctx).content["metrics"]["loss-feat"] != pytest.approx(
        train(msg, fresh).content["metrics"]["loss-feat"])


def test_a_later_round_reads_the_partition_from_the_node_state(teachers, monkeypatch):
    """Deployment starts a ClientApp process per message: after the first, the node's partition and
    local test split come from its state, not from the dataset, and train exactly as before."""
    cfg = RunConfig.from_mapping(RUN)
    train_config = TrainConfig(local_epochs=1, pgd_steps=2)
    ctx = context(teachers)
    first = train(instruction(cfg, train_config)[0], ctx)
    kept = ctx.state["node-data"].to_torch_state_dict()
    partition = client_split(cfg, load_data(cfg), 3, 10)
    assert torch.equal(kept["train-images"], partition.images)
    assert torch.equal(kept["test-labels"], client_test_split(cfg, load_data(cfg), 3, 10).labels)
    assert first.content["metrics"]["compute-seconds"] > 0

    def no_dataset(*args):
        raise AssertionError("the dataset was loaded again")

    monkeypatch.setattr("client_app.handlers.node_data", no_dataset)
    again = train(instruction(cfg, train_config)[0], ctx)
    assert evaluate(instruction(cfg, train_config)[0], ctx).content["metrics"]["num-examples"] == \
        len(kept["test-labels"])
    for key, array in first.content["arrays"].items():
        assert np.array_equal(array.numpy(), again.content["arrays"][key].numpy())
    # Another run config (here another seed) is another partition: made afresh.
    with pytest.raises(AssertionError, match="loaded again"):
        ctx.run_config = {**RUN, "seed": 1}
        train(instruction(cfg, train_config)[0], ctx)


def test_only_the_first_message_of_a_process_reports_its_startup(teachers, monkeypatch):
    """In deployment each message is a fresh process, whose start-up (interpreter, imports, data,
    teacher) is overhead: its first reply says how long it took; a later one in the same process
    (a simulation's actor) says nothing."""
    monkeypatch.setattr("client_app.app._started_compute", False)
    cfg = RunConfig.from_mapping(RUN)
    train_config = TrainConfig(local_epochs=1, pgd_steps=1)
    ctx = context(teachers)
    first = train(instruction(cfg, train_config)[0], ctx).content["metrics"]
    age = _process_age()
    assert 0 < first["startup-seconds"] < age
    assert "startup-seconds" not in train(instruction(cfg, train_config)[0], ctx).content["metrics"]
    assert "startup-seconds" not in evaluate(instruction(cfg, train_config)[0], ctx).content["metrics"]


def test_process_age_is_the_time_since_the_process_started():
    """Against the parent's clock: a child that sleeps 1 s after starting reports at least that,
    and at most the time the parent waited for it."""
    code = "import time; time.sleep(1.0); from client_app.app import _process_age; print(_process_age())"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1]).stdout
    elapsed = time.monotonic() - start
    assert 1.0 <= float(out) <= elapsed + 0.02  # /proc counts in 10 ms ticks


def test_num_threads_node_config_sets_torch_threads_and_rejects_bad_values(teachers):
    cfg = RunConfig.from_mapping(RUN)
    msg = instruction(cfg, TrainConfig(local_epochs=1, pgd_steps=1))[0]
    before = torch.get_num_threads()
    try:
        assert not train(msg, context(teachers, **{"num-threads": 1})).has_error()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="node config key 'num-threads': expected a non-negative"):
        train(msg, context(teachers, **{"num-threads": -2}))


def test_a_compressed_reply_decodes_to_the_trained_model_up_to_what_the_residual_keeps(tmp_path):
    """`update-compression=topk`: the reply carries each tensor's largest update entries; the model
    the server decodes plus the residual the node keeps is the model it trained."""
    cfg = RunConfig.from_mapping(RUN)
    plain_msg, model = instruction(cfg, TrainConfig(objective="ce", local_epochs=1))
    trained = train(plain_msg, context(tmp_path)).content["arrays"].to_torch_state_dict()
    msg, _ = instruction(cfg, TrainConfig(objective="ce", local_epochs=1, update_compression="topk",
                                          topk_fraction=0.25))
    ctx = context(tmp_path)
    encoded = train(msg, ctx).content["arrays"].to_torch_state_dict()
    sent = model.state_dict()
    assert any(k.endswith("|index") for k in encoded)
    decoded = decode_update(encoded, sent, "topk")
    residual = ctx.state["compression-residual"].to_torch_state_dict()
    for key, value in trained.items():
        if value.is_floating_point():
            assert torch.allclose(decoded[key] + residual[key], value, atol=1e-6), key
            kept = encoded[key + "|index"].numel()
            assert kept == math.ceil(0.25 * value.numel())
        else:
            assert torch.equal(decoded[key], value)


def test_asking_for_cuda_without_one_names_the_ray_gpu_resource(monkeypatch):
    from pmafl.assembly import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="client-resources-num-gpus > 0"):
        resolve_device("cuda")


# The warm worker: deployment's fresh ClientApp processes hand their messages to it.

def worker_pids(folder):
    """The pids of the workers that logged their start in `folder`, in order."""
    return [int(line.split()[2]) for log in sorted(folder.glob("*.log"))
            for line in log.read_text().splitlines() if line.startswith("warm worker ")]


def stop(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_warm_worker_replies_as_the_handler_in_process_and_stays_up(teachers, tmp_path_factory):
    from client_app import handlers
    from client_app.worker import call

    folder = tmp_path_factory.mktemp("workers")
    cfg = RunConfig.from_mapping(RUN)
    content = instruction(cfg, TrainConfig(local_epochs=1, pgd_steps=1))[0].content
    local_ctx, worker_ctx = context(teachers), context(teachers)
    try:
        for round_ in (1, 2):  # the second message finds the worker already up
            local = handlers.train(content, local_ctx)
            started = time.time() - 5.0  # as if the ClientApp process had started 5 s ago
            remote = call("train", content, worker_ctx, started, folder, watch_pid=os.getpid())
            for key, array in local["arrays"].items():
                assert np.array_equal(array.numpy(), remote["arrays"][key].numpy()), (round_, key)
            assert remote["metrics"]["loss"] == local["metrics"]["loss"]
            assert 5.0 <= remote["metrics"]["startup-seconds"] <= time.time() - started
            # The node's state came back from the worker: the same partition and teacher logits.
            assert set(worker_ctx.state.keys()) == set(local_ctx.state.keys())
            for key in ("node-data", "teacher-cache"):
                here, there = local_ctx.state[key], worker_ctx.state[key]
                assert all(np.array_equal(here[k].numpy(), there[k].numpy()) for k in here)
        reply = call("evaluate", content, worker_ctx, None, folder, watch_pid=os.getpid())
        assert reply["metrics"]["num-examples"] == 100 and "startup-seconds" not in reply["metrics"]
        assert len(worker_pids(folder)) == 1  # one worker for all three messages
    finally:
        stop(worker_pids(folder))


def test_a_handler_error_in_the_worker_is_raised_in_the_clientapp(teachers, tmp_path_factory):
    from client_app.worker import call

    folder = tmp_path_factory.mktemp("workers")
    content = instruction(RunConfig.from_mapping(RUN), TrainConfig(objective="ce"))[0].content
    try:
        with pytest.raises(ValueError, match="node config key 'num-threads': expected a non-negative"):
            call("train", content, context(teachers, **{"num-threads": -2}), None, folder, os.getpid())
        # The worker survives its handler's error and answers the next message.
        assert call("train", content, context(teachers), None, folder, os.getpid())["metrics"]["loss"] > 0
        assert len(worker_pids(folder)) == 1
    finally:
        stop(worker_pids(folder))


def test_a_killed_worker_is_replaced_and_a_worker_ends_with_its_node(teachers, tmp_path_factory):
    from client_app.worker import call

    folder = tmp_path_factory.mktemp("workers")
    content = instruction(RunConfig.from_mapping(RUN), TrainConfig(objective="ce"))[0].content
    node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the SuperNode
    try:
        expected = call("train", content, context(teachers), None, folder, node.pid)["arrays"]
        first = worker_pids(folder)[0]
        os.kill(first, signal.SIGKILL)
        again = call("train", content, context(teachers), None, folder, node.pid)["arrays"]
        assert all(np.array_equal(expected[k].numpy(), again[k].numpy()) for k in expected)
        second = worker_pids(folder)[1]
        assert second != first
        node.kill()
        node.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{second}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{second}").exists() or \
            Path(f"/proc/{second}/stat").read_text().split()[2] == "Z"
        assert not (folder / "run1-node7.sock").exists()
    finally:
        node.kill()
        stop(worker_pids(folder))


def test_warm_worker_config_and_folder_are_checked(tmp_path, monkeypatch):
    from client_app.worker import WorkerError, worker_folder

    msg = instruction(RunConfig.from_mapping(RUN), TrainConfig(objective="ce"))[0]
    with pytest.raises(ValueError, match="node config key 'warm-worker': expected true or false, got 'yes'"):
        train(msg, context(tmp_path, **{"warm-worker": "yes"}))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    (tmp_path / f"pmafl-workers-{os.getuid()}").mkdir(mode=0o755)
    os.chmod(tmp_path / f"pmafl-workers-{os.getuid()}", 0o755)
    with pytest.raises(WorkerError, match="must belong to uid .* with mode 0700"):
        worker_folder()


def test_an_exiting_worker_leaves_a_newer_workers_socket_alone(tmp_path):
    """A ClientApp may meet a worker as it exits and start a new one at the same path. The old
    worker then exits without removing the new one's socket and key."""
    from multiprocessing.connection import Listener

    from filelock import FileLock

    socket, keyfile = tmp_path / "run1-node7.sock", tmp_path / "run1-node7.key"
    keyfile.write_bytes(b"k" * 32)
    old = subprocess.Popen([sys.executable, "-c", "import sys; from client_app.worker import serve; "
                            "serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), idle_seconds=0.5)",
                            str(socket), str(keyfile), str(os.getpid())],
                           cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert old.poll() is None and time.monotonic() < deadline, "the worker did not listen"
            time.sleep(0.01)
        with FileLock(str(tmp_path / "run1-node7.lock")):  # as `call` holds it to start a worker
            time.sleep(1.5)  # the old worker is idle now, and waits for the lock
            assert old.poll() is None
            socket.unlink()
            new = Listener(str(socket), family="AF_UNIX", authkey=keyfile.read_bytes())
        assert old.wait(timeout=10) == 0
        assert socket.exists() and keyfile.exists()
        new.close()
    finally:
        old.kill()


def start_worker(folder, watch_pid, **serve_options):
    """A warm worker for run 1, node 7 in `folder`, as `call` starts it but with `serve`'s keyword
    arguments, once it listens."""
    (folder / "run1-node7.key").write_bytes(os.urandom(32))
    options = "".join(f", {key}={value!r}" for key, value in serve_options.items())
    code = ("import sys; from client_app.worker import serve; "
            f"serve(*sys.argv[1:3], int(sys.argv[3]){options})")
    with open(folder / "run1-node7.log", "ab") as log:
        worker = subprocess.Popen([sys.executable, "-c", code, str(folder / "run1-node7.sock"),
                                   str(folder / "run1-node7.key"), str(watch_pid)],
                                  cwd=Path(__file__).resolve().parents[1], stdout=log,
                                  stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while worker.pid not in worker_pids(folder):
        assert worker.poll() is None and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    return worker


def unknown_handler(folder, watch_pid):
    """`call` a handler that does not exist: the worker answers with the KeyError."""
    from client_app.worker import call

    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=RUN)
    with pytest.raises(KeyError, match="no-such-handler") as raised:
        call("no-such-handler", RecordDict(), ctx, None, folder, watch_pid)
    return raised.value


def test_a_client_with_a_wrong_key_is_refused_and_the_worker_serves_the_next(tmp_path):
    from multiprocessing.connection import AuthenticationError, Client

    worker = start_worker(tmp_path, os.getpid())
    try:
        with pytest.raises(AuthenticationError):
            Client(str(tmp_path / "run1-node7.sock"), family="AF_UNIX", authkey=b"wrong key")
        error = unknown_handler(tmp_path, os.getpid())
        assert any("raised in the warm worker run1-node7" in note for note in error.__notes__)
        assert worker.poll() is None and worker_pids(tmp_path) == [worker.pid]  # the same worker
        assert "refused a connection: AuthenticationError" in (tmp_path / "run1-node7.log").read_text()
    finally:
        worker.kill()
        stop(worker_pids(tmp_path))


def test_a_client_that_stalls_holds_the_worker_only_for_the_transfer_timeout(tmp_path):
    """One that connects and sends nothing (in the key challenge), one that passes the challenge
    and sends no message: the worker drops each after `transfer_seconds`, then serves a ClientApp."""
    import socket
    import threading
    from multiprocessing.connection import Client

    node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # the SuperNode
    address = str(tmp_path / "run1-node7.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    served = []
    clientapp = threading.Thread(target=lambda: served.append(unknown_handler(tmp_path, node.pid)),
                                 daemon=True)
    try:
        worker = start_worker(tmp_path, node.pid, transfer_seconds=1.0)
        with Client(address, family="AF_UNIX", authkey=(tmp_path / "run1-node7.key").read_bytes()):
            silent.connect(address)
            clientapp.start()
            clientapp.join(timeout=30)  # the default transfer timeout, for two stalled clients
        assert served, "the worker was still held by the stalled clients"
        assert worker.poll() is None and worker_pids(tmp_path) == [worker.pid]
        log = (tmp_path / "run1-node7.log").read_text()
        assert "dropped a connection before its message came in: BlockingIOError" in log
        assert "refused a connection: BlockingIOError" in log
    finally:
        silent.close()
        node.kill()
        if clientapp.is_alive():
            clientapp.join(timeout=30)
        stop(worker_pids(tmp_path))


def test_call_gives_up_on_a_worker_that_does_not_answer_within_the_round_timeout(tmp_path, monkeypatch):
    """A worker that takes the message and never answers, and one that never takes the connection
    (busy with an earlier message): `call` waits `round-timeout` plus the margin, then says so."""
    import socket
    import threading
    from multiprocessing.connection import Listener

    from client_app.worker import WorkerError, call

    monkeypatch.setattr("client_app.worker.REPLY_MARGIN_SECONDS", 0.0)
    keyfile, address = tmp_path / "run1-node7.key", str(tmp_path / "run1-node7.sock")
    keyfile.write_bytes(os.urandom(32))
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={"round-timeout": 1})
    late = r"warm worker run1-node7 did not answer a train message within 1 s .*its log: .*run1-node7\.log"
    released = threading.Event()
    listener = Listener(address, family="AF_UNIX", authkey=keyfile.read_bytes())

    def hung_worker():
        while not released.is_set():
            with listener.accept() as conn:
                conn.recv()
                released.wait(30)

    threading.Thread(target=hung_worker, daemon=True).start()
    try:
        start = time.monotonic()
        with pytest.raises(WorkerError, match=late):
            call("train", RecordDict(), ctx, None, tmp_path, os.getpid())
        assert 1.0 <= time.monotonic() - start < 20
    finally:
        released.set()
        listener.close()
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # listens, never accepts
    busy.bind(address)
    busy.listen(8)
    try:
        start = time.monotonic()
        with pytest.raises(WorkerError, match=late):
            call("train", RecordDict(), ctx, None, tmp_path, os.getpid())
        assert 1.0 <= time.monotonic() - start < 20
    finally:
        busy.close()


def test_the_reply_timeout_is_the_round_timeout_plus_a_margin_and_survives_bad_values():
    from client_app.worker import REPLY_MARGIN_SECONDS, ROUND_TIMEOUT, reply_seconds

    assert reply_seconds({"round-timeout": 60}) == 60 + REPLY_MARGIN_SECONDS
    assert reply_seconds({"round-timeout": 1.5}) == 1.5 + REPLY_MARGIN_SECONDS
    for bad in ({}, {"round-timeout": "60"}, {"round-timeout": True}, {"round-timeout": -1},
                {"round-timeout": 0}, {"round-timeout": float("nan")}):
        assert reply_seconds(bad) == ROUND_TIMEOUT + REPLY_MARGIN_SECONDS
