"""The wheel must carry every subpackage: setuptools drops an unlisted one silently."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pyfuse3

from replicator.transport import PROTOCOL_VERSION

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("engine", "transport", "journal", "cli")


def _packages_on_disk() -> set[str]:
    found: set[str] = set()
    for folder in FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join(("replicator", folder, *rel.parts)))
    return found


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    missing = _packages_on_disk() - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    for folder in FOLDERS:
        assert config["tool"]["setuptools"]["package-dir"][f"replicator.{folder}"] == folder


def test_replicator_is_a_namespace_without_top_level_leaks() -> None:
    assert not (ROOT / "__init__.py").exists()
    import replicator

    assert getattr(replicator, "__file__", None) is None  # namespace package


def test_console_script_prints_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "replicator.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("replicator ")
    # the release number stays 0.1.0 across protocols: what the hosts must agree on is said
    assert out.stdout.rstrip().endswith(f" (protocol {PROTOCOL_VERSION})"), out.stdout


def test_the_patched_pyfuse3_from_the_makefile_is_installed() -> None:
    """`make` builds pyfuse3 with engine/fuse/pyfuse3.patch (fallocate, request loop)."""
    makefile = (ROOT / "Makefile").read_text()
    version = re.search(r"^PYFUSE3_VERSION := (\S+)$", makefile, re.M)
    label = re.search(r"^PYFUSE3_LOCAL := \$\(PYFUSE3_VERSION\)(\S+)$", makefile, re.M)
    assert version and label, "PYFUSE3_VERSION / PYFUSE3_LOCAL not found in the Makefile"
    assert importlib.metadata.version("pyfuse3") == version[1] + label[1]
    assert hasattr(pyfuse3.Operations, "fallocate")
