"""MNIST as the four standard IDX files: a strict IDX reader and a verified loader.

`read_idx` parses one IDX file (gzip-compressed or not; compression is detected by the
gzip magic bytes, not by the file name) and refuses anything malformed with an
`MNISTDataError` that names the file.

`load_mnist` finds the four files, checks them and returns an `MNIST` tuple of numpy
arrays. Where it looks, in order:

1. `data_dir`, when given and the directory exists: only there, and it never downloads
   into it;
2. the environment variable ``FIXEDPOINT_MNIST_DIR``, when set and the directory
   exists: likewise only there;
3. the cache directory: `cache_dir`, else ``$FIXEDPOINT_CACHE_DIR/mnist``, else
   ``~/.cache/fixedpoint/mnist``. Files missing there are downloaded (when
   ``download=True``) from public mirrors, checked against the SHA-256 of their
   decompressed content, and written atomically.

A directory named in 1. or 2. that does not exist is passed over, with a warning on the
``fixedpoint_deq.mnist.data`` logger (shown on the console unless logging is configured
otherwise); one that exists but lacks a file or holds a bad one is an error.

Each file may be stored gzip-compressed (``name.gz``) or plain (``name``).
Only numpy and the standard library are used.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np


__all__ = [
    "ENV_CACHE_DIR",
    "ENV_MNIST_DIR",
    "FILE_NAMES",
    "MIRRORS",
    "MNIST",
    "MNISTDataError",
    "SHA256",
    "default_cache_dir",
    "download_mnist",
    "fetch_url",
    "find_mnist_files",
    "load_mnist",
    "read_idx",
]

_log = logging.getLogger(__name__)

#: Environment variable naming a directory that holds the four MNIST files.
ENV_MNIST_DIR = "FIXEDPOINT_MNIST_DIR"
#: Environment variable naming the root of fixedpoint's cache (MNIST goes in ``mnist/``).
ENV_CACHE_DIR = "FIXEDPOINT_CACHE_DIR"

#: The four files, by role, under their uncompressed names.
FILE_NAMES: Mapping[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: SHA-256 of the UNCOMPRESSED content of each file (independent of the gzip wrapper).
SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Public mirrors serving ``<name>.gz``, tried in order.
MIRRORS: Sequence[str] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> big-endian dtype of the payload.
_IDX_DTYPES: Mapping[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

PathLike = str | os.PathLike[str]
Fetch = Callable[[str], bytes]


class MNISTDataError(ValueError):
    """A data file is missing, malformed or not the expected content."""


class MNIST(NamedTuple):
    """The MNIST data set as numpy arrays.

    Images are ``(N, 28, 28)`` uint8 in 0..255, labels ``(N,)`` uint8 in 0..9; the
    standard split has N = 60000 for training and N = 10000 for testing.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


# --------------------------------------------------------------------------- IDX files


def _gunzip(data: bytes, path: PathLike) -> bytes:
    """Decompress a whole gzip stream (one or more members), strictly."""
    chunks: list[bytes] = []
    rest = data
    while True:
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            chunks.append(d.decompress(rest))
            chunks.append(d.flush())
        except zlib.error as e:
            raise MNISTDataError(f"{path}: corrupt gzip stream ({e})") from None
        if not d.eof:
            raise MNISTDataError(
                f"{path}: truncated gzip stream (the compressed data ends before the "
                "end-of-stream marker; the file is probably incompletely downloaded)"
            )
        rest = d.unused_data
        if not rest:
            return b"".join(chunks)
        if not rest.startswith(_GZIP_MAGIC):
            raise MNISTDataError(
                f"{path}: {len(rest)} trailing byte(s) after the end of the gzip stream"
            )


def _read_bytes(path: PathLike) -> bytes:
    """The content of `path`, decompressed if it starts with the gzip magic bytes."""
    data = Path(path).read_bytes()
    if data.startswith(_GZIP_MAGIC):
        data = _gunzip(data, path)
    return data


def _parse_idx(data: bytes, path: PathLike) -> np.ndarray:
    """Parse the (uncompressed) IDX bytes `data`; `path` is used in error messages."""
    if len(data) < 4:
        raise MNISTDataError(
            f"{path}: not an IDX file: only {len(data)} byte(s), shorter than the 4-byte magic"
        )
    if data[0] != 0 or data[1] != 0:
        raise MNISTDataError(
            f"{path}: not an IDX file: bad magic number 0x{data[:4].hex()} "
            "(an IDX file starts with two zero bytes, a type code and the number of dimensions)"
        )
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise MNISTDataError(f"{path}: unknown IDX type code 0x{type_code:02X} (known: {known})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTDataError(
            f"{path}: truncated IDX header: {ndim} dimension(s) need {header} header bytes, "
            f"the file has {len(data)}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    count = 1
    for n in shape:
        count *= n
    expected = count * dtype.itemsize
    payload = len(data) - header
    if payload < expected:
        raise MNISTDataError(
            f"{path}: truncated IDX data: shape {shape} of {dtype.name} needs {expected} "
            f"payload bytes, the file has {payload}"
        )
    if payload > expected:
        raise MNISTDataError(
            f"{path}: {payload - expected} trailing byte(s) after the IDX data "
            f"(shape {shape} of {dtype.name} needs {expected} payload bytes, the file has {payload})"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    # A writable copy in native byte order (JAX and most code want native order).
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not, into a numpy array.

    Compression is detected by the gzip magic bytes ``1f 8b``, not by the extension.
    Supported IDX type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64 (stored big-endian; returned as a writable array in
    native byte order, with the shape given by the header).

    Raises:
        MNISTDataError: the file is not a well-formed IDX file (bad magic, unknown type
            code, truncated header or data, trailing bytes, corrupt or truncated gzip
            stream); the message names the file and the problem.
        OSError: the file cannot be read (e.g. `FileNotFoundError`).
    """
    return _parse_idx(_read_bytes(path), path)


# --------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """The directory where MNIST is cached and downloaded to by default.

    ``$FIXEDPOINT_CACHE_DIR/mnist`` if that variable is set (and non-empty), else
    ``~/.cache/fixedpoint/mnist``.
    """
    root = os.environ.get(ENV_CACHE_DIR)
    if root:
        return Path(root).expanduser() / "mnist"
    return Path.home() / ".cache" / "fixedpoint" / "mnist"


def find_mnist_files(directory: PathLike) -> tuple[dict[str, Path], list[str]]:
    """Look for the four MNIST files in `directory`.

    For each file, ``name.gz`` is preferred to the uncompressed ``name``.

    Returns:
        ``(found, missing)``: `found` maps each uncompressed file name present to its
        path, `missing` lists the names of the absent ones (as ``name.gz``).
    """
    directory = Path(directory)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in FILE_NAMES.values():
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            missing.append(f"{name}.gz")
    return found, missing


def _how_to_provide() -> str:
    names = ", ".join(f"{n}.gz" for n in FILE_NAMES.values())
    return (
        f"Put the four MNIST files ({names}; gzip-compressed or not) in a directory and "
        f"pass --data-dir DIR (data_dir=DIR) or set {ENV_MNIST_DIR}=DIR."
    )


# --------------------------------------------------------------------------- download


def fetch_url(url: str, *, timeout: float = 60.0) -> bytes:
    """Download `url` with urllib and return its body (raises `OSError` on failure)."""
    request = urllib.request.Request(url, headers={"User-Agent": "fixedpoint-mnist/0.1"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _download_one(
    name: str,
    directory: Path,
    *,
    mirrors: Sequence[str],
    fetch: Fetch,
    checksums: Mapping[str, str],
) -> Path:
    """Download ``name.gz`` into `directory`, verified and written atomically."""
    failures: list[str] = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{name}.gz"
        _log.info("downloading %s", url)
        try:
            body = fetch(url)
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts are OSErrors
            failures.append(f"{url}: {e}")
            continue
        break
    else:
        raise MNISTDataError(
            f"MNIST file {name}.gz is not in {directory} and could not be downloaded "
            f"({'; '.join(failures) or 'no mirrors given'}). {_how_to_provide()}"
        )

    target = directory / f"{name}.gz"
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.gz.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        # Check what was written, exactly as a later load will read it.
        data = _read_bytes(tmp)
        digest = hashlib.sha256(data).hexdigest()
        if digest != checksums[name]:
            raise MNISTDataError(
                f"{name}.gz downloaded from {url} has the wrong content: sha256 of the "
                f"decompressed bytes is {digest}, expected {checksums[name]}; the download "
                f"was discarded. {_how_to_provide()}"
            )
        _parse_idx(data, url)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def download_mnist(
    cache_dir: PathLike | None = None,
    *,
    mirrors: Sequence[str] = MIRRORS,
    fetch: Fetch | None = None,
    checksums: Mapping[str, str] | None = None,
) -> Path:
    """Download the MNIST files missing from `cache_dir` and return that directory.

    Each missing file is fetched as ``name.gz`` from the first of `mirrors` that
    answers, checked against the SHA-256 of its decompressed content, and moved into
    place atomically (temporary file + `os.replace`), so an interrupted or bad download
    never leaves a file under the final name. Files already present are not fetched.

    Args:
        cache_dir: where to put the files; default `default_cache_dir()`.
        mirrors: base URLs, tried in order.
        fetch: ``fetch(url) -> bytes``; default `fetch_url`. Network errors must be
            raised as `OSError` (e.g. `urllib.error.URLError`) for the next mirror to
            be tried.
        checksums: uncompressed name -> expected SHA-256 hex digest; default `SHA256`.

    Raises:
        MNISTDataError: no mirror could serve a file, or a download has the wrong content.
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    fetch = fetch_url if fetch is None else fetch
    checksums = SHA256 if checksums is None else checksums
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MNISTDataError(
            f"cannot create the MNIST cache directory {directory} ({e}). {_how_to_provide()}"
        ) from e
    _, missing = find_mnist_files(directory)
    for gz_name in missing:
        _download_one(
            gz_name.removesuffix(".gz"),
            directory,
            mirrors=mirrors,
            fetch=fetch,
            checksums=checksums,
        )
    return directory


# --------------------------------------------------------------------------- loading


def _load_checked(path: Path, name: str, ndim: int, verify: bool) -> np.ndarray:
    """Read one of the four files, checking its checksum (if `verify`) and structure."""
    data = _read_bytes(path)
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256[name]:
            raise MNISTDataError(
                f"{path}: not the standard MNIST {name}: sha256 of the decompressed bytes is "
                f"{digest}, expected {SHA256[name]} (delete the file if it is corrupt, or pass "
                "verify=False to load a different data set in the same format)"
            )
    array = _parse_idx(data, path)
    if array.dtype != np.uint8 or array.ndim != ndim:
        raise MNISTDataError(
            f"{path}: expected a {ndim}-D uint8 array, got shape {array.shape} of {array.dtype}"
        )
    return array


def load_mnist(
    data_dir: PathLike | None = None,
    *,
    cache_dir: PathLike | None = None,
    download: bool = True,
    verify: bool = True,
    fetch: Fetch | None = None,
) -> MNIST:
    """Load MNIST as numpy arrays, downloading it into the cache if needed and allowed.

    Where the files are looked for, in order (each file as ``name.gz`` or ``name``):

    1. `data_dir`, if given and the directory exists: only there; missing files are an
       error, never downloaded;
    2. ``$FIXEDPOINT_MNIST_DIR``, if set and the directory exists: likewise only there;
    3. `cache_dir`, else ``$FIXEDPOINT_CACHE_DIR/mnist``, else ``~/.cache/fixedpoint/mnist``;
       files missing there are downloaded if `download` (see `download_mnist`).

    A `data_dir` or ``$FIXEDPOINT_MNIST_DIR`` that does not exist is passed over for the
    next place, and a one-line warning on this module's logger says so and where the
    files are taken from instead (and whether they are being downloaded).

    Args:
        data_dir: directory holding the four files.
        cache_dir: cache directory (the files go directly in it).
        download: whether files missing from the cache may be downloaded.
        verify: check the SHA-256 of each file's decompressed content against `SHA256`
            (about 0.3 s). Structure (IDX format, uint8, 3-D images and 1-D labels of
            matching counts, labels in 0..9) is checked in any case.
        fetch: ``fetch(url) -> bytes`` used for downloading; default `fetch_url`.

    Returns:
        An `MNIST` tuple: ``train_images (60000, 28, 28)``, ``train_labels (60000,)``,
        ``test_images (10000, 28, 28)``, ``test_labels (10000,)``, all uint8.

    Raises:
        MNISTDataError: files missing (the message names the directory, the missing files
            and how to provide them), malformed, or not the expected content; or a named
            directory does not exist and the cache cannot provide the files.
    """
    named: list[tuple[Path, str]] = []
    if data_dir is not None:
        named.append((Path(data_dir).expanduser(), "data directory"))
    if os.environ.get(ENV_MNIST_DIR):
        named.append((Path(os.environ[ENV_MNIST_DIR]).expanduser(), f"${ENV_MNIST_DIR}"))
    absent: list[str] = []  # the named directories passed over, in words
    for directory, source in named:
        if directory.exists():
            break
        absent.append(f"the {source} {directory} does not exist")
    else:
        directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        source = "cache directory"
    passed_over = ", and ".join(absent)

    _, missing = find_mnist_files(directory)
    fetching = source == "cache directory" and bool(missing) and download
    if absent:
        using = "the cache" if source == "cache directory" else source
        _log.warning(
            "MNIST: %s; using %s %s%s",
            passed_over,
            using,
            directory,
            " (downloading the missing files)" if fetching else "",
        )
    if fetching:
        try:
            download_mnist(directory, fetch=fetch)
        except MNISTDataError as e:
            if absent:
                raise MNISTDataError(f"{passed_over}, and {e}") from None
            raise

    found, missing = find_mnist_files(directory)
    if missing:
        if not directory.exists():
            where = "does not exist"
        elif not directory.is_dir():
            where = "is not a directory"
        else:
            where = f"lacks {', '.join(missing)}"
        hint = " (downloading is disabled)" if source == "cache directory" else ""
        before = f"{passed_over}, and " if absent else ""
        raise MNISTDataError(
            f"MNIST not found: {before}the {source} {directory} {where}{hint}. {_how_to_provide()}"
        )

    arrays = {
        role: _load_checked(found[name], name, 3 if role.endswith("images") else 1, verify)
        for role, name in FILE_NAMES.items()
    }
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        images_path = found[FILE_NAMES[f"{split}_images"]]
        labels_path = found[FILE_NAMES[f"{split}_labels"]]
        if images.shape[0] != labels.shape[0]:
            raise MNISTDataError(
                f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                f"{labels.shape[0]} labels"
            )
        if labels.size and labels.max() > 9:
            raise MNISTDataError(
                f"{labels_path}: labels must lie in 0..9, found {int(labels.max())}"
            )
    return MNIST(**arrays)
