"""One writer per history: ``HISTORY.lock``.

The lock file appears complete or not at all: its content (the holder's process id) is written to a
private temporary file first, which is then hard-linked to the lock's name (``os.link`` fails when
the name exists, so exactly one of several competitors wins). The holder keeps an exclusive
``flock`` on the file for its whole life; the kernel drops it when the holder dies, so a lock whose
``flock`` can be taken is stale whatever process id it names (a reused id cannot fool it). A stale
lock is replaced by renaming a complete new one over it while holding the stale file's ``flock``,
after checking that the name still refers to that file: two competitors taking over the same stale
lock serialise on that ``flock``, and the second finds the name already replaced and starts again.
(A lock left by a bo_search older than this one carries no ``flock``; it is taken over as stale.)

``flock`` is advisory and local to one machine, as the process ids are: two searches on one history
from two machines over a network file system are not detected.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import secrets
import time
from pathlib import Path

from bo_search.types import UserError


class HistoryLock:
    """One writer per history: ``HISTORY.lock`` holds the writer's process id; a second search
    refuses with the holder's pid; a lock left by a dead process is taken over."""

    def __init__(self, history: str | os.PathLike[str]):
        self.path = Path(str(history) + ".lock")
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> HistoryLock:
        tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else has it
            for _ in range(20):
                if self._link_or_take_over(tmp):
                    self._fd, fd = fd, -1
                    self.held = True
                    atexit.register(self.release)
                    return self
        finally:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot take the lock {self.path}; remove it if no search is running")

    def _link_or_take_over(self, tmp: Path) -> bool:
        """True when ``tmp`` now is the lock; False to try again; UserError when a live search holds it."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            pass
        try:
            old = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False  # released meanwhile
        try:
            try:
                fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(old)
                if pid is None or not _alive(pid):  # a competitor is replacing this stale lock right now
                    time.sleep(0.05)
                    return False
                raise UserError(self._in_use(pid)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(old).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                return False  # someone replaced or removed it meanwhile: look again
            os.rename(tmp, self.path)  # atomic: the name now holds our complete lock
            return True
        finally:
            os.close(old)

    def _in_use(self, pid: int | None) -> str:
        who = f"process {pid}" if pid is not None else "another process"
        return (
            f"history {self.path.with_suffix('')} is in use by another search ({who}, lock {self.path}); "
            "wait for it to finish or use another --history_output"
        )

    def release(self) -> None:
        if self.held and self._fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        self.held = False


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 64, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
