"""An output folder replaced crash-safely: OUT is whole at every instant, whatever kills the run.

The result is written to a hidden sibling ``.OUT.partial-PID-*``; a lock file ``.OUT.moeq-lock``
(created exclusively, holding the owner's pid) keeps a second run from writing the same OUT. Once
complete, the partial folder takes OUT's place in one atomic step: without ``overwrite`` a rename
that fails if OUT appeared meanwhile (``renameat2(RENAME_NOREPLACE)``), with it an atomic exchange
of the two folders (``RENAME_EXCHANGE``), after which the old OUT, now in the partial's place, is
renamed ``.OUT.old-PID-*`` and deleted. Where the kernel or file system lacks those, plain renames
are used (OUT is then briefly absent, the old one whole under its ``.old`` name). A run killed at
any point leaves only hidden folders of a dead pid: the next run for the same OUT names them and
removes them, or puts an ``.old`` folder back if OUT itself is missing.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False where the kernel, libc or file system does not offer it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _owner_pid(path: Path, kind: str) -> int | None:
    """The pid in a ``.OUT.partial-PID-*`` / ``.OUT.old-PID-*`` name."""
    try:
        return int(path.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return None


class OutputFolder:
    """``with OutputFolder(out, overwrite) as partial: write into partial; then .commit()``."""

    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite = Path(out), overwrite
        self.lock = self.out.parent / f".{self.out.name}.moeq-lock"
        self.partial: Path | None = None
        self.cleaned: list[Path] = []  # stale folders of killed runs, removed (for the caller to report)

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._claim()
        try:
            self._clean_stale()
            self.partial = Path(
                tempfile.mkdtemp(prefix=f".{self.out.name}.partial-{os.getpid()}-", dir=self.out.parent)
            )
            self.partial.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        except BaseException:
            self.lock.unlink(missing_ok=True)
            raise
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.partial is not None and self.partial.exists():
                shutil.rmtree(self.partial, ignore_errors=True)
        finally:
            self.lock.unlink(missing_ok=True)

    def _claim(self) -> None:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._lock_is_held():
                    raise
                self.lock.unlink(missing_ok=True)  # left by a killed run
                continue
            with os.fdopen(fd, "w") as f:
                f.write(record)
            return

    def _lock_is_held(self) -> bool:
        """Raises FileExistsError when another live run holds the lock; False when it is stale."""
        try:
            owner = json.loads(self.lock.read_text())
            pid, host = int(owner["pid"]), owner.get("host")
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if host == socket.gethostname() and not _alive(pid):
            return False
        raise FileExistsError(
            f"another run (pid {pid} on {host}) is writing {self.out}: wait for it, or if no run is active, "
            f"remove {self.lock}."
        )

    def _clean_stale(self) -> None:
        for kind in ("old", "partial"):
            for path in sorted(self.out.parent.glob(f".{self.out.name}.{kind}-*")):
                pid = _owner_pid(path, kind)
                if pid is None or _alive(pid):
                    continue
                if kind == "old" and not self.out.exists():  # killed between the two plain renames
                    os.rename(path, self.out)
                    logger.warning("restored %s from %s, left by a run that was killed", self.out, path)
                    continue
                shutil.rmtree(path, ignore_errors=True)
                self.cleaned.append(path)
                logger.warning("removed %s, left by a run that was killed (pid %d)", path, pid)

    def commit(self) -> None:
        """Put the complete partial folder in OUT's place (see the module's doc)."""
        if not self.overwrite:
            try:
                if not _renameat2(self.partial, self.out, _RENAME_NOREPLACE):
                    if self.out.exists():
                        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(self.out))
                    os.rename(self.partial, self.out)
            except FileExistsError:
                kept = self.out.with_name(f"{self.out.name}.moeq-{os.getpid()}")
                os.rename(self.partial, kept)
                self.partial = None
                raise FileExistsError(
                    f"{self.out} was created by another process while this run was writing it (and overwrite was "
                    f"not asked for): it is left as it is; this run's result is in {kept}."
                ) from None
            self.partial = None
            return
        if self.out.exists() and _renameat2(self.partial, self.out, _RENAME_EXCHANGE):
            old, self.partial = self.partial, None  # the old OUT now sits at the partial's path
        else:
            old = None
            if self.out.exists():
                old = self._old_name()
                os.rename(self.out, old)
            os.rename(self.partial, self.out)
            self.partial = None
        if old is not None:
            if old.name.startswith(f".{self.out.name}.partial-"):
                hidden = self._old_name()
                os.rename(old, hidden)  # named as old, so a kill during the removal is cleaned up as such
                old = hidden
            shutil.rmtree(old, ignore_errors=True)

    def _old_name(self) -> Path:
        return self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"


def _umask() -> int:
    try:  # read without changing it: os.umask would, for a moment, for every thread
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask
