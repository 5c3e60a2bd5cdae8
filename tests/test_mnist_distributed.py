"""Multi-process MNIST training outside a cluster: the coordinator options, their
errors, and two local processes that train exactly as one process over two devices.

The two-process runs are real: two `python -m fixedpoint_deq.mnist` processes with
``--coordinator-address localhost:PORT --num-processes 2 --process-id I`` on the CPU
(one device each, Gloo collectives), a tiny model on a few real digits.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fixedpoint_deq.mnist import distributed
from fixedpoint_deq.mnist.__main__ import config_from_args


ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FIXEDPOINT_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))

needs_data = pytest.mark.skipif(
    not (DATA_DIR / "train-images-idx3-ubyte.gz").exists()
    and not (DATA_DIR / "train-images-idx3-ubyte").exists(),
    reason=f"MNIST not found in {DATA_DIR}",
)

# A run that compiles fast (Neumann forward, one phantom step, no Jacobian
# regularisation, mean head, width 4): 3 steps of 16 digits per epoch, 2 epochs, with
# the random shifts of the default recipe.
TINY = [
    "--no-progress",
    "--width", "4",
    "--stem-stride", "1",
    "--head", "mean",
    "--solver", "neumann",
    "--max-steps", "4",
    "--phantom-steps", "1",
    "--jac-reg", "0",
    "--batch-size", "16",
    "--eval-batch-size", "32",
    "--epochs", "2",
    "--warmup-steps", "2",
    "--train-subset", "48",
    "--test-subset", "32",
    "--seed", "5",
]  # fmt: skip

# The environment variables of the coordinator, cleared for the tests of parsing.
_ENV_NAMES = (
    distributed.ENV_COORDINATOR_ADDRESS,
    distributed.ENV_NUM_PROCESSES,
    distributed.ENV_PROCESS_ID,
    "FIXEDPOINT_DISTRIBUTED",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_NAMES}
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in _ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --------------------------------------------------------------------------- options


def test_explicit_options_imply_distributed(clean_env):
    config, _ = config_from_args(
        ["--coordinator-address", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "3"]
    )
    assert config.distributed
    assert (config.coordinator_address, config.num_processes, config.process_id) == (
        "10.0.0.1:1234",
        4,
        3,
    )
    config, _ = config_from_args([])
    assert not config.distributed and config.coordinator_address is None


def test_environment_fills_what_the_command_line_does_not_give(clean_env):
    clean_env.setenv(distributed.ENV_COORDINATOR_ADDRESS, "[::1]:4000")
    clean_env.setenv(distributed.ENV_NUM_PROCESSES, "2")
    clean_env.setenv(distributed.ENV_PROCESS_ID, "1")
    config, _ = config_from_args([])
    assert config.distributed
    assert (config.coordinator_address, config.num_processes, config.process_id) == (
        "[::1]:4000",
        2,
        1,
    )
    # The command line wins over the environment, option by option.
    config, _ = config_from_args(["--process-id", "0", "--coordinator-address", "host:5"])
    assert (config.coordinator_address, config.num_processes, config.process_id) == (
        "host:5",
        2,
        0,
    )
    assert distributed.split_address("[::1]:4000") == ("::1", 4000)


@pytest.mark.parametrize(
    "argv, env, option",
    [
        (["--num-processes", "2"], {}, "--coordinator-address"),
        (["--coordinator-address", "h:1", "--process-id", "0"], {}, "--num-processes"),
        (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"], {}, "[0, 1]"),
        (["--coordinator-address", "h:1", "--num-processes", "0", "--process-id", "0"], {}, ">= 1"),
        (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "-1"], {}, ">= 0"),
        (["--coordinator-address", "h", "--num-processes", "2", "--process-id", "0"], {}, "HOST:PORT"),
        (["--coordinator-address", "h:0", "--num-processes", "2", "--process-id", "0"], {}, "HOST:PORT"),
        (["--coordinator-timeout", "0"], {}, "--coordinator-timeout"),
        ([], {distributed.ENV_NUM_PROCESSES: "two"}, "$FIXEDPOINT_NUM_PROCESSES"),
        ([], {distributed.ENV_PROCESS_ID: "1"}, "--process-id"),
    ],
)  # fmt: skip
def test_inconsistent_options_are_usage_errors(argv, env, option, clean_env, capsys):
    """Exit status 2 and one error line (after the usage) that names the fault."""
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(SystemExit) as info:
        config_from_args(argv)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("fixedpoint-mnist: error:") and option in last, last


def test_the_options_are_checked_by_the_config_too():
    from fixedpoint_deq.mnist.config import Config

    with pytest.raises(ValueError, match="distributed"):  # explicit options, not distributed
        Config(coordinator_address="h:1", num_processes=2, process_id=0).check()
    Config(coordinator_address="h:1", num_processes=2, process_id=1, distributed=True).check()


def test_an_unanswered_coordinator_is_one_line_and_exit_1(tmp_path):
    """Nobody listens at the address (process 1), or nobody joins (process 0): after
    --coordinator-timeout seconds, one line on stderr and exit status 1 -- not JAX's
    abort with a stack trace. (This also checks that importing the trainer starts no
    JAX backend, which would make `jax.distributed.initialize` refuse.)"""
    procs = {
        pid: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fixedpoint_deq.mnist",
                "--coordinator-address",
                f"localhost:{_free_port()}",
                "--num-processes",
                "2",
                "--process-id",
                str(pid),
                "--coordinator-timeout",
                "2",
                "--compilation-cache",
                "off",
                "--data-dir",
                str(tmp_path / "no-data"),
                "--out-dir",
                str(tmp_path / f"out{pid}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for pid in (0, 1)
    }
    for pid, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = [s for s in err.splitlines() if s.strip()]
        assert proc.returncode == 1, err
        assert len(lines) == 1 and lines[0].startswith("fixedpoint-mnist: error: process"), err
        assert ("never answered" if pid else "not every process joined") in lines[0], err
        assert "within 2 s" in lines[0]
        assert not (tmp_path / f"out{pid}").exists()  # nothing was written


# --------------------------------------------------------------------------- two processes

_REFERENCE = textwrap.dedent(
    """
    # One process over two (host) devices: the run straight through, and the same run
    # stopped after epoch 1 (its checkpoint is what the two processes resume).
    import json, sys
    import jax
    from fixedpoint_deq.mnist.__main__ import config_from_args
    from fixedpoint_deq.mnist import compile_cache, train as tr

    argv, out = json.loads(sys.argv[1]), sys.argv[2]
    compile_cache.enable("off")
    assert len(jax.devices()) == 2 and jax.process_count() == 1, jax.devices()
    config, _ = config_from_args(argv + ["--checkpoint-dir", out + "/ckpt", "--out-dir", out + "/out"])
    tr.train(config, progress=False, log=lambda s: None)
    config, _ = config_from_args(argv + ["--checkpoint-dir", out + "/epoch1"])
    tr.train(config, progress=False, log=lambda s: None, stop_after_epoch=1)
    """
)


def _two_processes(args_of, cache: Path, timeout: float) -> list[tuple[int, str, str]]:
    """Run the CLI as processes 0 and 1 of a two-process run (`args_of(pid)`: the
    arguments of process `pid`); ``(returncode, stdout, stderr)`` of each."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fixedpoint_deq.mnist",
                "--data-dir",
                str(DATA_DIR),
                *TINY,
                "--coordinator-address",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(pid),
                "--coordinator-timeout",
                "120",
                "--compilation-cache",
                str(cache),
                *args_of(pid),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for pid in (0, 1)
    ]
    return _wait_all(procs, timeout)


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            out.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


def _metrics(directory: Path) -> list[dict]:
    """The records of metrics.jsonl, less their timings."""
    records = [json.loads(s) for s in (directory / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("train_time")
        r.pop("wall_time")
    return records


def _checkpoint(directory: Path) -> tuple[int, bytes]:
    """``(epoch, the bytes of the .eqx file)`` of the checkpoint in `directory`: the
    arrays of the model, the optimiser state and the key."""
    meta = json.loads((directory / "checkpoint.json").read_text())
    return meta["epoch"], (directory / meta["file"]).read_bytes()


def _steps(cache: Path | set[str]) -> list[str]:
    """The cache entries of the compiled training and evaluation steps."""
    names = cache if isinstance(cache, set) else {p.name for p in cache.iterdir()}
    return sorted(n for n in names if n.startswith(("jit_step-", "jit_evaluate-")))


def _params(directory: Path) -> list[np.ndarray]:
    import equinox as eqx
    import jax

    from fixedpoint_deq.mnist.checkpoint import load_model

    model, _, _ = load_model(directory)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array))]


@needs_data
def test_two_processes_train_as_one_process_over_two_devices(tmp_path):
    """Two processes (one CPU device each) against one process over two host devices,
    on the same global batches: the same losses, accuracies and solver statistics in
    every epoch, and the same final model and optimiser state, bit for bit (each
    device computes the same partitioned program, and the gradient all-reduce of two
    shards is one addition, exact in either order). Only process 0 writes checkpoints
    and metrics; the two processes resume a checkpoint and end where the uninterrupted
    run ends. The second pair of processes loads its programs from the compilation
    cache that the first pair's process 0 wrote."""
    ref, cache = tmp_path / "ref", tmp_path / "cache"
    reference = subprocess.Popen(
        [sys.executable, "-c", _REFERENCE, json.dumps(["--data-dir", str(DATA_DIR), *TINY]), str(ref)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
        cwd=ROOT,
    )  # fmt: skip
    try:
        # Run 1, alongside the reference: each process with its own directories.
        run = tmp_path / "run"
        results = _two_processes(
            lambda pid: ["--checkpoint-dir", str(run / f"ckpt{pid}"), "--out-dir", str(run / f"out{pid}")],
            cache,
            timeout=600,
        )  # fmt: skip
    finally:
        ((code, _, err),) = _wait_all([reference], timeout=600)
    assert code == 0, err[-3000:]
    for pid, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"process {pid}:\n{stderr[-3000:]}"
    assert "epoch 2: train loss" in results[0][1]
    expected = _metrics(ref / "out")
    assert [r["epoch"] for r in expected] == [1, 2]
    assert _metrics(run / "out0") == expected
    assert _checkpoint(run / "ckpt0") == _checkpoint(ref / "ckpt")
    for a, b in zip(_params(run / "ckpt0"), _params(ref / "ckpt"), strict=True):
        np.testing.assert_array_equal(a, b)
    # Process 1 checked its directories (so created them) but wrote nothing.
    assert list((run / "ckpt1").iterdir()) == [] and list((run / "out1").iterdir()) == []
    entries = sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache"))
    assert any(name.startswith("jit_step-") for name in entries), entries

    cache_before = {p.name for p in cache.iterdir()}

    # Run 2: both processes resume the checkpoint of epoch 1 (in one directory, as on a
    # shared file system) and finish epoch 2.
    resumed = tmp_path / "resumed"
    shutil.copytree(ref / "epoch1", resumed / "ckpt")
    assert _checkpoint(resumed / "ckpt")[0] == 1
    results = _two_processes(
        lambda pid: ["--checkpoint-dir", str(resumed / "ckpt"), "--resume", "--out-dir", str(resumed / f"out{pid}")],
        cache,
        timeout=600,
    )  # fmt: skip
    for pid, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"process {pid}:\n{stderr[-3000:]}"
    assert "resumed from" in results[0][1] and "after epoch 1" in results[0][1]
    assert _metrics(resumed / "out0") == expected
    assert _checkpoint(resumed / "ckpt") == _checkpoint(ref / "ckpt")
    assert list((resumed / "out1").iterdir()) == []
    # The resumed run's training and evaluation steps are the programs of run 1: it
    # found them in the cache (and so wrote none).
    assert _steps(cache) == _steps(cache_before)
