"""Prometheus metrics: ``--metrics-listen HOST:PORT`` on ``send`` and ``receive``.

Nothing is counted for the metrics: each scrape takes one snapshot of the process's
``StatusBoard`` (the same dict ``replicator status --json`` prints) and turns it into
metric families (``SnapshotCollector``) in a private ``CollectorRegistry``, rendered by
``prometheus_client.generate_latest``. So the write path pays nothing, and a process that
is never scraped does no work for them.

The endpoint is a small HTTP/1.1 responder on the event loop (``MetricsServer``): it
answers ``GET /metrics`` (the Prometheus text format), 404 for any other path and 405 for
another method on ``/metrics``, one request per connection. Nothing listens unless
``--metrics-listen`` is given. The names are listed in ``docs/OPERATIONS.md``.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from replicator.engine.control import close_server
from replicator.engine.errors import cannot_listen
from replicator.engine.status import ReceiverPhase, SenderPhase, StatusBoard

log = structlog.get_logger()

PREFIX = "replicator_"
MAX_HEAD = 16 * 1024  # request line and headers
HEAD_TIMEOUT = 10.0
_STATES = {"sender": [str(p) for p in SenderPhase], "receiver": [str(p) for p in ReceiverPhase]}

Snapshot = dict[str, Any]


class SnapshotCollector(Collector):
    """Metric families from one ``StatusBoard.snapshot()``; set ``snapshot`` before collecting.

    ``replicator_replicated_records_total`` counts the records applied on the receiver
    since this process first reported the job (the progress of the applied LSN), so it
    starts at 0 like any counter of a fresh process.
    """

    def __init__(self) -> None:
        self.snapshot: Snapshot = {"role": "", "jobs": []}
        self._applied_base: dict[tuple[str, str], int] = {}

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        role = str(snap.get("role", ""))
        jobs: list[dict[str, Any]] = list(snap.get("jobs", []))
        labels = ["role", "job"]

        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=labels + (extra or []))

        def counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, doc, labels=labels + (extra or []))

        start = GaugeMetricFamily(
            PREFIX + "start_time_seconds",
            "Unix time this replicator process started.",
            labels=["role"],
        )
        uptime = float(snap.get("uptime_seconds", 0.0))
        start.add_metric([role], round(time.time() - uptime, 3))
        yield start
        tls = snap.get("tls")
        if isinstance(tls, dict):
            expiry = GaugeMetricFamily(
                PREFIX + "tls_certificate_expiry_timestamp_seconds",
                "Unix time this process's TLS certificate (certificate=NAME) and its CA "
                "(certificate=ca) expire: alert well before (keygen --name NAME --force).",
                labels=["role", "certificate"],
            )
            for label, field in ((str(tls.get("certificate")), "expires"), ("ca", "ca_expires")):
                when = _parse_iso(tls.get(field))
                if when is not None:
                    expiry.add_metric([role, label], when)
            yield expiry
        in_flight = snap.get("in_flight")
        if isinstance(in_flight, dict):
            used = GaugeMetricFamily(
                PREFIX + "in_flight_bytes",
                "Bytes a receiver's sessions hold before they are durable, all together "
                "(--in-flight-max is the limit).",
                labels=["role"],
            )
            used.add_metric([role], float(in_flight.get("used", 0)))
            yield used
            waits = CounterMetricFamily(
                PREFIX + "in_flight_waits",
                "Frames a receiver's session had to wait for (the in-flight budget spent): "
                "rising, the receiver's disk or --in-flight-max holds the senders back.",
                labels=["role"],
            )
            waits.add_metric([role], float(in_flight.get("waits", 0)))
            yield waits
        refused = snap.get("refused_connections")
        if isinstance(refused, dict):
            refusals = CounterMetricFamily(
                PREFIX + "refused_connections",
                "Connections refused before any job's session ran, by reason: tls (a failed "
                "TLS handshake: another CA, no certificate, a plaintext peer), "
                "too_many_pending (closed to make room), auth (--allow), version, name, busy.",
                labels=["role", "reason"],
            )
            for reason, count in sorted(refused.items()):
                refusals.add_metric([role, str(reason)], float(count))
            yield refusals

        connected = gauge("connected", "1 while the job has a live replication connection.")
        state = gauge("state", "1 for the job's current state, 0 for the others.", ["state"])
        payload = counter(
            "replicated_bytes",
            "Record payload replicated (sender: sent; receiver: received), uncompressed.",
        )
        records = counter(
            "replicated_records",
            "Records applied on the receiver since this process first reported the job.",
        )
        wire_sent = counter(
            "wire_sent_bytes", "Record payload bytes as sent on the wire (after compression)."
        )
        wire_received = counter(
            "wire_received_bytes",
            "Record payload bytes as received from the wire (before decompression).",
        )
        ratio = gauge("compression_ratio", "Payload bytes per wire byte (1: no compression).")
        lag_seconds = gauge(
            "lag_seconds",
            "Replication lag (RPO) in seconds: sender, since the source time of the oldest "
            "change not yet applied; receiver, since the source time of the consistency point "
            "the replica holds (a bound: it also grows while the source writes nothing).",
        )
        lag_bytes = gauge("lag_bytes", "Bytes journaled on the sender and not yet applied.")
        lag_records = gauge(
            "lag_records",
            "Records not yet applied (sender: journaled; receiver: received).",
        )
        silent = gauge(
            "peer_silent_seconds",
            "Seconds since the connected peer last sent anything (the receiver pings every "
            "5 s and the sender answers: more than ~12 s means the peer or the path is stuck).",
        )
        journal_bytes = gauge("journal_bytes", "Bytes the job's journal uses on disk.")
        journal_cap = gauge("journal_cap_bytes", "The cap on the job's journal.")
        errors = counter("errors", "Errors by kind since the process started.", ["kind"])
        lsns = {
            key: gauge(f"{key}_lsn", f"The job's {key} LSN.")
            for key in ("journaled", "durable", "received", "applied")
        }
        generation = gauge("generation", "The replica's history generation.")
        point = gauge(
            "consistency_point_timestamp_seconds",
            "Source time of the last consistency point the replica holds (receiver).",
        )
        consistent = gauge("consistent", "1 when the replica is at a consistency point (receiver).")
        clock_offset = gauge(
            "source_clock_offset_seconds",
            "The source's clock less this receiver's, from the sender's Pings (receiver; "
            "absent while not known): keep it near 0 with NTP.",
        )
        progress = gauge(
            "initial_sync_ratio", "How much of the last scan (initial sync) is done, 0..1."
        )
        rpo_target = gauge("rpo_target_seconds", "The sender's --target-rpo.")
        rpo_met = gauge(
            "rpo_target_met",
            "0 while the lag has stayed above --target-rpo longer than its grace, else 1.",
        )
        pace = gauge(
            "shaping_pace_bytes_per_second",
            "The rate the sender's shaper uses now (--target-rpo's pace within the cap).",
        )

        for job in jobs:
            name = str(job.get("job", ""))
            key = [role, name]
            connected.add_metric(key, 1.0 if job.get("connected") else 0.0)
            for each in _STATES.get(role, []):
                state.add_metric([*key, each], 1.0 if job.get("state") == each else 0.0)
            moved = job.get("bytes") or {}
            payload.add_metric(key, float(moved.get("payload", 0)))
            wire = wire_sent if role == "sender" else wire_received
            wire.add_metric(key, float(moved.get("wire", 0)))
            ratio.add_metric(key, float(job.get("compression_ratio", 1.0)))
            if job.get("peer_silent_seconds") is not None:
                silent.add_metric(key, float(job["peer_silent_seconds"]))
            lag = job.get("lag") or {}
            if lag.get("seconds") is not None:
                lag_seconds.add_metric(key, float(lag["seconds"]))
            if lag.get("bytes") is not None:
                lag_bytes.add_metric(key, float(lag["bytes"]))
            if lag.get("records") is not None:
                lag_records.add_metric(key, float(lag["records"]))
            journal = job.get("journal") or {}
            journal_bytes.add_metric(key, float(journal.get("bytes", 0)))
            if journal.get("cap") is not None:
                journal_cap.add_metric(key, float(journal["cap"]))
            for kind, count in sorted((job.get("errors") or {}).items()):
                errors.add_metric([*key, str(kind)], float(count))
            lsn = job.get("lsn") or {}
            for which, family in lsns.items():
                if which in lsn:
                    family.add_metric(key, float(lsn[which]))
            applied = int(lsn.get("applied", 0))
            base = self._applied_base.setdefault((role, name), applied)
            if applied < base:  # the replica's history started over: so does the counter
                base = self._applied_base[(role, name)] = applied
            records.add_metric(key, float(applied - base))
            generation.add_metric(key, float(job.get("generation", 0)))
            cp = job.get("consistency_point")
            if cp:
                consistent.add_metric(key, 1.0 if cp.get("consistent") else 0.0)
                ts = _parse_iso(cp.get("source_time"))
                if ts is not None:
                    point.add_metric(key, ts)
            if job.get("source_clock_offset_seconds") is not None:
                clock_offset.add_metric(key, float(job["source_clock_offset_seconds"]))
            sync = job.get("initial_sync")
            if sync:
                progress.add_metric(key, round(float(sync.get("percent", 0.0)) / 100, 4))
            rpo = _get(job, "shaping", "rpo")
            if isinstance(rpo, dict):
                rpo_target.add_metric(key, float(rpo["target_seconds"]))
                rpo_met.add_metric(key, 1.0 if rpo.get("met") else 0.0)
                if rpo.get("pace_bytes_per_second") is not None:
                    pace.add_metric(key, float(rpo["pace_bytes_per_second"]))
        yield from (
            connected,
            state,
            payload,
            records,
            wire_sent if role == "sender" else wire_received,
            ratio,
            lag_seconds,
            lag_bytes,
            lag_records,
            silent,
            journal_bytes,
            journal_cap,
            errors,
            *lsns.values(),
            generation,
            point,
            consistent,
            clock_offset,
            progress,
            rpo_target,
            rpo_met,
            pace,
        )


def _get(job: dict[str, Any], *keys: str) -> Any:
    value: Any = job
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _parse_iso(text: Any) -> float | None:
    """Seconds since the epoch from ``status._iso`` ('2026-01-02T03:04:05.678Z')."""
    if not isinstance(text, str) or not text.endswith("Z"):
        return None
    main, _, millis = text[:-1].partition(".")
    try:
        seconds = calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
    return seconds + (int(millis) / 1000 if millis.isdigit() else 0.0)


class Metrics:
    """A private registry whose one collector reads a snapshot taken per scrape."""

    def __init__(self, snapshot: Callable[[], Awaitable[Snapshot]]) -> None:
        self._snapshot = snapshot
        self.collector = SnapshotCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._lock = asyncio.Lock()

    async def render(self) -> bytes:
        async with self._lock:  # one scrape at a time: the collector holds one snapshot
            self.collector.snapshot = await self._snapshot()
            return generate_latest(self.registry)

    @classmethod
    def of(cls, board: StatusBoard) -> Metrics:
        return cls(board.snapshot)


class MetricsServer:
    """``GET /metrics`` over HTTP on ``host:port`` (see the module docstring)."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def addresses(self) -> list[str]:
        if self._server is None:
            return []
        found = []
        for sock in self._server.sockets:
            host, port = sock.getsockname()[:2]
            found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return found

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._client, self.host, self.port, limit=MAX_HEAD
            )
        except OSError as exc:
            where = f"{self.host}:{self.port}"
            raise cannot_listen(
                where,
                exc,
                who="metrics server",
                option="--metrics-listen",
                doing="serve metrics on",
            ) from exc
        log.info("metrics.listening", addresses=self.addresses)

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await close_server(server, self._clients)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            status, content_type, body = await self._answer(reader)
            allow = "Allow: GET\r\n" if status.startswith("405") else ""
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{allow}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._clients.discard(task)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.LimitOverrunError):
            return "400 Bad Request", text, b"bad request\n"
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", text, b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target != "/metrics":
            return "404 Not Found", text, b"not found: try /metrics\n"
        if method != "GET":
            return "405 Method Not Allowed", text, b"only GET\n"
        try:
            body = await self.metrics.render()
        except Exception:
            log.exception("metrics.render_failed")
            return "500 Internal Server Error", text, b"metrics failed; see the log\n"
        return "200 OK", CONTENT_TYPE_LATEST, body
