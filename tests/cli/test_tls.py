"""Mutual TLS between real processes: keygen, a send that reproduces the image, every kind
of peer the receiver must refuse (with nothing written and the receiver still serving),
and strangers that stall in the TLS handshake."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from replicator.engine.errors import ExitCode
from tests.engine.test_tls import expired_copy
from tests.tools import (
    ENV,
    REPLICATOR,
    ReceiverProc,
    b3,
    free_port,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    send_once,
    start_receiver,
)
from tests.transport.test_flood import BOUND, MIB, rss


def keygen(out: Path, *args: str) -> None:
    done = replicator("keygen", "--out", str(out), *args)
    assert done.returncode == 0, done.stderr


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == event:
                found.append(entry)
    return found


def last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("replicator: error:")]
    assert lines, stderr
    return lines[-1]


def send(rcv: ReceiverProc, job: str, state: Path, disk: Path, *security: str) -> Any:
    return replicator(
        "send", "--to", rcv.address, "--job", job, "--state-dir", str(state), "--once",
        *security, str(disk), timeout=60,
    )  # fmt: skip


def test_keygen_command(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    done = replicator("keygen", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "ca.crt" in done.stdout and "receiver.crt" in done.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("ca", "receiver", "sender"):
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600
        assert (out / f"{name}.crt").is_file()
    before = (out / "sender.key").read_bytes()
    again = replicator("keygen", "--out", str(out))
    assert again.returncode == ExitCode.CONFIG
    assert "--force" in last_error(again.stderr)
    assert (out / "sender.key").read_bytes() == before
    keygen(out, "--name", "site-b", "--days", "90")
    assert (out / "site-b.crt").is_file() and (out / "site-b.key").is_file()
    keygen(out, "--force")
    assert (out / "sender.key").read_bytes() != before
    # past X.509's last date: a usage error, nothing made (was an OverflowError, exit 70,
    # and an empty key folder)
    far = replicator("keygen", "--out", str(tmp_path / "far"), "--days", "3000000")
    assert far.returncode == ExitCode.USAGE, far.stderr
    assert "36500" in far.stderr and not (tmp_path / "far").exists()


def test_a_command_without_tls_or_insecure_says_how_to_make_keys(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x")
    for args in (
        ["send", "--to", "127.0.0.1:1", "--job", "j", "--once", str(disk)],
        ["verify", "--to", "127.0.0.1:1", "--job", "j", str(disk)],
        ["receive", "--listen", "127.0.0.1:1", "--dir", str(tmp_path / "t")],
    ):
        out = replicator(*args)
        assert out.returncode == ExitCode.CONFIG, out.stderr
        assert "replicator keygen --out DIR" in last_error(out.stderr), args


def test_insecure_beyond_loopback_is_warned_about(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x")
    out = replicator(
        "send", "--to", f"0.0.0.0:{free_port()}", "--job", "j", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(disk), timeout=60,
    )  # fmt: skip
    assert "WARNING: --insecure while sending to 0.0.0.0" in out.stderr
    near = replicator(
        "send", "--to", "127.0.0.1:1", "--job", "j", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(disk),
    )  # fmt: skip
    assert "WARNING" not in near.stderr


@pytest.mark.tools
def test_a_send_over_mutual_tls_reproduces_the_image(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    keygen(out)
    disk = tmp_path / "disk0.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "256M")
    qemu_io("qcow2", disk, "write -P 0x5a 0 8M", "write -P 0xa5 100M 4M", "write -z 120M 1M")
    tls = ("--tls-dir", str(out))
    rcv = start_receiver(tmp_path / "target", security=tls)
    try:
        first = send_once(rcv, "vm1", tmp_path / "state", disk, security=tls)
        replica = rcv.dir / "vm1" / disk.name
        assert qemu_compare("qcow2", disk, replica).returncode == 0
        assert b3(disk) == b3(replica)
        assert first["bytes_changed"] >= 12 * MIB
        qemu_io("qcow2", disk, "write -P 0x11 64M 64k")
        assert send_once(rcv, "vm1", tmp_path / "state", disk, security=tls)["basis"] == "local"
        assert qemu_compare("qcow2", disk, replica).returncode == 0
        check = replicator(
            "verify", "--to", rcv.address, "--job", "vm1", "--state-dir",
            str(tmp_path / "state"), *tls, str(disk),
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        # both processes say when their certificates expire (status, and so the metrics)
        live = subprocess.Popen(
            [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm1", "--state-dir",
             str(tmp_path / "state"), "--interval", "0.5", *tls, str(disk)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
        )  # fmt: skip
        try:
            shown: dict[str, Any] = {}
            deadline = time.monotonic() + 30
            while not shown.get("running") and time.monotonic() < deadline:
                asked = replicator("status", "--state-dir", str(tmp_path / "state"), "--json")
                shown = json.loads(asked.stdout) if asked.returncode == 0 else {}
                time.sleep(0.2)
            assert shown.get("tls", {}).get("certificate") == "sender", shown
            assert shown["tls"]["days_left"] > 800
        finally:
            live.terminate()
            assert live.wait(timeout=60) == 0
        answer = json.loads(replicator("status", "--dir", str(rcv.dir), "--json").stdout)
        assert answer["tls"]["certificate"] == "receiver", answer
    finally:
        assert rcv.stop() == 0


def _raw_tls_client(port: int, folder: Path | None, name: str = "sender") -> str:
    """A TLS client that is not replicator: what it reads after its side of the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if folder is not None:
        context.load_cert_chain(folder / f"{name}.crt", folder / f"{name}.key")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        try:
            return repr(tls.recv(100))
        except (ssl.SSLError, ConnectionError) as exc:
            return repr(exc)


def test_peers_without_a_valid_certificate_are_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    ours, theirs = tmp_path / "keys", tmp_path / "other"
    keygen(ours)
    keygen(theirs)
    mixed = tmp_path / "mixed"  # our CA (so it trusts the receiver), their sender certificate
    mixed.mkdir(mode=0o700)
    (mixed / "ca.crt").write_bytes((ours / "ca.crt").read_bytes())
    for suffix in ("crt", "key"):
        (mixed / f"sender.{suffix}").write_bytes((theirs / f"sender.{suffix}").read_bytes())
    (mixed / "sender.key").chmod(0o600)
    stale = expired_copy(ours, tmp_path / "stale")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 4096)
    log = tmp_path / "receiver.log"
    tls = ("--tls-dir", str(ours))
    rcv = start_receiver(tmp_path / "target", log=log, security=(*tls, "--allow", "sender:vm1"))
    try:
        cases = {
            "plaintext": (("--insecure",), ExitCode.REFUSED, "accepts TLS connections only"),
            "other CA": (("--tls-dir", str(theirs)), ExitCode.AUTH, "not signed by our CA"),
            "other CA, our CA": (("--tls-dir", str(mixed)), ExitCode.AUTH, "does not trust"),
            "expired": (("--tls-dir", str(stale)), ExitCode.AUTH, "expired on"),
        }
        for what, (security, code, words) in cases.items():
            out = send(rcv, "vm1", tmp_path / f"s-{what}", disk, *security)
            assert out.returncode == code, f"{what}: {out.returncode} {out.stderr[-2000:]}"
            assert words in last_error(out.stderr), what
        # not replicator at all: no certificate, an expired one (sent as is)
        no_cert = _raw_tls_client(rcv.port, None)
        assert "CERTIFICATE_REQUIRED" in no_cert, no_cert
        expired = _raw_tls_client(rcv.port, stale)
        assert "EXPIRED" in expired, expired
        # a valid certificate, but not allowed that job
        out = send(rcv, "vm2", tmp_path / "s-vm2", disk, *tls)
        assert out.returncode == ExitCode.REFUSED
        assert "may not write job 'vm2'" in last_error(out.stderr)
        assert "--allow sender:vm2" in last_error(out.stderr)
        assert "--allow sender:'*'" in last_error(out.stderr)  # quoted, for a shell
        assert not (rcv.dir / "vm1").exists() and not (rcv.dir / "vm2").exists()
        assert not (rcv.dir / ".replicator" / "vm1").exists()
        assert not (rcv.dir / ".replicator" / "vm2").exists()
        # still serving: the allowed sender gets its job
        send_once(rcv, "vm1", tmp_path / "state", disk, security=tls)
        assert b3(disk) == b3(rcv.dir / "vm1" / disk.name)
        # a job it may not touch, unknown there: refused for --allow, before the unknown
        # job's refusal, which lists the receiver's jobs (it named vm1 to a peer that may
        # not know of it)
        out = replicator(
            "verify", "--to", rcv.address, "--job", "payroll", "--state-dir",
            str(tmp_path / "s-payroll"), *tls, str(disk),
        )  # fmt: skip
        assert out.returncode == ExitCode.REFUSED, out.stderr
        assert "may not write job 'payroll'" in last_error(out.stderr)
        assert "vm1" not in out.stderr
        # counted for monitoring, by reason (they were in the log only)
        snap = json.loads(replicator("status", "--dir", str(rcv.dir), "--json").stdout)
        refused = snap["refused_connections"]
        assert refused["auth"] == 2 and refused["tls"] >= 5, refused
        table = replicator("status", "--dir", str(rcv.dir)).stdout
        assert f"refused connections since start: auth 2, tls {refused['tls']}" in table
    finally:
        assert rcv.stop() == 0
    reasons = [e["reason"] for e in log_events(log, "transport.tls_refused")]
    assert any("does not use TLS" in r for r in reasons), reasons
    assert any("not signed by our CA" in r for r in reasons), reasons
    assert any("reset the connection" in r or "closed the connection" in r for r in reasons)
    assert any("sent no certificate" in r for r in reasons), reasons
    assert any("certificate has expired" in r for r in reasons), reasons
    assert all(e["peer"].startswith("127.0.0.1:") for e in log_events(log, "transport.tls_refused"))
    refused = log_events(log, "receiver.refused")
    assert [e["code"] for e in refused] == ["auth", "auth"], refused
    assert "vm2" in refused[0]["why"] and "payroll" in refused[1]["why"]


@pytest.mark.tools
def test_another_certificate_of_the_ca_cannot_pose_as_the_receiver(tmp_path: Path) -> None:
    """A host holding only site-b's key (the real receiver lets it write one job) runs a
    receiver with it: a sender, `verify` and `failback` aimed there are refused before
    sending anything (exit 10, naming the certificate), and nothing lands there; a sender
    told that name with --tls-peer replicates to it."""
    out = tmp_path / "keys"
    keygen(out)
    keygen(out, "--name", "site-b")
    disk = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "64M")
    qemu_io("qcow2", disk, "write -P 0x5a 0 4M")
    tls = ("--tls-dir", str(out))
    state = tmp_path / "state"
    log = tmp_path / "impostor.log"
    impostor = start_receiver(
        tmp_path / "impostor", log=log, security=(*tls, "--tls-name", "site-b")
    )
    try:
        sent = send(impostor, "web01", state, disk, *tls)
        assert sent.returncode == ExitCode.AUTH, sent.stderr
        error = last_error(sent.stderr)
        assert "presented certificate 'site-b', not 'receiver'" in error, error
        assert "--tls-peer site-b" in error
        for command, where in (("verify", "--to"), ("failback", "--from")):
            done = replicator(
                command, where, impostor.address, "--job", "web01", "--state-dir", str(state),
                *tls, str(disk), timeout=60,
            )  # fmt: skip
            assert done.returncode == ExitCode.AUTH, (command, done.stderr)
            assert "presented certificate 'site-b'" in last_error(done.stderr), command
        # a continuous sender gives up too (a certificate refusal is not retried)
        endless = replicator(
            "send", "--to", impostor.address, "--job", "web01", "--state-dir", str(state),
            "--interval", "0.2", *tls, str(disk), timeout=60,
        )  # fmt: skip
        assert endless.returncode == ExitCode.AUTH, endless.stderr
        assert not (impostor.dir / "web01").exists()
        assert not (impostor.dir / ".replicator" / "web01").exists()
        assert not log_events(log, "receiver.session")
        # named on purpose, it is the receiver
        named = send_once(impostor, "web01", state, disk, security=(*tls, "--tls-peer", "site-b"))
        assert named["bytes_changed"] >= 4 * MIB
        assert qemu_compare("qcow2", disk, impostor.dir / "web01" / disk.name).returncode == 0
    finally:
        assert impostor.stop() == 0
    wrong = replicator(
        "send", "--to", "127.0.0.1:1", "--job", "web01", "--once", "--insecure",
        "--tls-peer", "receiver", str(disk),
    )  # fmt: skip
    assert wrong.returncode == ExitCode.CONFIG and "--tls-peer needs --tls-dir" in wrong.stderr


def test_a_tls_sender_against_a_plaintext_receiver(tmp_path: Path) -> None:
    keygen(tmp_path / "keys")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x01" * 65536)
    rcv = start_receiver(tmp_path / "target")
    try:
        out = send(rcv, "vm1", tmp_path / "s", disk, "--tls-dir", str(tmp_path / "keys"))
        assert out.returncode == ExitCode.AUTH
        assert "does not speak TLS" in last_error(out.stderr)
        assert not (rcv.dir / "vm1").exists()
    finally:
        assert rcv.stop() == 0


def test_a_tls_sender_pointed_at_another_service_is_told_to_check_the_address(
    tmp_path: Path,
) -> None:
    """`--to` at a wrong port (an SSH server, which speaks first) was answered only "is it
    running with --insecure?": the address was never named as what to check."""
    keygen(tmp_path / "keys")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x01" * 65536)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def banner() -> None:
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
                    conn.recv(4096)

        thread = threading.Thread(target=banner, daemon=True)
        thread.start()
        out = replicator("send", "--to", f"127.0.0.1:{port}", "--job", "vm1", "--state-dir",
                         str(tmp_path / "s"), "--once", "--tls-dir", str(tmp_path / "keys"),
                         str(disk), timeout=60)  # fmt: skip
        thread.join(timeout=30)
    assert out.returncode == ExitCode.AUTH, out.stderr
    error = last_error(out.stderr)
    assert "does not speak TLS" in error and "--insecure" in error
    assert "another service's" in error and "--listen" in error, error


def _stalled_client_hello(port: int, context: ssl.SSLContext) -> socket.socket:
    """A TLS client that sends its ClientHello and then nothing: it stalls in the
    handshake, holding whatever the receiver keeps for a handshake under way."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(outgoing.read())
    return sock


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def test_stalled_tls_handshakes_time_out_within_the_pending_bounds(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 512:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 512), hard))
    out = tmp_path / "keys"
    keygen(out)
    tls = ("--tls-dir", str(out))
    log = tmp_path / "receiver.log"
    rcv = start_receiver(tmp_path / "target", log=log, security=tls)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x5a" * 65536)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(out / "ca.crt")
    context.load_cert_chain(out / "sender.crt", out / "sender.key")
    strangers: list[socket.socket] = []
    try:
        send_once(rcv, "warmup", tmp_path / "warmup", disk, security=tls)
        time.sleep(1.5)
        baseline = peak = rss(rcv.proc.pid)
        started = time.monotonic()
        for i in range(100):
            strangers.append(_stalled_client_hello(rcv.port, context))
            if i % 20 == 0:
                peak = max(peak, rss(rcv.proc.pid))
        for _ in range(10):
            time.sleep(0.05)
            peak = max(peak, rss(rcv.proc.pid))
        send_once(rcv, "legit", tmp_path / "state", disk, security=tls)  # served meanwhile
        peak = max(peak, rss(rcv.proc.pid))
        deadline = started + 20
        while not all(_closed(s) for s in strangers):
            assert time.monotonic() < deadline, "stalled handshakes were not cut off"
            time.sleep(0.2)
        cut_after = time.monotonic() - started
        time.sleep(1.5)
        after = rss(rcv.proc.pid)
        print(
            f"\n100 stalled TLS handshakes: receiver RSS {baseline / MIB:.1f} MiB, peak "
            f"{peak / MIB:.1f} (+{(peak - baseline) / MIB:.1f}), after {after / MIB:.1f} MiB; "
            f"all cut within {cut_after:.1f} s"
        )
        assert peak < baseline + BOUND
        assert after < baseline + BOUND
        assert rcv.proc.poll() is None
        send_once(rcv, "legit", tmp_path / "state", disk, security=tls)
    finally:
        for sock in strangers:
            sock.close()
        assert rcv.stop() == 0
    reasons = [e["reason"] for e in log_events(log, "transport.tls_refused")]
    assert len(reasons) == 100, reasons[:5]
    assert sum("did not complete the handshake within 10 s" in r for r in reasons) >= 50
    assert sum("were waiting for a handshake" in r for r in reasons) >= 30
