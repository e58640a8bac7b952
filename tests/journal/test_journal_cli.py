"""``replicator journal inspect DIR [--json]``: report, exit status, read-only."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from replicator.cli.main import app
from replicator.engine.errors import ExitCode
from replicator.journal import Record
from tests.journal.helpers import filled, segment_files

runner = CliRunner()
REPLICATOR = Path(sys.executable).with_name("replicator")


async def _journal(path: Path) -> None:
    journal = await filled(path, 15, segment_bytes=1024)
    await journal.append(Record.epoch(3))
    await journal.append(Record.zero("vol", 0, 4096))
    await journal.aclose()


async def test_inspect_clean_journal_text(tmp_path: Path) -> None:
    await _journal(tmp_path)
    result = runner.invoke(app, ["journal", "inspect", str(tmp_path)])
    assert result.exit_code == ExitCode.OK, result.output
    for name in (p.name for p in segment_files(tmp_path)):
        assert name in result.output
    assert "records: 17" in result.output
    assert "EPOCH 1" in result.output and "WRITE 15" in result.output and "ZERO 1" in result.output
    assert "problem: none" in result.output


async def test_inspect_json_reports_segments_and_counts(tmp_path: Path) -> None:
    await _journal(tmp_path)
    result = runner.invoke(app, ["journal", "inspect", str(tmp_path), "--json"])
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads(result.output)
    assert doc["clean"] is True and doc["problem"] is None
    assert doc["records"] == 17 and doc["first_lsn"] == 1 and doc["last_lsn"] == 17
    assert doc["by_type"] == {"EPOCH": 1, "WRITE": 15, "ZERO": 1}
    assert [s["first_lsn"] for s in doc["segments"]] == [1, 7, 13]
    assert [s["sealed"] for s in doc["segments"]] == [True, True, False]
    assert doc["bytes"] == sum(p.stat().st_size for p in segment_files(tmp_path))


async def test_inspect_reports_a_torn_tail_without_cutting_it(tmp_path: Path) -> None:
    await _journal(tmp_path)
    tail = segment_files(tmp_path)[-1]
    size = tail.stat().st_size
    with tail.open("r+b") as f:
        f.truncate(size - 5)
    result = runner.invoke(app, ["journal", "inspect", str(tmp_path), "--json"])
    assert result.exit_code == ExitCode.JOURNAL
    problem = json.loads(result.output)["problem"]
    assert problem["file"] == str(tail) and problem["fatal"] is False
    assert tail.stat().st_size == size - 5  # read-only


async def test_inspect_real_process_on_a_corrupt_sealed_segment(tmp_path: Path) -> None:
    await _journal(tmp_path)
    sealed = segment_files(tmp_path)[1]
    data = bytearray(sealed.read_bytes())
    data[300] ^= 1
    sealed.write_bytes(bytes(data))
    proc = await asyncio.create_subprocess_exec(
        str(REPLICATOR),
        "journal",
        "inspect",
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == ExitCode.JOURNAL, stderr
    assert f"problem: {sealed} at offset 201" in stdout.decode()
    assert "open refuses the journal" in stdout.decode()


@pytest.mark.parametrize(
    ("name", "make", "says"),
    [
        ("nope", None, "does not exist"),
        ("disk.img", "file", "is not a folder"),
        ("images", "folder", "holds no journal (no *.seg segment files)"),
    ],
)
def test_inspect_something_that_is_no_journal_says_what_to_name(
    tmp_path: Path, name: str, make: str | None, says: str
) -> None:
    """A wrong path is the user's mistake (exit 3, what to name instead), not a damaged
    journal (exit 8 would send them to the damage procedure)."""
    path = tmp_path / name
    if make == "file":
        path.write_bytes(b"\0" * 4096)
    elif make == "folder":
        path.mkdir()
        (path / "disk.qcow2").write_bytes(b"QFI\xfb")
    result = runner.invoke(app, ["journal", "inspect", str(path)])
    assert result.exit_code == ExitCode.CONFIG, result.output
    assert result.stdout == ""
    last = result.stderr.splitlines()[-1]  # after the JSON log line of the failure
    assert last.startswith(f"replicator: error: {path} {says}"), result.stderr
    assert "a sender's --state-dir" in last


def test_inspect_a_journal_folder_without_segments_is_a_problem(tmp_path: Path) -> None:
    """Where the product keeps a journal, a folder with no segment is damage."""
    (tmp_path / "journal").mkdir()
    result = runner.invoke(app, ["journal", "inspect", str(tmp_path / "journal"), "--json"])
    assert result.exit_code == ExitCode.JOURNAL
    assert json.loads(result.output)["segments"] == []


async def test_inspect_a_sender_state_folder_reads_its_journal(tmp_path: Path) -> None:
    """The folder an operator knows (``send --state-dir``) is enough."""
    await _journal(tmp_path / "state" / "journal")
    (tmp_path / "state" / "sender.json").write_text("{}")
    result = runner.invoke(app, ["journal", "inspect", str(tmp_path / "state"), "--json"])
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads(result.stdout)
    assert doc["path"] == str(tmp_path / "state" / "journal") and doc["records"] == 17
    assert "inspecting the one it holds" in result.stderr


async def test_inspect_a_receiver_folder_with_one_job_reads_its_journal(tmp_path: Path) -> None:
    await _journal(tmp_path / "replicas" / ".replicator" / "vm1" / "journal")
    result = runner.invoke(app, ["journal", "inspect", str(tmp_path / "replicas")])
    assert result.exit_code == ExitCode.OK, result.output
    assert f"journal {tmp_path / 'replicas' / '.replicator' / 'vm1' / 'journal'}" in result.stdout


async def test_inspect_a_folder_of_several_journals_names_them(tmp_path: Path) -> None:
    for job in ("vm1", "vm2"):
        await _journal(tmp_path / "state" / job / "journal")
    result = runner.invoke(app, ["journal", "inspect", str(tmp_path / "state")])
    assert result.exit_code == ExitCode.CONFIG
    assert str(tmp_path / "state" / "vm1" / "journal") in result.stderr
    assert str(tmp_path / "state" / "vm2" / "journal") in result.stderr
    assert result.stdout == ""
