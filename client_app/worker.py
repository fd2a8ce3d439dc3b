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

    python -m client_app.worker SOCKET KEYFILE WATCH_PID    # what `call` starts
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from filelock import FileLock
from flwr.app import Context, RecordDict

IDLE_SECONDS = 600.0  # a worker with no message for this long exits
START_SECONDS = 120.0  # how long a new worker may take to listen
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


def call(kind: str, content: RecordDict, context: Context, process_start: float | None,
         folder: Path | None = None, watch_pid: int | None = None) -> RecordDict:
    """Run the handler `kind` ("train" or "evaluate") on the node's warm worker and return the
    reply's content; `context.state` becomes the node's state after the handler. An exception of
    the handler is raised here as it was raised there. A worker started here lives as long as
    `watch_pid` (default: this process's parent, the SuperNode or SuperExec)."""
    folder = folder or worker_folder()
    watch_pid = watch_pid or os.getppid()
    name = f"run{context.run_id}-node{context.node_id}"
    for attempt in (1, 2):
        with _connect(folder, name, watch_pid) as conn:
            try:
                conn.send((kind, content, context, process_start))
                ok, payload, state = conn.recv()
            except (EOFError, ConnectionError) as e:
                # Exiting (idle) or killed while it had the message: a handler only changes the
                # state it returns, so running the message again on a new worker is safe.
                if attempt == 2:
                    raise WorkerError(f"the warm worker {name} died twice while handling a {kind} "
                                      f"message; its log: {folder / (name + '.log')}") from e
                continue
        if not ok:
            payload.add_note(f"(raised in the warm worker {name}; its log: {folder / (name + '.log')})")
            raise payload
        context.state = state
        return payload
    raise AssertionError("unreachable")


# No worker listens there: none was started, or it is gone (or going: killed while connecting).
_NOT_LISTENING = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, EOFError)


def _connect(folder: Path, name: str, watch_pid: int) -> Connection:
    """A connection to the worker `name`, started first when none listens."""
    socket, keyfile = folder / f"{name}.sock", folder / f"{name}.key"
    with FileLock(str(folder / f"{name}.lock")):
        try:
            return Client(str(socket), family="AF_UNIX", authkey=keyfile.read_bytes())
        except _NOT_LISTENING:
            pass  # none yet, or one that is gone: start one
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        socket.unlink(missing_ok=True)
        with open(folder / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "client_app.worker", str(socket), str(keyfile), str(watch_pid)],
                cwd=APP_ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, sys.path))},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                return Client(str(socket), family="AF_UNIX", authkey=keyfile.read_bytes())
            except _NOT_LISTENING:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise WorkerError(f"the warm worker {name} did not start (exit code "
                                      f"{process.poll()}); its log: {folder / (name + '.log')}") from None
                time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(socket: str, keyfile: str, watch_pid: int, idle_seconds: float = IDLE_SECONDS) -> None:
    """The worker's loop: one message at a time, until idle for `idle_seconds` or `watch_pid` is
    gone."""
    listener = Listener(socket, family="AF_UNIX", authkey=Path(keyfile).read_bytes())
    bound = os.stat(socket).st_ino
    last: list[float | None] = [time.monotonic()]  # None while handling a message

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
            with FileLock(str(Path(socket).with_suffix(".lock"))):
                reason = done()
                if reason is None:  # a message came in meanwhile
                    continue
                try:
                    ours = os.stat(socket).st_ino == bound
                except FileNotFoundError:
                    ours = False
                if ours:  # else the socket and key are a newer worker's
                    Path(socket).unlink(missing_ok=True)
                    Path(keyfile).unlink(missing_ok=True)
                print(f"exiting: {reason}", flush=True)
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    from client_app.handlers import HANDLERS  # torch and the app: once per worker

    print(f"warm worker {os.getpid()} listening on {socket}", flush=True)
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError) as e:  # a client that failed the key challenge or hung up
            print(f"refused a connection: {e!r}", flush=True)
            continue
        with conn:
            last[0] = None
            try:
                kind, content, context, process_start = conn.recv()
                reply: tuple[bool, Any, Any] = (True, HANDLERS[kind](content, context, process_start),
                                                context.state)
            except Exception as e:  # noqa: BLE001 - every error goes back to the ClientApp
                traceback.print_exc()
                reply = (False, e, None)
            try:
                conn.send(reply)
            except Exception as e:  # noqa: BLE001 - a reply that does not pickle, a gone client
                try:
                    conn.send((False, WorkerError(f"the worker could not send its reply: {e!r}"), None))
                except Exception:  # noqa: BLE001
                    print(f"could not send the reply: {e!r}", flush=True)
            last[0] = time.monotonic()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
