"""``replicator send``: replicate volumes to a receiver (snapshot-diff capture)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from replicator.cli.capture_opts import Capture, check_capture_needs, check_capture_options
from replicator.cli.common import (
    InsecureOption,
    TlsDirOption,
    TlsNameOption,
    TlsPeerOption,
    connector_for,
    fail,
    finite,
    parse_endpoint,
    parse_size,
    run,
    transport_security,
)
from replicator.cli.jobfile_command import JobFileOption
from replicator.cli.monitoring import MetricsListenOption, metrics_endpoint
from replicator.cli.progress import progress_report
from replicator.cli.shaping_opts import (
    BurstOption,
    RateOption,
    ScheduleOption,
    TargetRpoOption,
    following,
    make_shaping,
)
from replicator.cli.witness_opts import (
    WITNESS_INTERVAL,
    FenceAfterOption,
    FenceExecOption,
    LeaseIntervalOption,
    WitnessOption,
    WitnessPeerOption,
    source_fence,
    source_lease,
    with_lease,
)
from replicator.engine.errors import ConfigError, ReplicatorError
from replicator.engine.hooks import HOOK_TIMEOUT
from replicator.engine.monitor import sender_monitor
from replicator.engine.names import check_job_name
from replicator.engine.sender import JOURNAL_CAP, LIVE_JOURNAL_CAP, Sender, SenderConfig, Summary
from replicator.engine.statedir import default_state_dir
from replicator.engine.tls import TlsIdentity
from replicator.engine.units import human_size
from replicator.engine.volumes import DEFAULT_EXTENT, resolve_volumes
from replicator.transport import Shaper

if TYPE_CHECKING:  # live capture (NBD, FUSE) is imported only when chosen: ~50 ms
    from replicator.engine.live import LiveSender
    from replicator.engine.nbd.gate import WriteGate

MIN_JOURNAL_CAP = 4 * 1024 * 1024

ToOption = Annotated[str, typer.Option("--to", help="Receiver address, HOST:PORT.")]
JobOption = Annotated[
    str, typer.Option("--job", help="Job name: the replica folder on the receiver (DIR/JOB).")
]
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Sender state (journal, manifests). Default: /var/lib/replicator/send/JOB as root, "
        "else $XDG_STATE_HOME (~/.local/state)/replicator/send/JOB.",
    ),
]
VolumesArgument = Annotated[
    list[Path],
    typer.Argument(help="Disk images (VHD, VHDX, qcow2, raw) and small configuration files."),
]


def build_config(
    to: str,
    job: str,
    state_dir: Path | None,
    volumes: list[Path] | None,
    *,
    pre_hook: str | None = None,
    post_hook: str | None = None,
    hook_timeout: float = HOOK_TIMEOUT,
    resync: bool = False,
    extent_size: int = DEFAULT_EXTENT,
    journal_max: int = JOURNAL_CAP,
    wait_for_receiver: float | None = None,
) -> SenderConfig:
    """The sender's configuration; ``volumes`` None for a folder's job (FUSE capture,
    a folder's verify), whose volumes ``engine.fuse_folder.folder_job`` fills in."""
    host, port = parse_endpoint(to, "--to")
    check_job_name(job)
    specs = resolve_volumes(volumes) if volumes is not None else []
    return SenderConfig(
        host=host,
        port=port,
        job=job,
        volumes=specs,
        state_dir=state_dir or default_state_dir("send", job),
        extent_size=extent_size,
        pre_hook=pre_hook,
        post_hook=post_hook,
        hook_timeout=hook_timeout,
        resync=resync,
        journal_max_bytes=journal_max,
        wait_for_receiver=wait_for_receiver,
    )


def _live_sender(
    sender: Sender,
    once: bool,
    socket: Path | None,
    listen: str | None,
    size: int | None,
    *,
    fencing: bool,
) -> tuple[LiveSender, WriteGate | None]:
    """The NBD live sender; with ``fencing`` (send --witness) its writes pass a gate that
    source self-fencing holds (engine/witness_fence.py)."""
    from replicator.engine.live import LiveSender, NbdCapture, NbdOptions
    from replicator.engine.nbd.endpoints import check_endpoints
    from replicator.engine.nbd.gate import WriteGate

    assert socket is not None  # check_capture_needs
    endpoint = parse_endpoint(listen, "--nbd-listen") if listen else None
    check_endpoints(str(socket), endpoint)  # before the initial sync, which may take hours
    capture = NbdCapture(sender.config.volumes, NbdOptions(str(socket), endpoint, size))
    capture.gate = WriteGate() if fencing else None
    return LiveSender(sender, capture), capture.gate


def _fuse_sender(
    to: str,
    job: str,
    state_dir: Path | None,
    volumes: list[Path],
    once: bool,
    mount: Path | None,
    journal_max: int,
    resync: bool,
    tls: TlsIdentity | None,
    shaper: Shaper,
) -> LiveSender:
    from replicator.engine.fuse_folder import FuseOptions, folder_source, fuse_folder_job
    from replicator.engine.live import LiveSender

    assert mount is not None  # check_capture_needs
    source = folder_source(volumes, "--capture fuse takes exactly one VOLUME: the VM's folder")
    config = build_config(to, job, state_dir, None, journal_max=journal_max, resync=resync)
    config, capture = fuse_folder_job(config, FuseOptions(source, mount))
    return LiveSender(Sender(config, connector_for(config, tls, shaper)), capture)


def basis_words(summary: Summary, resync: bool) -> str:
    """What the changes were found against, in words (``Summary.basis`` is a token)."""
    if summary.basis == "local":
        return "compared against this sender's record of the last sync"
    if resync:
        return "compared against the replica itself (--resync)"
    if summary.epoch <= 1:
        return "compared against the replica (first sync from this state folder)"
    return "compared against the replica (the sender's manifests were not usable)"


def wire_words(summary: Summary) -> str:
    """Bytes on the wire, and what lz4 saved of the records' size (when it saved any)."""
    sent = f"sent {human_size(summary.wire_bytes)} on the wire"
    if summary.payload_bytes > summary.wire_bytes > 0:
        # rounded down: "saved 100%" said of 19 KiB sent for 4.3 MiB read as nothing sent
        saved = 100 * (summary.payload_bytes - summary.wire_bytes) // summary.payload_bytes
        return f"{sent} (lz4 saved {saved}% of {human_size(summary.payload_bytes)})"
    return sent


def freeze_words(summary: Summary) -> str:
    """With a pre hook: how long the guest was frozen (a line of its own)."""
    if summary.frozen_seconds is None:
        return ""
    copied = summary.copied_before_freeze
    before = f" ({human_size(copied)} of the changes copied before the freeze)" if copied else ""
    return f"\n  guest frozen {summary.frozen_seconds:.2f} s{before}"


def print_summary(summary: Summary, as_json: bool, *, resync: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps(summary.as_dict(), sort_keys=True))
        return
    zeroed = f", zeroed {human_size(summary.bytes_zeroed)}" if summary.bytes_zeroed else ""
    files = f" and {summary.files_changed} files" if summary.files_changed else ""
    typer.echo(
        f"job {summary.job}: epoch {summary.epoch} is durable on the receiver "
        f"(lsn {summary.lsn}) after {summary.seconds:.2f} s\n"
        f"  scanned {human_size(summary.bytes_scanned)}; changed "
        f"{human_size(summary.bytes_changed)} in {summary.extents_changed} extents{files}{zeroed}\n"
        f"  {wire_words(summary)}\n"
        f"  {basis_words(summary, resync)}{freeze_words(summary)}"
    )


def send(
    to: ToOption,
    job: JobOption,
    volumes: VolumesArgument,
    state_dir: StateDirOption = None,
    once: Annotated[
        bool,
        typer.Option(
            "--once/--no-once",
            help="Bring the replica up to date once, then exit.",
            show_default=False,
        ),
    ] = False,
    interval: Annotated[
        float,
        typer.Option(
            "--interval",
            help="Seconds between scans when continuous.",
            min=0.1,
            callback=finite,
        ),
    ] = 60.0,
    as_json: Annotated[
        bool,
        typer.Option("--json/--no-json", help="Print the summary as JSON.", show_default=False),
    ] = False,
    insecure: InsecureOption = False,
    tls_dir: TlsDirOption = None,
    tls_name: TlsNameOption = None,
    tls_peer: TlsPeerOption = None,
    capture: Annotated[
        Capture,
        typer.Option(
            "--capture",
            help="scan: snapshot diff every --interval. nbd: serve the disks over NBD and "
            "journal every write before acknowledging it (real time). fuse: mount the VM "
            "folder (the one VOLUME) at --mount and journal every change (real time).",
            case_sensitive=False,
        ),
    ] = Capture.scan,
    mount: Annotated[
        Path | None,
        typer.Option(
            "--mount",
            help="Where the VM folder is mounted through the filter (--capture fuse); "
            "the VM uses the files there.",
        ),
    ] = None,
    journal_max: Annotated[
        str | None,
        typer.Option(
            "--journal-max",
            help="Cap on the sender's journal (e.g. 2G). At the cap, scan capture waits for "
            "the receiver (a frozen scan thaws instead, copies first and freezes again); NBD "
            "and FUSE capture track what changed and resync it later. "
            "Default 1G scan, 16G live (less when its file system has not the room).",
        ),
    ] = None,
    nbd_socket: Annotated[
        Path | None,
        typer.Option("--nbd-socket", help="Unix socket for the NBD exports (--capture nbd)."),
    ] = None,
    nbd_listen: Annotated[
        str | None,
        typer.Option("--nbd-listen", help="Also serve NBD on HOST:PORT (--capture nbd)."),
    ] = None,
    nbd_size: Annotated[
        int | None,
        typer.Option(
            "--nbd-size",
            help="Export size in bytes (default: the most a growable image can grow to).",
            min=1,
        ),
    ] = None,
    wait_for_receiver: Annotated[
        float | None,
        typer.Option(
            "--wait-for-receiver",
            metavar="SECONDS",
            callback=finite,
            help="Serve the disks without the receiver if it is not reached in SECONDS at "
            "start (--capture nbd): they are compared with this sender's last sync, and "
            "every write is shipped once the receiver answers. Default: wait for it (so a "
            "promoted replica is never written beside; see --witness).",
            min=0,
        ),
    ] = None,
    pre_hook: Annotated[
        str | None,
        typer.Option(
            "--pre-hook",
            metavar="CMD",
            help="Shell command run before each scan (freeze; --capture scan). If it fails "
            "no point is taken: --once exits 3, a continuous sender tries again next interval.",
        ),
    ] = None,
    post_hook: Annotated[
        str | None,
        typer.Option(
            "--post-hook",
            metavar="CMD",
            help="Shell command run after each scan (thaw), also after a pre hook that failed "
            "($REPLICATOR_PRE_RESULT says which), so it must be harmless on an unfrozen guest.",
        ),
    ] = None,
    hook_timeout: Annotated[
        float,
        typer.Option(
            "--hook-timeout",
            metavar="SECONDS",
            callback=finite,
            help="A hook running longer is killed (with its process group) and counts as failed.",
            min=0.1,
        ),
    ] = HOOK_TIMEOUT,
    resync: Annotated[
        bool,
        typer.Option(
            "--resync/--no-resync",
            help="Compare with the replica itself instead of local state.",
            show_default=False,
        ),
    ] = False,
    metrics_listen: MetricsListenOption = None,
    rate: RateOption = None,
    burst: BurstOption = None,
    schedule: ScheduleOption = None,
    target_rpo: TargetRpoOption = None,
    witness: WitnessOption = None,
    witness_peer: WitnessPeerOption = None,
    witness_interval: LeaseIntervalOption = WITNESS_INTERVAL,
    fence_after: FenceAfterOption = None,
    fence_exec: FenceExecOption = None,
    job_file: JobFileOption = None,  # read by SendCommand before the other options (jobfile)
) -> None:
    """Replicate VOLUMES to a receiver: changed extents only, in write order, durably."""
    try:
        tls = transport_security(
            tls_dir=tls_dir,
            tls_name=tls_name,
            insecure=insecure,
            side="sender",
            host=parse_endpoint(to, "--to")[0],
            tls_peer=tls_peer,
        )
        check_capture_options(
            capture,
            {
                "nbd_socket": nbd_socket,
                "nbd_listen": nbd_listen,
                "nbd_size": nbd_size,
                "wait_for_receiver": wait_for_receiver,
                "mount": mount,
                "pre_hook": pre_hook,
                "post_hook": post_hook,
            },
        )
        check_capture_needs(capture, {"once": once, "nbd_socket": nbd_socket, "mount": mount})
        metrics = metrics_endpoint(metrics_listen)
        shaping = make_shaping(rate, burst, schedule, target_rpo)
        default_cap = JOURNAL_CAP if capture is Capture.scan else LIVE_JOURNAL_CAP
        cap = parse_size(journal_max, "--journal-max") if journal_max else default_cap
        if cap < MIN_JOURNAL_CAP:
            raise ConfigError(
                f"--journal-max {journal_max} is too small: at least 4M (a few MiB of records "
                "must fit while earlier ones wait for the receiver)"
            )
        if capture is Capture.fuse:
            live = _fuse_sender(
                to, job, state_dir, volumes, once, mount, cap, resync, tls, shaping.bucket
            )
        else:
            config = build_config(
                to,
                job,
                state_dir,
                volumes,
                pre_hook=pre_hook,
                post_hook=post_hook,
                hook_timeout=hook_timeout,
                resync=resync,
                journal_max=cap,
                wait_for_receiver=wait_for_receiver,
            )
            sender = Sender(config, connector_for(config, tls, shaping.bucket))
        gate = None
        if capture is Capture.nbd:
            live, gate = _live_sender(
                sender, once, nbd_socket, nbd_listen, nbd_size, fencing=witness is not None
            )
        fence = source_fence(job, witness, witness_interval, fence_after, fence_exec, gate)
        if capture is not Capture.scan:
            live.sender.fence = fence
        lease = source_lease(
            live.sender if capture is not Capture.scan else sender,
            witness,
            witness_interval,
            tls_dir=tls_dir,
            tls_name=tls.name if tls else None,
            peer=witness_peer,
            fence=fence,
        )
    except ReplicatorError as exc:
        fail(exc)
    if capture is not Capture.scan:
        live.sender.progress = progress_report("initial sync")

        async def main_live(stop: asyncio.Event) -> None:
            async with following(shaping), sender_monitor(live.sender, metrics, shaping):
                await with_lease(live.run(stop), lease and lease())

        run(main_live, graceful=True)
        return
    sender.progress = progress_report("sync")
    if once:

        async def main_once(stop: asyncio.Event) -> Summary:
            async with following(shaping), sender_monitor(sender, metrics, shaping):
                return await with_lease(sender.run_once(), lease and lease())

        summary = run(main_once, graceful=False)
        print_summary(summary, as_json, resync=resync)
        if sender.quiesce.thaw_failure is not None:  # the point is durable; the guest may not be
            fail(sender.quiesce.thaw_failure)
        return

    async def main_forever(stop: asyncio.Event) -> None:
        async with following(shaping), sender_monitor(sender, metrics, shaping):
            await with_lease(sender.run_forever(interval, stop), lease and lease())

    run(main_forever, graceful=True)
