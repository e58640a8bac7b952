"""``~`` in a path means the home folder wherever an operator writes it: the shell expands
it at the start of a word (``--state-dir ~/s``) but not after ``--state-dir=``, and a job
file is read by no shell at all. Both reached replicator as a literal ``~``: a folder
named ``~`` in the current folder (or in the job file's), keys not found there."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.tools import ENV, REPLICATOR, ReceiverProc, qemu_img


def _run(cwd: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*REPLICATOR, *args], cwd=cwd, env={**ENV, "HOME": str(home)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return home, work


def test_option_equals_tilde_is_the_home_folder(tmp_path: Path, receiver: ReceiverProc) -> None:
    home, work = _folders(tmp_path)
    out = _run(work, home, "keygen", "--out=~/keys")
    assert out.returncode == 0, out.stderr
    assert (home / "keys" / "ca.crt").is_file()
    disk = work / "vm.img"
    qemu_img("create", "-q", "-f", "raw", str(disk), "1M")
    out = _run(work, home, "send", "--to", receiver.address, "--job", "vm", "--once",
               "--insecure", "--state-dir=~/state", str(disk))  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (home / "state" / "sender.json").is_file()
    assert not (work / "~").exists()
    out = _run(work, home, "status", "--state-dir=~/state")
    assert out.returncode == 0, out.stderr
    # a quoted "~" the shell left alone is a name, as for any program
    out = _run(work, home, "keygen", "--out", "~")
    assert out.returncode == 0, out.stderr
    assert (work / "~" / "ca.crt").is_file()


def test_a_job_file_path_with_tilde_is_the_home_folder(tmp_path: Path) -> None:
    home, work = _folders(tmp_path)
    out = _run(work, home, "keygen", "--out", str(home / "keys"))
    assert out.returncode == 0, out.stderr
    disk = home / "vm.img"
    qemu_img("create", "-q", "-f", "raw", str(disk), "1M")
    job_file = work / "jobs.toml"
    job_file.write_text(
        '[jobs.vm]\nto = "127.0.0.1:7070"\ntls_dir = "~/keys"\nvolumes = ["~/vm.img"]\n'
    )
    out = _run(work, home, "check-config", str(job_file))
    assert out.returncode == 0, out.stderr
    assert f"from {home / 'keys'}" in out.stdout and f"disk {disk}" in out.stdout, out.stdout
