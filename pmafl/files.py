"""Small file helpers shared by the data, the teacher cache and the results folder."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

_UMASK_LOCK = threading.Lock()


def cache_root() -> Path:
    """pmafl's cache folder: $XDG_CACHE_HOME/pmafl, else ~/.cache/pmafl (datasets, teachers)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pmafl"


def _umask() -> int:
    """The process's umask. Reading it means setting it: for that instant it is 0o077, so a file
    another thread creates meanwhile is at worst private, never world-writable; the lock keeps
    two readers from taking each other's 0o077 for the real mask."""
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temporary file in the same folder, fsync it and rename it over `path`: a
    crash at any moment leaves either the old file or the new one, never a half-written file. The
    file gets the mode of any new file (0o666 less the umask), not mkstemp's private 0o600: a
    teacher or model copied into a container must stay readable by the user the container runs as."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
