"""What the ClientApp's messages do, on whichever process runs them (see `client_app.app`): local
training of the received global model (`train`) and its evaluation on the node's local test split
(`evaluate`). Each takes the message's content and the node's context, and returns the reply's
content.

What a node computes once (its partition and local test split, the teacher's logits on its
images) is kept in the node's state (`context.state`), so that a later message starts training
without loading the dataset, in whatever process it runs. Every reply carries `compute-seconds`,
the time of the local training (or evaluation) itself, for the round loop's timing: everything
else a round takes (process start-up, imports, loading data and teacher, the wait for messages) is
overhead. Given the wall-clock start of the process that received the message (for its first
message only), a reply also carries `startup-seconds`, from that start to the compute.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common.logger import FLOWER_LOGGER

from pmafl.assembly import (
    NodeData,
    build_model,
    client_seed,
    node_data,
    node_data_key,
    resolve_device,
)
from pmafl.compression import encode_update
from pmafl.config import RunConfig, TrainConfig
from pmafl.data import Split, make_loader
from pmafl.evaluate import evaluate as evaluate_model
from pmafl.fedftg import label_counts
from pmafl.kdiga import teacher_input_gradients
from pmafl.objectives import active_add_ons, needs_teacher
from pmafl.protocol import (
    ARRAYS,
    COMPUTE_SECONDS,
    CONFIG,
    LABEL_COUNTS,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    STARTUP_SECONDS,
)
from pmafl.teacher import get_teacher
from pmafl.train import train_model

# The core logs through `logging` (it imports no Flower); show its records (teacher pre-training
# progress) in the run's log stream.
logging.getLogger("pmafl").setLevel(logging.INFO)
logging.getLogger("pmafl").handlers = FLOWER_LOGGER.handlers


def _startup_seconds(process_start: float | None) -> dict[str, float]:
    """`startup-seconds` when the receiving process's start is given, else nothing."""
    return {STARTUP_SECONDS: time.time() - process_start} if process_start is not None else {}


def _node_partition(context: Context) -> tuple[int, int]:
    node_config = context.node_config
    for key in ("partition-id", "num-partitions"):
        if key not in node_config:
            raise ValueError(f"node config lacks '{key}': start the SuperNode with "
                             "--node-config \"partition-id=N num-partitions=M\"")
    return int(node_config["partition-id"]), int(node_config["num-partitions"])


def _set_threads(context: Context) -> None:
    """torch's thread count from the node config's `num-threads` (0 or unset: torch's default)."""
    value = context.node_config.get("num-threads", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"node config key 'num-threads': expected a non-negative integer (0: "
                         f"torch's default), got {value!r}")
    if value and torch.get_num_threads() != value:
        torch.set_num_threads(value)


def _node_data(context: Context, cfg: RunConfig) -> NodeData:
    """This node's partition and local test split: made once (loading the dataset and running the
    partitioner, seconds), then read back from the node's state (milliseconds)."""
    partition_id, num_partitions = _node_partition(context)
    key = node_data_key(cfg, partition_id, num_partitions)
    meta = context.state.get("node-data-meta")
    if meta is None or meta["key"] != key:
        data = node_data(cfg, partition_id, num_partitions)
        context.state["node-data"] = ArrayRecord(torch_state_dict={
            "train-images": data.train.images, "train-labels": data.train.labels,
            "test-images": data.test.images, "test-labels": data.test.labels})
        context.state["node-data-meta"] = ConfigRecord({
            "key": key, "num-classes": data.num_classes, "mean": list(data.mean),
            "std": list(data.std)})
        return data
    arrays = context.state["node-data"].to_torch_state_dict()
    return NodeData(Split(arrays["train-images"], arrays["train-labels"]),
                    Split(arrays["test-images"], arrays["test-labels"]), int(meta["num-classes"]),
                    tuple(meta["mean"]), tuple(meta["std"]))


def _teacher_tensors(context: Context, teacher: torch.nn.Module, sha256: str, images: torch.Tensor,
                     labels: torch.Tensor, input_grads: bool) -> list[torch.Tensor]:
    """The teacher's logits on this node's un-augmented images (and, for KDIGA, its input
    gradients): computed once, kept in the node's state across rounds (keyed by the teacher's
    checksum)."""
    meta = context.state.get("teacher-cache-meta")
    if meta is None or meta["sha256"] != sha256 or meta["num-examples"] != len(images):
        device = next(teacher.parameters()).device
        with torch.no_grad():
            logits = torch.cat([teacher(chunk.to(device)).cpu() for chunk in images.split(512)])
        context.state["teacher-cache"] = ArrayRecord(torch_state_dict={"logits": logits})
        context.state["teacher-cache-meta"] = ConfigRecord({"sha256": sha256,
                                                            "num-examples": len(images)})
    cached = context.state["teacher-cache"].to_torch_state_dict()
    if input_grads and "input-grads" not in cached:
        cached["input-grads"] = teacher_input_gradients(teacher, images, labels)
        context.state["teacher-cache"] = ArrayRecord(torch_state_dict=cached)
    return [cached["logits"], *([cached["input-grads"]] if input_grads else [])]


def _add_on_state(context: Context) -> dict[str, dict[str, torch.Tensor]]:
    """The state of this node's add-on modules (RobustKD's connectors: trained with the model,
    not part of the global model), carried over from its previous round in the node's state."""
    return {key.removeprefix("add-on:"): record.to_torch_state_dict()
            for key, record in context.state.array_records.items() if key.startswith("add-on:")}


def _received_model(content: RecordDict, cfg: RunConfig, data: NodeData, device: torch.device
                    ) -> torch.nn.Module:
    model = build_model(cfg, data)
    model.load_state_dict(content[ARRAYS].to_torch_state_dict())
    return model.to(device)


def _update(context: Context, model: torch.nn.Module, content: RecordDict, train_config: TrainConfig
            ) -> ArrayRecord:
    """What the reply carries: the trained model, or its update compressed as the server asked
    (`update-compression`), with this node's error-feedback residual kept in its state."""
    residual = None
    if "compression-residual" in context.state:
        residual = context.state["compression-residual"].to_torch_state_dict()
    received = content[ARRAYS].to_torch_state_dict()
    encoded, residual = encode_update(model.state_dict(), received, train_config.update_compression,
                                      train_config.topk_fraction, residual)
    if residual:
        context.state["compression-residual"] = ArrayRecord(torch_state_dict=residual)
    return ArrayRecord(torch_state_dict=encoded)


def train(content: RecordDict, context: Context, process_start: float | None = None) -> RecordDict:
    """Local training of the received global model on this node's partition."""
    _set_threads(context)
    cfg = RunConfig.from_mapping(context.run_config)
    train_config = TrainConfig.from_mapping(content[CONFIG])
    server_round = int(content[CONFIG].get(SERVER_ROUND, 0))
    partition_id, _ = _node_partition(context)
    device = resolve_device(cfg.device)
    data = _node_data(context, cfg)
    images, labels = data.train.tensors()
    model = _received_model(content, cfg, data, device)
    tensors = [images, labels]
    teacher = None
    if needs_teacher(train_config.objective):
        cache_dir = str(context.node_config.get("teacher-cache-dir", ""))
        teacher, sha256 = get_teacher(cfg, data.num_classes, cache_dir, device)
        tensors += _teacher_tensors(context, teacher, sha256, images, labels,
                                    input_grads=any("teacher_input_grads" in a.batch_fields
                                                    for a in active_add_ons(train_config).values()))
    # Seeded after the model and teacher are built: loading the teacher draws random numbers only
    # the first time in a process.
    seed = client_seed(cfg.seed, server_round, partition_id)
    torch.manual_seed(seed)
    loader = make_loader(*tensors, batch_size=cfg.batch_size, shuffle=True, seed=seed)
    add_on_state = _add_on_state(context)
    startup = _startup_seconds(process_start)
    start = time.perf_counter()
    metrics = train_model(model, teacher, loader, train_config, add_on_state)
    seconds = time.perf_counter() - start
    for name, state in add_on_state.items():
        context.state[f"add-on:{name}"] = ArrayRecord(torch_state_dict=state)
    if content[CONFIG].get(LABEL_COUNTS):  # FedFTG weighs client models by class
        metrics[LABEL_COUNTS] = label_counts(labels, data.num_classes)
    metrics.update({COMPUTE_SECONDS: seconds, **startup})
    return RecordDict({ARRAYS: _update(context, model, content, train_config),
                       METRICS: MetricRecord(metrics)})


def evaluate(content: RecordDict, context: Context, process_start: float | None = None) -> RecordDict:
    """Clean and PGD accuracy of the received global model on this node's local test split (the
    test split resampled to this node's class proportions)."""
    _set_threads(context)
    cfg = RunConfig.from_mapping(context.run_config)
    train_config = TrainConfig.from_mapping(content[CONFIG])
    partition_id, _ = _node_partition(context)
    device = resolve_device(cfg.device)
    data = _node_data(context, cfg)
    images, labels = data.test.tensors()
    model = _received_model(content, cfg, data, device)
    torch.manual_seed(client_seed(cfg.seed, int(content[CONFIG].get(SERVER_ROUND, 0)),
                                  partition_id))
    startup = _startup_seconds(process_start)
    start = time.perf_counter()
    scores = evaluate_model(model, images, labels, train_config.eps, cfg.eval_steps,
                            cfg.batch_size * 8)
    metrics = MetricRecord({**scores, NUM_EXAMPLES: len(labels),
                            COMPUTE_SECONDS: time.perf_counter() - start, **startup})
    return RecordDict({METRICS: metrics})


HANDLERS = {"train": train, "evaluate": evaluate}
