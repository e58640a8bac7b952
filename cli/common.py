"""What every command shares: endpoints, the event loop, signals, errors and exit codes."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import typer

from replicator.engine.connectors import Connector, TcpConnector
from replicator.engine.errors import ConfigError, ReplicatorError, unwrap
from replicator.engine.sender import SenderConfig

T = TypeVar("T")

INSECURE_REQUIRED = (
    "TLS is not available yet: pass --insecure to replicate unencrypted and "
    "unauthenticated (only on a network you trust)"
)


def parse_endpoint(value: str, option: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} wants HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str, option: str) -> int:
    """Bytes from '123', '64M', '16G', '1T' (binary units)."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in "KMGT" and text[-1:] else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit() or int(number) <= 0:
        raise ConfigError(f"{option} wants a size such as 512M or 16G, got {value!r}")
    return int(number) * _SIZE_UNITS[unit]


def connector_for(config: SenderConfig) -> Connector:
    """Where the job's connections come from: the command line's one decision about them
    (TCP today; TLS and rate limits wrap it, so they survive reconnects)."""
    return TcpConnector(config.host, config.port, timeout=config.connect_timeout)


def require_insecure(insecure: bool) -> None:
    if not insecure:
        raise ConfigError(INSECURE_REQUIRED)


def fail(error: BaseException) -> NoReturn:
    """Print one line naming what went wrong and what to do; exit with its code."""
    if isinstance(error, ReplicatorError):
        typer.echo(f"replicator: error: {error}", err=True)
        raise typer.Exit(int(error.exit_code))
    typer.echo(f"replicator: unexpected error: {type(error).__name__}: {error}", err=True)
    raise typer.Exit(70)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep working without
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(main: Callable[[asyncio.Event], Coroutine[Any, Any, T]], *, graceful: bool) -> T:
    """Run ``main(stop)`` on uvloop.

    SIGINT/SIGTERM set ``stop`` when ``graceful`` (the command finishes its work and
    exits 0); otherwise they cancel the work, which ends with exit code 130.
    """
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        loop = runner.get_loop()
        stop = asyncio.Event()
        task_holder: list[asyncio.Task[T]] = []

        def on_signal() -> None:
            if graceful and not stop.is_set():
                stop.set()
            elif task_holder:
                task_holder[0].cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)

        async def wrapper() -> T:
            task = asyncio.current_task()
            assert task is not None
            task_holder.append(task)
            return await main(stop)

        try:
            return runner.run(wrapper())
        except BaseException as exc:  # unwrap() turns a cancellation into Interrupted
            if isinstance(exc, typer.Exit | SystemExit):
                raise
            fail(unwrap(exc))
