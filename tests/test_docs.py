"""The documentation builds without a warning, and its API reference leaves no module out."""

from __future__ import annotations

import glob
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import cryodask

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _documented():
    names = set()
    for path in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True):
        with open(path, encoding="utf-8") as fh:
            names.update(re.findall(r"^::: ([\w.]+)", fh.read(), flags=re.M))
    return names


def test_every_public_module_is_in_the_api_reference():
    documented = _documented()
    modules = {m.name for m in pkgutil.walk_packages(cryodask.__path__, "cryodask.")}
    # The command line is documented by its --help; the simulator by its package.
    wanted = {m for m in modules if m != "cryodask.cli" and not m.startswith("cryodask.simulate.")}
    assert wanted - documented == set()
    assert documented - modules - {"cryodask"} == set()  # no reference to a module that is gone


@pytest.mark.docs
def test_mkdocs_builds_strictly(tmp_path):
    """Broken links, missing pages and docstrings that disagree with their signatures
    (griffe's warnings) fail a strict build."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "api" / "pipeline" / "index.html").read_text(encoding="utf-8")
    assert "estimate_ctf_dataset" in page and "prior_window" in page
    assert "prior_window" in (tmp_path / "configuration" / "index.html").read_text(encoding="utf-8")
