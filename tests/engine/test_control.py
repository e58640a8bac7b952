"""The control socket: one JSON line in, one out; mode 0600, peers checked, stale sockets
replaced, live ones refused, handlers added by name."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from replicator.engine.control import (
    MAX_REQUEST,
    ControlBusy,
    ControlRefused,
    ControlServer,
    ControlUnavailable,
    RequestError,
    SenderClaim,
    claim_held,
    read_claim,
    request,
)


async def _exchange(path: Path, data: bytes, *, shut: bool = True) -> dict[str, Any]:
    """Send raw ``data``; the one answer line, parsed."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        await writer.drain()
        if shut:
            writer.write_eof()
        line = await asyncio.wait_for(reader.readline(), 10)
        # one answer, then the server closes (unread request bytes make that a reset)
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
    finally:
        writer.close()
    answer: dict[str, Any] = json.loads(line)
    return answer


async def _status(request: dict[str, Any]) -> dict[str, Any]:
    return {"jobs": [], "asked": request}


async def test_requests_and_their_answers(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def failing(request: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    async def picky(request: dict[str, Any]) -> int:
        if not isinstance(request.get("rate"), int):
            raise RequestError('"rate" is bytes per second')
        return int(request["rate"])

    async with ControlServer(path, {"status": _status, "boom": failing}) as server:
        server.handlers["rate"] = picky  # later operations are added by name
        ok = await _exchange(path, b'{"op": "status", "job": "x"}\n')
        assert ok == {"ok": True, "result": {"jobs": [], "asked": {"op": "status", "job": "x"}}}
        ping = await _exchange(path, b'{"op":"ping"}\n')
        assert ping["result"]["pid"] == os.getpid()
        assert ping["result"]["ops"] == ["boom", "ping", "rate", "status"]
        bad = await _exchange(path, b"{not json\n")
        assert bad["ok"] is False and bad["code"] == "bad_request"
        assert (await _exchange(path, b"[1, 2]\n"))["code"] == "bad_request"
        assert (await _exchange(path, b'{"op": 3}\n'))["code"] == "bad_request"
        unknown = await _exchange(path, b'{"op": "explode"}\n')
        assert unknown["code"] == "unknown_op"
        assert "ping" in unknown["error"] and "status" in unknown["error"]
        failed = await _exchange(path, b'{"op": "boom"}\n')
        assert failed["code"] == "failed" and "boom" in failed["error"]
        assert (await _exchange(path, b'{"op": "rate"}\n'))["code"] == "bad_request"
        assert (await _exchange(path, b'{"op": "rate", "rate": 5}\n'))["result"] == 5
        # no newline before EOF: the request is what came
        assert (await _exchange(path, b'{"op": "ping"}'))["ok"] is True
        # the blocking client the status command uses
        assert (await asyncio.to_thread(request, path, "status"))["jobs"] == []
        with pytest.raises(ControlRefused, match="unknown_op"):
            await asyncio.to_thread(request, path, "nope")


async def test_an_oversized_or_slow_request_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with ControlServer(path, {"status": _status}, request_timeout=0.3):
        big = b'{"op": "status", "pad": "' + b"x" * (MAX_REQUEST + 10) + b'"}\n'
        assert (await _exchange(path, big))["code"] == "too_large"
        endless = b"x" * (MAX_REQUEST * 2)  # no newline at all
        assert (await _exchange(path, endless, shut=False))["code"] == "too_large"
        slow = await _exchange(path, b'{"op": "sta', shut=False)  # then nothing
        assert slow["code"] == "timeout"


async def test_mode_0600_and_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    old = os.umask(0)  # a lax umask must not make a lax socket
    try:
        server = ControlServer(path, {})
        await server.start()
    finally:
        os.umask(old)
    st = path.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    await server.aclose()
    assert not path.exists()


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening: a killed process's
        dead.bind(str(path))
    async with ControlServer(path, {"status": _status}):
        assert (await _exchange(path, b'{"op":"ping"}\n'))["ok"]
        second = ControlServer(path, {}, owner="a sender for job 'x'")
        with pytest.raises(ControlBusy, match="already answers") as caught:
            await second.start()
        assert "a sender for job 'x'" in str(caught.value)
        assert (await _exchange(path, b'{"op":"ping"}\n'))["ok"]  # the first one still serves
    assert not path.exists()
    with pytest.raises(ControlUnavailable):
        request(path, "status", timeout=1)


async def test_a_path_longer_than_sun_path_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    assert len(os.fsencode(str(path))) > 108
    async with ControlServer(path, {"status": _status}):
        assert path.exists()
        assert (await asyncio.to_thread(request, path, "status"))["jobs"] == []
    assert not path.exists()


async def test_peers_of_other_uids_are_refused(tmp_path: Path) -> None:
    """Beyond the file mode: SO_PEERCRED says who connects (here our own uid is not allowed)."""
    path = tmp_path / "control.sock"
    async with ControlServer(path, {"status": _status}, allowed_uids=frozenset({12345})):
        answer = await _exchange(path, b'{"op":"status"}\n')
        assert answer["ok"] is False and answer["code"] == "forbidden"
        with pytest.raises(ControlRefused, match="forbidden"):
            await asyncio.to_thread(request, path, "status")


def test_the_sender_claim(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with SenderClaim(state, {"job": "vm1", "peer": "h:1"}) as claim:
        assert claim.held and claim_held(state)
        info = read_claim(state)
        assert info is not None and info["job"] == "vm1" and info["pid"] == os.getpid()
        with pytest.raises(ControlBusy, match=r"a sender for job 'vm1' \(pid \d+\) already runs"):
            SenderClaim(state, {"job": "other"}).__enter__()
    assert not claim_held(state)
    assert read_claim(state) is not None  # names the job at rest
