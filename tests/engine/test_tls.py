"""Mutual TLS in one process: keygen's files, the contexts built from them, what a served
TLS connection goes through before its handler runs, and who may write which job."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import shutil
import ssl
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from replicator.engine import keys
from replicator.engine.authz import Allow, Authorizer, allowed, parse_allow, refusal
from replicator.engine.connectors import TcpConnector
from replicator.engine.errors import AuthError, ConfigError, ExitCode, as_user_error, tls_refusal
from replicator.engine.tls import (
    TLS_FILE_MAX,
    PeerNameError,
    TlsIdentity,
    check_peer,
    peer_name,
)
from replicator.transport import (
    PLAINTEXT_REFUSAL,
    ConnectionClosedError,
    Error,
    FramedConnection,
    Goodbye,
    Hello,
    Refuse,
    RemoteProtocolError,
    connect,
    serve,
)
from tests.transport.helpers import HELLO, welcome

Handler = Callable[[FramedConnection], Awaitable[None]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("tls") / "keys"
    keys.keygen(where, ["receiver", "sender"])
    return where


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("tls") / "other"
    keys.keygen(where, ["receiver", "sender"])
    return where


def load_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key, x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())


def expired_copy(folder: Path, where: Path, name: str = "sender") -> Path:
    """A folder with ``folder``'s CA and a certificate NAME that expired 9 days ago."""
    where.mkdir(mode=0o700)
    (where / "ca.crt").write_bytes((folder / "ca.crt").read_bytes())
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    key, cert = keys.issue(*load_ca(folder), name, 1, now=past)
    keys.write_key(where / f"{name}.key", key)
    keys.write_cert(where / f"{name}.crt", cert)
    return where


# --- keygen -------------------------------------------------------------------------------


def test_keygen_makes_a_ca_and_two_certificates_with_private_modes(tmp_path: Path) -> None:
    where = tmp_path / "keys"
    result = keys.keygen(where, ["receiver", "sender"], days=30)
    assert result.ca_created and result.written == ["receiver", "sender"]
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    names = {p.name: stat.S_IMODE(p.stat().st_mode) for p in where.iterdir()}
    assert names == {
        "ca.crt": 0o644,
        "ca.key": 0o600,
        "receiver.crt": 0o644,
        "receiver.key": 0o600,
        "sender.crt": 0o644,
        "sender.key": 0o600,
    }
    _, ca = load_ca(where)
    sender = x509.load_pem_x509_certificate((where / "sender.crt").read_bytes())
    assert sender.issuer == ca.subject
    assert sender.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "sender"
    assert isinstance(sender.public_key(), ec.EllipticCurvePublicKey)
    assert sender.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    days = (sender.not_valid_after_utc - sender.not_valid_before_utc).days
    assert days == 30  # plus the 5 minutes of clock skew allowed at the start
    sender.verify_directly_issued_by(ca)


def test_keygen_refuses_to_replace_keys_without_force(tmp_path: Path) -> None:
    where = tmp_path / "keys"
    keys.keygen(where, ["receiver", "sender"])
    before = {p.name: p.read_bytes() for p in where.iterdir()}
    with pytest.raises(ConfigError, match="does not replace keys") as refused:
        keys.keygen(where, ["receiver", "sender"])
    assert "--force" in str(refused.value)
    assert {p.name: p.read_bytes() for p in where.iterdir()} == before
    keys.keygen(where, ["site-b"])  # one more name: the CA is reused
    assert (where / "site-b.key").exists()
    assert (where / "ca.crt").read_bytes() == before["ca.crt"]
    keys.keygen(where, ["sender"], force=True)  # replaced, signed by the same CA
    assert (where / "sender.key").read_bytes() != before["sender.key"]
    assert (where / "ca.key").read_bytes() == before["ca.key"]
    sender = x509.load_pem_x509_certificate((where / "sender.crt").read_bytes())
    sender.verify_directly_issued_by(load_ca(where)[1])


def test_keygen_needs_the_ca_key_and_a_sane_name(tmp_path: Path) -> None:
    where = tmp_path / "keys"
    keys.keygen(where, ["sender"])
    os.unlink(where / "ca.key")  # a host that only got ca.crt
    with pytest.raises(ConfigError, match=r"has ca\.crt but not ca\.key"):
        keys.keygen(where, ["more"])
    for bad in ("ca", "../x", "", "-x", "a/b"):
        with pytest.raises(ConfigError, match="invalid certificate name"):
            keys.keygen(tmp_path / "k2", [bad])


# --- contexts -----------------------------------------------------------------------------


def test_contexts_are_tls13_mutual_and_pinned_to_the_ca(folder: Path) -> None:
    client = TlsIdentity(folder, "sender", server=False).load()
    server = TlsIdentity(folder, "receiver", server=True).load()
    for context in (client, server):
        assert context.minimum_version is ssl.TLSVersion.TLSv1_3
        assert context.verify_mode is ssl.CERT_REQUIRED
        assert not context.check_hostname
        assert len(context.get_ca_certs()) == 1  # ours only: no system trust store
    assert server.num_tickets == 0


def test_missing_files_and_an_expired_certificate_fail_at_start(
    folder: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"site-z\.crt is missing") as missing:
        TlsIdentity(folder, "site-z", server=False).load()
    assert "replicator keygen --out DIR" in str(missing.value)
    # what stands in a file's place is named: "is missing" sent an operator looking for it
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    key = odd / "sender.key"
    key.unlink()
    key.mkdir()
    with pytest.raises(ConfigError, match=r"sender\.key is a folder, not a file"):
        TlsIdentity(odd, "sender", server=False).load()
    key.rmdir()
    key.symlink_to("/dev/null")
    with pytest.raises(ConfigError, match=r"sender\.key is a device \(such as /dev/null\)"):
        TlsIdentity(odd, "sender", server=False).load()
    key.unlink()
    key.symlink_to(odd / "moved.key")
    with pytest.raises(ConfigError, match=r"sender\.key is a symbolic link to nothing"):
        TlsIdentity(odd, "sender", server=False).load()
    stale = expired_copy(folder, tmp_path / "stale")
    with pytest.raises(AuthError, match="expired on") as expired:
        TlsIdentity(stale, "sender", server=False).load()
    assert expired.value.exit_code == ExitCode.AUTH
    assert "--force" in str(expired.value)


def test_an_oversized_ca_file_is_refused_before_openssl_reads_it(
    folder: Path, tmp_path: Path
) -> None:
    """A ca.crt grown to hundreds of MB (a log or an image copied over it) was read whole by
    OpenSSL at start and at each reload: memory and time for nothing that could be a CA."""
    big = tmp_path / "big"
    shutil.copytree(folder, big)
    with (big / "ca.crt").open("ab") as ca:
        ca.truncate(TLS_FILE_MAX + 1)  # sparse: the test writes no data
    with pytest.raises(ConfigError, match=r"ca\.crt is \d+ bytes") as refused:
        TlsIdentity(big, "sender", server=False).load()
    assert "replicator keygen --out DIR" in str(refused.value)


def test_a_replaced_certificate_is_used_from_the_next_connection(
    folder: Path, tmp_path: Path
) -> None:
    where = tmp_path / "keys"
    where.mkdir()
    for name in ("ca.crt", "sender.crt", "sender.key"):
        (where / name).write_bytes((folder / name).read_bytes())
    (where / "sender.key").chmod(0o600)
    identity = TlsIdentity(where, "sender", server=False)
    first = identity.load()
    assert identity.context() is first  # nothing changed: the same context
    key, cert = keys.issue(*load_ca(folder), "sender", 10)
    keys.write_key(where / "sender.key", key)
    with capture_logs() as logs:
        assert identity.context() is first  # a key without its certificate: kept the old
        assert identity.context() is first
    assert [e["event"] for e in logs] == ["tls.reload_failed"]  # once, not per connection
    keys.write_cert(where / "sender.crt", cert)
    with capture_logs() as logs:
        second = identity.context()
    assert second is not first
    assert sorted(e["event"] for e in logs) == ["tls.certificate_expires_soon", "tls.reloaded"]


# --- authorization ------------------------------------------------------------------------


def test_allow_rules() -> None:
    rules = [parse_allow("site-a:vm1"), parse_allow("site-b:*")]
    assert rules == [Allow("site-a", "vm1"), Allow("site-b", "*")]
    assert allowed([], None, "vm1")  # no rules: whoever the CA let in
    assert allowed(rules, "site-a", "vm1")
    assert not allowed(rules, "site-a", "vm2")
    assert allowed(rules, "site-b", "anything")
    assert not allowed(rules, None, "vm1")
    assert not allowed(rules, "site-c", "vm1")
    why = refusal(rules, "site-a", "vm2")
    assert why is not None and "'vm2'" in why and "--allow site-a:vm2" in why
    assert "--allow site-a:'*'" in why  # a shell would glob a bare *
    assert refusal(rules, "site-a", "vm1") is None
    for bad in ("vm1", ":vm1", "site-a:", "site-a:../x", "a/b:vm1"):
        with pytest.raises(ConfigError, match="--allow"):
            parse_allow(bad)


# --- served TLS -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def tls_server(handler: Handler, folder: Path, **kw: Any) -> AsyncIterator[int]:
    identity = TlsIdentity(folder, "receiver", server=True)
    identity.load()
    srv = await serve("127.0.0.1", 0, handler, ssl=identity.context, **kw)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def answer(conn: FramedConnection) -> None:
    with contextlib.suppress(ConnectionClosedError):
        msg = await conn.recv(10)
        assert isinstance(msg, Hello)
        await conn.send(welcome())
        assert isinstance(await conn.recv(10), Goodbye)


def run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    if loop == "uvloop":
        uvloop.run(main())  # type: ignore[arg-type]
    else:
        asyncio.run(main())  # type: ignore[arg-type]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_mutual_tls_session_and_the_peer_name(folder: Path, loop: str) -> None:
    names: list[str | None] = []

    async def handler(conn: FramedConnection) -> None:
        names.append(peer_name(conn))
        await answer(conn)

    async def main() -> None:
        async with tls_server(handler, folder) as port:
            connector = TcpConnector(
                "127.0.0.1", port, tls=TlsIdentity(folder, "sender", server=False)
            )
            for _ in range(2):  # the connector's context serves every reconnect
                conn = await connector.connect()
                assert conn.get_extra_info("ssl_object").version() == "TLSv1.3"
                assert peer_name(conn) == "receiver"
                await conn.send(HELLO)
                assert (await conn.recv(10)).window == welcome().window  # type: ignore[union-attr]
                await conn.send(Goodbye("done"))
                await conn.aclose()

    run(loop, main)
    assert names == ["sender", "sender"]


def _client(folder: Path | None, name: str = "sender") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the receiver's side of things is under test
    if folder is not None:
        context.load_cert_chain(folder / f"{name}.crt", folder / f"{name}.key")
    return context


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("case", ["none", "foreign", "expired"])
def test_a_refused_certificate_never_reaches_the_handler(
    folder: Path, foreign: Path, tmp_path: Path, loop: str, case: str
) -> None:
    """The sender is told why (an alert, read as AuthError); the receiver logs it."""
    client = {
        "none": lambda: _client(None),
        "foreign": lambda: _client(foreign),
        "expired": lambda: _client(expired_copy(folder, tmp_path / "old")),
    }[case]()
    reached: list[FramedConnection] = []

    async def handler(conn: FramedConnection) -> None:
        reached.append(conn)

    async def main() -> None:
        with capture_logs() as logs:
            async with tls_server(handler, folder) as port:
                conn = await connect("127.0.0.1", port, ssl=client)  # TLS 1.3: done for us
                await conn.send(HELLO)
                with pytest.raises(ConnectionClosedError) as cut:
                    await conn.recv(5)
                await conn.aclose()
                await asyncio.sleep(0.05)
        refused = [e for e in logs if e["event"] == "transport.tls_refused"]
        assert len(refused) == 1 and refused[0]["peer"].startswith("127.0.0.1:")
        expect = {
            "none": "sent no certificate",
            "foreign": "not signed by our CA",
            "expired": "certificate has expired",
        }[case]
        assert expect in refused[0]["reason"]
        error = as_user_error(cut.value)
        assert isinstance(error, AuthError), repr(cut.value)
        assert {"none": "got none", "foreign": "does not trust", "expired": "expired"}[case] in str(
            error
        )

    run(loop, main)
    assert reached == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_plaintext_sender_is_refused_in_words_it_reads(folder: Path, loop: str) -> None:
    async def main() -> None:
        with capture_logs() as logs:
            async with tls_server(answer, folder) as port:
                conn = await connect("127.0.0.1", port)
                await conn.send(HELLO)
                assert await conn.recv(5) == Refuse("auth", PLAINTEXT_REFUSAL)
                await conn.aclose()
                await asyncio.sleep(0.05)
        assert [e["reason"] for e in logs if e["event"] == "transport.tls_refused"] == [
            "the peer does not use TLS (a sender run with --insecure?)"
        ]

    run(loop, main)


def test_a_tls_sender_against_a_plaintext_receiver(folder: Path) -> None:
    async def plaintext_receiver(conn: FramedConnection) -> None:
        with pytest.raises(RemoteProtocolError, match="speak TLS"):
            await conn.recv(5)
        await conn.send(Error("protocol", "not a replicator peer"))  # as Receiver.handle does

    async def main() -> None:
        srv = await serve("127.0.0.1", 0, plaintext_receiver)
        port = srv.sockets[0].getsockname()[1]
        connector = TcpConnector("127.0.0.1", port, tls=TlsIdentity(folder, "sender", server=False))
        with pytest.raises(AuthError, match="does not speak TLS"):
            await connector.connect()
        srv.close()
        await srv.wait_closed()

    uvloop.run(main())


def test_a_receiver_certificate_from_another_ca(folder: Path, foreign: Path) -> None:
    async def main() -> None:
        async with tls_server(answer, foreign) as port:
            identity = TlsIdentity(folder, "sender", server=False)
            with pytest.raises(AuthError, match="not signed by our CA"):
                await TcpConnector("127.0.0.1", port, tls=identity).connect()

    uvloop.run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_tls_handshake_is_pending_and_has_the_deadline(folder: Path, loop: str) -> None:
    """Strangers that never finish their TLS handshake count against max_pending (the
    oldest goes) and are cut at handshake_timeout; a real sender still gets in."""

    async def main() -> None:
        with capture_logs() as logs:
            async with tls_server(answer, folder, max_pending=3, handshake_timeout=0.5) as port:
                strangers = []
                for _ in range(5):
                    strangers.append(await asyncio.open_connection("127.0.0.1", port))
                    await asyncio.sleep(0.02)
                identity = TlsIdentity(folder, "sender", server=False)
                conn = await TcpConnector("127.0.0.1", port, tls=identity).connect()
                await conn.send(HELLO)
                assert isinstance(await conn.recv(5), type(welcome()))
                await conn.send(Goodbye("done"))
                await conn.aclose()
                started = asyncio.get_running_loop().time()
                for reader, _ in strangers:
                    async with asyncio.timeout(5):
                        with contextlib.suppress(ConnectionError):
                            assert await reader.read() == b""
                assert asyncio.get_running_loop().time() - started < 2
                for _, writer in strangers:
                    writer.close()
                await asyncio.sleep(0.05)
        reasons = [e["reason"] for e in logs if e["event"] == "transport.tls_refused"]
        assert len(reasons) == 5
        assert sum("were waiting for a handshake" in r for r in reasons) >= 2
        assert sum("did not complete the handshake within 0.5 s" in r for r in reasons) >= 1

    run(loop, main)


def test_a_tls_handshake_under_way_counts_against_its_own_address(folder: Path) -> None:
    """Pending in its TLS handshake, a connection from 127.0.0.2 is not evicted by a flood
    of strangers from 127.0.0.1 (its address is known before the handshake is)."""

    async def main() -> None:
        async with tls_server(answer, folder, max_pending=3, handshake_timeout=10) as port:
            slow = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            await asyncio.sleep(0.02)
            strangers = []
            for _ in range(5):
                strangers.append(await asyncio.open_connection("127.0.0.1", port))
                await asyncio.sleep(0.02)
            for reader, _ in strangers[:3]:
                async with asyncio.timeout(5):
                    with contextlib.suppress(ConnectionError):
                        assert await reader.read() == b""
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await slow[0].read()
            for _, writer in [slow, *strangers]:
                writer.close()
            await asyncio.sleep(0.05)

    uvloop.run(main())


def test_keys_anyone_could_change_are_warned_about(tmp_path: Path) -> None:
    """A key others may read, a folder or ca.crt others may write (they could add a CA of
    their own): each warned at load, naming the fix; keygen's modes give no warning."""
    where = tmp_path / "keys"
    keys.keygen(where, ["sender"])
    with capture_logs() as logs:
        TlsIdentity(where, "sender", server=False).load()
    assert [e for e in logs if e["log_level"] == "warning"] == []
    where.chmod(0o777)
    (where / "ca.crt").chmod(0o666)
    (where / "sender.key").chmod(0o640)
    with capture_logs() as logs:
        TlsIdentity(where, "sender", server=False).load()
    warned = {(e["event"], e.get("path", e.get("key"))): e["fix"] for e in logs}
    assert warned == {
        ("tls.key_readable_by_others", str(where / "sender.key")): f"chmod 600 {where}/sender.key",
        ("tls.writable_by_others", str(where)): f"chmod go-w {where}",
        ("tls.writable_by_others", str(where / "ca.crt")): f"chmod 644 {where}/ca.crt",
    }


async def test_a_certificate_near_its_end_is_shown_and_warned_about_while_running(
    tmp_path: Path,
) -> None:
    """A process started months ago warned only then: its expiry is in the status and the
    metrics (loud in the last 30 days), and it is warned about again once a day."""
    from prometheus_client.parser import text_string_to_metric_families

    from replicator.cli.status_cmd import _tls
    from replicator.engine.metrics import Metrics
    from replicator.engine.status import StatusBoard

    where = tmp_path / "keys"
    keys.keygen(where, ["sender"], days=10)
    identity = TlsIdentity(where, "sender", server=False)
    identity.load()
    board = StatusBoard("sender")
    board.tls = identity
    snap = await board.snapshot()
    tls = snap["tls"]
    assert tls["certificate"] == "sender" and 9.9 < tls["days_left"] <= 10
    assert tls["expires"].endswith("Z") and tls["ca_expires"] > tls["expires"]
    shown = _tls(tls)
    assert (
        shown is not None
        and "days left; make a new one with `replicator keygen --out DIR --name sender --force`"
        in " ".join(shown.plain.split())
    ), shown

    async def take() -> dict[str, Any]:
        return snap

    text = (await Metrics(take).render()).decode()
    expiry = {
        sample.labels["certificate"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "replicator_tls_certificate_expiry_timestamp_seconds"
    }
    assert set(expiry) == {"sender", "ca"}
    assert expiry["sender"] - time.time() == pytest.approx(10 * 86400, abs=400)
    with capture_logs() as logs:
        identity.context()  # the same day: not again
        identity._rechecked -= datetime.timedelta(days=2)
        identity.context()
        identity.context()
    warned = [e for e in logs if e["event"] == "tls.certificate_expires_soon"]
    assert len(warned) == 1 and warned[0]["certificate"] == str(where / "sender.crt")
    assert "--name sender --force" in warned[0]["action"]


def test_tls_refusal_leaves_other_connection_errors_alone() -> None:
    assert tls_refusal(ConnectionResetError()) is None
    damaged = ssl.SSLError(1, "bad mac")
    damaged.reason = "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    assert tls_refusal(damaged) is None
    # one flipped bit in our ClientHello: the receiver cannot decode it (seen with the WAN
    # emulator's corruption: "refused our certificate", exit 10, and a continuous sender
    # gave up)
    for reason in ("TLSV1_ALERT_DECODE_ERROR", "TLSV1_ALERT_ILLEGAL_PARAMETER", "BAD_EXTENSION"):
        garbled = ssl.SSLError(1, "alert")
        garbled.reason = reason
        assert tls_refusal(garbled) is None, reason
    alert = ssl.SSLError(1, "alert")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    wrapped = ConnectionClosedError("lost")
    wrapped.__cause__ = alert
    assert isinstance(as_user_error(wrapped), AuthError)
    assert tls_refusal(ssl.SSLEOFError()) is None
    _ = Authorizer([])


async def test_a_tls_alert_that_ended_the_connection_still_names_the_certificate() -> None:
    """TLS 1.3: the receiver checks our certificate after our side of the handshake is
    done, so its alert can end the connection while we write. The error raised by that
    write keeps the alert as its cause, and the sender reports exit 10, not a lost
    connection to retry (a flaky test_tls.py case, 2 of 5 full runs)."""
    from replicator.transport import Ping, connection_pair

    sender, receiver = await connection_pair()
    try:
        alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
        alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
        sender._connection_lost(alert)  # what the TLS layer reports when the alert arrives
        with pytest.raises(Exception) as caught:
            await sender.send(Ping(1, 2))
        mapped = as_user_error(caught.value)
        assert isinstance(mapped, AuthError) and mapped.exit_code == ExitCode.AUTH
        assert "CA it does not trust" in str(mapped)
    finally:
        await sender.aclose()
        await receiver.aclose()


class _Presents:
    """A connection whose peer presented a valid certificate named ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def get_extra_info(self, key: str) -> object:
        assert key == "peercert"
        return {"subject": ((("commonName", self.name),),)}


@pytest.mark.parametrize(
    ("presented", "role", "option", "listen"),
    [
        ("witness", "receiver", "--tls-peer", "receive"),
        ("receiver", "witness", "--witness-peer", "witness"),
    ],
)
def test_the_other_service_s_port_says_to_fix_the_address(
    presented: str, role: str, option: str, listen: str
) -> None:
    """`send --to` given the witness's port (or --witness the receiver's) told to pass
    `--tls-peer witness`, which would send replication to the witness."""
    with pytest.raises(PeerNameError) as caught:
        check_peer(_Presents(presented), role, role=role, where="h:1", option=option)
    assert f"replicator {listen} --listen" in str(caught.value.hint)
    assert option not in str(caught.value.hint)
    # a name of the admin's own still gets the option that accepts it
    with pytest.raises(PeerNameError, match=f"pass {option} site-b"):
        check_peer(_Presents("site-b"), role, role=role, where="h:1", option=option)
