"""JAX's persistent compilation cache, as the command line and the benchmarks use it.

Compiling the training step of the MNIST DEQ takes longer than running it many times
over; JAX can keep what it compiled on disk and load it in the next process that asks
for the same program. `enable` turns that cache on (it must run before the first
compilation; it changes JAX's global configuration). Where it goes, in order:

1. the `setting` passed to `enable` (``--compilation-cache DIR``), or ``"off"``;
2. the environment variable ``FIXEDPOINT_COMPILATION_CACHE``: a directory, or ``off``;
3. a directory already configured for JAX (``JAX_COMPILATION_CACHE_DIR`` or
   ``jax.config.update("jax_compilation_cache_dir", ...)``);
4. `default_directory`: ``$FIXEDPOINT_CACHE_DIR/jax``, else
   ``$XDG_CACHE_HOME/fixedpoint/jax``, else ``~/.cache/fixedpoint/jax``.

Every compiled program is cached, however fast it compiled (JAX's default keeps only
those that took a second or more), so that a second run finds everything it needs.
A library user turns the same cache on with two lines of JAX configuration (see the
FAQ of the documentation).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import jax


__all__ = [
    "ENV_COMPILATION_CACHE",
    "OFF",
    "cache_entries",
    "default_directory",
    "enable",
    "resolve",
]

#: Environment variable naming the cache directory, or ``off``.
ENV_COMPILATION_CACHE = "FIXEDPOINT_COMPILATION_CACHE"
#: The setting that turns the cache off.
OFF = "off"


def default_directory(environ: Mapping[str, str] | None = None) -> Path:
    """The default cache directory: ``$FIXEDPOINT_CACHE_DIR/jax`` (the root of
    fixedpoint's cache, as for MNIST), else ``$XDG_CACHE_HOME/fixedpoint/jax``, else
    ``~/.cache/fixedpoint/jax``.

    **Arguments:**

    - `environ`: the environment to read (default: `os.environ`).
    """
    env = os.environ if environ is None else environ
    if env.get("FIXEDPOINT_CACHE_DIR"):
        return Path(env["FIXEDPOINT_CACHE_DIR"]).expanduser() / "jax"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "fixedpoint" / "jax"
    return Path.home() / ".cache" / "fixedpoint" / "jax"


def resolve(
    setting: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None
) -> Path | None:
    """The cache directory that `setting` and the environment select (the order of the
    module docstring), or None when the cache is off.

    **Arguments:**

    - `setting`: a directory, ``"off"``, or None (then the environment decides).
    - `environ`: the environment to read (default: `os.environ`).
    """
    env = os.environ if environ is None else environ
    if setting is None or str(setting) == "":
        setting = env.get(ENV_COMPILATION_CACHE) or None
    if setting is None:
        configured = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
        return Path(configured) if configured else default_directory(env)
    if str(setting).strip().lower() == OFF:
        return None
    return Path(setting).expanduser()


def enable(setting: str | os.PathLike | None = None) -> Path | None:
    """Turn JAX's persistent compilation cache on, in the directory `resolve` selects,
    for every compilation of this process from now on; with ``"off"``, leave it off.

    Call it before the first compilation (JAX reads the setting once). The directory is
    created if missing; one that cannot be created is a warning, and the cache stays
    off. Entries are written by the first process of a multi-process run only.

    **Arguments:**

    - `setting`: a directory, ``"off"``, or None (see `resolve`).

    **Returns:** the cache directory, or None when the cache is off.
    """
    directory = resolve(setting)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(
            f"the compilation cache is off: cannot create {directory} ({e.strerror or e})",
            stacklevel=2,
        )
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache every program, not only those that took a second or more to compile: the
    # small ones add up too, and a second run then compiles nothing.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return directory


def cache_entries(directory: str | os.PathLike) -> list[str]:
    """The names of the compiled programs stored in the cache `directory` (JAX writes
    one ``<key>-cache`` file per program, next to bookkeeping files), sorted.

    **Arguments:**

    - `directory`: a cache directory (one that does not exist holds no entries).
    """
    path = Path(directory)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.name.endswith("-cache"))
