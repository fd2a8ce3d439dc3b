"""A node's warm worker: one long-lived process per run and node that runs the ClientApp's
handlers, so that torch, the dataset and the teacher are loaded once, not once per message.

Flower 1.41's deployment starts a fresh `flwr-clientapp` process for every message. That process
(`client_app.app`, which imports no torch) calls `call`: it connects to the worker of its run and
node over a Unix socket, starting the worker first when there is none, sends the message's content
and the node's context, and gets back the reply's content and the node's new state. The node's
state stays in Flower's context, as without a worker: the worker's memory only saves the loading,
so a worker that exits loses nothing, and a message it did not answer is run again by a new one.

The sockets live in a folder only this user can open (`$TMPDIR/pmafl-workers-<uid>/`), and a
connection must prove it knows the worker's random key (`multiprocessing.connection`'s HMAC
challenge) before anything is unpickled. A worker exits when it has been idle for `IDLE_SECONDS`
or when the process that started its first ClientApp (the SuperNode or SuperExec) is gone. Its
output goes to `<folder>/run<R>-node<N>.log`.

No wait is unbounded. Every read and write on a connection, the key challenge included, fails
after `TRANSFER_SECONDS` without progress: the worker then logs and drops that connection and
serves the next one, as it does with a connection that fails the key challenge or hangs up. A
ClientApp waits for its reply (and for a worker busy with an earlier message to take its
connection) at most the run's `round-timeout` plus `REPLY_MARGIN_SECONDS`, as the server stops
waiting for the reply by then anyway, and then raises a `WorkerError`.

    python -m client_app.worker SOCKET KEYFILE WATCH_PID    # what `call` starts
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

from filelock import FileLock
from flwr.app import Context, RecordDict

IDLE_SECONDS = 600.0  # a worker with no message for this long exits
START_SECONDS = 120.0  # how long a new worker may take to listen
TRANSFER_SECONDS = 30.0  # the longest a read or write of a connection may make no progress
ROUND_TIMEOUT = 600.0  # the run config's `round-timeout` default, used when it is unset or bad
REPLY_MARGIN_SECONDS = 60.0  # how much longer than `round-timeout` a ClientApp waits for its reply
APP_ROOT = Path(__file__).resolve().parents[1]  # the folder holding this app's packages


class WorkerError(RuntimeError):
    """The warm worker could not be started or reached, or died while handling a message."""


def worker_folder() -> Path:
    """This user's private folder for the workers' sockets, keys and logs."""
    folder = Path(tempfile.gettempdir()) / f"pmafl-workers-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    status = folder.stat()
    if status.st_uid != os.getuid() or status.st_mode & 0o077:
        raise WorkerError(f"worker folder {folder} must belong to uid {os.getuid()} with mode 0700 "
                          f"(it has uid {status.st_uid}, mode {oct(status.st_mode & 0o777)})")
    return folder


def reply_seconds(run_config: Mapping[str, Any]) -> float:
    """How long `call` waits for the worker: the run's `round-timeout` plus
    `REPLY_MARGIN_SECONDS`. The server validates `round-timeout`; a value that is missing or not
    a positive number here counts as its default, `ROUND_TIMEOUT`."""
    value = run_config.get("round-timeout")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        value = ROUND_TIMEOUT
    return float(value) + REPLY_MARGIN_SECONDS


def call(kind: str, content: RecordDict, context: Context, process_start: float | None,
         folder: Path | None = None, watch_pid: int | None = None) -> RecordDict:
    """Run the handler `kind` ("train" or "evaluate") on the node's warm worker and return the
    reply's content; `context.state` becomes the node's state after the handler. An exception of
    the handler is raised here as it was raised there. A worker started here lives as long as
    `watch_pid` (default: this process's parent, the SuperNode or SuperExec). Raises a
    `WorkerError` when the worker has not replied within `reply_seconds(context.run_config)`."""
    folder = folder or worker_folder()
    watch_pid = watch_pid or os.getppid()
    name = f"run{context.run_id}-node{context.node_id}"
    log = folder / f"{name}.log"
    wait = reply_seconds(context.run_config)
    deadline = time.monotonic() + wait
    for attempt in (1, 2):
        try:
            with _connect(folder, name, watch_pid, deadline) as conn:
                conn.send((kind, content, context, process_start))
                if not _ready(conn, deadline):
                    raise TimeoutError
                ok, payload, state = conn.recv()
        except TimeoutError:
            raise WorkerError(f"the warm worker {name} did not answer a {kind} message within "
                              f"{wait:g} s (the run's round-timeout plus {REPLY_MARGIN_SECONDS:g} s); "
                              f"its log: {log}") from None
        except BlockingIOError as e:  # a read or write timed out: see `_bound_io`
            raise WorkerError(f"the warm worker {name} stalled for {TRANSFER_SECONDS:g} s while "
                              f"exchanging a {kind} message; its log: {log}") from e
        except (EOFError, ConnectionError) as e:
            # Exiting (idle) or killed while it had the message: a handler only changes the
            # state it returns, so running the message again on a new worker is safe.
            if attempt == 2:
                raise WorkerError(f"the warm worker {name} died twice while handling a {kind} "
                                  f"message; its log: {log}") from e
            continue
        if not ok:
            payload.add_note(f"(raised in the warm worker {name}; its log: {log})")
            raise payload
        context.state = state
        return payload
    raise AssertionError("unreachable")


# No worker listens there: none was started, or it is gone (or going: killed while connecting).
_NOT_LISTENING = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, EOFError)


def _connect(folder: Path, name: str, watch_pid: int, deadline: float) -> Connection:
    """A connection to the worker `name`, started first when none listens. Raises TimeoutError
    when a worker listens but has not taken the connection by `deadline` (a hung one, or one still
    busy with an earlier message)."""
    address, keyfile = folder / f"{name}.sock", folder / f"{name}.key"
    with FileLock(str(folder / f"{name}.lock")):
        try:
            return _open(address, keyfile.read_bytes(), deadline)
        except _NOT_LISTENING:
            pass  # none yet, or one that is gone: start one
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        address.unlink(missing_ok=True)
        with open(folder / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "client_app.worker", str(address), str(keyfile), str(watch_pid)],
                cwd=APP_ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        start_deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                return _open(address, keyfile.read_bytes(), deadline)
            except _NOT_LISTENING:
                if process.poll() is not None or time.monotonic() > start_deadline:
                    raise WorkerError(f"the warm worker {name} did not start (exit code "
                                      f"{process.poll()}); its log: {folder / (name + '.log')}") from None
                time.sleep(0.01)


def _open(address: Path, authkey: bytes, deadline: float) -> Connection:
    """The ClientApp's end: connect, wait until `deadline` for the worker to take the connection,
    then answer its key challenge and challenge it in turn (as `multiprocessing.connection.Client`
    does)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bound_io(sock, TRANSFER_SECONDS)
        sock.connect(str(address))
    except BaseException:
        sock.close()
        raise
    conn = Connection(sock.detach())
    try:
        if not _ready(conn, deadline):  # it sends its challenge once it takes the connection
            raise TimeoutError
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
    except BaseException:
        conn.close()
        raise
    return conn


def _bound_io(sock: socket.socket, seconds: float) -> None:
    """Make every read and write of the blocking `sock` fail with an OSError after `seconds`
    without progress (kernel timeouts, which `Connection` keeps, unlike `settimeout`)."""
    sock.setblocking(True)
    timeval = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _ready(conn: Connection, deadline: float) -> bool:
    """Wait until `conn` has something to read (or is closed), at most until `deadline`."""
    while (left := deadline - time.monotonic()) > 0:
        if conn.poll(min(left, 3600.0)):  # poll's own limit is some 24 days
            return True
    return conn.poll(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(address: str, keyfile: str, watch_pid: int, idle_seconds: float = IDLE_SECONDS,
          transfer_seconds: float = TRANSFER_SECONDS) -> None:
    """The worker's loop: one message at a time, until idle for `idle_seconds` or `watch_pid` is
    gone. A connection whose key challenge or message makes no progress for `transfer_seconds` is
    dropped."""
    authkey = Path(keyfile).read_bytes()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)
    bound = os.stat(address).st_ino
    last: list[float | None] = [time.monotonic()]  # None while handling a connection

    def done() -> str | None:
        """Why this worker should exit now, if it should."""
        if not _alive(watch_pid):
            return f"process {watch_pid} is gone"
        since = last[0]
        return "idle" if since is not None and time.monotonic() - since > idle_seconds else None

    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            if done() is None:
                continue
            # Under the lock that `call` holds while it connects or starts a worker: a ClientApp
            # that found this worker going may have started a new one at the same path.
            with FileLock(str(Path(address).with_suffix(".lock"))):
                reason = done()
                if reason is None:  # a message came in meanwhile
                    continue
                try:
                    ours = os.stat(address).st_ino == bound
                except FileNotFoundError:
                    ours = False
                if ours:  # else the socket and key are a newer worker's
                    Path(address).unlink(missing_ok=True)
                    Path(keyfile).unlink(missing_ok=True)
                print(f"exiting: {reason}", flush=True)
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    from client_app.handlers import HANDLERS  # torch and the app: once per worker

    print(f"warm worker {os.getpid()} listening on {address}", flush=True)
    while True:
        try:
            sock, _ = listener.accept()
        except OSError as e:
            print(f"could not accept a connection: {e!r}", flush=True)
            time.sleep(0.1)  # out of file descriptors, say: retry, but do not spin
            continue
        _bound_io(sock, transfer_seconds)
        # Busy from here: `call` holds its lock until its side of the challenge is done, so the
        # watchdog cannot find this worker idle between the challenge and the message.
        idle_since, last[0] = last[0], None
        with Connection(sock.detach()) as conn:
            answered = _answer(conn, authkey, HANDLERS)
        last[0] = time.monotonic() if answered else idle_since


def _answer(conn: Connection, authkey: bytes, handlers: Mapping[str, Any]) -> bool:
    """The worker's end of one connection: check the key, run the message's handler and send back
    its reply (or its exception). False when the connection was dropped before its message came
    in."""
    try:
        deliver_challenge(conn, authkey)
        answer_challenge(conn, authkey)
    except Exception as e:  # noqa: BLE001 - a wrong key, a hang-up, a stall, garbage
        print(f"refused a connection: {e!r}", flush=True)
        return False
    try:
        message = conn.recv_bytes()
    except (OSError, EOFError) as e:
        print(f"dropped a connection before its message came in: {e!r}", flush=True)
        return False
    try:
        kind, content, context, process_start = ForkingPickler.loads(message)
        reply: tuple[bool, Any, Any] = (True, handlers[kind](content, context, process_start),
                                        context.state)
    except Exception as e:  # noqa: BLE001 - every error goes back to the ClientApp
        traceback.print_exc()
        reply = (False, e, None)
    try:
        data = ForkingPickler.dumps(reply)
    except Exception as e:  # noqa: BLE001 - a reply that does not pickle
        data = ForkingPickler.dumps((False, WorkerError(f"the worker could not send its reply: {e!r}"),
                                     None))
    try:
        conn.send_bytes(data)
    except OSError as e:  # a ClientApp that is gone or stalled: the next one gets its own reply
        print(f"could not send the reply: {e!r}", flush=True)
    return True


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
