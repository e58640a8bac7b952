"""A receiver and a sender in one process, through the embedding API (docs/EMBEDDING.md).

Run it from a checkout with replicator installed: ``python examples/embed_pair.py``.
In temporary folders it makes a 16 MiB raw disk image, serves a receiver on a free
loopback port, replicates the image to it with a continuous sender, writes 1 MiB into the
source image, waits for the lag event that write causes and for the replica to catch up,
then verifies the replica against the source. The last line printed is a JSON summary;
the exit code is 0 when the replica is identical, 1 when it is not or an expected event
did not come, and the error's exit code (docs/OPERATIONS.md, "Exit codes") otherwise.

This file is not part of the installed package (it lives outside the package folders).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

from replicator.engine.api import (
    EventKind,
    EventStream,
    Receiver,
    ReceiverConfig,
    ReplicatorError,
    Sender,
    SenderConfig,
    StatusEvent,
    resolve_volumes,
)

MiB = 1024 * 1024
TIMEOUT = 60.0  # seconds for the whole run


async def next_event(events: EventStream, wanted: str, accept: Any) -> StatusEvent:
    """The next event ``accept(event)`` says yes to; a clear failure if none comes."""
    async for event in events:
        if accept(event):
            return event
    raise SystemExit(f"embed_pair: the events ended before {wanted}")


def caught_up(event: StatusEvent, lsn: int = 1) -> bool:
    return event.kind is EventKind.LAG and event.lag.records == 0 and event.applied_lsn >= lsn


async def main(tmp: Path) -> dict[str, Any]:
    disk = tmp / "source" / "disk.img"
    disk.parent.mkdir()
    disk.write_bytes(os.urandom(16 * MiB))
    receiver_config = ReceiverConfig(replica_root=tmp / "replicas", state_root=tmp / "rstate")
    seen: dict[str, Any] = {"receiver_events": []}

    async with Receiver(receiver_config, host="127.0.0.1", port=0) as receiver:
        host, port = receiver.address
        print(f"receiver listening on {host}:{port}", flush=True)
        receiver_events = receiver.events()
        config = SenderConfig(
            host=host,
            port=port,
            job="vm1",
            volumes=resolve_volumes([disk]),
            state_dir=tmp / "sstate",
        )
        sender = Sender(config, interval=0.5)  # insecure: loopback only (see EMBEDDING.md)
        async with sender.events() as events:
            async with sender:
                first = await next_event(events, "the initial sync", caught_up)
                print(f"initial sync applied up to lsn {first.applied_lsn}", flush=True)

                with disk.open("r+b") as f:  # what a VM writing to its disk would do
                    f.seek(5 * MiB)
                    f.write(os.urandom(MiB))
                    f.flush()
                    os.fsync(f.fileno())
                print("wrote 1 MiB into the source image", flush=True)

                lagging = await next_event(
                    events,
                    "a lag event",
                    lambda e: (
                        e.kind is EventKind.LAG
                        and e.lag.records > 0
                        and e.snapshot["lsn"]["journaled"] > first.applied_lsn + 1
                    ),
                )
                journaled = int(lagging.snapshot["lsn"]["journaled"])
                print(
                    f"lag event: {lagging.lag.records} records not applied yet "
                    f"(journaled lsn {journaled}, applied {lagging.applied_lsn}, "
                    f"{lagging.lag.seconds} s)",
                    flush=True,
                )
                done = await next_event(events, "the catch-up", lambda e: caught_up(e, journaled))
                print(f"caught up: applied lsn {done.applied_lsn}", flush=True)

                result = await sender.verify()  # pauses the sender, compares, resumes it
                for volume in result.volumes:
                    state = "identical" if volume.identical else "DIFFERENT"
                    print(f"verify {volume.volume}: {state} ({volume.source_size} bytes)")
                seen.update(
                    identical=result.identical,
                    running_after_verify=sender.running,
                    status_state=(await sender.snapshot())["state"],
                )
            seen.update(
                lag_records=lagging.lag.records,
                journaled_lsn=journaled,
                applied_lsn=done.applied_lsn,
                sender_failure=None if sender.failure is None else str(sender.failure),
            )
        receiver_events.close()
        async for event in receiver_events:  # what the receiver saw meanwhile
            seen["receiver_events"].append(str(event.kind))
        seen["receiver_job_state"] = (await receiver.snapshot())["jobs"][0]["state"]

    replica = tmp / "replicas" / "vm1" / "disk.img"
    seen["replica_matches"] = replica.read_bytes() == disk.read_bytes()
    return seen


def run() -> int:
    # the engine logs through structlog: keep stdout for this program's own lines
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    with tempfile.TemporaryDirectory(prefix="embed-pair-") as tmp:
        try:
            seen = asyncio.run(asyncio.wait_for(main(Path(tmp)), TIMEOUT))
        except ReplicatorError as exc:
            print(f"embed_pair: error: {exc}", file=sys.stderr)
            return int(exc.exit_code)
        except TimeoutError:
            print(f"embed_pair: no result within {TIMEOUT} s", file=sys.stderr)
            return 1
    print(json.dumps(seen, sort_keys=True))
    return 0 if seen["identical"] and seen["replica_matches"] else 1


if __name__ == "__main__":
    sys.exit(run())
