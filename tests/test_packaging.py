"""What `pip install .` puts into site-packages: one import name, `supermerge`, and nothing generic.

A project that installs `flows/` or `bench/` at the top of site-packages shadows its users' own packages
of those names (a Prefect project's `flows/` is a common layout); pyproject maps the folders under
`supermerge` instead. This builds the real wheel layout from a copy of the sources (pip builds in the
source tree, so not from the checkout itself) into a bare target folder and lists what landed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_puts_exactly_one_top_level_import_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("merge_core", "orchestrator", "flows", "bench", "deploy", "tests", "docs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "img"))
    target = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(target), str(src)], check=True, capture_output=True)
    top = {p.name for p in target.iterdir()} - {"bin"}  # console scripts land in bin/ with --target
    assert {n for n in top if not n.endswith(".dist-info")} == {"supermerge"}
    installed = {p.name for p in (target / "supermerge").iterdir()}
    assert installed == {"merge_core", "orchestrator", "flows"}, "only the product, not bench/deploy/tests"
    assert (target / "supermerge" / "merge_core" / "methods" / "registry.py").is_file()
    assert (target / "bin" / "supermerge").is_file()
