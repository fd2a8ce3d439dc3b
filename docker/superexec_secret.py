"""Write a random SuperExec secret into each folder named on the command line, unless one is there.

The `secrets` service of docker/compose.yml and docker/compose.node.yml runs this once, as root,
before any Flower service starts. Each folder is a named volume, and its file `superexec` is what
`--superexec-auth-secret-file /secrets/superexec` reads in the services that mount that volume:
a SuperExec must prove it holds the same secret before its SuperLink or SuperNode hands it a task.
The file belongs to Flower's user `app` (uid 49999), mode 0400. A secret that is already there is
kept, so a restart or another `up` changes nothing; `docker compose down -v` drops it with its
volume.

    python superexec_secret.py /secrets/superlink /secrets/node-0 ...
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

APP_UID = 49999  # user `app` in Flower's images


def ensure_secret(folder: Path) -> bool:
    """Write `folder`/superexec (64 random hex digits, no newline) if missing; True if written."""
    path = folder / "superexec"
    if path.exists():
        return False
    partial = folder / "superexec.partial"
    # Never readable by others, not even while it is written; renamed into place only when whole,
    # since Flower refuses an empty secret and would take a partial one as the secret.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_hex(32))
        if os.geteuid() == 0:
            os.fchown(file.fileno(), APP_UID, APP_UID)
    os.replace(partial, path)
    return True


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    for folder in map(Path, argv):
        print(f"{folder}/superexec: {'new secret' if ensure_secret(folder) else 'kept'}")


if __name__ == "__main__":
    main(sys.argv[1:])
