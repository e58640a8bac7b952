from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from replicator.engine.nbd import JournaledFileExport, NbdServer
from replicator.journal import Journal


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (pytest's tmp_path can exceed 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="nbd", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path / "journal")
    yield j
    await j.aclose()


@dataclass
class Served:
    """A running server over some volume files, all journaled into one journal."""

    journal: Journal
    server: NbdServer
    socket: str
    exports: dict[str, JournaledFileExport] = field(default_factory=dict)

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"


@dataclass
class ServeFactory:
    journal: Journal
    sockdir: Path
    running: list[Served] = field(default_factory=list)

    async def __call__(
        self,
        *paths: Path,
        export_size: int | None = None,
        max_request: int = 32 * 1024 * 1024,
        max_inflight: int = 64,
        handshake_timeout: float = 30.0,
    ) -> Served:
        exports = {}
        for path in paths:
            exp = JournaledFileExport(self.journal, path, path.name, export_size)
            exports[exp.name] = exp
        server = NbdServer(
            exports,
            max_request=max_request,
            max_inflight=max_inflight,
            handshake_timeout=handshake_timeout,
        )
        sock = str(self.sockdir / f"s{len(self.running)}")
        await server.start_unix(sock)
        served = Served(self.journal, server, sock, exports)
        self.running.append(served)
        return served

    async def stop(self) -> None:
        while self.running:
            served = self.running.pop()
            await served.server.aclose()
            for exp in served.exports.values():
                await exp.aclose()


@pytest.fixture
async def serve(journal: Journal, sockdir: Path) -> AsyncIterator[ServeFactory]:
    factory = ServeFactory(journal, sockdir)
    yield factory
    await factory.stop()
