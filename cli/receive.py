"""``replicator receive``: serve senders, keep their replicas under DIR/JOB."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Annotated

import structlog
import typer

from replicator.cli.common import fail, parse_endpoint, require_insecure, run
from replicator.engine.errors import ConfigError, ReplicatorError
from replicator.engine.receiver import Receiver, ReceiverConfig, check_receiver_dirs
from replicator.engine.statedir import StateDirLock
from replicator.transport import serve

log = structlog.get_logger()


def receive(
    listen: Annotated[str, typer.Option("--listen", help="Address to listen on, HOST:PORT.")],
    directory: Annotated[Path, typer.Option("--dir", help="Replicas land in DIR/JOB/<file name>.")],
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Receiver state (journals). Default: DIR/.replicator."),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS or authentication (trusted networks only).")
    ] = False,
) -> None:
    """Receive replication streams until SIGTERM/SIGINT, then finish applying and exit 0."""
    try:
        require_insecure(insecure)
        host, port = parse_endpoint(listen, "--listen")
        default_state = directory / ".replicator"
        if state_dir is None and default_state.is_symlink():
            raise ConfigError(
                f"{default_state} is a symlink: receiver state stays inside --dir",
                hint="remove it, or name the folder you want with --state-dir",
            )
        config = ReceiverConfig(replica_root=directory, state_root=state_dir or default_state)
        check_receiver_dirs(config)
    except ReplicatorError as exc:
        fail(exc)

    async def main(stop: asyncio.Event) -> None:
        with contextlib.ExitStack() as owned:  # one receiver per folder, before listening
            for folder in {config.state_root, config.replica_root}:
                owned.enter_context(StateDirLock(folder, "a receiver"))
            await serve_until(stop)

    async def serve_until(stop: asyncio.Event) -> None:
        receiver = Receiver(config)
        try:
            server = await serve(host, port, receiver.handle)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
        bound = [s.getsockname() for s in server.sockets]
        log.warning("receiver.listening", addresses=[f"{a[0]}:{a[1]}" for a in bound])
        typer.echo(f"listening on {', '.join(f'{a[0]}:{a[1]}' for a in bound)}", err=True)
        try:
            await stop.wait()
        finally:
            server.close()
            await receiver.aclose()
            await server.wait_closed()
        log.warning("receiver.stopped")

    run(main, graceful=True)
