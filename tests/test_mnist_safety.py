"""The MNIST trainer owns its directories and survives faults around saving: a lock on
the checkpoint and output directories, saves that only delete their own files, a clear
line and exit status for a disk that fills or turns read-only, and Ctrl-C that stops
between steps.

Fast by design: a tiny model on synthetic digits (no MNIST needed), every run with the
same step settings (one compilation for the file); faults are injected by patching the
functions that write.
"""

import errno
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np
import pytest

from fixedpoint_deq.mnist import _files, checkpoint as ck, train as tr
from fixedpoint_deq.mnist.__main__ import main
from fixedpoint_deq.mnist.build import make_model, make_optimizer
from fixedpoint_deq.mnist.config import Config
from fixedpoint_deq.mnist.inputs import prepare_images
from fixedpoint_deq.mnist.metrics import METRICS_FILE, PLOT_FILE


# Three steps of 16 digits per epoch, two epochs: the smallest run with a step inside an
# epoch and an epoch after a checkpoint, and the quickest step to compile.
TINY: dict[str, Any] = dict(
    width=4,
    batch_size=16,
    eval_batch_size=16,
    max_steps=2,
    solver="neumann",  # (the cheapest step to compile)
    backward="jfb",
    jac_reg=0.0,
    augment_shift=0,
    warmup_steps=1,
    epochs=2,
    seed=0,
)


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    return (
        prepare_images(images[:48]),
        labels[:48],
        prepare_images(images[48:]),
        labels[48:],
    )


DIGITS = _digits()


def _cli(*args: str) -> list[str]:
    argv = ["--no-progress"]
    for k, v in TINY.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return argv + list(args)


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of the command line on the synthetic digits."""
    monkeypatch.setattr(tr, "load_data", lambda config: DIGITS)
    before = signal.getsignal(signal.SIGINT)
    try:
        status = main(_cli(*args))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command line as a KeyboardInterrupt")
    assert signal.getsignal(signal.SIGINT) is before  # (the handler is restored)
    out, err = capsys.readouterr()
    return status, out, err


def _dirs(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    return ckpt, out, ["--checkpoint-dir", str(ckpt), "--out-dir", str(out)]


def _one_error_line(err: str, *parts: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def _saved_epoch(ckpt: Path) -> int:
    """The epoch of the checkpoint in `ckpt`, which must load whole."""
    _, _, epoch = ck.load_model(ckpt)
    return epoch


def _unlocked(*directories: Path) -> bool:
    """No lock file is left, and a new run can take the directories."""
    if any((d / _files.LOCK_FILE).exists() for d in directories):
        return False
    _files.lock_directories(directories).release()
    return True


# --------------------------------------------------------------------------- the lock


def test_a_run_is_refused_a_directory_that_another_run_holds(tmp_path, monkeypatch, capsys):
    """While a run holds its directories, another run on either of them (whatever its
    flags: here `--resume` against `--overwrite`) stops before it reads, writes or
    deletes anything, with one line naming the holder and exit status 1."""
    ckpt, out, _ = _dirs(tmp_path)
    config = Config(**TINY, checkpoint_dir=str(ckpt))
    model = make_model(config)
    ck.save_checkpoint(ckpt, 1, model, {}, jax.random.key(0), [], config)  # (an earlier run's)
    with tr.prepare_run(Config(**TINY, checkpoint_dir=str(ckpt), resume=True)):
        # A save of the holder half-way through: its temporary file.
        saving = ckpt / ".ckpt-0002-0a0b0c0d.eqx.1a2b3c4d5e6f.tmp"
        saving.write_bytes(b"half a model")
        before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
        holder = f"pid {os.getpid()} on {socket.gethostname()}"
        for flags in (["--overwrite"], ["--resume"], ["--out-dir", str(tmp_path / "other")]):
            status, _, err = _run(monkeypatch, capsys, "--checkpoint-dir", str(ckpt), *flags)
            assert status == 1
            _one_error_line(err, f"{ckpt} is in use by another run", holder)
        # The output directory alone is enough to be refused.
        with tr.prepare_run(Config(out_dir=str(out))):
            status, _, err = _run(monkeypatch, capsys, "--out-dir", str(out))
            assert status == 1
            _one_error_line(err, f"{out} is in use by another run", holder)
        with pytest.raises(tr.DirectoryInUseError, match="in use by another run"):
            tr.train(
                Config(**TINY, checkpoint_dir=str(ckpt), overwrite=True),
                DIGITS,
                progress=False,
            )
        assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert _unlocked(ckpt, out)
    # The same directory as checkpoint and output directory is one lock, not a conflict.
    status, _, err = _run(monkeypatch, capsys, "--checkpoint-dir", str(out), "--out-dir", str(out))
    assert status == 0, err
    assert _saved_epoch(out) == 2 and _unlocked(out)


_HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
lock = files.lock_directories(sys.argv[2:])
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_lock_of_another_process_refuses_until_it_is_killed(tmp_path, monkeypatch, capsys):
    """Another process that holds the directory refuses this one, naming its pid; once
    it is killed (`kill -9`: no clean-up) the lock file it leaves does not block."""
    ckpt, out, dirs = _dirs(tmp_path)
    ckpt.mkdir()
    files_py = importlib.util.find_spec("fixedpoint_deq.mnist._files").origin  # type: ignore[union-attr]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(files_py), str(ckpt)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        status, _, err = _run(monkeypatch, capsys, *dirs)
        assert status == 1
        _one_error_line(err, f"{ckpt} is in use by another run", f"pid {holder.pid} on")
        assert not out.exists() or list(out.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()
    lock_file = ckpt / _files.LOCK_FILE
    assert f'"pid": {holder.pid}' in lock_file.read_text()  # left behind
    with tr.prepare_run(Config(checkpoint_dir=str(ckpt))):
        assert f'"pid": {os.getpid()}' in lock_file.read_text()
        with pytest.raises(tr.DirectoryInUseError, match=f"pid {os.getpid()} on"):
            tr.prepare_run(Config(checkpoint_dir=str(ckpt)))
    assert _unlocked(ckpt)


# --------------------------------------------------------------------------- interleaved saves


def _model_state(seed: int):
    config = Config(**dict(TINY, seed=seed))
    model = make_model(config)
    opt_state = make_optimizer(config, 6).init(eqx.filter(model, eqx.is_inexact_array))
    return config, model, opt_state


def test_interleaved_saves_leave_one_whole_checkpoint(tmp_path, monkeypatch):
    """Run B's whole save lands inside run A's save (after A wrote its ``.eqx``, or after
    A wrote its JSON but before it removed the file that JSON replaced; at another epoch
    or the same): the directory always ends with a ``checkpoint.json`` naming a ``.eqx``
    that is there and holds the model of the run that wrote that JSON. The next run
    that owns the directory removes what the other left."""
    runs = {name: _model_state(seed) for name, seed in (("A", 1), ("B", 2))}
    key = jax.random.key(0)
    write_text = ck.write_text
    for i, when in enumerate(["after A's .eqx", "after A's JSON"]):
        for epoch_a, epoch_b in ((2, 3), (2, 2)):
            ckpt = tmp_path / f"{i}-{epoch_a}{epoch_b}"

            def save(name: str, epoch: int) -> None:
                config, model, opt_state = runs[name]
                ck.save_checkpoint(ckpt, epoch, model, opt_state, key, [dict(run=name)], config)

            def interleaved(path, text):
                monkeypatch.setattr(ck, "write_text", write_text)
                if when == "after A's JSON":
                    write_text(path, text)
                save("B", epoch_b)
                if when == "after A's .eqx":
                    write_text(path, text)

            save("A", 1)  # A's checkpoint of its previous epoch
            monkeypatch.setattr(ck, "write_text", interleaved)
            save("A", epoch_a)
            meta = ck.read_meta(ckpt)  # (checks that the file it names is there)
            winner = meta["history"][0]["run"]
            assert winner == ("A" if when == "after A's .eqx" else "B")
            _, model, opt_state = runs[winner]
            loaded = ck.load_checkpoint(ckpt, model, opt_state, key)
            assert loaded is not None and loaded[0] == (epoch_a if winner == "A" else epoch_b)
            got, want = (
                jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_array)) for m in (loaded[1], model)
            )
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a, b)
            tr.prepare_run(Config(checkpoint_dir=str(ckpt), resume=True)).release()
            assert sorted(p.name for p in ckpt.iterdir()) == [ck.CHECKPOINT_JSON, meta["file"]]


def test_warm_starts_remove_only_the_cache_files_they_replace(tmp_path):
    """Once the checkpoint of an epoch is saved, `WarmStarts.prune` removes the cache
    files that this run wrote for other epochs and the one of the checkpoint that the
    save replaced (here: the resumed one's), and no other ``fixed-points-*.npz`` (a
    copy, another run's)."""
    from fixedpoint_deq.mnist.warm import WarmStarts

    ckpt, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = Config(**TINY, checkpoint_dir=str(ckpt))
    ck.save_checkpoint(ckpt, 3, make_model(config), {}, jax.random.key(0), [], config)
    assert ck.checkpoint_epoch(ckpt) == 3 and ck.checkpoint_epoch(elsewhere) is None
    foreign = {
        name: b"not this run's" for name in ("fixed-points-0001.npz", "fixed-points-0007.npz")
    }
    for name, content in {**foreign, "fixed-points-0003.npz": b"the resumed one's"}.items():
        (ckpt / name).write_bytes(content)

    def caches() -> list[str]:
        return sorted(p.name for p in ckpt.glob("fixed-points-*.npz"))

    warm = WarmStarts(8, 2, side=3)
    warm.save(elsewhere, 4)  # (another directory: not pruned with this one)
    assert warm.save(ckpt, 4) == ckpt / "fixed-points-0004.npz"
    assert warm.prune(ckpt, 4, ck.checkpoint_epoch(ckpt)) == [ckpt / "fixed-points-0003.npz"]
    assert caches() == ["fixed-points-0001.npz", "fixed-points-0004.npz", "fixed-points-0007.npz"]
    warm.save(ckpt, 5)
    assert warm.prune(ckpt, 5, 4) == [ckpt / "fixed-points-0004.npz"]
    warm.save(ckpt, 5)  # (the same epoch again: its file is kept)
    assert warm.prune(ckpt, 5, 5) == []
    assert caches() == ["fixed-points-0001.npz", "fixed-points-0005.npz", "fixed-points-0007.npz"]
    assert all((ckpt / name).read_bytes() == content for name, content in foreign.items())
    assert (elsewhere / "fixed-points-0004.npz").is_file()
    # What it wrote loads back.
    loaded = WarmStarts(8, 2, side=3)
    loaded.load(ckpt, 5, log=pytest.fail)
    np.testing.assert_array_equal(np.asarray(loaded.cache.filled), np.asarray(warm.cache.filled))


# --------------------------------------------------------------------------- faults


def _fault_after_saves(monkeypatch, saves: int):
    """A dict whose ``"armed"`` turns True once `saves` checkpoints are saved."""
    state = dict(armed=False, saves=0)
    save = tr.save_checkpoint

    def save_then_arm(*args, **kwargs):
        path = save(*args, **kwargs)
        state["saves"] += 1
        state["armed"] = state["saves"] >= saves
        return path

    monkeypatch.setattr(tr, "save_checkpoint", save_then_arm)
    return state


@pytest.mark.parametrize(
    "fault", ["disk full in .eqx", "read-only checkpoint", "disk full in jsonl"]
)
def test_a_failed_write_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, capsys, fault
):
    """In epoch 2: the disk fills while the model is serialised (equinox wraps the
    error), the checkpoint directory turns read-only, or the disk of the output
    directory fills (once the checkpoint of epoch 2 is saved). Each: exit status 1, one line naming the file and the fault and
    the last good checkpoint, which loads; no temporary file is left, and the lock is
    released."""
    ckpt, out, dirs = _dirs(tmp_path)
    state = _fault_after_saves(monkeypatch, 2 if fault == "disk full in jsonl" else 1)
    if fault == "disk full in .eqx":
        write_array = ck._write_array

        def full(f, x):
            if state["armed"]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            write_array(f, x)

        monkeypatch.setattr(ck, "_write_array", full)
        expected = ["ckpt-0002-", ".eqx: No space left on device", "epoch 2 was not saved"]
        last = 1
    elif fault == "read-only checkpoint":
        os_open = os.open

        def read_only(path, *args, **kwargs):
            if state["armed"] and str(path).startswith(str(ckpt)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return os_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
        expected = ["ckpt-0002-", "Read-only file system", "epoch 2 was not saved"]
        last = 1
    else:
        write_text = Path.write_text

        def full_out(self, *args, **kwargs):
            if state["armed"] and str(self).startswith(str(out)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", full_out)
        expected = [f"{out / METRICS_FILE}: No space left on device"]
        last = 2
    status, _, err = _run(monkeypatch, capsys, *dirs)
    assert status == 1, err
    line = _one_error_line(err, "fixedpoint-mnist: error: cannot write", *expected)
    assert f"last good checkpoint: epoch {last} in {ckpt}" in line
    monkeypatch.undo()
    assert _saved_epoch(ckpt) == last
    metrics = (out / METRICS_FILE).read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in metrics] == [1]
    leftovers = [p.name for d in (ckpt, out) for p in d.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert _unlocked(ckpt, out)


def test_a_plot_that_cannot_be_written_is_a_warning(tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    ckpt, out, dirs = _dirs(tmp_path)
    status, stdout, err = _run(monkeypatch, capsys, *dirs)
    assert status == 0, err
    warnings = [s for s in stdout.splitlines() if s.startswith("warning:")]
    assert len(warnings) == 2  # one per epoch
    assert f"{out / PLOT_FILE}: No space left on device" in warnings[0]
    metrics = (out / METRICS_FILE).read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in metrics] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == [METRICS_FILE]
    assert _saved_epoch(ckpt) == 2


# --------------------------------------------------------------------------- Ctrl-C


@pytest.fixture
def ctrl_c_as_in_a_terminal():
    """SIGINT raises `KeyboardInterrupt`, as in a terminal (a process that a script
    starts in the background ignores it, and so do the runs started there)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_as_in_a_terminal")
@pytest.mark.parametrize(
    "at, presses, swallowed, message",
    [
        (
            (2, 0),
            1,
            False,
            "interrupted in epoch 2 after 1 of 3 steps; last good checkpoint: epoch 1 in {ckpt} "
            "(continue it with --resume)",
        ),
        ((1, 1), 1, False, "interrupted in epoch 1 after 2 of 3 steps; nothing saved"),
        # Where a KeyboardInterrupt would be swallowed (as in JAX's gc callback).
        ((2, 0), 1, True, "interrupted in epoch 2 after 1 of 3 steps; last good checkpoint"),
        # A second Ctrl-C stops inside the step.
        ((2, 1), 2, False, "interrupted in epoch 2; last good checkpoint: epoch 1 in {ckpt}"),
    ],
)
def test_ctrl_c_stops_the_run_saying_what_was_saved(
    tmp_path, monkeypatch, capsys, at, presses, swallowed, message
):
    ckpt, out, dirs = _dirs(tmp_path)
    step_key = tr.step_key

    def press_ctrl_c(key, epoch, step):
        if (epoch, step) == at:
            for _ in range(presses):
                try:
                    # To this thread, the main one: the handler has run when it returns.
                    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
                except KeyboardInterrupt:
                    if not swallowed:
                        raise
        return step_key(key, epoch, step)

    monkeypatch.setattr(tr, "step_key", press_ctrl_c)
    status, _, err = _run(monkeypatch, capsys, *dirs)
    assert status == 130, err
    _one_error_line(err, "fixedpoint-mnist: " + message.format(ckpt=ckpt))
    if at[0] == 2:
        assert _saved_epoch(ckpt) == 1
    else:
        assert not (ckpt / ck.CHECKPOINT_JSON).exists()
    assert _unlocked(ckpt, out)
