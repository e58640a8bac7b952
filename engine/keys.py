"""``replicator keygen``: a small CA and the certificates mutual TLS uses.

Files in the keygen folder (docs/OPERATIONS.md, "Security: TLS and keys"):

* ``ca.crt`` / ``ca.key``: the CA, made once per folder and never replaced by keygen. Every
  side needs ``ca.crt``; ``ca.key`` signs new certificates and should stay where keygen
  runs.
* ``NAME.crt`` / ``NAME.key`` for each certificate: ``receiver`` and ``sender`` by default,
  or one more per ``--name NAME``. The subject CN (and a DNS SAN) is NAME: the name a
  receiver's ``--allow NAME:JOB`` rules match.

Keys are ECDSA P-256 (every TLS 1.3 stack, OpenSSL's included, signs and verifies it;
Ed25519 certificates are not accepted everywhere yet), written unencrypted with mode 0600
in a folder of mode 0700, atomically (a process reading the folder while keygen runs sees
the old file or the new one, never half of one). Certificates allow both TLS roles, so a
host can later serve as the other side (failback) with the same certificate.
"""

from __future__ import annotations

import datetime
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from replicator.engine.errors import ConfigError
from replicator.engine.tls import (
    CA_CERT,
    CA_KEY,
    DEFAULT_DAYS,
    cert_path,
    check_cert_name,
    key_path,
)
from replicator.journal.durable import atomic_write

CA_DAYS = 3650
CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass
class KeygenResult:
    directory: Path
    ca_created: bool
    written: list[str] = field(default_factory=list)  # certificate names made this time


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(
    days: int = CA_DAYS, *, now: datetime.datetime | None = None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new CA key and its self-signed certificate."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = _new_key()
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"replicator CA {secrets.token_hex(4)}")]
    )
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    days: int,
    *,
    now: datetime.datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A key and a certificate named ``name``, signed by the CA, for either TLS role.
    ``now`` and ``days`` may put its validity anywhere (tests make expired ones)."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = key or _new_key()
    public = key.public_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    atomic_write(path, _key_bytes(key), mode=0o600)


def write_cert(path: Path, cert: x509.Certificate) -> None:
    atomic_write(path, _cert_bytes(cert), mode=0o644)


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    crt, key = directory / CA_CERT, directory / CA_KEY
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"cannot read the CA in {directory}: {exc}",
            hint=f"keygen needs {CA_CERT} and {CA_KEY} from an earlier `replicator keygen` "
            "in that folder; for a new CA use a new, empty --out folder",
        ) from exc
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key} is not a key replicator keygen made (P-256)")
    return private, cert


def keygen(
    directory: Path, names: Sequence[str], *, days: int = DEFAULT_DAYS, force: bool = False
) -> KeygenResult:
    """Make the CA when ``directory`` has none, then a key and certificate per name.

    Refuses (ConfigError, before writing anything) to replace an existing key or
    certificate unless ``force``; never replaces the CA.
    """
    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    for name in names:
        check_cert_name(name)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--out {directory} is not a folder", hint="name a new or empty folder")
    ca_crt, ca_key = directory / CA_CERT, directory / CA_KEY
    has_crt, has_key = ca_crt.exists(), ca_key.exists()
    if has_crt != has_key:
        present, absent = (ca_crt, ca_key) if has_crt else (ca_key, ca_crt)
        raise ConfigError(
            f"{directory} has {present.name} but not {absent.name}",
            hint="run keygen in the folder where the CA was made (it holds both), then copy "
            "the new NAME.crt and NAME.key here; or use a new --out folder for a new CA",
        )
    if not force:
        existing = [
            p.name
            for name in names
            for p in (cert_path(directory, name), key_path(directory, name))
            if p.exists()
        ]
        if existing:
            raise ConfigError(
                f"{directory} already has {', '.join(existing)}: keygen does not replace keys",
                hint="pass --force to replace them (then copy the new files to the hosts that "
                "use them), or --name NAME for one more certificate",
            )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        ca_created = not has_crt
        if ca_created:
            ca_private, ca_cert = make_ca(max(CA_DAYS, days))
            write_key(ca_key, ca_private)
            write_cert(ca_crt, ca_cert)
        else:
            ca_private, ca_cert = _load_ca(directory)
        result = KeygenResult(directory, ca_created)
        for name in names:
            key, cert = issue(ca_private, ca_cert, name, days)
            # the key first: a reader that sees the new certificate finds its key
            write_key(key_path(directory, name), key)
            write_cert(cert_path(directory, name), cert)
            result.written.append(name)
    except OSError as exc:
        raise ConfigError(
            f"cannot write keys to {directory}: {exc.strerror or exc}",
            hint="pick a folder you can write to",
        ) from exc
    return result
