"""Tests for `fixedpoint_deq.mnist.data`: the IDX reader and the MNIST loader (offline)."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from fixedpoint_deq.mnist import data as mnist_data
from fixedpoint_deq.mnist.data import (
    download_mnist,
    ENV_CACHE_DIR,
    ENV_MNIST_DIR,
    FILE_NAMES,
    load_mnist,
    MIRRORS,
    MNIST,
    MNISTDataError,
    read_idx,
)


SHARED_MNIST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mnist"
needs_shared = pytest.mark.skipif(
    not SHARED_MNIST.is_dir(), reason=f"shared MNIST copy not present at {SHARED_MNIST}"
)

_TYPE_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode `array` as an (uncompressed) IDX file."""
    array = np.asarray(array)
    header = bytes([0, 0, _TYPE_CODES[array.dtype], array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _no_network(url: str) -> bytes:
    raise AssertionError(f"test tried to download {url}")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the caller's MNIST/cache variables, touches the real home cache or
    reaches the network (the default `fetch_url` fails the test)."""
    monkeypatch.delenv(ENV_MNIST_DIR, raising=False)
    monkeypatch.delenv(ENV_CACHE_DIR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mnist_data, "fetch_url", _no_network)


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(7, dtype=np.uint8),
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-(2**31), -1, 0, 1, 2**31 - 1], dtype=np.int32),
        np.linspace(-2.5, 3.0, 24, dtype=np.float32).reshape(2, 3, 4),
        np.array([-128, 0, 127], dtype=np.int8),
        np.array([[-30000, 5], [7, 30000]], dtype=np.int16),
        np.array([np.pi, -np.e, 1e300], dtype=np.float64),
        np.zeros((0, 28, 28), dtype=np.uint8),
    ],
    ids=["u8-1d", "u8-3d", "i32-1d", "f32-3d", "i8-1d", "i16-2d", "f64-1d", "u8-empty"],
)
def test_read_idx_roundtrip(tmp_path: Path, array: np.ndarray, compress: bool) -> None:
    raw = idx_bytes(array)
    # The extension deliberately does not match the content: detection is by magic bytes.
    path = tmp_path / ("data.idx" if compress else "data.idx.gz")
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
    out = read_idx(path)
    assert out.dtype == array.dtype and out.dtype.isnative
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable
    assert read_idx(str(path)).shape == array.shape  # str paths work too


def test_read_idx_multimember_gzip(tmp_path: Path) -> None:
    raw = idx_bytes(np.arange(100, dtype=np.uint8))
    path = tmp_path / "two-members"
    path.write_bytes(gzip.compress(raw[:50], mtime=0) + gzip.compress(raw[50:], mtime=0))
    np.testing.assert_array_equal(read_idx(path), np.arange(100, dtype=np.uint8))


_GOOD = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
_GOOD_GZ = gzip.compress(_GOOD, mtime=0)
_CORRUPT = {
    "bad-magic": (b"\x01\x02" + _GOOD[2:], "magic"),
    "empty": (b"", "magic"),
    "unknown-type": (_GOOD[:2] + b"\x0a" + _GOOD[3:], "type code 0x0A"),
    "truncated-header": (_GOOD[:9], "truncated IDX header"),
    "truncated-payload": (_GOOD[:-1], "truncated IDX data"),
    "trailing-bytes": (_GOOD + b"\x00\x00", "2 trailing byte"),
    "truncated-gzip": (_GOOD_GZ[: len(_GOOD_GZ) // 2], "truncated gzip"),
    "truncated-gzip-trailer": (_GOOD_GZ[:-3], "truncated gzip"),
    "gzip-bad-crc": (_GOOD_GZ[:-8] + bytes([_GOOD_GZ[-8] ^ 1]) + _GOOD_GZ[-7:], "corrupt gzip"),
    "gzip-trailing-garbage": (_GOOD_GZ + b"junk", "trailing byte(s) after the end of the gzip"),
    "gzip-trailing-zeros": (_GOOD_GZ + b"\x00" * 4, "trailing byte(s) after the end of the gzip"),
    "gzip-of-truncated-idx": (gzip.compress(_GOOD[:-5], mtime=0), "truncated IDX data"),
    "gzip-of-non-idx": (gzip.compress(b"hello world", mtime=0), "magic"),
}


@pytest.mark.parametrize("case", list(_CORRUPT))
def test_read_idx_rejects_corrupt_files(tmp_path: Path, case: str) -> None:
    content, what = _CORRUPT[case]
    path = tmp_path / f"corrupt-{case}-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(MNISTDataError) as info:
        read_idx(path)
    message = str(info.value)
    assert path.name in message
    assert what in message
    assert isinstance(info.value, ValueError)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def shared_mnist() -> MNIST:
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"shared MNIST copy not present at {SHARED_MNIST}")
    return load_mnist(SHARED_MNIST, download=False, verify=True)


def test_real_mnist(shared_mnist: MNIST) -> None:
    m = shared_mnist
    assert m.train_images.shape == (60000, 28, 28) and m.train_images.dtype == np.uint8
    assert m.train_labels.shape == (60000,) and m.train_labels.dtype == np.uint8
    assert m.test_images.shape == (10000, 28, 28) and m.test_images.dtype == np.uint8
    assert m.test_labels.shape == (10000,) and m.test_labels.dtype == np.uint8
    assert m.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert m.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert m.train_images.mean() == pytest.approx(33.32, abs=0.005)
    assert set(np.unique(m.train_labels).tolist()) == set(range(10))
    assert m.train_images.max() == 255


@needs_shared
def test_env_var_dir_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_MNIST_DIR, str(SHARED_MNIST))
    m = load_mnist(cache_dir=tmp_path / "cache", fetch=_no_network, verify=False)
    assert m.test_labels[:3].tolist() == [7, 2, 1]
    assert not (tmp_path / "cache").exists()


@needs_shared
def test_uncompressed_files_and_checksum_mismatch(tmp_path: Path) -> None:
    """Plain (uncompressed) files are accepted; a changed file fails verification only."""
    for name in FILE_NAMES.values():
        (tmp_path / name).write_bytes(gzip.decompress((SHARED_MNIST / f"{name}.gz").read_bytes()))
    m = load_mnist(tmp_path, verify=True)
    assert m.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]

    labels = tmp_path / FILE_NAMES["test_labels"]
    raw = bytearray(labels.read_bytes())
    raw[8] = 3  # first test label 7 -> 3: still a valid file, but not MNIST
    labels.write_bytes(bytes(raw))
    with pytest.raises(MNISTDataError, match="sha256") as info:
        load_mnist(tmp_path, verify=True)
    assert labels.name in str(info.value)
    assert load_mnist(tmp_path, verify=False).test_labels[0] == 3


# --------------------------------------------------------------------------- structure


def _write_set(directory: Path, n_train: int = 6, n_test: int = 4, **override: bytes) -> None:
    """A tiny MNIST-shaped data set (gzip files) in `directory`."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    content = {
        "train_images": idx_bytes(rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)),
        "train_labels": idx_bytes(np.arange(n_train, dtype=np.uint8) % 10),
        "test_images": idx_bytes(rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)),
        "test_labels": idx_bytes(np.arange(n_test, dtype=np.uint8) % 10),
    }
    content.update(override)
    for role, name in FILE_NAMES.items():
        (directory / f"{name}.gz").write_bytes(gzip.compress(content[role], mtime=0))


def test_small_set_loads_without_verify(tmp_path: Path) -> None:
    _write_set(tmp_path)
    m = load_mnist(tmp_path, verify=False)
    assert m.train_images.shape == (6, 28, 28) and m.test_labels.tolist() == [0, 1, 2, 3]
    with pytest.raises(MNISTDataError, match="sha256"):
        load_mnist(tmp_path, verify=True)


@pytest.mark.parametrize(
    "override, what",
    [
        ({"train_labels": idx_bytes(np.arange(5, dtype=np.uint8))}, "6 images but"),
        ({"test_labels": idx_bytes(np.array([0, 1, 10, 2], dtype=np.uint8))}, "0..9"),
        ({"test_labels": idx_bytes(np.arange(4, dtype=np.int32))}, "uint8"),
        ({"test_images": idx_bytes(np.zeros((4, 784), dtype=np.uint8))}, "3-D"),
    ],
    ids=["count-mismatch", "label-range", "label-dtype", "image-ndim"],
)
def test_structure_checks(tmp_path: Path, override: dict[str, bytes], what: str) -> None:
    _write_set(tmp_path, **override)  # pyright: ignore[reportArgumentType]
    with pytest.raises(MNISTDataError, match=what):
        load_mnist(tmp_path, verify=False)


def test_missing_files_in_data_dir(tmp_path: Path) -> None:
    _write_set(tmp_path)
    (tmp_path / f"{FILE_NAMES['test_images']}.gz").unlink()
    (tmp_path / f"{FILE_NAMES['train_labels']}.gz").unlink()
    with pytest.raises(MNISTDataError) as info:
        load_mnist(tmp_path, fetch=_no_network)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "t10k-images-idx3-ubyte.gz" in message and "train-labels-idx1-ubyte.gz" in message
    assert "lacks train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz." in message
    assert "--data-dir" in message and ENV_MNIST_DIR in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t10k-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz",
    ]  # nothing was downloaded into an explicit data_dir


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    with pytest.raises(MNISTDataError, match="is not a directory") as info:
        load_mnist(a_file)
    assert f"the data directory {a_file} is not a directory" in str(info.value)
    assert not (tmp_path / "home").exists()  # no fallback to the cache


def test_env_var_dir_missing_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "env").mkdir()
    monkeypatch.setenv(ENV_MNIST_DIR, str(tmp_path / "env"))
    with pytest.raises(MNISTDataError, match=ENV_MNIST_DIR) as info:
        load_mnist(cache_dir=tmp_path / "cache")
    assert f"{tmp_path / 'env'} lacks" in str(info.value)
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- fallback

_LOGGER = "fixedpoint_deq.mnist.data"


def _fake_mirror(
    monkeypatch: pytest.MonkeyPatch, directory: Path
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Serve the small set in `directory` as the mirrors' files, through `fetch_url`
    (the default fetch) and with `SHA256` set to its checksums.

    Returns the list the fetched URLs are appended to, and the served arrays by name.
    """
    payloads = {n: (directory / f"{n}.gz").read_bytes() for n in FILE_NAMES.values()}
    monkeypatch.setattr(
        mnist_data,
        "SHA256",
        {n: hashlib.sha256(gzip.decompress(b)).hexdigest() for n, b in payloads.items()},
    )
    urls: list[str] = []

    def fetch(url: str) -> bytes:
        urls.append(url)
        return payloads[url.rsplit("/", 1)[1].removesuffix(".gz")]

    monkeypatch.setattr(mnist_data, "fetch_url", fetch)
    arrays = {n: read_idx(directory / f"{n}.gz") for n in FILE_NAMES.values()}
    return urls, arrays


@pytest.mark.parametrize("cache_from", ["home", "env"])
def test_missing_data_dir_falls_back_to_the_download_cache(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    cache_from: str,
) -> None:
    """A `data_dir` that does not exist: the cache is used, filled by a checked download,
    and one warning line says so. The call is the trainer's: ``load_mnist(data_dir)``."""
    _write_set(tmp_path / "mirror")
    urls, arrays = _fake_mirror(monkeypatch, tmp_path / "mirror")
    if cache_from == "env":
        monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "root"))
        cache = tmp_path / "root" / "mnist"
    else:
        cache = tmp_path / "home" / ".cache" / "fixedpoint" / "mnist"
    absent = tmp_path / "shared" / "data" / "mnist"

    caplog.set_level(logging.INFO, logger=_LOGGER)
    m = load_mnist(absent)
    for role, name in FILE_NAMES.items():
        np.testing.assert_array_equal(getattr(m, role), arrays[name])
    assert urls == [MIRRORS[0] + f"{n}.gz" for n in FILE_NAMES.values()]
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in FILE_NAMES.values())
    assert not (tmp_path / "shared").exists()  # nothing is created where data_dir points
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"MNIST: the data directory {absent} does not exist; using the cache {cache} "
        "(downloading the missing files)"
    ]

    # Cached now: the same call downloads nothing, and still says where the data come from.
    caplog.clear()
    monkeypatch.setattr(mnist_data, "fetch_url", _no_network)
    m2 = load_mnist(absent)
    np.testing.assert_array_equal(m2.test_images, m.test_images)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        f"MNIST: the data directory {absent} does not exist; using the cache {cache}"
    ]


def test_existing_data_dir_is_used_without_fetching(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A `data_dir` that exists is the only place looked at: nothing is fetched (the
    default fetch fails the test), the cache is not touched, and nothing is logged."""
    _write_set(tmp_path / "data")
    _write_set(tmp_path / "mirror", n_train=3)  # a different set a fallback would load
    _fake_mirror(monkeypatch, tmp_path / "mirror")
    monkeypatch.setattr(mnist_data, "fetch_url", _no_network)
    caplog.set_level(logging.INFO, logger=_LOGGER)
    m = load_mnist(tmp_path / "data", verify=False)
    assert m.train_images.shape == (6, 28, 28)
    assert not (tmp_path / "home").exists()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    # Present but incomplete: the directory's own error, still no fetch and no cache.
    (tmp_path / "data" / f"{FILE_NAMES['test_labels']}.gz").unlink()
    with pytest.raises(MNISTDataError, match="lacks t10k-labels-idx1-ubyte.gz"):
        load_mnist(tmp_path / "data", verify=False)
    assert not (tmp_path / "home").exists()


def test_missing_data_dir_falls_back_to_the_env_var_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_set(tmp_path / "env")
    monkeypatch.setenv(ENV_MNIST_DIR, str(tmp_path / "env"))
    caplog.set_level(logging.INFO, logger=_LOGGER)
    m = load_mnist(tmp_path / "absent", verify=False)
    assert m.train_images.shape == (6, 28, 28)
    assert not (tmp_path / "home").exists()
    assert [r.getMessage() for r in caplog.records] == [
        f"MNIST: the data directory {tmp_path / 'absent'} does not exist; "
        f"using ${ENV_MNIST_DIR} {tmp_path / 'env'}"
    ]


def test_missing_data_dir_offline_names_both_places(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No data anywhere and no network (or downloading disabled): the error says that the
    data directory and the env var's directory do not exist, and why the cache failed."""
    monkeypatch.setenv(ENV_MNIST_DIR, str(tmp_path / "env"))
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "root"))
    cache = tmp_path / "root" / "mnist"

    def offline(url: str) -> bytes:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mnist_data, "fetch_url", offline)
    absent = tmp_path / "absent"
    passed_over = (
        f"the data directory {absent} does not exist, and the ${ENV_MNIST_DIR} "
        f"{tmp_path / 'env'} does not exist, and "
    )
    with pytest.raises(MNISTDataError) as info:
        load_mnist(absent)
    message = str(info.value)
    assert message.startswith(passed_over + "MNIST file train-images-idx3-ubyte.gz is not in")
    assert str(cache) in message and "could not be downloaded" in message
    assert "--data-dir" in message and list(cache.iterdir()) == []
    with pytest.raises(MNISTDataError) as info:
        load_mnist(absent, download=False)
    assert str(info.value).startswith(
        f"MNIST not found: {passed_over}the cache directory {cache} lacks "
    )
    assert "(downloading is disabled)" in str(info.value)
    assert not absent.exists() and not (tmp_path / "env").exists()


# --------------------------------------------------------------------------- download


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert mnist_data.default_cache_dir() == tmp_path / "home" / ".cache" / "fixedpoint" / "mnist"
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "c"))
    assert mnist_data.default_cache_dir() == tmp_path / "c" / "mnist"


def test_download_disabled(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(MNISTDataError, match="downloading is disabled") as info:
        load_mnist(cache_dir=cache, download=False, fetch=_no_network)
    assert str(cache) in str(info.value)


def test_offline_error_says_how_to_provide(tmp_path: Path) -> None:
    urls: list[str] = []

    def offline(url: str) -> bytes:
        urls.append(url)
        raise urllib.error.URLError("no network")

    cache = tmp_path / "cache"
    with pytest.raises(MNISTDataError) as info:
        load_mnist(cache_dir=cache, fetch=offline)
    message = str(info.value)
    assert str(cache) in message and "could not be downloaded" in message
    assert "--data-dir" in message and ENV_MNIST_DIR in message
    for name in FILE_NAMES.values():
        assert f"{name}.gz" in message
    assert urls == [m + "train-images-idx3-ubyte.gz" for m in MIRRORS]  # every mirror, in order
    assert list(cache.iterdir()) == []


def test_default_cache_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_CACHE_DIR, str(tmp_path / "root"))

    def offline(url: str) -> bytes:
        raise OSError("offline")

    with pytest.raises(MNISTDataError) as info:
        load_mnist(fetch=offline)
    assert str(tmp_path / "root" / "mnist") in str(info.value)


def test_download_wrong_checksum_is_rejected(tmp_path: Path) -> None:
    fake = gzip.compress(idx_bytes(np.arange(10, dtype=np.uint8)), mtime=0)  # valid IDX, not MNIST
    cache = tmp_path / "cache"
    with pytest.raises(MNISTDataError, match="sha256") as info:
        load_mnist(cache_dir=cache, fetch=lambda url: fake)
    assert "train-images-idx3-ubyte.gz" in str(info.value)
    assert list(cache.iterdir()) == []  # neither the file nor a temporary remains


def test_download_corrupt_gzip_is_rejected(tmp_path: Path) -> None:
    fake = gzip.compress(idx_bytes(np.arange(10, dtype=np.uint8)), mtime=0)[:-6]
    cache = tmp_path / "cache"
    with pytest.raises(MNISTDataError, match="truncated gzip"):
        download_mnist(cache, fetch=lambda url: fake)
    assert list(cache.iterdir()) == []


def test_good_fake_download_lands_atomically(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With an injected checksum table: fallback to the second mirror, atomic replace."""
    payloads = {
        name: gzip.compress(idx_bytes(np.full(3 + i, i, dtype=np.uint8)), mtime=0)
        for i, name in enumerate(FILE_NAMES.values())
    }
    checksums = {
        name: hashlib.sha256(gzip.decompress(b)).hexdigest() for name, b in payloads.items()
    }
    cache = tmp_path / "cache"
    cache.mkdir()
    # One file is already present: it must not be fetched again.
    present = FILE_NAMES["test_labels"]
    (cache / f"{present}.gz").write_bytes(payloads[present])

    urls: list[str] = []

    def fetch(url: str) -> bytes:
        urls.append(url)
        if url.startswith("https://first/"):
            raise urllib.error.URLError("first mirror down")
        return payloads[url.rsplit("/", 1)[1].removesuffix(".gz")]

    replaced: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy_replace(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        src, dst = Path(src), Path(dst)
        assert src.parent == dst.parent == cache and not dst.exists()
        assert src.read_bytes() == payloads[dst.name.removesuffix(".gz")]
        replaced.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(mnist_data.os, "replace", spy_replace)
    out = download_mnist(
        cache, mirrors=("https://first/", "https://second/mnist"), fetch=fetch, checksums=checksums
    )
    assert out == cache
    expected = [n for n in FILE_NAMES.values() if n != present]
    assert [dst.name for _, dst in replaced] == [f"{n}.gz" for n in expected]
    assert urls == [f"https://{m}/{n}.gz" for n in expected for m in ("first", "second/mnist")]
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in FILE_NAMES.values())
    for i, name in enumerate(FILE_NAMES.values()):
        np.testing.assert_array_equal(read_idx(cache / f"{name}.gz"), np.full(3 + i, i))

    # Everything is present now: a second call fetches nothing.
    download_mnist(cache, fetch=_no_network, checksums=checksums)


@needs_shared
def test_load_mnist_downloads_into_cache(tmp_path: Path) -> None:
    """A fake mirror serving the real files: load_mnist downloads, verifies and loads."""
    urls: list[str] = []

    def fetch(url: str) -> bytes:
        urls.append(url)
        return (SHARED_MNIST / url.rsplit("/", 1)[1]).read_bytes()

    cache = tmp_path / "cache"
    m = load_mnist(cache_dir=cache, fetch=fetch)
    assert m.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert len(urls) == 4 and all(u.startswith(MIRRORS[0]) for u in urls)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in FILE_NAMES.values())
    # Cached now: no further downloads.
    m2 = load_mnist(cache_dir=cache, fetch=_no_network, verify=False)
    np.testing.assert_array_equal(m2.test_labels, m.test_labels)
