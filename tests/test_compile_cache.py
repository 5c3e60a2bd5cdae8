"""The persistent compilation cache of the MNIST command line and the benchmarks
(`fixedpoint_deq.mnist.compile_cache`): where it goes, that the command line turns it
on, and that a second process finds what the first one compiled."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fixedpoint_deq.mnist import compile_cache


ROOT = Path(__file__).resolve().parents[1]


def test_default_directory_follows_the_environment(tmp_path):
    home = Path.home()
    assert compile_cache.default_directory({}) == home / ".cache" / "fixedpoint" / "jax"
    assert compile_cache.default_directory({"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "fixedpoint" / "jax"
    )
    # fixedpoint's own cache root (where MNIST is downloaded to) comes first.
    env = {"XDG_CACHE_HOME": "/elsewhere", "FIXEDPOINT_CACHE_DIR": str(tmp_path / "fp")}
    assert compile_cache.default_directory(env) == tmp_path / "fp" / "jax"


def test_resolve_order_setting_then_environment_then_default(tmp_path):
    env = {compile_cache.ENV_COMPILATION_CACHE: str(tmp_path / "env")}
    assert compile_cache.resolve(str(tmp_path / "opt"), env) == tmp_path / "opt"
    assert compile_cache.resolve(None, env) == tmp_path / "env"
    assert compile_cache.resolve("off", env) is None
    assert compile_cache.resolve("OFF", {}) is None
    assert compile_cache.resolve(None, {compile_cache.ENV_COMPILATION_CACHE: "off"}) is None
    if getattr(compile_cache.jax.config, "jax_compilation_cache_dir") is None:  # (unset for JAX)
        assert compile_cache.resolve(None, {}) == compile_cache.default_directory({})


def test_the_command_line_turns_the_cache_on(tmp_path, monkeypatch):
    """`main` passes --compilation-cache (default: None, the environment's choice) to
    `compile_cache.enable` before training (which fails here at once: the output
    directory is a file)."""
    from fixedpoint_deq.mnist.__main__ import config_from_args, main

    calls = []
    monkeypatch.setattr(compile_cache, "enable", calls.append)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--out-dir", str(blocker), "--compilation-cache", str(tmp_path / "c")]) == 2
    assert main(["--out-dir", str(blocker)]) == 2
    assert calls == [str(tmp_path / "c"), None]
    assert config_from_args(["--compilation-cache", "off"])[0].compilation_cache == "off"


_PROGRAM = textwrap.dedent(
    """
    # Compile two small programs with the cache on; report the cache hits.
    import json, sys
    import jax, jax.numpy as jnp
    from fixedpoint_deq.mnist import compile_cache

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None
    )
    directory = compile_cache.enable(sys.argv[1])
    x = jnp.linspace(0.0, 1.0, 16).reshape(4, 4)
    y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(x)
    g = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(x) ** 2)))(x)
    print("RESULT" + json.dumps(dict(
        directory=str(directory), hits=len(hits), y=float(y), g=float(g.sum()))))
    """
)


def _run(cache: Path) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.pop(compile_cache.ENV_COMPILATION_CACHE, None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _PROGRAM, str(cache)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def test_a_second_process_finds_the_first_ones_programs(tmp_path):
    """Run 1 writes an entry for every program it compiles, even those that compile in
    milliseconds (JAX's default keeps only those over a second); run 2, a fresh process
    on the same directory, finds them all: cache hits, and no new entry."""
    cache = tmp_path / "cache"
    first = _run(cache)
    assert first["directory"] == str(cache) and first["hits"] == 0
    entries = compile_cache.cache_entries(cache)
    assert any(name.startswith("jit__lambda-") for name in entries), entries
    second = _run(cache)
    assert second["hits"] >= 2
    assert compile_cache.cache_entries(cache) == entries
    assert (second["y"], second["g"]) == (first["y"], first["g"])


def test_off_and_an_unusable_directory_leave_the_cache_off(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = textwrap.dedent(
        """
        import sys, warnings, jax
        from fixedpoint_deq.mnist import compile_cache
        assert compile_cache.enable("off") is None
        assert not jax.config.jax_enable_compilation_cache
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert compile_cache.enable(sys.argv[1] + "/sub") is None
        assert "cannot create" in str(caught[0].message), caught
        print("OK")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(blocker)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_the_cache_setting_does_not_change_the_steps():
    """Runs that differ only in where their compilations are cached share the jitted
    steps (`Config.step_settings`)."""
    from fixedpoint_deq.mnist.config import Config

    assert Config().compilation_cache is None
    for setting in ("off", "/tmp/elsewhere"):
        assert Config(compilation_cache=setting).step_settings() == Config().step_settings()
