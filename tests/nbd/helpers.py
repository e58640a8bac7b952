"""Test helpers: a minimal raw NBD client, a journal replayer and tool runners."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

from replicator.engine.nbd import proto
from replicator.journal import Journal, Record, RecordType
from tests import tools

OPT = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
REQ = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
READ_TIMEOUT = 10.0


@dataclass
class OptionReply:
    option: int
    rep: int
    data: bytes


class RawClient:
    """Speaks NBD byte by byte so tests control (and can break) every field."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.size = 0
        self.flags = 0

    async def exactly(self, n: int) -> bytes:
        """readexactly with a timeout: a server that stops answering fails the test."""
        return await asyncio.wait_for(self.reader.readexactly(n), READ_TIMEOUT)

    @classmethod
    async def connect(cls, socket_path: str) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        return cls(reader, writer)

    async def greet(self, client_flags: int = 1) -> int:
        magic, opt_magic, hflags = struct.unpack(">QQH", await self.exactly(18))
        assert (magic, opt_magic) == (proto.NBDMAGIC, proto.IHAVEOPT)
        self.writer.write(struct.pack(">I", client_flags))
        return int(hflags)

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.writer.write(OPT.pack(proto.IHAVEOPT, option, len(data)) + data)

    async def read_option_reply(self) -> OptionReply:
        magic, option, rep, length = OPT_REPLY.unpack(await self.exactly(OPT_REPLY.size))
        assert magic == proto.OPTION_REPLY_MAGIC
        return OptionReply(option, rep, await self.exactly(length))

    async def option_replies(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option and collect replies up to the final one (ACK or error)."""
        self.send_option(option, data)
        out: list[OptionReply] = []
        while True:
            reply = await self.read_option_reply()
            assert reply.option == option
            out.append(reply)
            if reply.rep == proto.Rep.ACK or reply.rep >= 1 << 31:
                return out

    async def go(self, name: str, infos: Sequence[int] = ()) -> list[OptionReply]:
        replies = await self.option_replies(proto.Opt.GO, go_data(name, infos))
        for reply in replies:
            if reply.rep == proto.Rep.INFO and reply.data[:2] == b"\0\0":
                self.size, self.flags = struct.unpack(">QH", reply.data[2:12])
        return replies

    @classmethod
    async def open(cls, socket_path: str, name: str) -> RawClient:
        client = await cls.connect(socket_path)
        await client.greet(3)
        replies = await client.go(name)
        assert replies[-1].rep == proto.Rep.ACK, replies
        return client

    def send_request(
        self,
        cmd: int,
        handle: int,
        offset: int = 0,
        length: int = 0,
        data: bytes = b"",
        flags: int = 0,
    ) -> None:
        self.writer.write(REQ.pack(proto.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data)

    async def read_reply(
        self, read_lengths: dict[int, int] | None = None
    ) -> tuple[int, int, bytes]:
        """(handle, error, data); ``read_lengths`` maps READ handles to their lengths."""
        magic, error, handle = REPLY.unpack(await self.exactly(REPLY.size))
        assert magic == proto.SIMPLE_REPLY_MAGIC
        data = b""
        if read_lengths and handle in read_lengths and error == 0:
            data = await self.exactly(read_lengths.pop(handle))
        return handle, error, data

    async def request(
        self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0
    ) -> tuple[int, bytes]:
        self.send_request(cmd, 1, offset, length, data, flags)
        handle, error, payload = await self.read_reply({1: length} if cmd == 0 else None)
        assert handle == 1
        return error, payload

    async def disconnect(self) -> None:
        self.send_request(proto.Cmd.DISC, 0)
        await self.writer.drain()
        assert await asyncio.wait_for(self.reader.read(), READ_TIMEOUT) == b""
        self.writer.close()

    async def closed_by_server(self) -> bool:
        try:
            rest = await asyncio.wait_for(self.reader.read(), 5)
        except ConnectionResetError:
            return True
        return rest == b""


def loop_policy(name: str) -> asyncio.AbstractEventLoopPolicy:
    """Modules doing real I/O run on both loops (the CLI runs on uvloop)."""
    return uvloop.EventLoopPolicy() if name == "uvloop" else asyncio.DefaultEventLoopPolicy()


def go_data(name: str, infos: Sequence[int] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


async def replay(journal: Journal, volume: str, target: Path) -> int:
    """Apply a journal's records for ``volume`` to ``target`` (an independent copy).

    A deliberately plain applier: what a receiver must do with each record type.
    Returns the number of records applied.
    """
    await journal.sync()
    fd = os.open(target, os.O_RDWR)
    applied = 0
    try:
        async for record in journal.read_from(0):
            if record.volume != volume:
                continue
            apply_record(fd, record)
            applied += 1
    finally:
        os.close(fd)
    return applied


def apply_record(fd: int, record: Record) -> None:
    if record.type is RecordType.WRITE:
        os.pwrite(fd, record.data, record.offset)
    elif record.type in (RecordType.ZERO, RecordType.TRIM):
        os.pwrite(fd, bytes(record.length), record.offset)
    elif record.type is RecordType.RESIZE:
        os.ftruncate(fd, record.size)


async def journal_records(journal: Journal) -> list[Record]:
    await journal.sync()
    return [r async for r in journal.read_from(0)]


async def run(*argv: str, timeout: float = 120) -> str:
    """Run a tool; fail with its output when it exits non-zero."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(argv)} exited {proc.returncode}:\n{text}"
    return text


async def nbdsh(script: str, timeout: float = 60) -> str:
    """``tests.tools.nbdsh`` off the event loop (the server under test runs on it)."""
    return await asyncio.to_thread(tools.nbdsh, script, timeout)


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (make sysdeps installs it)"
    return path
