"""`benchmarks.gpu_check` without a GPU: one line saying so, exit status 0; and its
float32/float64 comparison runs (on whatever device there is)."""

import math
import os
import subprocess
import sys
from pathlib import Path

from . import gpu_check


ROOT = Path(__file__).resolve().parents[1]


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "benchmarks.gpu_check: no GPU found (JAX's backend: cpu); nothing measured"
    ]


def test_float32_against_float64_times_both():
    out = gpu_check.precision(n=32, steps=3, repeats=2)
    assert set(out) == {"float32 (ms)", "float64 (ms)", "float64 / float32"}
    assert all(math.isfinite(v) and v > 0 for v in out.values())
