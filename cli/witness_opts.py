"""``--witness`` and ``--auto-failover-after`` for ``send`` and ``receive`` (docs/WITNESS.md)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from replicator.cli.common import finite
from replicator.engine.errors import ConfigError

if TYPE_CHECKING:
    from replicator.engine.nbd.gate import WriteGate
    from replicator.engine.sender import Sender
    from replicator.engine.witness_client import Witness
    from replicator.engine.witness_fence import SourceFence

T = TypeVar("T")

WitnessOption = Annotated[
    str | None,
    typer.Option(
        "--witness",
        help="The tie-breaker for automatic failover: HOST:PORT of `replicator witness` "
        "(TLS with this side's --tls-dir) or etcd://HOST:PORT.",
    ),
]
WitnessPeerOption = Annotated[
    str | None,
    typer.Option(
        "--witness-peer",
        help="The name the witness's certificate must carry (default: witness, the name "
        "`replicator witness` presents). Any other certificate of the CA is refused.",
    ),
]
WITNESS_INTERVAL = 2.0  # --witness-interval's default
LeaseIntervalOption = Annotated[
    float,
    typer.Option(
        "--witness-interval",
        callback=finite,
        help="Seconds between the source's lease renewals at the witness.",
        min=0.1,
    ),
]
FenceAfterOption = Annotated[
    float | None,
    typer.Option(
        "--fence-after",
        callback=finite,
        help="With --witness: seconds without a successful lease renewal after which this "
        "source fences itself (holds NBD writes, runs --fence-exec); the witness promotes "
        "the target only later. Below 3 x --witness-interval. Default: 2 x --witness-interval.",
        min=0.05,
    ),
]
FenceExecOption = Annotated[
    str | None,
    typer.Option(
        "--fence-exec",
        help="With --witness: command run (no shell) when this source fences itself, e.g. "
        "'virsh suspend vm1'; REPLICATOR_JOB is set.",
    ),
]
NO_TIE_BREAKER = (
    "--auto-failover-after needs --witness HOST:PORT (or etcd://HOST:PORT): without a "
    "tie-breaker this side cannot tell a dead source from a cut network, and promoting "
    "then makes two primaries (split brain)"
)


def source_fence(
    job: str,
    witness: str | None,
    interval: float,
    fence_after: float | None,
    fence_exec: str | None,
    gate: WriteGate | None,
) -> SourceFence | None:
    """The sender's self-fencing for ``--witness`` (docs/WITNESS.md, "Fencing"); refuses
    --fence-after/--fence-exec without --witness and a --fence-after the lease would not
    outlast."""
    if witness is None:
        if fence_after is not None or fence_exec is not None:
            raise ConfigError(
                "--fence-after and --fence-exec need --witness: without a witness there is "
                "no lease to lose",
                hint="add --witness HOST:PORT (docs/WITNESS.md)",
            )
        return None
    from replicator.engine.witness_fence import SourceFence, check_fence_exec

    lease = 3 * interval
    after = 2 * interval if fence_after is None else fence_after
    if after >= lease:
        raise ConfigError(
            f"--fence-after {after:g} is not below the lease ({lease:g}s: 3 x "
            f"--witness-interval {interval:g}): the source would fence after the target may "
            "have been promoted",
            hint=f"give --fence-after below {lease:g}, or a longer --witness-interval",
        )
    if fence_exec is not None:
        check_fence_exec(fence_exec)
    return SourceFence(job, after, exec_cmd=fence_exec, gate=gate)


def source_lease(
    sender: Sender,
    witness: str | None,
    interval: float,
    *,
    tls_dir: Path | None,
    tls_name: str | None,
    peer: str | None = None,
    fence: SourceFence | None = None,
) -> Callable[[], Coroutine[Any, Any, Any]] | None:
    """The sender's lease keeper for ``--witness`` (None without): a coroutine factory, so
    the client is made here (bad options fail at start) and the loop runs in ``run``."""
    check_witness_peer(peer, witness, tls_dir)
    if witness is None:
        return None
    from replicator.engine.generations import load_peer
    from replicator.engine.witness_client import witness_for
    from replicator.engine.witness_roles import keep_lease

    config = sender.config
    if fence is not None:
        sender.status.fence = fence.status
    client = witness_for(
        witness,
        who=f"{tls_name or 'sender'}@{socket.gethostname()}:{config.job}",
        tls_dir=None if tls_dir is None else str(tls_dir),
        tls_name=tls_name,
        peer=peer,
        lease_seconds=3 * interval,
    )
    last = load_peer(config.state_dir)  # before the first session says it
    known = last.generation

    def generation() -> int:
        return max(known, sender.status.generation)

    def replica() -> str:
        return sender.replica_id or last.replica

    def unbound() -> bool:
        # a state folder that never had a session: no replica holds what this source
        # writes, so the witness promotes none (an old copy of the job elsewhere asking
        # would be granted and lose everything since)
        return not (sender.reached or last.generation or last.replica)

    async def renewing() -> None:
        try:
            await keep_lease(
                client, config.job, generation, interval, fence, replica, unbound,
                sender.session_began,
            )  # fmt: skip
        finally:
            await client.aclose()

    return renewing


def receiver_requester(name: str, directory: Path) -> str:
    """The receiver's name at the witness, NAME@HOST:FOLDER, which a grant binds (without
    TLS the witness knows the requester by it alone: the same name asking again is the
    target whose answer was lost, and is granted again). FOLDER is ``--dir``'s real path
    (symlinks, ``..`` and relative spellings resolved), so a receiver restarted on its
    folder spelled otherwise is still the one granted, while another folder, here or a
    copy on another host, is another requester (a random identity kept in the folder
    would travel with a copy of it)."""
    return f"{name}@{socket.gethostname()}:{os.path.realpath(directory)}"


def check_witness_peer(peer: str | None, witness: str | None, tls_dir: Path | None) -> None:
    """--witness-peer names the built-in witness's certificate: it needs both."""
    if peer is None:
        return
    if witness is None or witness.startswith("etcd://"):
        raise ConfigError(
            "--witness-peer names the certificate of a `replicator witness`: it needs "
            "--witness HOST:PORT",
            hint="leave --witness-peer out, or give --witness",
        )
    if tls_dir is None:
        raise ConfigError(
            "--witness-peer needs --tls-dir DIR: without TLS the witness has no certificate name"
        )
    from replicator.engine.tls import check_cert_name

    check_cert_name(peer)


def check_auto_failover(after: float | None, witness: str | None) -> None:
    """--auto-failover-after and --witness on receive go together (ConfigError)."""
    if after is None and witness is not None:
        raise ConfigError(
            "--witness on receive needs --auto-failover-after SECONDS",
            hint="give how long the source may be silent before the target promotes",
        )
    if after is not None and witness is None:
        raise ConfigError(
            NO_TIE_BREAKER,
            hint="run `replicator witness --listen HOST:PORT` on a third machine and pass "
            "--witness HOST:PORT to send and receive; or fail over by hand with "
            "`replicator failover --force`",
        )


def auto_failover(
    after: float | None,
    witness: str | None,
    *,
    who: str,
    tls_dir: Path | None,
    tls_name: str | None,
    peer: str | None = None,
) -> tuple[Witness, float] | None:
    """The receiver's witness and delay, or None without --auto-failover-after; refuses
    --auto-failover-after without --witness (and the reverse: nothing would use it)."""
    check_auto_failover(after, witness)
    check_witness_peer(peer, witness, tls_dir)
    if after is None or witness is None:
        return None
    from replicator.engine.witness_client import witness_for

    client = witness_for(
        witness,
        who=who,
        tls_dir=None if tls_dir is None else str(tls_dir),
        tls_name=tls_name,
        peer=peer,
        lease_seconds=after,
    )
    return client, after


async def until_stopped(stop: asyncio.Event, work: Coroutine[Any, Any, Any]) -> None:
    """Run ``work`` until ``stop`` is set (its errors end the command)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, waiter):
            t.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error


async def with_lease(work: Coroutine[Any, Any, T], lease: Coroutine[Any, Any, Any] | None) -> T:
    """``work``'s result, with the source's lease renewed meanwhile (``keep_lease``): when
    the witness says the target took over, ``work`` is cancelled and that error ends the
    command (exit 11)."""
    if lease is None:
        return await work
    async with asyncio.TaskGroup() as group:
        job = group.create_task(work)
        renewing = group.create_task(lease)
        job.add_done_callback(lambda _: renewing.cancel())
    return job.result()
