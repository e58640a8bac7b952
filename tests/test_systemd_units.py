"""The systemd units in contrib/ pass ``systemd-analyze verify``: known keys only, values
that parse, an ExecStart that exists (pointed at this checkout's ``replicator``), with the
FUSE drop-in applied too. ``verify`` exits 0 on unknown keys and bad values (it only prints
them), so any line it prints about our units fails the test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools import require_tool

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
INSTALLED = "/usr/local/bin/replicator"


def _verify(folder: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("systemd-analyze"), "verify", *(str(folder / u) for u in units)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _install(folder: Path, side: str) -> str:
    """contrib's unit as instance ``test``, running this checkout's entry point."""
    entry = Path(sys.executable).parent / "replicator"
    assert entry.exists(), f"{entry} is missing: `make install` makes the console script"
    text = (CONTRIB / f"replicator-{side}@.service").read_text()
    assert f"ExecStart={INSTALLED} " in text
    unit = f"replicator-{side}@test.service"
    (folder / unit).write_text(text.replace(INSTALLED, str(entry)))
    return unit


@pytest.mark.parametrize("fuse", [False, True], ids=["units", "with-fuse-drop-in"])
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path, fuse: bool) -> None:
    units = [_install(tmp_path, "send"), _install(tmp_path, "receive")]
    if fuse:
        drop_ins = tmp_path / f"{units[0]}.d"
        drop_ins.mkdir()
        shutil.copy(CONTRIB / "replicator-send-fuse.conf", drop_ins / "fuse.conf")
    out = _verify(tmp_path, *units)
    ours = [line for line in (out.stdout + out.stderr).splitlines() if "replicator" in line]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    unit = _install(tmp_path, "receive")
    path = tmp_path / unit
    path.write_text(path.read_text().replace("ProtectClock=", "ProtectClokc="))
    out = _verify(tmp_path, unit)
    assert "Unknown key 'ProtectClokc'" in out.stdout + out.stderr
