"""``replicator receive``: serve senders, keep their replicas under DIR/JOB."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated

import structlog
import typer

from replicator.cli.common import (
    InsecureOption,
    TlsDirOption,
    TlsNameOption,
    fail,
    finite,
    parse_endpoint,
    parse_in_flight_max,
    run,
    transport_security,
)
from replicator.cli.jobfile_command import ConfigOption
from replicator.cli.monitoring import MetricsListenOption, metrics_endpoint
from replicator.cli.witness_opts import (
    WitnessOption,
    WitnessPeerOption,
    auto_failover,
    receiver_requester,
    until_stopped,
)
from replicator.engine import descriptors
from replicator.engine.authz import Authorizer, parse_allow
from replicator.engine.errors import ConfigError, ReplicatorError, cannot_listen
from replicator.engine.monitor import receiver_monitor
from replicator.engine.names import RECEIVER_STATE_NAME
from replicator.engine.receiver import Receiver, ReceiverConfig, check_receiver_dirs
from replicator.engine.statedir import receiver_folder_locks
from replicator.engine.user_command import split_command
from replicator.engine.witness_roles import AutoFailover
from replicator.transport import serve

log = structlog.get_logger()


def check_exec(command: str, after: float | None) -> None:
    """``--auto-failover-exec`` is refused at start when nothing would run it, or when it
    is no command at all: finding out at the promotion would be too late."""
    if after is None:
        raise ConfigError(
            "--auto-failover-exec runs after an automatic promotion: it needs "
            "--auto-failover-after SECONDS and --witness",
            hint="add them, or fail over by hand with `replicator failover --force --exec CMD`",
        )
    split_command("--auto-failover-exec", command, "starts the VM")


def receive(
    listen: Annotated[str, typer.Option("--listen", help="Address to listen on, HOST:PORT.")],
    directory: Annotated[Path, typer.Option("--dir", help="Replicas land in DIR/JOB/<file name>.")],
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Receiver state (journals). Default: DIR/.replicator."),
    ] = None,
    insecure: InsecureOption = False,
    tls_dir: TlsDirOption = None,
    tls_name: TlsNameOption = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="NAME:JOB: only the certificate named NAME may write JOB ('*': every job); "
            "repeatable. Default: any certificate signed by the --tls-dir CA writes any job.",
        ),
    ] = None,
    metrics_listen: MetricsListenOption = None,
    in_flight_max: Annotated[
        str | None,
        typer.Option(
            "--in-flight-max",
            help="Memory all senders' records may take together before they are durable "
            "(e.g. 128M): beyond it the receiver stops reading their connections until its "
            "syncs catch up, and the senders wait. Default 256M (docs/OPERATIONS.md, "
            "'Receiver memory').",
        ),
    ] = None,
    auto_failover_after: Annotated[
        float | None,
        typer.Option(
            "--auto-failover-after",
            callback=finite,
            help="Promote a job after SECONDS without its source, when --witness agrees "
            "(docs/OPERATIONS.md, 'Automatic failover').",
            min=0.1,
        ),
    ] = None,
    auto_failover_exec: Annotated[
        str | None,
        typer.Option(
            "--auto-failover-exec",
            help="After an automatic promotion, run CMD as `failover --exec` does (no shell; "
            "in the replica folder, REPLICATOR_JOB and REPLICATOR_REPLICA_DIR set): the "
            "command that starts the VM.",
            metavar="CMD",
        ),
    ] = None,
    witness: WitnessOption = None,
    witness_peer: WitnessPeerOption = None,
    config_file: ConfigOption = None,  # read by ReceiveCommand before the other options
) -> None:
    """Receive replication streams until SIGTERM/SIGINT, then finish applying and exit 0."""
    try:
        host, port = parse_endpoint(listen, "--listen")
        rules = [parse_allow(value) for value in allow or ()]
        if rules and tls_dir is None:
            raise ConfigError(
                "--allow needs --tls-dir: without TLS a sender has no certificate name",
                hint="make keys with `replicator keygen --out DIR`",
            )
        tls = transport_security(
            tls_dir=tls_dir, tls_name=tls_name, insecure=insecure, side="receiver", host=host
        )
        metrics = metrics_endpoint(metrics_listen)
        default_state = directory / RECEIVER_STATE_NAME
        if state_dir is None and default_state.is_symlink():
            raise ConfigError(
                f"{default_state} is a symlink: receiver state stays inside --dir",
                hint="remove it, or name the folder you want with --state-dir",
            )
        config = ReceiverConfig(
            replica_root=directory,
            state_root=state_dir or default_state,
            authorize=Authorizer(rules) if rules else None,
            in_flight_max=parse_in_flight_max(in_flight_max),
        )
        check_receiver_dirs(config)
        if auto_failover_exec is not None:
            check_exec(auto_failover_exec, auto_failover_after)
        auto = auto_failover(
            auto_failover_after,
            witness,
            who=receiver_requester(tls.name if tls else "receiver", directory),
            tls_dir=tls_dir,
            tls_name=tls.name if tls else None,
            peer=witness_peer,
        )
    except ReplicatorError as exc:
        fail(exc)

    async def main(stop: asyncio.Event) -> None:
        with contextlib.ExitStack() as owned:  # one receiver per folder, before listening
            for lock in receiver_folder_locks(config.state_root, config.replica_root):
                owned.enter_context(lock)
            await serve_until(stop)

    async def serve_until(stop: asyncio.Event) -> None:
        descriptors.raise_limit()  # before the receiver counts the jobs it may keep open
        receiver = Receiver(config)
        if receiver.max_open_jobs < descriptors.FEW_JOBS:
            log.warning(
                "receiver.few_jobs",
                most=receiver.max_open_jobs,
                open_files=descriptors.limit(),
                action="raise the receiver's open-file limit (LimitNOFILE= in its systemd "
                f"unit, `ulimit -Hn`): each job open may hold {descriptors.JOB_DESCRIPTORS}",
            )
        receiver.status.tls = tls  # status and the metrics show when its certificate expires
        try:
            # TLS: the context is asked for at every accept (rebuilt when its files change)
            server = await serve(
                host,
                port,
                receiver.handle,
                ssl=tls.context if tls else None,
                on_refused=receiver.status.refused_connection,
            )
        except OSError as exc:
            raise cannot_listen(listen, exc, who="receiver", option="--listen") from exc
        bound = [s.getsockname() for s in server.sockets]
        log.info(
            "receiver.listening",
            addresses=[f"{a[0]}:{a[1]}" for a in bound],
            security=f"TLS 1.3 as {tls.name!r}" if tls else "insecure",
            allow=[str(rule) for rule in rules]
            or ("any certificate signed by the CA" if tls else "anyone (--insecure)"),
        )
        typer.echo(f"listening on {', '.join(f'{a[0]}:{a[1]}' for a in bound)}", err=True)
        try:
            async with receiver_monitor(receiver, metrics):  # the control socket, metrics
                if auto is None:
                    await stop.wait()
                else:
                    watch = AutoFailover(receiver, *auto, exec_cmd=auto_failover_exec)
                    await until_stopped(stop, watch.run())
        finally:
            if auto is not None:
                await auto[0].aclose()
            server.close()
            await receiver.aclose()
            await server.wait_closed()
        log.info("receiver.stopped")

    run(main, graceful=True)
