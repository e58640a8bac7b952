"""Which certificate may write which job: the ``--allow NAME:JOB`` rules of a receiver
(who may write a job) and of a witness (who may renew or promote it).

Pure functions of the rules, the peer's certificate name and the job. Without rules every
peer the TLS handshake let in (any certificate signed by the receiver's CA) may write
every job: the CA is the trust boundary. With rules, a peer may write a job only when a
rule names its certificate and that job, or its certificate and ``*``. A plaintext
(``--insecure``) peer has no name, so rules need TLS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from replicator.engine.errors import ConfigError
from replicator.engine.names import check_job_name
from replicator.engine.tls import check_cert_name, peer_name

ANY_JOB = "*"


@dataclass(frozen=True, slots=True)
class Allow:
    """One ``--allow NAME:JOB`` rule: certificate NAME may write JOB (``*``: every job)."""

    name: str
    job: str

    def __str__(self) -> str:
        return f"{self.name}:{self.job}"


def parse_allow(value: str) -> Allow:
    """``NAME:JOB`` (JOB may be ``*``) into a rule; ConfigError when malformed."""
    name, sep, job = value.partition(":")
    if not sep or not name or not job:
        raise ConfigError(
            f"--allow wants CERTIFICATE_NAME:JOB (JOB may be '*'), got {value!r}",
            hint="e.g. --allow sender:vm1 or --allow site-b:'*'",
        )
    try:
        check_cert_name(name)
        if job != ANY_JOB:
            check_job_name(job)
    except ConfigError as exc:
        raise ConfigError(f"--allow {value!r}: {exc.message}") from exc
    return Allow(name, job)


def allowed(rules: Sequence[Allow], name: str | None, job: str) -> bool:
    """May the peer named ``name`` (None: no certificate) write ``job``?"""
    if not rules:
        return True
    return name is not None and any(
        rule.name == name and rule.job in (job, ANY_JOB) for rule in rules
    )


def refusal(rules: Sequence[Allow], name: str | None, job: str) -> str | None:
    """Why ``name`` may not write ``job`` (the text of the receiver's Refuse), or None."""
    if allowed(rules, name, job):
        return None
    who = f"certificate {name!r}" if name is not None else "a peer without a certificate"
    return (
        f"{who} may not write job {job!r} on this receiver; nothing was written "
        # '*' quoted, as a shell needs it (the receive config's `allow` takes it bare)
        f"(on the receiver: --allow {name or 'NAME'}:{job}, or --allow {name or 'NAME'}:'*')"
    )


class Authorizer:
    """The receiver's rules, applied to a connection (``ReceiverConfig.authorize``)."""

    def __init__(self, rules: Sequence[Allow]) -> None:
        self.rules = tuple(rules)

    def refusal(self, conn: Any, job: str) -> str | None:
        """None when the peer on ``conn`` may write ``job``; else the reason."""
        return refusal(self.rules, peer_name(conn), job)
