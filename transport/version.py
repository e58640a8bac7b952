"""The protocol version, alone in a module with no imports: ``replicator --version`` says
it without loading the wire code (docs/PROTOCOL.md, "Version policy")."""

from __future__ import annotations

from typing import Final

# 2: Refuse code "diverged"; Hello capabilities "resync", "verify"; TreeRequest/Tree
# 3: generations interpreted (split brain); Refuse codes "promoted", "generation"
# 4: Handover (planned failover, failback hand-back), ReadRequest/ReadData (failback reads);
#    Hello capability "failback"
# 5: PointFloor (a receiver that lost records the sender cannot send again)
# 6: Records payloads carry journal record format version 2 (XXH3-128 checksums)
PROTOCOL_VERSION: Final = 6
