"""What a running ``send`` or ``receive`` offers to watch it: the control socket, always,
and the Prometheus endpoint, when ``--metrics-listen`` asks for it. Both read the process's
``StatusBoard`` (engine/status.py) when asked, and nothing else.

* a sender: ``STATE_DIR/control.sock``, after claiming ``STATE_DIR/sender.json`` (one
  sender per state folder; see engine/control.py);
* a receiver: ``STATE_ROOT/control.sock`` (``DIR/.replicator`` by default), started once
  the receiver holds its folders' locks.

A control socket that cannot be made (a file system without sockets, say) is logged and
left out: replication matters more than its status, and ``replicator status`` then reads
the files at rest. A live socket of another process is an error (``ControlBusy``), and so
is a metrics address that cannot be listened on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog

from replicator.engine.at_rest import NOT_RUNNING, receiver_jobs_at_rest
from replicator.engine.control import (
    SOCKET_NAME,
    ControlBusy,
    ControlServer,
    Handler,
    RequestError,
    SenderClaim,
)
from replicator.engine.errors import ExitCode, ReplicatorError, unwrap
from replicator.engine.pacing import backlog_probe
from replicator.engine.status import StatusBoard
from replicator.engine.tls import TlsIdentity
from replicator.transport.schedule import SpecError, parse_rate
from replicator.transport.shaper import Shaping

if TYPE_CHECKING:
    from replicator.engine.metrics import MetricsServer
    from replicator.engine.receiver import Receiver
    from replicator.engine.sender import Sender

log = structlog.get_logger()


class Monitor:
    """An async context: claim (sender), control socket, metrics; undone in reverse."""

    def __init__(
        self,
        board: StatusBoard,
        state_dir: Path,
        *,
        owner: str,
        metrics: tuple[str, int] | None = None,
        claim: SenderClaim | None = None,
        at_rest: Callable[[set[str]], list[dict[str, Any]]] | None = None,
        handlers: dict[str, Handler] | None = None,
    ) -> None:
        """``at_rest(known)``: the jobs the board does not have yet, read from their files
        (a receiver opens a job when its sender first connects)."""
        self.board = board
        self.at_rest = at_rest
        self.state_dir = state_dir
        self.owner = owner
        self.claim = claim
        self.control: ControlServer | None = ControlServer(
            state_dir / SOCKET_NAME, {"status": self._status, **(handlers or {})}, owner=owner
        )
        self.metrics: MetricsServer | None = None
        if metrics:  # prometheus-client is imported only when asked for (start-up time)
            from replicator.engine.metrics import Metrics, MetricsServer

            self.metrics = MetricsServer(Metrics.of(board), *metrics)

    async def __aenter__(self) -> Monitor:
        if self.claim is not None:
            self.claim.__enter__()
        try:
            await self._start_control()
            if self.metrics is not None:
                await self.metrics.start()
        except BaseException as exc:
            # a start that failed before anything ran: the claim is undone, not recorded
            # as a run (status would show a job that never ran, or lose the last run's end)
            claim, self.claim = self.claim, None
            try:
                await self.__aexit__(type(exc), exc, None)
            finally:
                if claim is not None:
                    claim.abandon()
            raise
        return self

    async def _start_control(self) -> None:
        control = self.control
        assert control is not None
        if self.claim is not None and not self.claim.held:
            self.control = None  # without the claim the socket is not ours to replace
            log.warning(
                "control.unavailable",
                path=str(control.path),
                reason="the state folder's sender.json could not be locked",
            )
            return
        try:
            await control.start()
        except ControlBusy:
            raise
        except OSError as exc:
            self.control = None
            log.warning(
                "control.unavailable",
                path=str(control.path),
                error=str(exc),
                hint="`replicator status` reads the files at rest instead",
            )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        """``exc``: what ended the command, if anything did; a sender's claim records it
        (``SenderClaim.record_end``) for ``status`` at rest."""
        try:
            if self.metrics is not None:
                await self.metrics.aclose()
            if self.control is not None:
                await self.control.aclose()
        finally:
            if self.claim is not None:
                self.claim.record_end(None if exc is None else unwrap(exc))
                self.claim.__exit__(None, None, None)

    async def _status(self, request: dict[str, Any]) -> dict[str, Any]:
        job = request.get("job")
        if job is not None and not isinstance(job, str):
            raise RequestError('"job" is a job name')
        snapshot = await self.board.snapshot()
        if self.at_rest is not None:
            known = {j["job"] for j in snapshot["jobs"]}
            with contextlib.suppress(Exception):  # the live jobs are the answer that matters
                more = await asyncio.to_thread(self.at_rest, known)
                for entry in more:
                    if entry["state"] == NOT_RUNNING:
                        entry["state"] = "idle"  # no sender since this receiver started
                snapshot["jobs"] = sorted([*snapshot["jobs"], *more], key=lambda j: j["job"])
        if job is not None:
            snapshot["jobs"] = [j for j in snapshot["jobs"] if j.get("job") == job]
        snapshot["state_dir"] = str(self.state_dir)
        return snapshot


def sender_monitor(
    sender: Sender, metrics: tuple[str, int] | None = None, shaping: Shaping | None = None
) -> Monitor:
    """The monitor of a ``send`` process: its one job on a board of its own; with
    ``shaping``, the ``rate`` op changes its rate while it runs."""
    config = sender.config
    handlers: dict[str, Handler] = {}
    if shaping is not None:
        sender.status.shaping = shaping
        shaping.probe = backlog_probe(sender.status)  # --target-rpo's pacer reads the lag

        async def rate(request: dict[str, Any]) -> dict[str, Any]:
            text = request.get("rate")
            if not isinstance(text, str):
                raise RequestError('"rate" is a rate such as "50Mbit" or "unlimited"')
            try:
                shaping.set_rate(parse_rate(text))
            except SpecError as exc:
                raise RequestError(str(exc)) from None
            log.info("sender.rate_changed", job=config.job, rate=text)
            return shaping.status()

        handlers["rate"] = rate
    board = StatusBoard("sender")
    board.add(config.job, sender.status)
    tls = getattr(sender.connector, "tls", None)  # TcpConnector's: what it presents
    board.tls = tls if isinstance(tls, TlsIdentity) else None
    claim = SenderClaim(
        config.state_dir,
        {
            "job": config.job,
            "peer": sender.connector.target,
            "capture": sender.status.capture,
            "volumes": [v.name for v in config.volumes],
        },
    )
    owner = f"a sender for job {config.job!r}"
    return Monitor(
        board, config.state_dir, owner=owner, metrics=metrics, claim=claim, handlers=handlers
    )


def _refusal(exc: ReplicatorError | OSError) -> dict[str, Any]:
    """An operation that did not happen (or did not finish: PromotedUnfinished), and why,
    with its exit code: a full or failing
    disk (OSError) as the command at rest says it (``local storage error``, exit 9), not as
    a failed request (exit 3) with a traceback in the receiver's log."""
    mapped = unwrap(exc)
    code = mapped.exit_code if isinstance(mapped, ReplicatorError) else ExitCode.STORAGE
    return {"error": str(mapped), "exit_code": int(code)}


def receiver_monitor(receiver: Receiver, metrics: tuple[str, int] | None = None) -> Monitor:
    """The monitor of a ``receive`` process (call it once the receiver's folders are locked)."""
    state_root = receiver.config.state_root

    async def failover(request: dict[str, Any]) -> dict[str, Any]:
        job, command = request.get("job"), request.get("exec")
        planned, timeout = request.get("planned", False), request.get("wait", 60)
        if not isinstance(job, str) or not (command is None or isinstance(command, str)):
            raise RequestError('"job" is a job name, "exec" a command or null')
        if not isinstance(planned, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise RequestError('"planned" is a bool, "timeout" a number of seconds')
        allow_inconsistent = request.get("allow_inconsistent", False)
        if not isinstance(allow_inconsistent, bool):
            raise RequestError('"allow_inconsistent" is a bool')
        from replicator.engine.failover import finish_failover  # only when asked

        started = time.monotonic()
        try:  # a refusal is an answer (with its exit code), not a failed request
            if planned:
                promotion, already = await receiver.failover_planned(job, float(timeout))
            else:
                promotion, already = await receiver.failover(
                    job, allow_inconsistent=allow_inconsistent
                )
        except (ReplicatorError, OSError) as exc:  # e.g. not at a consistency point (exit 6)
            return _refusal(exc)
        try:
            result = await finish_failover(
                receiver.config, job, promotion, exec_cmd=command, started=started, already=already
            )
        except ReplicatorError as exc:  # promoted, a later step failed: the error says so
            return _refusal(exc)
        return result.as_dict()

    async def demote(request: dict[str, Any]) -> dict[str, Any]:
        job = request.get("job")
        if not isinstance(job, str):
            raise RequestError('"job" is a job name')
        try:  # a refusal is an answer (with its exit code), not a failed request
            return {"job": job, "generation": await receiver.demote(job)}
        except (ReplicatorError, OSError) as exc:
            return _refusal(exc)

    return Monitor(
        receiver.status,
        state_root,
        owner="a receiver",
        metrics=metrics,
        at_rest=lambda known: receiver_jobs_at_rest(
            state_root, known, receiver.config.replica_root
        ),
        handlers={"failover": failover, "demote": demote},
    )
