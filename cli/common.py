"""What every command shares: endpoints, the event loop, signals, errors and exit codes."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar

import structlog
import typer

from replicator.cli.logging_setup import json_logs
from replicator.engine.allocator import keep_freed_buffers
from replicator.engine.errors import ConfigError, ExitCode, ReplicatorError, unwrap
from replicator.engine.names import printable

if TYPE_CHECKING:  # loaded by the commands that connect, not by every command
    from rich.console import Console

    from replicator.engine.connectors import Connector
    from replicator.engine.sender import SenderConfig
    from replicator.engine.tls import TlsIdentity
    from replicator.transport import Shaper

T = TypeVar("T")
log = structlog.get_logger()

# How a command talks to its peer: --tls-dir (mutual TLS) or --insecure. Every command that
# connects to a peer or serves one takes these three (send, receive, verify; status and
# failback for their remote parts) and calls ``transport_security``.
TlsDirOption = Annotated[
    Path | None,
    typer.Option(
        "--tls-dir",
        help="Mutual TLS 1.3 with the keys `replicator keygen --out DIR` made: DIR's ca.crt "
        "and this side's certificate (sender.crt/.key or receiver.crt/.key).",
    ),
]
TlsNameOption = Annotated[
    str | None,
    typer.Option(
        "--tls-name",
        help="Use NAME.crt and NAME.key from --tls-dir instead (a `keygen --name NAME` one).",
    ),
]
TlsPeerOption = Annotated[
    str | None,
    typer.Option(
        "--tls-peer",
        help="The name the receiver's certificate must carry (default: receiver; a receiver "
        "run with --tls-name NAME presents NAME). Any other certificate of the CA is refused.",
    ),
]
InsecureOption = Annotated[
    bool,
    typer.Option(
        "--insecure/--no-insecure",
        help="No TLS or authentication (trusted networks only).",
        show_default=False,
    ),
]
NO_SECURITY = (
    "no --tls-dir: make keys with `replicator keygen --out DIR`, copy DIR's ca.crt and each "
    "side's certificate to that side, and pass --tls-dir DIR to both; or pass --insecure to "
    "replicate unencrypted and unauthenticated (only on a network you trust)"
)


def finite(value: float | None) -> float | None:
    """A seconds option's callback: nan and inf pass click's minimum (every comparison
    with nan is false) and ended the command later as a bug, or never woke it."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a number of seconds: give a finite number")
    return value


class UsageError(ConfigError):
    """A malformed option value: a bad command line (exit 2, as click's own usage errors),
    not a bad input such as a missing file (3). A ConfigError, so every handler of bad
    input handles it too."""

    exit_code = ExitCode.USAGE


def table_console(piped_width: int = 200) -> Console:
    """Where a command prints its table: the terminal's width on a terminal; piped (a log,
    ``| cat``), ``piped_width`` columns, so figures are not cut to "7…" at rich's default
    of 80."""
    from rich.console import Console  # rich's import costs every command's start

    console = Console()
    return console if console.is_terminal else Console(width=piped_width)


def parse_endpoint(value: str, option: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(
            f"{option} wants HOST:PORT (a port from 1 to 65535), got {value!r}",
            hint="e.g. 192.0.2.10:7400 or [2001:db8::1]:7400",
        )
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


def parse_in_flight_max(value: str | None) -> int:
    """``--in-flight-max``'s bytes (the default without one); also a receive config's
    ``in_flight_max`` (check-config)."""
    from replicator.engine.in_flight import IN_FLIGHT_MAX, MIN_IN_FLIGHT

    if value is None:
        return IN_FLIGHT_MAX
    limit = parse_size(value, "--in-flight-max")
    if limit < MIN_IN_FLIGHT:
        raise ConfigError(
            f"--in-flight-max {value} is too small: at least 4M (a Records frame is up to "
            "2 MiB, and each must fit while the one before it is synced)"
        )
    return limit


def connector_for(
    config: SenderConfig, tls: TlsIdentity | None = None, shaper: Shaper | None = None
) -> Connector:
    """Where the job's connections come from: the command line's one decision about them
    (TCP, with TLS around it when ``tls``, bulk frames shaped by ``shaper``; the connector
    owns them, so they survive reconnects)."""
    from replicator.engine.connectors import TcpConnector

    return TcpConnector(
        config.host, config.port, timeout=config.connect_timeout, tls=tls, shaper=shaper
    )


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (no DNS lookup: a name is not loopback)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def transport_security(
    *,
    tls_dir: Path | None,
    tls_name: str | None,
    insecure: bool,
    side: Literal["sender", "receiver"],
    host: str,
    tls_peer: str | None = None,
) -> TlsIdentity | None:
    """The TLS identity this side uses (its SSL context loaded once now, so missing or
    expired files fail the command at start), or None for --insecure. A sender's expects
    the receiver's certificate to be named ``tls_peer`` (``receiver`` by default).

    ``host`` is the peer's address (a sender) or the one listened on (a receiver):
    --insecure anywhere but on loopback is warned about loudly.
    """
    if tls_dir is not None and insecure:
        raise ConfigError(
            "--tls-dir and --insecure exclude each other", hint="keep --tls-dir: it is the safe one"
        )
    if tls_name is not None and tls_dir is None:
        raise ConfigError("--tls-name needs --tls-dir DIR (the folder holding NAME.crt)")
    if tls_peer is not None and tls_dir is None:
        raise ConfigError(
            "--tls-peer needs --tls-dir DIR: without TLS the receiver has no certificate name"
        )
    if tls_dir is None:
        if not insecure:
            raise ConfigError(NO_SECURITY)
        if not is_loopback(host):
            what = "listening on" if side == "receiver" else "sending to"
            risk = (
                "anyone who can reach this port can overwrite the replicas"
                if side == "receiver"
                else "the disk contents cross the network unencrypted, to whoever answers there"
            )
            log.warning("security.insecure", address=host, risk=risk)
            typer.echo(
                f"replicator: WARNING: --insecure while {what} {host}: no encryption and no "
                f"authentication; {risk}. Use --tls-dir (see `replicator keygen`) unless "
                "this network is trusted.",
                err=True,
            )
        return None
    from replicator.engine.tls import RECEIVER, SENDER, TlsIdentity

    server = side == "receiver"
    identity = TlsIdentity(
        tls_dir,
        tls_name or (RECEIVER if server else SENDER),
        server=server,
        peer=None if server else tls_peer or RECEIVER,
    )
    identity.load()
    return identity


def fail(error: BaseException) -> NoReturn:
    """Print one line naming what went wrong and what to do; exit with its code. What
    the message quotes (a path with a newline or an escape sequence in a folder's name)
    is shown escaped, as ``ls -b`` shows it: one line, nothing the terminal obeys."""
    if isinstance(error, ReplicatorError):
        code, text = int(error.exit_code), f"replicator: error: {printable(str(error))}"
        if json_logs():  # log collectors read the JSON lines: the end belongs there too
            log.error("command.failed", error=str(error), exit_code=code)
    else:  # a bug: without its traceback nobody can say where, so it is logged in any format
        code = int(ExitCode.BUG)
        text = (
            f"replicator: unexpected error: {type(error).__name__}: {printable(str(error))}\n"
            "  This is a bug in replicator; its traceback is logged above. Please report it "
            "with that and `replicator --version`."
        )
        log.error("command.failed", error=str(error), exit_code=code, exc_info=error)
    typer.echo(text, err=True)
    raise typer.Exit(code)


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
    exits 0); otherwise they cancel the work, which ends with exit code 130. SIGHUP (a
    closed terminal, or a `kill -HUP` meant as "reload") does as SIGTERM, and says so:
    it ended a sender at once, without a word.
    """
    keep_freed_buffers()  # bulk buffers reused, not faulted in afresh (engine/allocator.py)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        loop = runner.get_loop()
        stop = asyncio.Event()
        task_holder: list[asyncio.Task[T]] = []

        def on_signal() -> None:
            if graceful and not stop.is_set():
                stop.set()
            elif task_holder:
                task_holder[0].cancel()

        def on_hangup() -> None:
            log.warning(
                "signal.hangup",
                action="stopping as for SIGTERM: nothing is reloaded (TLS files are read "
                "again at each connection; other settings need a restart)",
            )
            on_signal()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        loop.add_signal_handler(signal.SIGHUP, on_hangup)

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
