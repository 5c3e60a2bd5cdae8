"""Files of a run: atomic writes (a temporary file in the same directory, then
`os.replace`) with the user's umask, the removal of temporaries an interrupted write
left behind, and the check that an output directory can be written."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path


_TMP_SUFFIX = ".tmp"


def _temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` through `write(temporary_path)`, then move it into place: an
    interrupted write never leaves a partial file at `path`.

    The temporary file is created with mode ``0o666`` less the process's umask, like
    any file `open` creates (`tempfile.mkstemp` would make it ``0o600``, unreadable for
    the other users of a shared run directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp_path = _temporary_name(path)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    os.close(fd)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def remove_temporaries(directory: Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files that `atomic_write` left in `directory` for files
    matching the glob patterns `names` (a write killed before its `os.replace`).
    Returns the removed paths."""
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
