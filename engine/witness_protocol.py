"""The built-in witness's wire format (docs/WITNESS.md): one request and one reply per
connection, each a frame of ``RPWN``, a version byte, three zero bytes, a little-endian
u32 body length, then a msgpack map. Small on purpose: a witness answers a few requests a
second and shares nothing with the replication protocol."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from typing import Any

import msgpack

from replicator.engine.errors import ConnectError, PeerProtocolError
from replicator.engine.tls import check_peer

MAGIC = b"RPWN"
VERSION = 1
MAX_BODY = 64 * 1024
TIMEOUT = 5.0  # a witness that does not answer in this long counts as unreachable
_HEAD = struct.Struct("<4sB3xI")


class ForeignFrame(PeerProtocolError):
    """A frame that is not the witness's, with the magic it has (e.g. a sender's Hello:
    a sender aimed at the witness's port)."""

    def __init__(self, magic: bytes) -> None:
        super().__init__(f"not a replicator witness frame (magic {magic!r})")
        self.magic = magic


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_BODY:
        raise ValueError(f"witness message of {len(body)} bytes is over {MAX_BODY}")
    return _HEAD.pack(MAGIC, VERSION, len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next frame's map; PeerProtocolError for anything else (foreign, too long)."""
    try:
        head = await reader.readexactly(_HEAD.size)
    except asyncio.IncompleteReadError as exc:
        raise ConnectError("the witness connection closed before a whole frame") from exc
    magic, version, length = _HEAD.unpack(head)
    if magic != MAGIC:
        raise ForeignFrame(magic)
    if version != VERSION:
        raise PeerProtocolError(
            f"witness protocol version {version}; this build speaks {VERSION}",
            hint="run the same replicator version on the witness and both sides",
        )
    if length > MAX_BODY:
        raise PeerProtocolError(f"witness frame of {length} bytes is over {MAX_BODY}")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ConnectError("the witness connection closed in the middle of a frame") from exc
    try:
        value = msgpack.unpackb(body, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PeerProtocolError(f"malformed witness frame: {exc}") from exc
    if not isinstance(value, dict):
        raise PeerProtocolError("witness frame body is not a map")
    return value


async def request(
    host: str,
    port: int,
    message: dict[str, Any],
    ssl_context: ssl.SSLContext | None,
    *,
    expect: str | None = None,
) -> dict[str, Any]:
    """Send ``message`` to the witness at HOST:PORT and return its reply. Raises
    ConnectError when it cannot be reached or does not answer in time, and PeerNameError
    (nothing sent) when its certificate is not named ``expect``."""
    where = f"{host}:{port}"
    try:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
            try:
                check_peer(writer, expect, role="witness", where=where, option="--witness-peer")
                writer.write(encode(message))
                await writer.drain()
                return await read_message(reader)
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except TimeoutError as exc:
        raise ConnectError(f"the witness at {where} did not answer in {TIMEOUT:g}s") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConnectError(f"cannot reach the witness at {where}: {exc}") from exc
