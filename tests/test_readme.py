"""The README's examples run: its ```python blocks, in order, in one namespace (as a
reader pasting them into one session would), and its set-up commands are the ones CI
and users rely on."""

import re
from pathlib import Path

import jax


README = Path(__file__).resolve().parent.parent / "README.md"

#: The two commands the README must keep verbatim.
MAIN_JOB = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[all]" && '
    "python -m fixedpoint_deq.mnist --quick --data-dir ../shared/data/mnist "
    "--checkpoint-dir runs/mnist/ckpt --out-dir runs/mnist"
)
TESTS = ". .venv/bin/activate && python -m pytest"


def _blocks(language: str) -> list[str]:
    pattern = rf"^```{language}\n(.*?)^```"
    return re.findall(pattern, README.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_set_up_commands_are_kept():
    commands = [line for block in _blocks("bash") for line in block.splitlines()]
    assert MAIN_JOB in commands
    assert TESTS in commands


def test_python_examples_run(monkeypatch):
    blocks = _blocks("python")
    assert len(blocks) >= 3
    # The benchmarks package is a folder of the repository, imported from its root.
    monkeypatch.syspath_prepend(str(README.parent))
    namespace: dict = {"__name__": "readme"}
    x64 = jax.config.read("jax_enable_x64")
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"README.md, python block {i + 1}", "exec"), namespace)
    finally:
        jax.config.update("jax_enable_x64", x64)
