"""One run per experiment folder: a lock file ``OUT/<experiment>/run.lock`` (PID, host, start time).

Two ``cxr train`` runs into the same ``--out`` used to finish with ``best.pt`` from one and ``last.pt`` and
``metrics.json`` from the other. The second run is now refused with the first one's PID and start time.
A lock whose process is gone (``kill -9``, a crash, a reboot) is stale: on the same host the next run sees
that the PID no longer runs, says so, and takes the folder over. A lock from another host (a shared file
system) cannot be checked from here and is refused with the file to remove.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterator

from cxr.common.inputs import InputError, writable_folder

LOCK_FILE = "run.lock"


class FolderLockedError(InputError):
    """Another live run holds the experiment folder."""


def pid_running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: Path) -> dict[str, Any] | None:
    """The holder written in a lock file, or None when the file is gone or unreadable (half written)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _stale(holder: dict[str, Any] | None) -> bool:
    return holder is None or (holder.get("host") == socket.gethostname() and not pid_running(holder["pid"]))


def _describe(holder: dict[str, Any]) -> str:
    return (f"{holder.get('command', 'a run')} (PID {holder['pid']} on {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')})")


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for this process while the block runs; refuse when another
    live process holds it, take over a stale lock with a warning. Folders it created and that are still
    empty at the end (the run failed before writing anything) are removed again: nothing half-written."""
    created = [p for p in (Path(folder), *Path(folder).parents) if not p.exists()]  # deepest first
    folder = writable_folder(folder, "the experiment folder")
    path = folder / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
          "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(3):  # a stale lock is removed, then created anew; another run may win that race
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if not _stale(holder):
                raise FolderLockedError(
                    f"{str(folder)!r} is in use by {_describe(holder)}; wait for it to finish or choose another "
                    f"--out. If that run is gone, delete {str(path)!r}.") from None
            gone = _describe(holder) if holder else "a run whose lock file is unreadable"
            warnings.warn(f"Taking over {str(folder)!r}: {gone} no longer runs (stale lock removed).", stacklevel=3)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(me, handle)
        break
    else:
        raise FolderLockedError(f"{str(folder)!r} is being taken over by another run; try again.")
    try:
        yield folder
    finally:
        if (read_lock(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        for empty in created:
            try:
                empty.rmdir()
            except OSError:  # not empty: the run wrote something there
                break
