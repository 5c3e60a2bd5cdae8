"""Start-up time of the MNIST trainer: from process start to the first finished
training step, with an empty compilation cache and then with the cache that run filled.

Each run is a fresh ``python -m fixedpoint_deq.mnist`` process (the real command line:
imports, reading MNIST, building the model, compiling, one step), stopped as soon as
its first training step has finished; the time is taken from just before the process
is started to the end of that step. A round is two runs on a new, empty cache
directory: the first compiles everything and fills the cache, the second loads from it.

    python -m benchmarks.startup --data-dir ../shared/data/mnist            # default model
    python -m benchmarks.startup --data-dir ../shared/data/mnist --quick    # --quick model
    python -m benchmarks.startup --rounds 2 -- --width 16                   # any CLI options
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from fixedpoint_deq.mnist import compile_cache


ROOT = Path(__file__).resolve().parents[1]

# Run the command line; exit as soon as the first training step has finished, printing
# the wall-clock time (time.time(), comparable between processes) at that moment.
_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import jax
    from fixedpoint_deq.mnist import steps

    make_train_step = steps.make_train_step

    def timed(config, optimizer):
        step = make_train_step(config, optimizer)

        def first(*args, **kwargs):
            jax.block_until_ready(step(*args, **kwargs))
            print("FIRST_STEP_DONE", repr(time.time()), flush=True)
            os._exit(0)

        return first

    steps.make_train_step = timed
    from fixedpoint_deq.mnist.__main__ import main

    sys.exit(main(json.loads(sys.argv[1])))
    """
)


def time_to_first_step(argv: list[str], timeout: float = 3600) -> float:
    """Seconds from just before starting ``python -m fixedpoint_deq.mnist argv`` to the
    end of its first training step (the process is stopped then).

    **Arguments:**

    - `argv`: the command line's arguments.
    - `timeout`: give up (`RuntimeError`) after this many seconds.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(argv)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("FIRST_STEP_DONE"):
            return float(line.split()[1]) - start
    raise RuntimeError(f"no training step finished (exit status {proc.returncode}):\n{proc.stderr}")


def rounds(argv: list[str], n: int) -> list[tuple[float, float, int, int]]:
    """``(first run s, second run s, cache entries after the first run, entries the
    second run added)`` of `n` rounds, each on a new, empty cache directory.

    **Arguments:**

    - `argv`: the command line's arguments (without ``--compilation-cache``).
    - `n`: the number of rounds.
    """
    out = []
    for _ in range(n):
        with tempfile.TemporaryDirectory(prefix="fixedpoint-startup-") as cache:
            args = [*argv, "--compilation-cache", cache]
            first = time_to_first_step(args)
            entries = compile_cache.cache_entries(cache)
            second = time_to_first_step(args)
            added = len(set(compile_cache.cache_entries(cache)) - set(entries))
        out.append((first, second, len(entries), added))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", help="MNIST directory (as the command line's --data-dir)")
    parser.add_argument("--quick", action="store_true", help="time the --quick model")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (>= 1; default 2)")
    parser.add_argument("cli", nargs="*", help="further options of the command line (after --)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    cli = ["--no-progress", *(["--quick"] if args.quick else []), *args.cli]
    if args.data_dir:
        cli += ["--data-dir", args.data_dir]
    model = "--quick" if args.quick else "default"
    print(f"Time to the first finished training step, {model} model ({' '.join(cli)})\n")
    print(
        "| round | first run (empty cache) [s] | second run [s] | second / first "
        "| programs cached by the first | added by the second |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, (first, second, entries, added) in enumerate(rounds(cli, args.rounds), 1):
        print(f"| {i} | {first:.1f} | {second:.1f} | {second / first:.2f} | {entries} | {added} |")


if __name__ == "__main__":
    main()
