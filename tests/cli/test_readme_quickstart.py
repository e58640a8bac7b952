"""README.md's "Quick start on two hosts", run as written (only the hosts and folders
changed to loopback and a temporary folder): keygen, receive with TLS, send --once of a
qcow2 image and a domain XML, verify. A command the README shows that no longer runs
fails here."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    free_port,
    qemu_img,
    qemu_io,
    replicator,
    wait_port,
)

README = Path(__file__).resolve().parents[2] / "README.md"
QUICK_START = "## Quick start on two hosts"


def _commands() -> list[str]:
    """The `replicator ...` lines of the quick start's code blocks, continuations joined."""
    section = README.read_text().split(QUICK_START, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    lines = [" ".join(b.replace("\\\n", " ").split()) for b in blocks]
    return [line for line in lines if line.startswith("replicator ")]


def test_the_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    commands = _commands()
    by_name = {c.split()[1] + (" nbd" if "--capture nbd" in c else "") +
               (" fuse" if "--capture fuse" in c else ""): c for c in commands}  # fmt: skip
    assert {"keygen", "receive", "send", "send nbd", "send fuse", "verify"} <= set(by_name)

    port = free_port()
    keys = tmp_path / "replicator-keys"
    disk = tmp_path / "web01.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "64M")
    qemu_io("qcow2", disk, "write -P 0x5a 1M 2M")
    xml = tmp_path / "web01.xml"
    xml.write_text(f"<domain><name>web01</name><devices><disk type='file'>"
                   f"<source file='{disk}'/></disk></devices></domain>\n")  # fmt: skip
    here = {
        "0.0.0.0:7400": f"127.0.0.1:{port}",
        "target:7400": f"127.0.0.1:{port}",
        "/etc/replicator/tls": str(keys),
        "replicator-keys": str(keys),
        "/srv/replicas": str(tmp_path / "replicas"),
        "/var/lib/libvirt/images/web01.qcow2": str(disk),
        "/etc/libvirt/qemu/web01.xml": str(xml),
    }
    # the default state folder as root is /var/lib/replicator/send/JOB: not in a test
    state = ["--state-dir", str(tmp_path / "state")]

    def argv(name: str) -> list[str]:
        words = [here.get(w, w) for w in shlex.split(by_name[name])[1:]]
        return [*words, *state] if "--job" in words else words

    out = replicator(*argv("keygen"))
    assert out.returncode == 0, out.stderr
    (tmp_path / "replicas").mkdir()
    proc = LoggedPopen(
        [*REPLICATOR, *argv("receive")],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    rcv = ReceiverProc(port, tmp_path / "replicas", proc, None)
    try:
        wait_port(port, proc)
        sent = replicator(*argv("send"))
        assert sent.returncode == 0, sent.stderr
        assert "durable on the receiver" in sent.stdout
        checked = replicator(*argv("verify"))
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.count(": identical") == 2, checked.stdout
    finally:
        assert rcv.stop() == 0
    assert (tmp_path / "replicas" / "web01" / disk.name).is_file()
