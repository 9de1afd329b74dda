"""An exclusive lock on a run directory, held for the whole of a training run.

`locked(run_dir)` takes `fcntl.flock` on `run_dir/.lock` (non-blocking) and writes the holder's pid and host
into it; a second run on the same directory fails at once with one `JaxalignError` naming the directory and
the holder, before it reads or writes anything else there. The kernel drops a flock when its process dies,
so a lock file left behind by a killed run (whatever it says) never blocks: only a live flock does. The file
itself stays (emptied on release): deleting it would let two runs lock two different files of one name.

Multi-host: every process of one run shares the run directory, so only process 0 takes the lock (the caller
passes `enabled=False` elsewhere). A leaf: imports nothing of jaxalign but `JaxalignError`.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import time

from jaxalign import JaxalignError

LOCK_FILE = ".lock"


def lock_path(run_dir: str) -> str:
    return os.path.join(run_dir, LOCK_FILE)


def holder(path: str, wait_s: float = 1.0) -> dict:
    """The holder's {"pid", "host"} as written in the lock file ({} if unreadable). The holder writes just
    after it takes the flock, so an empty file is re-read for up to `wait_s`."""
    deadline = time.time() + wait_s
    while True:
        try:
            with open(path) as f:
                text = f.read()
            info = json.loads(text) if text.strip() else {}
            if not isinstance(info, dict):
                info = {}
        except (OSError, ValueError):
            info = {}
        if info.get("pid") or time.time() >= deadline:
            return info
        time.sleep(0.05)


def _describe(info: dict) -> str:
    pid = info.get("pid", "unknown")
    host = info.get("host")
    return f"pid {pid}" + (f" on {host}" if host else "")


class RunDirLock:
    """Exclusive flock on run_dir/.lock; `acquire` raises JaxalignError when another process holds it."""

    def __init__(self, run_dir: str, log=print):
        self.run_dir, self.path, self.log, self.fd = run_dir, lock_path(run_dir), log, None

    def acquire(self):
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JaxalignError(f"{self.run_dir}: cannot open the run directory's lock file {self.path} "
                                f"({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise JaxalignError(
                    f"{self.run_dir}: another run is using this run directory ({_describe(holder(self.path))}, "
                    f"lock file {self.path}); wait for it to finish or choose another run_dir") from None
            # A file system without flock (some network mounts): train on, unprotected.
            self.log(f"warning: {self.path}: cannot lock the run directory ({e.strerror or e}); "
                     f"make sure no other run uses it")
            return self
        # Ours now: whatever a dead holder left in the file is replaced.
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n", 0)
        self.fd = fd
        return self

    def release(self):
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # the file stays (see the module docstring), empty: nobody holds it
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


@contextlib.contextmanager
def locked(run_dir: str, enabled: bool = True, log=print):
    """Hold run_dir's lock for the body (released on exceptions too); `enabled=False` is a no-op (processes
    other than 0 of a multi-host run)."""
    if not enabled:
        yield None
        return
    with RunDirLock(run_dir, log) as lock:
        yield lock
