"""Multi-process training: starting JAX's distributed runtime.

A run over several processes (on one machine or several) needs, in each process, the
address of the coordinator (``HOST:PORT`` of the first process, which hosts it), the
number of processes and this process's index. They are taken, in order of precedence,
from:

1. the command line: ``--coordinator-address``, ``--num-processes``, ``--process-id``
   (the `Config` fields of the same names);
2. the environment: ``FIXEDPOINT_COORDINATOR_ADDRESS``, ``FIXEDPOINT_NUM_PROCESSES``,
   ``FIXEDPOINT_PROCESS_ID`` (each used only where the command line does not give it);
3. JAX's own detection of the cluster (SLURM, Open MPI, Cloud TPU, and JAX's variables
   such as ``JAX_COORDINATOR_ADDRESS``), when none of the three is given.

The three go together: give all of them or none. On CPUs, the processes exchange
gradients through the Gloo collectives (`initialize` selects them).

JAX's runtime waits for the coordinator and for every process to join, and would abort
the process (with a stack trace) when its own deadline passes; `initialize` instead
stops the process with one line on stderr and exit status 1 once `timeout` seconds have
passed.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

import jax


__all__ = [
    "ENV_COORDINATOR_ADDRESS",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "check_options",
    "from_environment",
    "initialize",
    "split_address",
]

#: Environment variables read where the command line does not give the option.
ENV_COORDINATOR_ADDRESS = "FIXEDPOINT_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FIXEDPOINT_NUM_PROCESSES"
ENV_PROCESS_ID = "FIXEDPOINT_PROCESS_ID"

_VARIABLES = {
    "coordinator_address": ENV_COORDINATOR_ADDRESS,
    "num_processes": ENV_NUM_PROCESSES,
    "process_id": ENV_PROCESS_ID,
}

# Exit status of a process whose coordinator or peers never answered.
_EXIT_UNREACHABLE = 1
# JAX's own deadline is set this much later than ours, so that ours fires first.
_MARGIN_S = 60


def from_environment(
    given: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The coordinator settings of the environment that `given` (the command line's
    values, by `Config` field name) does not set.

    **Arguments:**

    - `given`: the values given explicitly; a name in it is not read from the
      environment.
    - `environ`: the environment to read (default: `os.environ`).

    **Returns:** ``{field name: value}`` for each variable set (and non-empty).

    **Raises:** `ValueError` naming the variable, for a number that is not an integer.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for name, variable in _VARIABLES.items():
        text = env.get(variable, "").strip()
        if name in given or not text:
            continue
        if name == "coordinator_address":
            out[name] = text
            continue
        try:
            out[name] = int(text)
        except ValueError:
            raise ValueError(f"${variable} must be an integer, got {text!r}.") from None
    return out


def split_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (an IPv6 host in brackets: ``[::1]:1234``).

    **Arguments:**

    - `address`: the coordinator's address.

    **Raises:** `ValueError` (naming `coordinator_address`) if it is not of that form
    or the port is not in [1, 65535].
    """
    host, sep, port = str(address).rpartition(":")
    bad = ValueError(
        f"`coordinator_address` must be HOST:PORT (a port in [1, 65535]), got {address!r}."
    )
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise bad
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def check_options(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    distributed: bool,
) -> None:
    """Refuse inconsistent coordinator settings (the messages name the `Config` fields).

    **Arguments:**

    - `coordinator_address`, `num_processes`, `process_id`: the settings, None where
      not given (each number is checked against its range by its own rule).
    - `distributed`: whether the run is a multi-process one.

    **Raises:** `ValueError` when only some of the three are given, when they are given
    for a run that is not `distributed`, when the address is not ``HOST:PORT``, or
    when `process_id` is not below `num_processes`.
    """
    values = dict(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    given = [k for k, v in values.items() if v is not None]
    if not given:
        return
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(
            f"{', '.join(f'`{k}`' for k in given)} given without "
            f"{' and '.join(f'`{k}`' for k in missing)}: give all three of "
            "`coordinator_address`, `num_processes` and `process_id` (or none, to let JAX "
            "detect the cluster)."
        )
    if not distributed:
        raise ValueError(
            "`coordinator_address`, `num_processes` and `process_id` are for `distributed` "
            "(multi-process) runs: set `distributed` too."
        )
    split_address(str(coordinator_address))
    assert num_processes is not None and process_id is not None
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"`process_id` ({process_id}) must be in [0, {num_processes - 1}] with "
            f"`num_processes` {num_processes}."
        )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: float = 300.0,
) -> None:
    """Start JAX's distributed runtime in this process (nothing if it already runs).

    Call it before any other JAX computation. On CPUs the processes exchange data
    through the Gloo collectives. If the coordinator does not answer, or not every
    process joins, within `timeout` seconds, the process stops with one line on stderr
    and exit status 1 (JAX's runtime cannot be interrupted while it waits).

    **Arguments:**

    - `coordinator_address`: ``HOST:PORT`` of the coordinator (hosted by process 0).
    - `num_processes`: the number of processes.
    - `process_id`: this process's index, in ``[0, num_processes)``.
    - `timeout`: seconds to wait for the coordinator and the other processes.

    With none of the three given, JAX detects them from the cluster (SLURM, Open MPI,
    Cloud TPU, ``JAX_COORDINATOR_ADDRESS``...).

    **Raises:** `ValueError` for inconsistent settings (`check_options`).
    """
    check_options(coordinator_address, num_processes, process_id, True)
    if jax.distributed.is_initialized():
        return
    if not jax.config.jax_cpu_collectives_implementation:  # pyright: ignore[reportAttributeAccessIssue]
        # Gloo is the default of recent JAX versions; without any, a CPU computation
        # over several processes has no collectives. A choice made with
        # JAX_CPU_COLLECTIVES_IMPLEMENTATION or jax.config is kept.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    watchdog = threading.Timer(
        timeout, _give_up, args=(coordinator_address, num_processes, process_id, timeout)
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(math.ceil(timeout)) + _MARGIN_S,
        )
    finally:
        watchdog.cancel()


def _give_up(
    address: str | None, num_processes: int | None, process_id: int | None, timeout: float
) -> None:
    """The watchdog of `initialize`: one line on stderr saying what did not answer,
    then exit status 1."""
    if address is None:
        what = "the distributed runtime (cluster detected by JAX) did not start"
    elif process_id == 0:
        what = (
            f"process 0 of {num_processes} hosts the coordinator at {address}, but not every "
            "process joined"
        )
    elif _answers(address):
        what = (
            f"process {process_id} of {num_processes}: the coordinator at {address} answers, "
            "but not every process joined"
        )
    else:
        what = (
            f"process {process_id} of {num_processes}: the coordinator at {address} never answered"
        )
    print(
        f"fixedpoint-mnist: error: {what} within {timeout:g} s (check the address, that every "
        "process was started, and --coordinator-timeout)",
        file=sys.stderr,
        flush=True,
    )
    os._exit(_EXIT_UNREACHABLE)


def _answers(address: str) -> bool:
    """Whether something accepts TCP connections at `address`."""
    try:
        with socket.create_connection(split_address(address), timeout=2):
            return True
    except OSError:
        return False
