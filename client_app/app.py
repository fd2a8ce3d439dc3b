"""ClientApp: thin wiring from Flower messages to `client_app.handlers` (local training with
`pmafl.train.train_model`, evaluation with `pmafl.evaluate.evaluate`).

Node config: `partition-id` and `num-partitions` (filled in by the simulation; set with
`flower-supernode --node-config` in deployment), and optionally `teacher-cache-dir`,
`num-threads` (torch's intra-op threads; 0 or unset: torch's default, all the host's cores, which
oversubscribes a host that runs several SuperNodes) and `warm-worker`.

In deployment, Flower starts a fresh ClientApp process (`flwr-clientapp`) for every message, and
one that imported torch, loaded the data and the teacher would spend seconds on that before
training. So there this module imports no torch: it hands the message to the node's warm worker
(`client_app.worker`), a long-lived process that keeps torch, the data and the teacher loaded
across messages, and that the first message starts. `warm-worker` (true or false) overrides
that choice; by default it is on exactly in a `flwr-clientapp` process. In a simulation, whose
processes are long-lived anyway, the handlers run in the process that received the message.

Every reply carries `compute-seconds` (the local training or evaluation itself). The first reply
of a process also carries `startup-seconds`, the time from the process's start to that compute
(Linux only: read from /proc).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()

# Flower's deployment runs every message in a fresh process of this command.
FRESH_PROCESS_PER_MESSAGE = Path(sys.argv[0]).name == "flwr-clientapp"


def _process_age() -> float | None:
    """Seconds since this process started, to 10 ms (from /proc; None where there is none)."""
    try:
        with open("/proc/self/stat") as f:  # field 22, starttime: clock ticks after boot
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


_started_compute = False  # has this process handled a message yet?


def _process_start() -> float | None:
    """The wall-clock start of this process for the first message it handles (in deployment,
    every message: each starts a fresh process; in a simulation, an actor's first), else None."""
    global _started_compute
    first, _started_compute = not _started_compute, True
    age = _process_age() if first else None
    return time.time() - age if age is not None else None


def _use_worker(context: Context) -> bool:
    value = context.node_config.get("warm-worker", FRESH_PROCESS_PER_MESSAGE)
    if not isinstance(value, bool):
        raise ValueError(f"node config key 'warm-worker': expected true or false, got {value!r}")
    return value


def _handle(kind: str, msg: Message, context: Context) -> Message:
    process_start = _process_start()
    if _use_worker(context):
        from client_app.worker import call

        content = call(kind, msg.content, context, process_start)
    else:
        from client_app.handlers import HANDLERS

        content = HANDLERS[kind](msg.content, context, process_start)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of the received global model on this node's partition."""
    return _handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Clean and PGD accuracy of the received global model on this node's local test split (the
    test split resampled to this node's class proportions)."""
    return _handle("evaluate", msg, context)

