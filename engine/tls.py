"""Mutual TLS for replication connections: the files ``replicator keygen`` makes, the SSL
contexts built from them, and the name a peer's certificate gives it.

Choices (docs/OPERATIONS.md, "Security: TLS and keys"):

* TLS 1.3 only. Both sides present a certificate, and only certificates signed by the
  folder's CA (``ca.crt``) are accepted: that CA is pinned, the system's trust store is
  never consulted.
* Peers are identified by their certificate's name, not by a DNS name (``check_hostname``
  off, ``CERT_REQUIRED``, the CA pinned). A client checks the name the server's certificate
  carries (``TlsIdentity.peer``: ``receiver`` by default, ``witness`` for a witness) once
  the handshake is done and before it sends a byte of its own (``check_peer``): another
  certificate of the same CA (a host trusted to write one job) cannot pose as the
  receiver or the witness. A server restricts which certificate names may do what with
  ``--allow`` rules (``engine/authz.py``).
* No session tickets: every connection runs a full handshake, so a certificate replaced
  or expired is never carried over by a resumed session.
* A context is built once and rebuilt only when one of its files changes, which is checked
  at every use: every connection a sender opens, every connection a receiver accepts.
  Replacing the files therefore rotates certificates without a restart (no SIGHUP needed);
  sessions already running keep theirs. A replacement that does not load (a key that does
  not match its certificate, a half-copied file) is logged and the previous context stays.
* Expiry: checked at load (an expired certificate of ours stops the command), warned 30
  days ahead at load and then at most once a day while connections are made, and shown
  by ``status`` and the metrics (``TlsIdentity.expiry``) so monitoring can alert on it.
"""

from __future__ import annotations

import datetime
import re
import ssl
import stat
from pathlib import Path
from typing import Any

import structlog

from replicator.engine.errors import AuthError, ConfigError

log = structlog.get_logger()

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SENDER = "sender"
RECEIVER = "receiver"
WITNESS = "witness"
EXPIRY_WARNING = datetime.timedelta(days=30)
EXPIRY_RECHECK = datetime.timedelta(days=1)  # a long-running process warns again this often
DEFAULT_DAYS = 825  # keygen's certificates: about 27 months, long enough to be rare
KEYGEN_HINT = "make keys with `replicator keygen --out DIR` and copy them as it says"
TLS_FILE_MAX = 16 << 20  # a ca.crt bundle of every public CA is ~200 KiB

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_cert_name(name: str) -> str:
    """A certificate name: its files are NAME.crt and NAME.key, its subject CN is NAME."""
    if not _NAME.fullmatch(name) or ".." in name or name == "ca":
        raise ConfigError(
            f"invalid certificate name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit ('ca' is the CA's)"
        )
    return name


def cert_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.crt"


def key_path(directory: Path, name: str) -> Path:
    return directory / f"{name}.key"


def peer_name(conn: Any) -> str | None:
    """The name in the peer's certificate (subject CN, else its first DNS SAN); None
    without TLS. ``conn`` is anything with ``get_extra_info`` (a FramedConnection)."""
    cert = conn.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            return str(value)
    return None


def _not_a_file(path: Path) -> str:
    """What stands where a TLS file should be: "is missing" only when nothing does."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "is a symbolic link to nothing" if path.is_symlink() else "is missing"
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "is a device (such as /dev/null), not a file"
    return "is not a regular file"


class PeerNameError(AuthError):
    """The server's certificate is valid but carries another name than the one expected."""


def check_peer(conn: Any, expected: str | None, *, role: str, where: str, option: str) -> None:
    """Raise PeerNameError unless the certificate on ``conn`` (anything with
    ``get_extra_info``) is named ``expected``; None expects nothing. ``role`` and ``option``
    word the error: what was dialled ("receiver") and the option that names it."""
    if expected is None:
        return
    presented = peer_name(conn)
    if presented == expected:
        return
    shown = "no certificate name" if presented is None else f"certificate {presented!r}"
    hint = (
        f"check the address; if that host is the {role} and its certificate has another "
        f"name, pass {option} {presented or 'NAME'}"
    )
    if presented in (RECEIVER, WITNESS) and presented != role:
        # a receiver's port given as the witness's, or the other way round: the way out
        # is the address, not an option that would send to the wrong service
        listen = "witness" if role == WITNESS else "receive"
        hint = (
            f"that is the default name of a replicator {presented}, not a {role}: give "
            f"the {role}'s address (the one `replicator {listen} --listen` uses)"
        )
    raise PeerNameError(
        f"the {role} at {where} presented {shown}, not {expected!r}: refused, nothing was "
        "sent (another certificate of the same CA answers there)",
        hint=hint,
    )


class TlsIdentity:
    """One side's TLS settings, from a keygen folder: trust ``ca.crt``, present
    ``NAME.crt`` with ``NAME.key``; a client also expects its server's certificate to be
    named ``peer`` (``check_peer``). ``context()`` gives the SSL context for the next
    connection (built once, rebuilt when a file changes; see the module docstring).

    Owned by what makes connections (a sender's connector, a receiver's server), so it
    outlives every single connection.
    """

    def __init__(
        self, directory: Path, name: str, *, server: bool, peer: str | None = RECEIVER
    ) -> None:
        self.directory = directory
        self.name = check_cert_name(name)
        self.server = server
        # a client's server must present this name (None: any certificate of the CA);
        # a server's peers are checked by its --allow rules instead
        self.peer = None if server or peer is None else check_cert_name(peer)
        self.ca = directory / CA_CERT
        self.cert = cert_path(directory, name)
        self.key = key_path(directory, name)
        self._context: ssl.SSLContext | None = None
        self._signature: tuple[object, ...] | None = None
        self._failed: tuple[object, ...] | None = None
        # not_valid_after of our certificate and of the CA, as last loaded
        self.expires: datetime.datetime | None = None
        self.ca_expires: datetime.datetime | None = None
        self._rechecked = datetime.datetime.now(datetime.UTC)

    def load(self) -> ssl.SSLContext:
        """The first context; raises ConfigError (missing or unusable files) or AuthError
        (our certificate expired) so a command fails at start with what to do."""
        self._context = None
        return self.context()

    def expiry(self) -> dict[str, object]:
        """When our certificate and the CA expire (``status``, the metrics)."""
        now = datetime.datetime.now(datetime.UTC)
        ends = [end for end in (self.expires, self.ca_expires) if end is not None]
        ours_first = self.ca_expires is None or (
            self.expires is not None and self.expires <= self.ca_expires
        )
        return {
            "certificate": self.name,
            "expires": _iso(self.expires),
            "ca_expires": _iso(self.ca_expires),
            "days_left": None if not ends else round((min(ends) - now).total_seconds() / 86400, 1),
            # what to do about the one that expires first (the log's words)
            "renew": self._renew_hint(ours_first),
        }

    def context(self) -> ssl.SSLContext:
        signature = self._stat()
        if self._context is not None and signature == self._signature:
            self._recheck()
            return self._context
        try:
            context = self._build()
        except (ConfigError, AuthError) as exc:
            if self._context is None:
                raise
            if signature != self._failed:  # once per change, not per connection
                self._failed = signature
                log.warning(
                    "tls.reload_failed", error=str(exc), action="kept the certificates in use"
                )
            return self._context
        if self._context is not None:
            log.warning("tls.reloaded", certificate=str(self.cert), ca=str(self.ca))
        self._context, self._signature, self._failed = context, signature, None
        return context

    def _stat(self) -> tuple[object, ...]:
        out: list[object] = []
        for path in (self.ca, self.cert, self.key):
            try:
                st = path.stat()
            except OSError:
                out.append(None)
            else:
                out.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(out)

    def _build(self) -> ssl.SSLContext:
        where = self.directory
        for path in (self.ca, self.cert, self.key):
            if not path.is_file():
                what = _not_a_file(path)
                raise ConfigError(
                    f"--tls-dir {where}: {path.name} {what}",
                    hint=f"{KEYGEN_HINT}; this side uses {CA_CERT}, {self.cert.name} and "
                    f"{self.key.name} (another name: --tls-name NAME)",
                )
            size = path.stat().st_size
            if size > TLS_FILE_MAX:  # OpenSSL reads it whole, at each start and reload
                raise ConfigError(
                    f"--tls-dir {where}: {path.name} is {size} bytes; a certificate, key or "
                    f"CA file is a few KiB (at most {TLS_FILE_MAX // (1 << 20)} MiB here)",
                    hint=f"{KEYGEN_HINT}; {path.name} should hold the PEM text keygen wrote",
                )
        self._check_key_mode()
        protocol = ssl.PROTOCOL_TLS_SERVER if self.server else ssl.PROTOCOL_TLS_CLIENT
        context = ssl.SSLContext(protocol)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False  # peers are named by their certificate, not by DNS
        context.verify_mode = ssl.CERT_REQUIRED
        context.options |= ssl.OP_NO_TICKET
        if self.server:
            context.num_tickets = 0
        try:
            context.load_verify_locations(cafile=str(self.ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"--tls-dir {where}: cannot load {CA_CERT}: {_why(exc)}", hint=KEYGEN_HINT
            ) from exc
        try:
            context.load_cert_chain(str(self.cert), str(self.key))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"--tls-dir {where}: cannot load {self.cert.name} with {self.key.name}: "
                f"{_why(exc)}",
                hint="the two files must come from the same `replicator keygen` run; "
                f"make them again with `replicator keygen --out DIR --name {self.name} --force`",
            ) from exc
        self._check_validity()
        return context

    def _check_key_mode(self) -> None:
        mode = self.key.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning(
                "tls.key_readable_by_others",
                key=str(self.key),
                mode=oct(stat.S_IMODE(mode)),
                fix=f"chmod 600 {self.key}",
            )
        # whoever may write the folder or ca.crt may add a CA of their own, then certificates
        for path, fix in ((self.directory, "chmod go-w"), (self.ca, "chmod 644")):
            mode = path.stat().st_mode
            if mode & (stat.S_IWGRP | stat.S_IWOTH):
                log.warning(
                    "tls.writable_by_others",
                    path=str(path),
                    mode=oct(stat.S_IMODE(mode)),
                    risk="another local user could add a CA of their own and be trusted",
                    fix=f"{fix} {path}",
                )

    def _recheck(self) -> None:
        """Once a day, from what was loaded: the warning a process started months ago gave
        only then (no file is read)."""
        now = datetime.datetime.now(datetime.UTC)
        if now - self._rechecked < EXPIRY_RECHECK:
            return
        self._rechecked = now
        for end, what in ((self.expires, str(self.cert)), (self.ca_expires, str(self.ca))):
            if end is None:
                continue
            if now > end:
                log.error(
                    "tls.certificate_expired",
                    certificate=what,
                    expired=f"{end:%Y-%m-%d %H:%M} UTC",
                    action=self._renew_hint(what == str(self.cert)),
                )
            elif end - now < EXPIRY_WARNING:
                log.warning(
                    "tls.certificate_expires_soon",
                    certificate=what,
                    expires=f"{end:%Y-%m-%d %H:%M} UTC",
                    action=self._renew_hint(what == str(self.cert)),
                )

    def _renew_hint(self, ours: bool) -> str:
        if ours:
            return (
                f"make a new one with `replicator keygen --out DIR --name {self.name} --force` "
                "where the CA key is, and copy it here (no restart needed)"
            )
        return (
            "make a new CA folder with `replicator keygen --out NEWDIR` and new keys for both sides"
        )

    def _check_validity(self) -> None:
        """Our own certificate and the CA must be valid now; warn 30 days ahead."""
        from cryptography import x509  # 70 ms: only for commands that use TLS

        now = datetime.datetime.now(datetime.UTC)
        ends: list[datetime.datetime] = []  # kept only when both are valid now
        for path, what in ((self.cert, f"certificate {self.cert.name}"), (self.ca, "CA")):
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (ValueError, OSError) as exc:
                raise ConfigError(
                    f"--tls-dir {self.directory}: cannot read {path.name}: {exc}",
                    hint=KEYGEN_HINT,
                ) from exc
            start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
            renew = self._renew_hint(path == self.cert)
            ends.append(end)
            if now < start or now > end:
                state = "expired on" if now > end else "is not valid before"
                when = end if now > end else start
                raise AuthError(f"{path}: the {what} {state} {when:%Y-%m-%d %H:%M} UTC", hint=renew)
            if end - now < EXPIRY_WARNING:
                log.warning(
                    "tls.certificate_expires_soon",
                    certificate=str(path),
                    expires=f"{end:%Y-%m-%d %H:%M} UTC",
                    action=renew,
                )
        self.expires, self.ca_expires = ends


def _iso(when: datetime.datetime | None) -> str | None:
    """As ``status`` writes times: '2026-01-02T03:04:05.000Z'."""
    return None if when is None else when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
