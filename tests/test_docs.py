"""The documentation site builds, and documents every public name.

`mkdocs build --strict` fails on any warning: a cross-reference in a docstring or page
that resolves nowhere, a broken link or anchor, a page missing from the navigation or
listed there but missing, and an example (``python exec="on"`` block) that raises. So
this one build checks the API reference, the pages and every example of the site.
"""

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fixedpoint
import fixedpoint.linear
import fixedpoint_deq


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

# What `mkdocs.yml` uses; all of them come with `pip install -e ".[docs]"`.
_DOCS_MODULES = (
    "mkdocs",
    "material",
    "mkdocstrings",
    "mkdocstrings_handlers.python",
    "markdown_exec",
    "hippogriffe",
)


def _missing_docs_modules() -> list[str]:
    missing = []
    for name in _DOCS_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


def _public_names(module) -> list[str]:
    """The public API of `module`: what it exports that is not a submodule."""
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or inspect.ismodule(value):
            continue
        if module is fixedpoint.linear and getattr(value, "__module__", None) != module.__name__:
            continue  # `linear` imports helpers (jnp, lx, ...) at module level
        names.append(f"{module.__name__}.{name}")
    return sorted(names)


def _documented() -> set[str]:
    """Every object rendered by a ``::: name`` block of the API pages."""
    found = set()
    for page in (DOCS / "api").glob("*.md"):
        found.update(re.findall(r"^\s*::: ([\w.]+)\s*$", page.read_text(), flags=re.MULTILINE))
    return found


def _resolve(path: str):
    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def test_every_public_name_is_documented():
    public = (
        _public_names(fixedpoint) + _public_names(fixedpoint.linear) + _public_names(fixedpoint_deq)
    )
    assert "fixedpoint.Anderson" in public and "fixedpoint_deq.DEQ" in public
    documented = _documented()
    # A re-export or an alias (`fixedpoint_deq.backward_stats` is
    # `fixedpoint.backward_stats`) is documented where the same object is.
    documented_objects = [_resolve(name) for name in documented]
    missing = [
        name
        for name in public
        if name not in documented and not any(_resolve(name) is obj for obj in documented_objects)
    ]
    assert not missing, f"public names without a `::: name` block in docs/api/: {missing}"


def test_site_builds_strictly(tmp_path):
    missing = _missing_docs_modules()
    if missing:
        pytest.skip(
            f"the documentation tools are not installed ({', '.join(missing)}): "
            'pip install -e ".[docs]" to build the site'
        )
    env = dict(os.environ)
    # Import this checkout (also when another copy of the package is installed), and
    # silence mkdocs-material's banner about MkDocs 2.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NO_MKDOCS_2_WARNING"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(
        warnings or [log[-5000:]]
    )
    for page in (
        "index.html",
        "how-to-choose/index.html",
        "how-it-works/index.html",
        "faq/index.html",
        "gpu/index.html",
        "development/index.html",
        "api/root_finders/index.html",
        "examples/deq_training/index.html",
        "benchmarks/index.html",
        "porting/index.html",
    ):
        assert (tmp_path / "site" / page).is_file(), page
