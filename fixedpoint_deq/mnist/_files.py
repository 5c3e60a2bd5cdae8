"""Files of a run: atomic writes (a temporary file in the same directory, then
`os.replace`) with the user's umask, the removal of temporaries an interrupted write
left behind, the check that an output directory can be written, and the lock by which
a run owns its directories (`lock_directories`).

A write that fails (a full disk, a directory turned read-only) raises `WriteError`,
whose message names the file and the fault; the file it was to replace is untouched.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import secrets
import socket
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path


try:
    import fcntl
except ImportError:  # (not POSIX: directories are not locked, see `lock_directories`)
    fcntl = None


_TMP_SUFFIX = ".tmp"
#: The lock file a run holds in each of its directories (`lock_directories`).
LOCK_FILE = ".fixedpoint-mnist.lock"


class WriteError(OSError):
    """A file of the run could not be written (a full disk, a read-only directory...).
    The message names the file and the fault."""


class DirectoryInUseError(RuntimeError):
    """A directory is owned by another run (`lock_directories`); the message names it
    and the run that holds it."""


def os_error_in(error: BaseException) -> OSError | None:
    """The `OSError` that `error` is or wraps (through ``__cause__``/``__context__``,
    e.g. inside equinox's ``TreePathError``), or None."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def describe(error: OSError) -> str:
    """What went wrong in `error`, in words (without the file name)."""
    if error.errno is not None:
        return error.strerror or os.strerror(error.errno)
    text = str(error)
    if "requested and" in text and "written" in text:  # numpy's short write
        return f"a short write, the disk may be full ({text})"
    return text or type(error).__name__


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` through `write(temporary_path)`, then move it into place: an
    interrupted write never leaves a partial file at `path`.

    The temporary file is created with mode ``0o666`` less the process's umask, like
    any file `open` creates (`tempfile.mkstemp` would make it ``0o600``, unreadable for
    the other users of a shared run directory).

    **Raises:** `WriteError` (naming `path` and the fault) if the file cannot be
    written: `path` is then as it was, and the temporary file is removed."""
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp_path = _temporary_name(path)
            try:
                fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                continue
        os.close(fd)
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        if tmp_path is not None:
            try:
                tmp_path.unlink(missing_ok=True)
            except OSError:
                pass  # (a read-only directory: nothing could be written there either)
        cause = os_error_in(e) if isinstance(e, Exception) else None
        if cause is None or isinstance(e, WriteError):
            raise
        raise WriteError(f"cannot write {path}: {describe(cause)}") from e


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def remove_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files that `atomic_write` left in `directory` for files
    matching the glob patterns `names` (a write killed before its `os.replace`).
    Returns the removed paths. Only for a directory this run owns
    (`lock_directories`): another run's temporaries are files it is writing."""
    removed = []
    for pattern in names:
        for tmp in directory.glob(f".{pattern}.*{_TMP_SUFFIX}"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def ensure_writable_directory(path: str | os.PathLike) -> Path:
    """Create `path` (and its parents) if needed and check, by writing a file there,
    that this process can write in it. Raises `OSError` (or `NotADirectoryError`)
    with a message saying what is wrong."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the directory {path}: {e.strerror or e}") from e
    probe = _temporary_name(path / "write-check")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.close(fd)
    except OSError as e:
        raise OSError(f"cannot write in the directory {path}: {e.strerror or e}") from e
    probe.unlink(missing_ok=True)
    return path


class DirectoryLock:
    """The lock of a run on its directories (see `lock_directories`): `release` it (or
    use it as a context manager; it is released when garbage-collected, and by the
    operating system when the process ends, however it ends)."""

    def __init__(self) -> None:
        self._held: list[tuple[Path, int]] = []

    @property
    def paths(self) -> list[Path]:
        """The lock files held."""
        return [path for path, _ in self._held]

    def release(self) -> None:
        """Remove the lock files and release them (again: nothing)."""
        while self._held:
            path, fd = self._held.pop()
            try:
                path.unlink(missing_ok=True)  # (while still held: see `_lock_one`)
            except OSError:
                pass  # (a read-only directory: the file stays, and does not block)
            os.close(fd)

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


def _holder() -> str:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started=started))


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, TypeError, KeyError):
        return "its holder did not say which"  # (being written, or not ours)


def _lock_one(directory: Path) -> int | None:
    """Lock `directory` (`fcntl.flock` on its lock file): the lock file's descriptor,
    or None where files cannot be locked."""
    assert fcntl is not None
    path = directory / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise DirectoryInUseError(
                f"{directory} is in use by another run ({_describe_holder(holder)}; lock "
                f"file {path}): wait for it to end, or pick another directory"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        # A run that ends removes its lock file while holding it: if this one was
        # removed (or replaced) after we opened it, the lock we hold is on a dead file.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder().encode(), 0)
            return fd
        os.close(fd)


def lock_directories(directories: Iterable[str | os.PathLike]) -> DirectoryLock:
    """Take the exclusive lock of each of `directories` (which must exist; the same
    directory named twice is locked once) for this run: another run that tries to lock
    one of them while it is held is refused.

    The lock is `fcntl.flock` on a lock file in each directory, which records the
    holder (process id, host, start time) for the refusal's message. The operating
    system releases it when the process ends, however it ends: a lock file left by a
    killed run does not block. Where files cannot be locked (no `fcntl`, or a file
    system without locks) a warning says so and the run goes on unlocked.

    **Raises:** `DirectoryInUseError` (naming the directory and the holder) if another
    run holds one of the directories; then none is held."""
    lock = DirectoryLock()
    seen = []
    try:
        for directory in map(Path, directories):
            st = directory.stat()
            if any(os.path.samestat(st, other) for other in seen):
                continue
            seen.append(st)
            fd = _lock_one(directory) if fcntl is not None else None
            if fd is None:
                warnings.warn(
                    f"{directory} cannot be locked here: another run could write in it "
                    "at the same time",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            lock._held.append((directory / LOCK_FILE, fd))
    except BaseException:
        lock.release()
        raise
    return lock
