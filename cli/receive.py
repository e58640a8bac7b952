"""``replicator receive``: serve senders, keep their replicas under DIR/JOB."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import structlog
import typer

from replicator.cli.common import fail, parse_endpoint, require_insecure, run
from replicator.engine.errors import ConfigError, ReplicatorError
from replicator.engine.receiver import Receiver, ReceiverConfig, check_receiver_dirs
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
        config = ReceiverConfig(
            replica_root=directory, state_root=state_dir or directory / ".replicator"
        )
        check_receiver_dirs(config)
    except ReplicatorError as exc:
        fail(exc)

    async def main(stop: asyncio.Event) -> None:
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
