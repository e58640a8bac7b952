"""How ``replicator status`` words a job's lag: the sender knows its RPO, the receiver only a
bound of it (it cannot see what was never sent, and an idle source looks like a stale one)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from replicator.cli.status_cmd import _render


def _text(snapshot: dict[str, Any]) -> str:
    console = Console(record=True, width=300, color_system=None)
    console.print(_render(snapshot))
    return console.export_text()


def _row(text: str, label: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(label)]
    assert len(lines) == 1, text
    return lines[0][len(label) :].strip()


def test_the_receiver_shows_its_lag_as_a_bound_of_the_rpo() -> None:
    job = {"job": "vm1", "state": "idle", "lag": {"records": 0, "seconds": 12.3}}
    text = _text({"role": "receiver", "source": "process", "jobs": [job]})
    row = _row(text, "lag (RPO bound)")
    assert row.startswith("0 records to apply; at most 12.3 s of source writes missing"), row
    assert "idle source" in row
    assert "lag (RPO) " not in text  # the receiver does not claim to know the RPO


def test_the_receiver_without_a_point_shows_only_what_it_has_to_apply() -> None:
    job = {"job": "vm1", "state": "idle", "lag": {"records": 3, "seconds": None}}
    text = _text({"role": "receiver", "source": "process", "jobs": [job]})
    assert _row(text, "lag (RPO bound)") == "3 records to apply"


def test_the_sender_shows_its_rpo() -> None:
    job = {"job": "vm1", "state": "replicating", "lag": {"records": 2, "seconds": 0.5}}
    text = _text({"role": "sender", "source": "process", "jobs": [job]})
    assert _row(text, "lag (RPO)") == "2 records, 0.5 s"


def test_traffic_names_the_compression_as_a_factor() -> None:
    job = {
        "job": "vm1",
        "bytes": {"payload": 131_482, "wire": 946},
        "compression_ratio": 139.004,
        "rate_bytes_per_second": 0.0,
    }
    text = _text({"role": "receiver", "source": "process", "jobs": [job]})
    assert _row(text, "received") == "128.4 KiB as 946 B (lz4: 139.00x smaller), 0 B/s"
    job |= {"bytes": {"payload": 1 << 20, "wire": (1 << 20) + 60}, "compression_ratio": 0.99}
    text = _text({"role": "receiver", "source": "process", "jobs": [job]})
    assert _row(text, "received") == "1.0 MiB as 1.0 MiB (not compressible), 0 B/s"


def test_a_sender_that_must_compare_says_why() -> None:
    why = "the receiver lacks lsn 14 to 15, which no journal here holds"
    job = {"job": "vm1", "state": "not_running", "compare_pending": why}
    text = _text({"role": "sender", "source": "files", "jobs": [job]})
    assert f"the next cycle compares with the replica: {why}" in " ".join(text.split()), text


def test_a_replica_that_lost_records_says_what_makes_it_consistent_again() -> None:
    point = {"lsn": 11, "source_time": None, "consistent": False, "floor_lsn": 17}
    job = {"job": "vm1", "state": "idle", "consistency_point": point}
    text = " ".join(_text({"role": "receiver", "source": "files", "jobs": [job]}).split())
    assert "records it had acknowledged were lost" in text, text
    assert "`replicator send --resync` compares now" in text
    assert "an apply is unfinished" not in text
    point["floor_lsn"] = None
    text = " ".join(_text({"role": "receiver", "source": "files", "jobs": [job]}).split())
    assert "an apply is unfinished" in text, text


def test_a_paused_sender_says_what_resumes_it() -> None:
    """Paused by its schedule, the state names when the schedule changes; by hand (or
    --rate 0), the command that resumes it (tests/cli/test_rate.py runs the latter)."""
    by_schedule = {
        "job": "vm1",
        "state": "paused",
        "shaping": {"source": "schedule", "paused": True, "next_change": "2026-12-07T06:00"},
    }
    text = _text({"role": "sender", "source": "process", "jobs": [by_schedule]})
    assert _row(text, "state") == "paused (the schedule's rate 0 until 2026-12-07T06:00)"
    by_hand = {"job": "vm1", "state": "paused", "shaping": {"source": "manual", "paused": True}}
    text = _text({"role": "sender", "source": "process", "jobs": [by_hand]})
    assert _row(text, "state") == (
        "paused (rate 0: `replicator rate --state-dir DIR RATE` resumes it)"
    )


def test_a_promoted_replica_shows_what_was_missing_when_it_was_promoted() -> None:
    """After a failover nothing more is missing: the bound is the one at the promotion
    (its time less the point's source time), not one that grows for ever."""
    from replicator.engine.generations import Promotion
    from replicator.engine.status import promotion_fields

    second = 10**9
    fields = promotion_fields("vm1", Promotion(2, 1, 1_000 * second, 17, 994 * second))
    assert fields["promotion"]["missing_seconds"] == 6.0
    job = {"job": "vm1", "state": "promoted", "lag": {"records": 0, "seconds": 5000.0}, **fields}
    text = _text({"role": "receiver", "source": "process", "jobs": [job]})
    assert _row(text, "lag (RPO bound)") == (
        "0 records to apply; promoted: at most 6.0 s of source writes were missing then (the "
        "promotion's time less the consistency point's time)"
    )
    # a source an hour behind: counted from the point's time on the target's clock
    skewed = Promotion(2, 1, 1_000 * second, 17, -2_606 * second, point_target_ns=994 * second)
    assert promotion_fields("vm1", skewed)["promotion"]["missing_seconds"] == 6.0
    unknown = promotion_fields("vm1", Promotion(2, 1, 1_000 * second, 0, 0))
    job.update(unknown)
    text = _text({"role": "receiver", "source": "process", "jobs": [job]})
    assert _row(text, "lag (RPO bound)") == (
        "0 records to apply; promoted (its consistency point has no source time)"
    )


def test_a_receiver_says_how_far_off_the_source_clock_is() -> None:
    job = {
        "job": "vm1",
        "state": "receiving",
        "lag": {"records": 0, "seconds": 2.5},
        "source_clock_offset_seconds": -3600.0,
    }
    text = _text({"role": "receiver", "source": "process", "jobs": [job]})
    assert _row(text, "lag (RPO bound)") == (
        "0 records to apply; at most 2.5 s of source writes missing (now less the consistency "
        "point's time: it grows on an idle source too); the source's clock is 1h00m behind "
        "(allowed for here; fix NTP on the hosts)"
    )
    job["source_clock_offset_seconds"] = 0.002
    text = _text({"role": "receiver", "source": "process", "jobs": [job]})
    assert "clock" not in _row(text, "lag (RPO bound)")


def test_a_sender_at_rest_that_cannot_bound_its_lag_says_why() -> None:
    why = "the receiver held LSN 69 to 121 unapplied when this sender last heard from it"
    lag = {"records": None, "at_most": None, "not_known": why}
    job = {"job": "vm1", "state": "not_running", "source": "files", "lag": lag}
    text = " ".join(_text({"role": "sender", "source": "files", "jobs": [job]}).split())
    assert f"not known: {why}" in text, text
    assert "no sync from this state folder has completed" not in text
