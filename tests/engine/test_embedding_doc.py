"""The TLS identities docs/EMBEDDING.md tells an embedding program to build are built as
written (it showed ``TlsIdentity(keygen_dir, "sender")``, a TypeError: ``server`` has no
default)."""

from __future__ import annotations

import re
from pathlib import Path

from replicator.engine.api import TlsIdentity
from replicator.engine.keys import keygen

DOC = Path(__file__).resolve().parents[2] / "docs" / "EMBEDDING.md"


def test_the_documented_tls_identities_load(tmp_path: Path) -> None:
    keygen_dir = tmp_path / "keys"
    keygen(keygen_dir, ["sender", "receiver", "rx1"])
    calls = re.findall(r"`(?:tls=)?(TlsIdentity\(keygen_dir, [^`]*\))`", DOC.read_text())
    assert len(calls) >= 2, calls
    for call in calls:
        identity = eval(call, {"TlsIdentity": TlsIdentity, "keygen_dir": keygen_dir})
        assert isinstance(identity, TlsIdentity)
        identity.load()
