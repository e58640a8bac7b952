"""Prometheus metrics: families from a status snapshot, served by a tiny HTTP responder."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replicator.engine.errors import ConfigError
from replicator.engine.metrics import Metrics, MetricsServer

SENDER_SNAPSHOT: dict[str, Any] = {
    "role": "sender",
    "pid": 1,
    "uptime_seconds": 12.5,
    "jobs": [
        {
            "job": "vm1",
            "role": "sender",
            "state": "replicating",
            "connected": True,
            "generation": 2,
            "lsn": {"journaled": 40, "durable": 39, "received": 35, "applied": 30},
            "lag": {"records": 10, "bytes": 4096, "seconds": 1.5},
            "initial_sync": {"bytes": 50, "total": 100, "percent": 50.0},
            "bytes": {"payload": 1000, "wire": 400},
            "compression_ratio": 2.5,
            "journal": {"bytes": 8192, "cap": 1 << 30},
            "errors": {"connection": 2},
        }
    ],
}

RECEIVER_SNAPSHOT: dict[str, Any] = {
    "role": "receiver",
    "uptime_seconds": 3.0,
    "refused_connections": {"auth": 2, "tls": 5},
    "in_flight": {"limit": 256, "used": 64, "peak": 128, "waiting": 1, "waits": 3},
    "jobs": [
        {
            "job": "vm1",
            "role": "receiver",
            "state": "idle",
            "connected": False,
            "generation": 0,
            "lsn": {"received": 12, "applied": 10},
            "lag": {"records": 2, "seconds": None},
            "source_clock_offset_seconds": -3600.25,
            "consistency_point": {
                "lsn": 10,
                "source_time": "2026-01-02T03:04:05.250Z",
                "consistent": True,
            },
            "bytes": {"payload": 10, "wire": 10},
            "compression_ratio": 1.0,
            "journal": {"bytes": 100, "cap": None},
            "errors": {},
        }
    ],
}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


async def test_sender_families_follow_the_snapshot() -> None:
    snapshot = dict(SENDER_SNAPSHOT)

    async def take() -> dict[str, Any]:
        return snapshot

    metrics = Metrics(take)
    got = _samples((await metrics.render()).decode())
    job = {"role": "sender", "job": "vm1"}
    assert got[_key("replicator_connected", **job)] == 1
    assert got[_key("replicator_state", state="replicating", **job)] == 1
    assert got[_key("replicator_state", state="connecting", **job)] == 0
    assert got[_key("replicator_replicated_bytes_total", **job)] == 1000
    assert got[_key("replicator_wire_sent_bytes_total", **job)] == 400
    assert got[_key("replicator_compression_ratio", **job)] == 2.5
    assert got[_key("replicator_lag_seconds", **job)] == 1.5
    assert got[_key("replicator_lag_bytes", **job)] == 4096
    assert got[_key("replicator_lag_records", **job)] == 10
    assert got[_key("replicator_journal_bytes", **job)] == 8192
    assert got[_key("replicator_journal_cap_bytes", **job)] == 1 << 30
    assert got[_key("replicator_errors_total", kind="connection", **job)] == 2
    assert got[_key("replicator_applied_lsn", **job)] == 30
    assert got[_key("replicator_journaled_lsn", **job)] == 40
    assert got[_key("replicator_generation", **job)] == 2
    assert got[_key("replicator_initial_sync_ratio", **job)] == 0.5
    assert got[_key("replicator_replicated_records_total", **job)] == 0  # since first seen
    # the records counter follows the applied LSN from there
    snapshot["jobs"] = [{**SENDER_SNAPSHOT["jobs"][0], "lsn": {"applied": 37}}]
    again = _samples((await metrics.render()).decode())
    assert again[_key("replicator_replicated_records_total", **job)] == 7


async def test_receiver_families() -> None:
    async def take() -> dict[str, Any]:
        return RECEIVER_SNAPSHOT

    got = _samples((await Metrics(take).render()).decode())
    job = {"role": "receiver", "job": "vm1"}
    assert got[_key("replicator_connected", **job)] == 0
    assert got[_key("replicator_state", state="idle", **job)] == 1
    assert got[_key("replicator_wire_received_bytes_total", **job)] == 10
    assert got[_key("replicator_received_lsn", **job)] == 12
    assert got[_key("replicator_consistent", **job)] == 1
    point = got[_key("replicator_consistency_point_timestamp_seconds", **job)]
    assert point == pytest.approx(1767323045.25)
    assert got[_key("replicator_source_clock_offset_seconds", **job)] == -3600.25
    assert _key("replicator_lag_seconds", **job) not in got  # unknown: no sample
    assert _key("replicator_journal_cap_bytes", **job) not in got
    refused = "replicator_refused_connections_total"
    assert got[_key(refused, role="receiver", reason="tls")] == 5
    assert got[_key(refused, role="receiver", reason="auth")] == 2
    assert got[_key("replicator_in_flight_bytes", role="receiver")] == 64
    assert got[_key("replicator_in_flight_waits_total", role="receiver")] == 3


async def _http(port: int, raw: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


async def test_the_endpoint_answers_get_metrics_only() -> None:
    async def take() -> dict[str, Any]:
        return SENDER_SNAPSHOT

    server = MetricsServer(Metrics(take), "127.0.0.1", 0)
    await server.start()
    try:
        port = int(server.addresses[0].rsplit(":", 1)[1])
        status, headers, body = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert headers["Content-Type"].startswith("text/plain; version=")
        assert int(headers["Content-Length"]) == len(body)
        assert b'replicator_lag_seconds{job="vm1",role="sender"} 1.5' in body
        assert (await _http(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"))[0].endswith("200 OK")
        assert (await _http(port, b"GET / HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 404 Not Found"
        assert (await _http(port, b"GET /x HTTP/1.1\r\n\r\n"))[0].endswith("404 Not Found")
        post = await _http(port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert post[0].endswith("405 Method Not Allowed") and post[1]["Allow"] == "GET"
        assert (await _http(port, b"hello\r\n\r\n"))[0].endswith("400 Bad Request")
    finally:
        await server.aclose()


async def test_an_address_in_use_is_a_config_error() -> None:
    async def take() -> dict[str, Any]:
        return SENDER_SNAPSHOT

    first = MetricsServer(Metrics(take), "127.0.0.1", 0)
    await first.start()
    try:
        port = int(first.addresses[0].rsplit(":", 1)[1])
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await MetricsServer(Metrics(take), "127.0.0.1", port).start()
    finally:
        await first.aclose()
