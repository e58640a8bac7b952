"""docs/PROTOCOL.md stays in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from replicator.transport import MessageType, Role, State
from replicator.transport.connection import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_PENDING
from replicator.transport.frames import (
    FRAME_MAGIC,
    MAX_BULK_HEADER,
    MAX_CONTROL_FRAME,
    MAX_HELLO_FRAME,
    PREFIX,
    PREFIX_SIZE,
)
from replicator.transport.messages import MAX_VOLUMES
from replicator.transport.protocol import MAX_MANIFEST_PART, TRANSITIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def test_transition_table_in_the_doc_matches_the_code() -> None:
    text = DOC.read_text()
    block = text.split("<!-- transitions:")[1].split("<!-- end transitions -->")[0]
    documented: dict[tuple[Role, State, str, MessageType], State] = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] not in ("sender", "receiver"):
            continue
        role, state, direction, types, new = cells
        for name in types.split(","):
            key = (Role(role), State[state], direction, MessageType[name.strip()])
            assert key not in documented, f"listed twice: {key}"
            documented[key] = State[new]
    assert documented == TRANSITIONS


def test_frame_prefix_offsets_in_the_doc() -> None:
    text = DOC.read_text()
    assert f'`b"{FRAME_MAGIC.decode()}"`' in text
    assert PREFIX.format == "<4sBBBBIII16s" and PREFIX_SIZE == 36
    rows = re.findall(r"^\| (\d+) +\| (\d+) +\| `(\w+)`", text, re.MULTILINE)
    offsets = [(int(o), int(s), name) for o, s, name in rows]
    assert offsets == [
        (0, 4, "magic"),
        (4, 1, "version"),
        (5, 1, "type"),
        (6, 1, "codec"),
        (7, 1, "flags"),
        (8, 4, "header_len"),
        (12, 4, "wire_len"),
        (16, 4, "raw_len"),
        (20, 16, "checksum"),
    ]
    for number, name in re.findall(r"^\| +(\d+) \| (\w+) \|", text, re.MULTILINE):
        mtype = MessageType(int(number))
        assert mtype.name.replace("_", "") == name.upper(), (number, name)


def test_memory_bounds_in_the_doc_match_the_code() -> None:
    text = DOC.read_text()
    section = text.split("## Memory bounds")[1].split("\n## ")[0]
    kib, mib = 1024, 1024 * 1024
    for phrase in (
        f"at most {MAX_HELLO_FRAME // kib} KiB",
        f"at most {MAX_CONTROL_FRAME // kib} KiB",
        f"at most {MAX_BULK_HEADER // kib} KiB",
        f"at most {MAX_MANIFEST_PART // mib} MiB",
        f"max_pending={DEFAULT_MAX_PENDING}",
        f"handshake_timeout={DEFAULT_HANDSHAKE_TIMEOUT:g}",
        f"with {MAX_VOLUMES} volumes",
    ):
        assert phrase in section, phrase
    assert f"at most {MAX_VOLUMES} volumes" in text
