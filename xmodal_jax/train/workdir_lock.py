"""One command at a time per workdir: `xmodal train`, `xmodal eval` and `xmodal table` jobs.

Two commands writing one workdir would interleave `metrics.jsonl` and mix checkpoints, so each
holds the workdir's lock, `<workdir>/lock`, while it runs, and a second one is refused with one
line naming the holder (host, pid, command, since when).

- Local workdir: an exclusive `flock` on the file, which also records the holder as JSON. The
  kernel drops the lock when the holder dies (also a SIGKILL), so a dead process never blocks a
  rerun; the file stays behind, empty or naming its last holder, and means nothing by itself.
  A table job's runner takes the lock before it starts `xmodal train` and hands the open file
  to it (`XMODAL_LOCK_FD`), so the lock lasts as long as either process lives.
- Remote workdir (`gs://...`, where nothing like flock exists): a lease, the same JSON object
  with a heartbeat the holder rewrites every `HEARTBEAT_SECS`. A lease whose heartbeat is older
  than `LEASE_TIMEOUT_SECS`, or whose holder is a dead process of this host, is stale: the next
  command takes it over and says so. Writes to a bucket are not compare-and-swap, so a new
  holder writes its lease, waits `SETTLE_SECS` and reads it back; of two commands starting
  together, the one whose lease was overwritten backs off. A holder whose lease was taken over
  (it stopped heartbeating, e.g. a paused VM) notices at its next heartbeat and stops before its
  next save (`check`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

from xmodal_jax.errors import UserError
from xmodal_jax.train import metrics as metrics_lib

LOCK = "lock"  # the file (local) or object (remote) in the workdir
FD_ENV = "XMODAL_LOCK_FD"  # an open descriptor of `<workdir>/lock` already locked by the parent
HEARTBEAT_SECS = 60.0
LEASE_TIMEOUT_SECS = 300.0
SETTLE_SECS = 2.0


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a workdir's lock."""

    host: str
    pid: int
    command: str
    since: float
    heartbeat: float = 0.0
    token: str = ""

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{self.command} (pid {self.pid} on {self.host}, since {since})"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n"


def _me(command: str) -> Holder:
    now = time.time()
    return Holder(socket.gethostname(), os.getpid(), command, now, now, uuid.uuid4().hex)


def _parse(text: str) -> Holder | None:
    """The holder recorded in a lock's text; None for an empty or foreign text."""
    try:
        fields = json.loads(text)
        return Holder(**{f.name: fields[f.name] for f in dataclasses.fields(Holder)})
    except (ValueError, TypeError, KeyError):
        return None


def _dead_here(holder: Holder) -> bool:
    """Whether `holder` is a process of this host that no longer exists."""
    if holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _stale(holder: Holder, now: float) -> bool:
    return now - holder.heartbeat > LEASE_TIMEOUT_SECS or _dead_here(holder)


def _busy(workdir: epath.Path, holder: Holder | None) -> UserError:
    who = holder.describe() if holder else "another process"
    return UserError(
        f"{workdir} is in use by {who}; two runs in one workdir would mix their checkpoints "
        "and logs. Wait for it to finish (or stop it), or use another --workdir."
    )


# ---------------------------------------------------------------- local: flock


def flock(path: str, command: str) -> int | None:
    """An open descriptor holding the exclusive lock of `path` (created, with its directory),
    recording `command` as the holder; None if another process holds it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    _record(fd, _me(command))
    return fd


def _record(fd: int, holder: Holder | None) -> None:
    os.ftruncate(fd, 0)
    if holder is not None:
        os.pwrite(fd, holder.to_json().encode(), 0)


def _inherited(path: str) -> int | None:
    """The descriptor of `path` a parent handed over in `XMODAL_LOCK_FD`, if it is that file."""
    try:
        fd = int(os.environ.get(FD_ENV, ""))
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except (ValueError, OSError):
        return None
    return fd if same else None


def _local_holder(path: str) -> Holder | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        return _parse(text) or Holder("?", 0, "another process", time.time())
    finally:
        os.close(fd)


# ---------------------------------------------------------------- remote: lease


def _read_lease(path: epath.Path) -> Holder | None:
    try:
        return _parse(path.read_text())
    except FileNotFoundError:
        return None


def _remote_holder(path: epath.Path) -> Holder | None:
    lease = _read_lease(path)
    return None if lease is None or _stale(lease, time.time()) else lease


# ---------------------------------------------------------------- both


def holder(workdir: epath.PathLike) -> Holder | None:
    """Who holds `workdir`'s lock now; None when nobody does (or only a stale lease is left)."""
    workdir = metrics_lib.workdir_path(workdir)
    if metrics_lib.is_remote(workdir):
        return _remote_holder(workdir / LOCK)
    return _local_holder(os.fspath(workdir / LOCK))


class WorkdirLock:
    """The lock of one workdir for one command: `check_free()` (cheap, creates nothing),
    `acquire()` (creates the workdir), `check()` (the lease is still ours), `release()`."""

    def __init__(self, workdir: epath.PathLike, command: str):
        self.workdir = metrics_lib.workdir_path(workdir)
        self.path = self.workdir / LOCK
        self.remote = metrics_lib.is_remote(self.workdir)
        self.command = command
        self._fd: int | None = None
        self._lease: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: Holder | None = None  # who took a remote lease over from us

    def check_free(self) -> None:
        """Refuses (UserError) if another process holds the lock now."""
        if not self.remote and _inherited(os.fspath(self.path)) is not None:
            return  # the parent (a table runner) holds it for us
        current = holder(self.workdir)
        if current is not None:
            raise _busy(self.workdir, current)

    def acquire(self) -> None:
        """Takes the lock (making the workdir) or refuses with a UserError naming the holder."""
        if self.remote:
            self._acquire_lease()
            return
        path = os.fspath(self.path)
        os.makedirs(os.fspath(self.workdir), exist_ok=True)
        fd = _inherited(path) if os.path.exists(path) else None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already ours: the parent's lock
            _record(fd, _me(self.command))
            self._fd = fd
            return
        self._fd = flock(path, self.command)
        if self._fd is None:
            raise _busy(self.workdir, _local_holder(path))

    def _acquire_lease(self) -> None:
        current = _read_lease(self.path)
        if current is not None and not _stale(current, time.time()):
            raise _busy(self.workdir, current)
        if current is not None:
            print(f"Taking over the stale lock of {current.describe()} in {self.workdir}.")
        mine = _me(self.command)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.path.write_text(mine.to_json())
        time.sleep(SETTLE_SECS)
        back = _read_lease(self.path)
        if back is None or back.token != mine.token:
            raise _busy(self.workdir, back)
        self._lease = mine
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="xmodal-lease")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECS):
            try:
                current = _read_lease(self.path)
                if current is None or current.token != self._lease.token:
                    self.lost = current or Holder("?", 0, "nobody (the lease was deleted)", 0.0)
                    return
                self._lease = dataclasses.replace(self._lease, heartbeat=time.time())
                self.path.write_text(self._lease.to_json())
            except OSError as e:  # a transient storage error: try again at the next beat
                print(f"WARNING: could not renew the lock of {self.workdir}: {e}", file=sys.stderr)

    def check(self) -> None:
        """Raises a UserError if a remote lease was taken over by another command."""
        if self.lost is not None:
            raise UserError(
                f"The lock of {self.workdir} was taken over by {self.lost.describe()} (this "
                "run stopped renewing it); stopped without saving so the runs do not mix."
            )

    def release(self) -> None:
        """Gives the lock up (a remote lease is deleted if it is still ours)."""
        if self._fd is not None:
            _record(self._fd, None)
            os.close(self._fd)  # an inherited lock stays with the parent's descriptor
            self._fd = None
        if self._lease is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            current = _read_lease(self.path)
            if current is not None and current.token == self._lease.token:
                self.path.unlink()
            self._lease = None
