"""Wire protocol and transport: messages, frames, the sans-IO state machine, asyncio I/O.

``docs/PROTOCOL.md`` is the specification; this package is its implementation.

The names below are loaded from their modules when first used (PEP 562), so importing
one light module of the package (``replicator.transport.errors``, ``.schedule``) does not
load the wire code: commands that never connect start without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from replicator.transport.connection import (
        PLAINTEXT_REFUSAL,
        FramedConnection,
        Shaper,
        connect,
        connect_unix,
        connection_pair,
        serve,
        serve_unix,
    )
    from replicator.transport.errors import (
        CERT_PROBLEMS,
        ConnectionClosedError,
        ConnectionFailedError,
        DialError,
        LocalProtocolError,
        ProtocolError,
        RemoteProtocolError,
        VersionMismatchError,
    )
    from replicator.transport.frames import (
        DEFAULT_MAX_FRAME,
        FRAME_VERSION,
    )
    from replicator.transport.messages import (
        Ack,
        Credit,
        Error,
        Goodbye,
        Handover,
        Hello,
        Manifest,
        ManifestRequest,
        Message,
        MessageError,
        MessageType,
        Ping,
        PointFloor,
        Pong,
        ReadData,
        ReadRequest,
        Records,
        Refuse,
        Tree,
        TreeEntry,
        TreeRequest,
        VolumeInfo,
        Welcome,
    )
    from replicator.transport.protocol import (
        DEFAULT_WINDOW,
        NEED_DATA,
        ConnectionClosed,
        NeedData,
        ProtocolConnection,
        Role,
        State,
        TransferStats,
    )
    from replicator.transport.version import PROTOCOL_VERSION

_HOME = {
    "Ack": "messages",
    "CERT_PROBLEMS": "errors",
    "ConnectionClosed": "protocol",
    "ConnectionClosedError": "errors",
    "Credit": "messages",
    "DEFAULT_MAX_FRAME": "frames",
    "DEFAULT_WINDOW": "protocol",
    "ConnectionFailedError": "errors",
    "DialError": "errors",
    "Error": "messages",
    "FRAME_VERSION": "frames",
    "FramedConnection": "connection",
    "Goodbye": "messages",
    "Handover": "messages",
    "Hello": "messages",
    "LocalProtocolError": "errors",
    "Manifest": "messages",
    "ManifestRequest": "messages",
    "Message": "messages",
    "MessageError": "messages",
    "MessageType": "messages",
    "NEED_DATA": "protocol",
    "NeedData": "protocol",
    "PLAINTEXT_REFUSAL": "connection",
    "PROTOCOL_VERSION": "version",
    "Ping": "messages",
    "PointFloor": "messages",
    "Pong": "messages",
    "ProtocolConnection": "protocol",
    "ProtocolError": "errors",
    "ReadData": "messages",
    "ReadRequest": "messages",
    "Records": "messages",
    "Refuse": "messages",
    "RemoteProtocolError": "errors",
    "Role": "protocol",
    "Shaper": "connection",
    "State": "protocol",
    "TransferStats": "protocol",
    "Tree": "messages",
    "TreeEntry": "messages",
    "TreeRequest": "messages",
    "VersionMismatchError": "errors",
    "VolumeInfo": "messages",
    "Welcome": "messages",
    "connect": "connection",
    "connect_unix": "connection",
    "connection_pair": "connection",
    "serve": "connection",
    "serve_unix": "connection",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))


__all__ = [
    "CERT_PROBLEMS",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_WINDOW",
    "FRAME_VERSION",
    "NEED_DATA",
    "PLAINTEXT_REFUSAL",
    "PROTOCOL_VERSION",
    "Ack",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionFailedError",
    "Credit",
    "DialError",
    "Error",
    "FramedConnection",
    "Goodbye",
    "Handover",
    "Hello",
    "LocalProtocolError",
    "Manifest",
    "ManifestRequest",
    "Message",
    "MessageError",
    "MessageType",
    "NeedData",
    "Ping",
    "PointFloor",
    "Pong",
    "ProtocolConnection",
    "ProtocolError",
    "ReadData",
    "ReadRequest",
    "Records",
    "Refuse",
    "RemoteProtocolError",
    "Role",
    "Shaper",
    "State",
    "TransferStats",
    "Tree",
    "TreeEntry",
    "TreeRequest",
    "VersionMismatchError",
    "VolumeInfo",
    "Welcome",
    "connect",
    "connect_unix",
    "connection_pair",
    "serve",
    "serve_unix",
]
