"""The embedding API: run a sender or a receiver inside your own asyncio program.

A thin, stable façade over the engine for HA tooling (``docs/EMBEDDING.md`` is its manual).
It takes the configuration objects the command line builds (``SenderConfig``,
``ReceiverConfig``), runs on the caller's event loop, and hands out the engine's own
objects, never copies: ``Sender.status`` *is* the job status ``replicator status`` reads,
``Sender.engine`` the ``engine.sender.Sender`` that replicates.

::

    async with Receiver(ReceiverConfig(replicas, state)) as receiver:
        host, port = receiver.address
        config = SenderConfig(host, port, "vm1", resolve_volumes([disk]), sender_state)
        async with Sender(config, interval=5.0) as sender, sender.events() as events:
            async for event in events:
                if event.kind is EventKind.LAG and event.lag.records == 0:
                    break
            result = await sender.verify()

Events come from the engine as it changes (``engine/status.py`` ``Listeners``; on the
sender also each acknowledgement that moves the applied LSN, on the receiver each apply
round), not from polling files. Each ``StatusEvent`` carries the job's status snapshot (the
dict ``replicator status --json`` prints) taken as soon as the loop runs after the change.

What the façade adds is lifecycle only: ``async with`` (or ``start()``/``aclose()``,
idempotent), the folder locks and the control socket the CLI's ``send``/``receive`` hold,
the pause a sender takes while it verifies, and the fan-out of events to subscribers.

The sender's other choices are the ones ``send`` offers, as keywords: ``shaping`` (a
``Shaping`` from ``--rate``/``--burst``/``--schedule``/``--target-rpo`` as typed, its
schedule and pacer run while the façade is open), ``nbd`` (``NbdOptions``: capture
every write through NBD exports instead of scanning, as ``--capture nbd``) and ``fuse``
(``FuseOptions``: mount the VM folder through the journaling filter and capture every
change, as ``--capture fuse``); ``failback()`` is ``replicator failback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import structlog

from replicator.engine.connectors import Connector, MemoryConnector, TcpConnector, TlsSource
from replicator.engine.errors import (
    AuthError,
    BusyError,
    ConfigError,
    ConnectError,
    ExitCode,
    Interrupted,
    PeerProtocolError,
    RefusedError,
    ReplicaInconsistent,
    ReplicatorError,
    SplitBrainError,
    StorageError,
    TargetStorageError,
    VersionMismatch,
    cannot_listen,
    unwrap,
)
from replicator.engine.failback import FailbackResult, failback
from replicator.engine.failover import FailoverResult, finish_failover
from replicator.engine.generations import PromotedUnfinished
from replicator.engine.job_replica import JobReplica, ReceiverConfig, check_receiver_dirs
from replicator.engine.monitor import Monitor, receiver_monitor, sender_monitor
from replicator.engine.pacing import backlog_probe
from replicator.engine.receiver import Receiver as EngineReceiver
from replicator.engine.scan import Progress
from replicator.engine.sender import Sender as EngineSender
from replicator.engine.sender import SenderConfig, Summary
from replicator.engine.statedir import receiver_folder_locks
from replicator.engine.status import (
    ReceiverJobStatus,
    SenderJobStatus,
    SenderPhase,
    StatusBoard,
)
from replicator.engine.tls import TlsIdentity
from replicator.engine.verify import VerifyResult, verify
from replicator.engine.volumes import VolumeSpec, resolve_volumes
from replicator.journal.errors import JournalError
from replicator.transport import serve
from replicator.transport.schedule import SpecError
from replicator.transport.shaper import Shaping

if TYPE_CHECKING:  # live capture's modules are imported only when it is chosen
    from replicator.engine.fuse_folder import FuseOptions
    from replicator.engine.live import LiveSender, NbdOptions

log = structlog.get_logger()

Role = Literal["sender", "receiver"]
EVENT_BUFFER = 1024  # events kept per subscriber that does not read; older ones are dropped
# the Sender whose FUSE capture runs in this process: pyfuse3 keeps one session per process
_fuse_running: list[Sender] = []
# the state folders (real paths) of this process's open Senders, from their first start,
# run_once, verify or failback to aclose(): the engine locks a folder only while a run or
# a call holds it, so a second Sender (control=False: no claim) took it between the first
# one's start() and its run, or between two of its runs, and the first one's run failed
# (weak: a Sender dropped unclosed, with no run left, lets go of its folder)
_state_folders: weakref.WeakValueDictionary[str, Sender] = weakref.WeakValueDictionary()


class EventKind(StrEnum):
    """What an event reports (the status's ``CHANGES``, plus the end of a run)."""

    STATE = "state"  # the sender's phase changed (``SenderPhase``)
    CONNECTED = "connected"  # a session began (sender: connected; receiver: a sender came)
    DISCONNECTED = "disconnected"  # the session ended
    ERROR = "error"  # an error was counted (``snapshot["last_error"]`` says which)
    LAG = "lag"  # records journaled (sender), or applied on the receiver (both sides)
    JOB = "job"  # receiver: a job was opened (its first sender since start)
    # a sender's continuous run ended (stop(), aclose(), or ``error``; not a verify's
    # pause), or a receiver closed (its event has job "")
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Lag:
    """What the replica lacks: records not applied, bytes shipped and not applied (sender
    only), seconds since the source time of the oldest change not applied (sender: the RPO
    now; receiver: the age of the consistency point it holds, None before the first)."""

    records: int
    bytes: int | None
    seconds: float | None

    @classmethod
    def of(cls, snapshot: Mapping[str, Any]) -> Lag:
        lag = snapshot.get("lag") or {}
        return cls(int(lag.get("records", 0)), lag.get("bytes"), lag.get("seconds"))


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """One change of a job, with the job's status snapshot taken right after it.

    ``snapshot`` is the engine's own ``snapshot()`` of the job (keys documented in
    docs/OPERATIONS.md, "Status"); empty for a STOPPED event of a job never opened.
    """

    kind: EventKind
    job: str
    role: Role
    snapshot: Mapping[str, Any]
    error: ReplicatorError | None = None

    @property
    def state(self) -> str:
        """The job's state then (``SenderPhase`` or ``ReceiverPhase`` value)."""
        return str(self.snapshot.get("state", ""))

    @property
    def lag(self) -> Lag:
        return Lag.of(self.snapshot)

    @property
    def applied_lsn(self) -> int:
        return int((self.snapshot.get("lsn") or {}).get("applied", 0))


class EventStream:
    """An async iterator of ``StatusEvent``; it ends when the façade is closed.

    Subscribed from the moment ``events()`` returns. A reader that falls more than
    ``EVENT_BUFFER`` events behind loses the oldest (``dropped`` counts them). Use it as
    ``async with`` (or call ``close()``) to unsubscribe early.
    """

    def __init__(self, hub: _Hub) -> None:
        self._hub = hub
        self._queue: deque[StatusEvent] = deque()
        self._wake = asyncio.Event()
        self.closed = False
        self.dropped = 0

    def _put(self, event: StatusEvent) -> None:
        if len(self._queue) >= EVENT_BUFFER:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(event)
        self._wake.set()

    def _end(self) -> None:
        self.closed = True
        self._wake.set()

    def close(self) -> None:
        """Stop receiving events (the ones queued can still be read)."""
        self._hub.unsubscribe(self)
        self._end()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> StatusEvent:
        while not self._queue:
            if self.closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        return self._queue.popleft()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


StatusOf = Callable[[str], SenderJobStatus | ReceiverJobStatus | None]


class _Hub:
    """Fan-out of engine changes to event streams, coalesced per (job, kind) while a
    snapshot is being taken, so a burst of acknowledgements costs one snapshot."""

    def __init__(self, role: Role, status_of: StatusOf) -> None:
        self.role = role
        self._status_of = status_of
        self._streams: list[EventStream] = []
        self._pending: dict[tuple[str, EventKind], None] = {}  # an ordered set
        self._pump: asyncio.Task[None] | None = None
        self.ended = False

    def subscribe(self) -> EventStream:
        stream = EventStream(self)
        if self.ended:
            stream._end()
        else:
            self._streams.append(stream)
        return stream

    def unsubscribe(self, stream: EventStream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)

    def tell(self, job: str, what: str) -> None:
        """A status listener (``engine/status.py``): called inline by the engine."""
        if self.ended or not self._streams:
            return
        self._pending[(job, EventKind(what))] = None
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._deliver_pending())

    async def _deliver_pending(self) -> None:
        while self._pending:
            batch = list(self._pending)
            self._pending.clear()
            snapshots: dict[str, Mapping[str, Any]] = {}
            for job, kind in batch:
                if job not in snapshots:
                    snapshots[job] = await self._snapshot(job)
                self._publish(StatusEvent(kind, job, self.role, snapshots[job]))

    async def _snapshot(self, job: str) -> Mapping[str, Any]:
        status = self._status_of(job)
        if status is None:
            return {}
        try:
            return await status.snapshot()
        except Exception:  # a status that cannot be read must not end the events
            log.exception("api.snapshot_failed", job=job)
            return {"job": job, "role": self.role}

    def _publish(self, event: StatusEvent) -> None:
        for stream in tuple(self._streams):
            stream._put(event)

    async def _drain(self) -> None:
        """Until every change reported so far is delivered (one deliverer at a time)."""
        while True:
            if self._pump is not None and not self._pump.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._pump)
            elif self._pending:
                self._pump = asyncio.get_running_loop().create_task(self._deliver_pending())
            else:
                return

    async def publish_last(self, event: StatusEvent) -> None:
        """Publish ``event`` after every change reported before it."""
        if not self.ended:
            await self._drain()
            self._publish(event)

    async def end(self) -> None:
        """Deliver what is pending, then end every stream."""
        if self.ended:
            return
        await self._drain()
        self.ended = True
        for stream in self._streams:
            stream._end()
        self._streams.clear()


class _Tasks:
    """Background tasks of a façade, cancelled and awaited on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # a bug (each task handles what it expects): said now, not when asyncio
            # collects the task ("exception was never retrieved"), nor never
            log.error("api.task_failed", task=task.get_name(), exc_info=error)

    async def cancel(self) -> None:
        """Cancel them all and wait until they ended; a cancellation of the caller is not
        swallowed (``asyncio.wait`` raises only that, never what the tasks raised)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


async def _close_in(task: asyncio.Task[None], hurry: Callable[[], bool] | None = None) -> None:
    """Wait for a façade's closing ``task``, which its caller's cancellation does not
    interrupt: the release happens whatever happens to the caller. When the caller is
    cancelled meanwhile, ``hurry`` cuts the graceful part short (and says whether the
    release is near: False while it waits for another task's call to end), the release is
    waited for, and the cancellation propagates (an embedder's Ctrl-C or
    ``asyncio.timeout`` must not be swallowed). A second cancellation stops the waiting,
    never the release."""
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.done():
            raise
        if hurry is None or hurry():
            await asyncio.wait({task})
        raise


class Sender:
    """A sending job (snapshot-diff capture, as ``replicator send``) in this process.

    ``async with Sender(config)`` starts replicating every ``interval`` seconds (and
    reconnects after interruptions, as a continuous ``send``); leaving the block stops it
    gracefully (what is journaled is shipped and applied, waiting at most 30 s) and
    raises the error that ended the run, if one did. Without ``async with``: ``start()``,
    ``stop()``, ``aclose()``; or ``run_once()`` for one cycle.

    ``connector`` decides where connections go (default: TCP to ``config.host:port``,
    with ``tls`` around it: a ``TlsIdentity`` or an ``ssl.SSLContext``; None is insecure).
    ``control``: serve ``STATE_DIR/control.sock`` so ``replicator status --state-dir``
    sees this job (and claim ``sender.json``, as ``send`` does). ``metrics``: a
    Prometheus endpoint (HOST, PORT).

    ``shaping``: bandwidth shaping as ``--rate``/``--burst``/``--schedule``/``--target-rpo``
    (``shaping_from(rate="50Mbit", ...)``); its bucket goes to the default connector, its
    schedule and target-RPO pacer run from the first start (or ``run_once``) to
    ``aclose()``, and ``replicator rate --state-dir`` changes it (with ``control``).
    ``nbd``: NBD capture (``--capture nbd``): the disks are served at ``nbd.socket`` from
    ``start()`` on (after an initial sync) and every write is journaled before it is
    acknowledged; ``interval`` does not apply, ``run_once()`` is refused.
    ``fuse``: FUSE capture (``--capture fuse``), with ``config.volumes`` empty: the job's
    volumes are the files of ``fuse.source`` (walked again at each start; ``config.folder``
    is set). ``start()`` mounts that folder at ``fuse.mount`` after an initial sync; every
    change made through the mount is journaled before it is acknowledged; the mount is gone
    once the run ends (``stop()``, ``aclose()``, an error). The folder and the mount point
    (existing, empty, not mounted) are checked by the constructor (ConfigError). As with
    ``nbd``, ``interval`` does not apply and ``run_once()`` is refused. This loop serves the
    mount: use it from other processes or threads, never with blocking calls on the loop.
    One FUSE Sender per process runs at a time (pyfuse3 has one session per process).
    """

    def __init__(
        self,
        config: SenderConfig,
        *,
        interval: float = 60.0,
        connector: Connector | None = None,
        tls: TlsSource | ssl.SSLContext | None = None,
        control: bool = True,
        metrics: tuple[str, int] | None = None,
        shaping: Shaping | None = None,
        nbd: NbdOptions | None = None,
        fuse: FuseOptions | None = None,
    ) -> None:
        if not interval > 0:
            raise ConfigError(f"interval must be positive, got {interval!r}")
        for given, what in ((tls, "tls"), (shaping, "shaping's bucket")):
            if connector is not None and given is not None:
                raise ConfigError(f"give {what} to the connector, not to the Sender")
        if fuse is not None and nbd is not None:
            raise ConfigError("nbd and fuse are two ways of capturing: give one of them")
        if config.wait_for_receiver is not None and nbd is None:
            raise ConfigError(
                "wait_for_receiver applies to nbd capture: a scan serves nothing, and a "
                "fuse folder's layout is compared with the replica's listing"
            )
        if fuse is not None and config.volumes:
            raise ConfigError(
                f"with fuse, the volumes are the files of {fuse.source}: give SenderConfig "
                "volumes=[]"
            )
        self._own_connector = connector is None  # one passed in stays the caller's
        if connector is None:
            shaper = shaping.bucket if shaping is not None else None
            connector = TcpConnector(
                config.host, config.port, timeout=config.connect_timeout, tls=tls, shaper=shaper
            )
        self.interval = interval
        self.engine = EngineSender(config, connector)  # checks the job name (ConfigError)
        self.shaping = shaping
        self.nbd = nbd
        self.fuse = fuse
        if fuse is not None:  # before its checks: they would stat a mount this loop serves
            _check_fuse_free()
        if nbd is not None or fuse is not None:
            # an image that cannot be served, a folder or mount point that cannot be used
            # fail now (ConfigError); the status says "nbd" or "fuse"
            self._live()
        if shaping is not None:  # as sender_monitor does, also without the control socket
            self.engine.status.shaping = shaping
            shaping.probe = backlog_probe(self.engine.status)
        self._shaping_task: asyncio.Task[None] | None = None
        self._hub = _Hub("sender", lambda job: self.engine.status)
        self._monitor = sender_monitor(self.engine, metrics, shaping) if control else None
        self._monitoring = False
        self._tasks = _Tasks()
        self._run: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._acks: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()  # one of start/stop/verify/run_once at a time
        # the run verify() stops to start it again: it ends without a STOPPED event
        self._paused: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None  # aclose()'s work, once begun
        self._hurry = asyncio.Event()  # aclose() was cancelled: no graceful stop
        self._close_locked = False  # aclose()'s work runs (no other call holds _busy)
        self._state_folder = os.path.realpath(config.state_dir)  # its key in _state_folders
        self._unlisten = self.engine.status.listeners.add(self._changed)
        self.failure: ReplicatorError | None = None  # what ended the run, if anything did
        self._failure_tb: TracebackType | None = None  # its traceback then
        self._once_failure: BaseException | None = None  # the last run_once()'s error
        self.closed = False

    # -- the engine's own objects --------------------------------------------------------
    @property
    def config(self) -> SenderConfig:
        return self.engine.config

    @property
    def status(self) -> SenderJobStatus:
        """The live job status (the object ``replicator status`` and the metrics read)."""
        return self.engine.status

    async def snapshot(self) -> dict[str, Any]:
        """The job's status now: what ``replicator status --json`` prints for it."""
        return await self.engine.status.snapshot()

    @property
    def running(self) -> bool:
        """True while the continuous run is on (also while it reconnects)."""
        return self._run is not None and not self._run.done()

    def events(self) -> EventStream:
        """Subscribe to this job's events (see ``StatusEvent``)."""
        return self._hub.subscribe()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start replicating continuously; returns at once (events say when it connects).

        Raises ConfigError (exit code 3) when the state folder is in use by another sender
        or the control socket is another process's; RuntimeError when already running or
        closed."""
        async with self._busy:
            self._check_open()
            if self.running:
                if not self._stop.is_set():
                    raise RuntimeError("this Sender is already running")
                await self._halt()  # a cancelled stop()'s run, still stopping: its end
            with _user_errors():
                await asyncio.to_thread(_check_volumes, self.config)
                await self._enter_monitor()
            self._begin()

    def _begin(self, after: asyncio.Task[None] | None = None) -> None:
        """Start a continuous run; ``after``: a run still stopping (a verify's pause cut
        short), which holds the state folder until it ends: the new one waits for it."""
        if self.fuse is not None:
            _check_fuse_free()
            _fuse_running.append(self)
        self._stop = stop = asyncio.Event()
        self.failure = None
        self.engine.status.set_state(SenderPhase.STARTING)  # not "stopped" from a last run
        self._run = self._tasks.start(self._replicate(stop, after), f"api-sender-{self.config.job}")
        if self.fuse is not None:  # also when cancelled before it began
            self._run.add_done_callback(lambda _: self._fuse_done())

    async def _replicate(self, stop: asyncio.Event, after: asyncio.Task[None] | None) -> None:
        try:
            if after is not None:
                await asyncio.wait({after})
            if stop.is_set():
                pass  # stopped before it began
            elif self.nbd is not None or self.fuse is not None:
                # a new capture each run: its exports or mount do not restart
                await self._live().run(stop)
            else:
                await self.engine.run_forever(self.interval, stop)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.failure = _user_error(exc)
            self._failure_tb = self.failure.__traceback__
            log.error("api.sender_failed", job=self.config.job, error=str(self.failure))
        finally:
            self._fuse_done()
        if self._paused is not asyncio.current_task():
            await self._hub.publish_last(self._stopped_event())

    async def wait(self) -> None:
        """Wait until the continuous run ends (``stop()``, or an error, which is raised);
        a verify()'s pause is not an end: the run it starts again is waited for."""
        while (run := self._run) is not None:
            await asyncio.wait({run})  # the caller's cancellation propagates
            if self._paused is not run:
                break
            async with self._busy:  # the verify holds it until it started the run again
                pass
            if self._run is run:  # it did not (the run had failed): that is the end
                break
        if self.failure is not None:
            raise self._failed()

    async def stop(self) -> None:
        """Stop the continuous run gracefully (ships and waits for what is journaled, at
        most 30 s); raises the error that ended it, if one did. Idempotent. Cancelled
        meanwhile, it raises CancelledError and the run goes on stopping (``start()``
        waits for it)."""
        async with self._busy:
            await self._halt()
        if self.failure is not None:
            raise self._failed()

    async def _halt(self) -> None:
        """Ask the run to stop, wait until it ended (never raising what ended it: that is
        ``failure``); a cancellation of the caller propagates, the run stopping on."""
        run = self._run
        if run is None:
            return
        self._stop.set()
        await asyncio.wait({run})

    async def aclose(self) -> None:
        """Stop (as ``stop()``) and release everything: the control socket, the state
        folder's claim, the event streams (they end, after a STOPPED event when it was
        running). Never raises the run's error (``failure`` keeps it); safe to call any
        number of times (each waits until the first one's release is done). A
        ``connector`` passed in is left open (it is the caller's).

        Cancelled meanwhile (Ctrl-C, ``asyncio.timeout``), it stops the run at once
        instead of gracefully (what is journaled and not applied stays in the journal for
        the next start), releases everything all the same, then raises CancelledError."""
        self.closed = True
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(
                self._close(), name=f"api-close-{self.config.job}"
            )
        await _close_in(self._closing, self._hurry_close)

    def _hurry_close(self) -> bool:
        """aclose() was cancelled: no graceful stop; whether the release is near (not
        while a verify(), run_once() or failback() of another task holds the Sender: the
        release follows its end)."""
        self._hurry.set()
        return self._close_locked

    async def _close(self) -> None:
        async with self._busy:
            self._close_locked = True
            run = self._run
            if run is not None and not run.done():
                self._stop.set()
                hurry = asyncio.ensure_future(self._hurry.wait())
                try:  # the graceful stop, unless aclose() is cancelled first
                    await asyncio.wait({run, hurry}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    hurry.cancel()
            self._unlisten()
            await self._tasks.cancel()
            try:
                if self._monitoring and self._monitor is not None:
                    self._monitoring = False
                    # what ended the last run or cycle, for the claim's record (status)
                    failure = self.failure or self._once_failure
                    await self._monitor.__aexit__(
                        None if failure is None else type(failure), failure, None
                    )
            finally:
                if _state_folders.get(self._state_folder) is self:
                    del _state_folders[self._state_folder]
                if self._own_connector:
                    await self.engine.connector.aclose()
                await self._hub.end()

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
        if exc is None and self.failure is not None:
            raise self._failed()

    # -- one cycle, verify ----------------------------------------------------------------
    async def run_once(self, progress: Progress | None = None) -> Summary:
        """One cycle (as ``send --once``): scan, ship, wait until the receiver applied it.
        Only while not running continuously (RuntimeError otherwise)."""
        async with self._busy:
            self._check_open()
            if self.nbd is not None or self.fuse is not None:
                raise RuntimeError(
                    f"run_once() is scan capture's: with {self.status.capture}, start() and stop()"
                )
            if self.running:
                raise RuntimeError("run_once() while running continuously: stop() first")
            try:
                with _user_errors():
                    await self._enter_monitor()
                    await asyncio.to_thread(_check_volumes, self.config)
                    summary = await self.engine.run_once(progress)
            except BaseException as exc:
                self._once_failure = unwrap(exc)
                raise
            self._once_failure = None
            return summary

    async def failback(self) -> FailbackResult:
        """Take the job back from its promoted target (as ``replicator failback``): bring
        the volumes (the VM stopped on both sides) to the promoted replica's state, moving
        only what differs, and make the target a replica again, so ``start()`` or
        ``run_once()`` resume without a full copy. ``config.host:port`` is the target's
        receiver. Not while running (RuntimeError); safe to call again after an error."""
        async with self._busy:
            self._check_open()
            if self.running:
                raise RuntimeError("failback() while running: stop() first")
            with _user_errors():
                await self._enter_monitor()
                await asyncio.to_thread(_check_volumes, self.config)
                return await failback(self.config, self.engine.connector)

    async def verify(self, *, repair: bool = False) -> VerifyResult:
        """Compare sources and replicas afresh (as ``replicator verify``); ``repair`` sends
        what differs and compares again. A continuous run is paused meanwhile (stopped
        gracefully, so everything journaled is applied first, then started again): the
        receiver serves one session per job."""
        async with self._busy:
            self._check_open()
            resume = self.running and not self._stop.is_set()
            if resume and (self.nbd is not None or self.fuse is not None):
                what = "NBD exports" if self.nbd is not None else "FUSE mount"
                raise RuntimeError(
                    f"verify() would stop the {what} the VM uses: stop() first, or verify "
                    "the replica's consistency points with the receiver's status"
                )
            if resume:
                paused = self._paused = self._run
                try:
                    await self._halt()
                except asyncio.CancelledError:  # e.g. asyncio.timeout(): the run goes on
                    self._begin(after=paused)  # once the one stopping has let go
                    raise
                if self.failure is not None:
                    await self._hub.publish_last(self._stopped_event())
                    raise self._failed()
            else:  # a cancelled stop()'s run, still stopping: it lets go of the folder first
                await self._halt()
            try:
                with _user_errors():
                    await self._enter_monitor()
                    await asyncio.to_thread(_check_volumes, self.config)
                    folder = None
                    if self.fuse is not None:  # the folder as it is now, its layout too
                        from replicator.engine.fuse_folder import folder_job

                        config, source = self.engine.config, self.fuse.source
                        self.engine.config, folder = folder_job(config, source)
                    return await verify(self.engine, repair=repair, folder=folder)
            finally:
                if resume:
                    self._begin()

    # -- internals ------------------------------------------------------------------------
    def _failed(self) -> ReplicatorError:
        """``failure``, to raise (again): with the traceback it had when the run ended.
        Each raise of one exception object adds the raiser's frames to its traceback, and
        they keep their locals: a controller asking a failed Sender again and again (its
        ``wait()`` in a loop) grew it without end."""
        assert self.failure is not None
        return self.failure.with_traceback(self._failure_tb)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Sender is closed")

    async def _enter_monitor(self) -> None:
        """What runs from the first start to ``aclose()``: the state folder's claim in this
        process, the control socket, shaping."""
        self._claim_state_folder()
        if self._monitor is not None and not self._monitoring:
            await self._monitor.__aenter__()
            self._monitoring = True
        if self.shaping is not None and self._shaping_task is None:
            self._shaping_task = self._tasks.start(self.shaping.run(), "api-shaping")

    def _claim_state_folder(self) -> None:
        """ConfigError when another open Sender of this process uses the state folder."""
        holder = _state_folders.setdefault(self._state_folder, self)
        if holder is not self:
            raise ConfigError(
                f"a Sender of this process (job {holder.config.job!r}) already runs with "
                f"state folder {self.config.state_dir}",
                hint="it holds it until its aclose(), stopped or not: close that one first, "
                "or give this one a state folder of its own",
            )

    def _live(self) -> LiveSender:
        from replicator.engine.live import LiveSender, NbdCapture

        if self.fuse is not None:
            from replicator.engine.fuse_folder import fuse_folder_job

            # the folder as it is now (files made through the last mount are volumes now)
            self.engine.config, capture = fuse_folder_job(self.engine.config, self.fuse)
            return LiveSender(self.engine, capture)
        assert self.nbd is not None
        return LiveSender(self.engine, NbdCapture(self.config.volumes, self.nbd))

    def _fuse_done(self) -> None:
        """The run ended, its mount with it (``LiveSender.run`` stops its capture, which
        unmounts, whatever ended the run): another FUSE Sender may start."""
        if self in _fuse_running:
            _fuse_running.remove(self)

    def _changed(self, job: str, what: str) -> None:
        if what in ("connected", "disconnected"):
            self._watch_acks()
        self._hub.tell(job, what)

    def _watch_acks(self) -> None:
        """Follow the current link's applied acknowledgements (``Link.wait_applied``):
        each one that moves the applied LSN is a LAG event."""
        if self._acks is not None:
            self._acks.cancel()  # it ends when cancelled; _Tasks awaits it at close
            self._acks = None
        link = self.engine.status.link
        if link is None or self.closed:
            return
        job = self.config.job

        async def follow() -> None:
            while True:
                try:
                    await link.wait_applied(link.applied_lsn + 1)
                except Exception:  # the link failed: attach(None) reports its end
                    return
                self._hub.tell(job, "lag")

        self._acks = self._tasks.start(follow(), f"api-acks-{job}")

    def _stopped_event(self) -> StatusEvent:
        return StatusEvent(EventKind.STOPPED, self.config.job, "sender", {}, error=self.failure)


class Receiver:
    """A receiver (as ``replicator receive``) in this process: it locks the replica and
    state folders, listens on ``host:port`` (port 0: a free one, see ``address``), and
    serves senders until ``aclose()``, which finishes applying complete epochs first.

    ``tls``: a ``TlsIdentity`` (server side, from a keygen folder) or an ``ssl.
    SSLContext``; None is insecure. ``config.authorize`` takes the ``--allow`` rules.
    ``control``: serve ``STATE_ROOT/control.sock`` (``replicator status --dir``,
    ``replicator failover`` reach this receiver). ``metrics``: a Prometheus endpoint.
    """

    def __init__(
        self,
        config: ReceiverConfig,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsIdentity | ssl.SSLContext | None = None,
        control: bool = True,
        metrics: tuple[str, int] | None = None,
    ) -> None:
        if not 0 <= port < 65536:
            raise ConfigError(f"port must be 0..65535, got {port}")
        self.config = config
        self.host, self.port = host, port
        self._tls = tls
        self.engine = EngineReceiver(config)
        self._hub = _Hub("receiver", self.engine.status.jobs.get)
        self._monitor: Monitor | None = receiver_monitor(self.engine, metrics) if control else None
        self._stack = contextlib.AsyncExitStack()
        self._server: asyncio.Server | None = None
        self._tasks = _Tasks()
        self._unlisten: list[Callable[[], None]] = []
        self._closing: asyncio.Task[None] | None = None  # aclose()'s work, once begun
        # per job: its status's listener (undo) and the task following its replica's applies
        self._followed: dict[str, tuple[Callable[[], None], asyncio.Task[None] | None]] = {}
        self.started = False
        self.closed = False

    @property
    def status(self) -> StatusBoard:
        """The live status board: one ``ReceiverJobStatus`` per job opened since start."""
        return self.engine.status

    async def snapshot(self) -> dict[str, Any]:
        """Every job's status now (the jobs opened since start; ``replicator status``
        adds the others from their files)."""
        return await self.engine.status.snapshot()

    @property
    def address(self) -> tuple[str, int]:
        """The address listened on (the real port when 0 was asked for)."""
        if self._server is None:
            raise RuntimeError("the Receiver is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def events(self) -> EventStream:
        """Subscribe to the events of every job on this receiver."""
        return self._hub.subscribe()

    async def start(self) -> None:
        """Check and lock the folders, listen, serve the control socket. ConfigError (exit
        code 3) for a folder that cannot be used or is another receiver's, an address
        that cannot be listened on; RuntimeError when started twice or closed."""
        if self.closed or self.started:
            raise RuntimeError(f"this Receiver is {'closed' if self.closed else 'started'}")
        self.started = True
        config = self.config
        try:
            await asyncio.to_thread(check_receiver_dirs, config)
            for lock in receiver_folder_locks(config.state_root, config.replica_root):
                self._stack.enter_context(lock)
            self._unlisten.append(self.engine.status.listeners.add(self._job_added))
            tls = self._tls
            context = tls.context if isinstance(tls, TlsIdentity) else tls
            try:
                self._server = await serve(
                    self.host,
                    self.port,
                    self.engine.handle,
                    ssl=context,
                    on_refused=self.engine.status.refused_connection,
                )
            except OSError as exc:
                where = f"{self.host}:{self.port}"
                raise cannot_listen(
                    where, exc, who="receiver", option="the port (0: any free one)"
                ) from exc
            if self._monitor is not None:
                await self._stack.enter_async_context(self._monitor)
        except BaseException:
            await self.aclose()
            raise
        host, port = self.address
        log.info("api.receiver_listening", address=f"{host}:{port}")

    async def failover(
        self, job: str, *, exec_cmd: str | None = None, allow_inconsistent: bool = False
    ) -> FailoverResult:
        """Promote ``job`` here (as ``replicator failover --force`` through a running
        receiver): its session, if any, is ended; every complete epoch received is
        applied; the replicas must be at a consistency point (ReplicaInconsistent, exit
        code 6, otherwise), unless ``allow_inconsistent`` (``--allow-inconsistent``: taken
        as they are, and the result's ``consistent`` says False); configuration files are
        pointed at them; ``exec_cmd`` starts. ConfigError for an unknown job. Idempotent."""
        started = time.monotonic()
        if not self.started or self.closed:
            raise RuntimeError("failover needs a started Receiver (or engine.failover_at_rest)")
        promotion, already = await self.engine.failover(job, allow_inconsistent=allow_inconsistent)
        return await finish_failover(
            self.config, job, promotion, exec_cmd=exec_cmd, started=started, already=already
        )

    async def demote(self, job: str) -> int:
        """Give promoted ``job`` back to replication (as ``replicator demote
        --discard-changes``): the source's next ``--resync`` overwrites what differs.
        ConfigError for an unknown job or one not promoted; RefusedError while a session
        (a failback) holds it. Returns the job's generation."""
        if not self.started or self.closed:
            raise RuntimeError("demote needs a started Receiver (or engine.demote_at_rest)")
        return await self.engine.demote(job)

    async def aclose(self) -> None:
        """Stop listening, end the sessions, finish applying complete epochs, release the
        folders; the event streams end after a STOPPED event. Idempotent (each call waits
        until the first one's release is done). Cancelled meanwhile, it finishes the
        release all the same, then raises CancelledError."""
        self.closed = True
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(
                self._close(), name="api-receiver-close"
            )
        await _close_in(self._closing)

    async def _close(self) -> None:
        for unlisten in self._unlisten:
            unlisten()
        for unlisten, _ in self._followed.values():
            unlisten()
        server, self._server = self._server, None
        try:
            if server is not None:
                server.close()
            await self.engine.aclose()
            if server is not None:
                await server.wait_closed()
        finally:
            await self._tasks.cancel()
            await self._stack.aclose()  # the control socket, then the folder locks
            await self._hub.publish_last(StatusEvent(EventKind.STOPPED, "", "receiver", {}))
            await self._hub.end()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _job_added(self, job: str, what: str) -> None:
        """A job opened (first session since start, or reopened: after a failed apply, or
        closed while idle to make room for another and opened again): its changes become
        events, and so does each apply round. What followed the job's previous replica
        is let go first: it was kept, task and closed replica, once per reopening."""
        previous = self._followed.pop(job, None)
        if previous is not None:
            unlisten, follower = previous
            unlisten()
            if follower is not None:
                follower.cancel()  # _Tasks awaits it at close, if it has not ended by then
        status = self.engine.status.jobs.get(job)
        if isinstance(status, ReceiverJobStatus):
            unlisten = status.listeners.add(self._hub.tell)
            replica = status.replica
            follower = None
            if isinstance(replica, JobReplica):
                follower = self._tasks.start(self._follow_applies(replica), f"api-applies-{job}")
            self._followed[job] = (unlisten, follower)
        self._hub.tell(job, what)

    async def _follow_applies(self, replica: JobReplica) -> None:
        async with replica.applied_changed:
            while True:
                await replica.applied_changed.wait()
                self._hub.tell(replica.job, "lag")


def shaping_from(
    rate: str | None = None,
    burst: str | None = None,
    schedule: str | None = None,
    target_rpo: str | None = None,
) -> Shaping:
    """A ``Shaping`` from the words ``send`` takes: ``rate`` "50Mbit", "12MB/s" or
    "unlimited"; ``burst`` "256K"; ``schedule`` "mon-fri 08:00-18:00 20Mbit; * unlimited";
    ``target_rpo`` "30" or "5m". ConfigError (exit code 3) quoting a bad part."""
    try:
        return Shaping.from_options(rate, burst, schedule, target_rpo)
    except SpecError as exc:
        raise ConfigError(str(exc), hint="see docs/OPERATIONS.md, 'Bandwidth'") from None


def nbd_options(
    socket: str | os.PathLike[str], listen: tuple[str, int] | None = None, size: int | None = None
) -> NbdOptions:
    """NBD capture's options (``--nbd-socket``, ``--nbd-listen``, ``--nbd-size``)."""
    from replicator.engine.live import NbdOptions

    if size is not None and size < 1:
        raise ConfigError(f"the export size must be at least 1 byte, got {size}")
    return NbdOptions(os.fspath(socket), listen, size)


def _check_fuse_free() -> None:
    """ConfigError while a Sender of this process runs FUSE capture: pyfuse3 serves one
    mount per process, and this loop serves it (a check that looked at it would wait on
    itself)."""
    if _fuse_running:
        raise ConfigError(
            f"a Sender of this process runs FUSE capture (job {_fuse_running[0].config.job}): "
            "one FUSE mount per process",
            hint="stop that Sender first, or run the other job as a `replicator send` process",
        )


def fuse_options(source: str | os.PathLike[str], mount: str | os.PathLike[str]) -> FuseOptions:
    """FUSE capture's options: the VM folder (``send --capture fuse``'s one VOLUME) and
    where it is mounted (``--mount``). ConfigError when ``source`` is not a folder."""
    from replicator.engine.fuse_folder import FuseOptions, folder_source

    folder = Path(source)
    folder_source([folder], f"fuse capture mounts a folder: {folder} is not one")
    return FuseOptions(folder, Path(mount))


def _user_error(exc: BaseException) -> ReplicatorError:
    """The ``ReplicatorError`` (with its exit code) for whatever ended a run or a call:
    the CLI's mapping (``unwrap``: an OSError is a StorageError, exit code 9); anything
    else is a bug, exit code 70 as the CLI's (``ExitCode.BUG``), its cause kept."""
    error = unwrap(exc)
    if isinstance(error, ReplicatorError):
        return error
    wrapped = ReplicatorError(
        f"internal error: {type(error).__name__}: {error}",
        hint="a bug in replicator: please report it with the log and `replicator --version`",
    )
    wrapped.exit_code = ExitCode.BUG
    wrapped.__cause__ = error
    return wrapped


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Around the engine's work in a façade call: what escapes is a ``ReplicatorError``
    (``_user_error``), never a raw OSError, KeyError or ExceptionGroup; a cancellation
    and misuse (RuntimeError, raised before the engine runs) pass as they are."""
    try:
        yield
    except ReplicatorError:
        raise
    except Exception as exc:
        error = _user_error(exc)
        raise error from (error.__cause__ or exc)  # the error itself, out of its group


def _check_volumes(config: SenderConfig) -> None:
    """The job's volumes are still there and still files, as ``send`` checks them at each
    start (a thread's call): a disk removed since ``resolve_volumes`` is a ConfigError
    naming it (exit code 3), not a raw FileNotFoundError from deep in a scan. A FUSE job's
    volumes are walked again from its folder instead."""
    if config.volumes and not config.folder:
        resolve_volumes([v.path for v in config.volumes])


__all__ = [
    "EVENT_BUFFER",
    "AuthError",
    "BusyError",
    "ConfigError",
    "ConnectError",
    "Connector",
    "EventKind",
    "EventStream",
    "ExitCode",
    "FailbackResult",
    "FailoverResult",
    "Interrupted",
    "JournalError",
    "Lag",
    "MemoryConnector",
    "PeerProtocolError",
    "PromotedUnfinished",
    "Receiver",
    "ReceiverConfig",
    "RefusedError",
    "ReplicaInconsistent",
    "ReplicatorError",
    "Sender",
    "SenderConfig",
    "Shaping",
    "SplitBrainError",
    "StatusEvent",
    "StorageError",
    "Summary",
    "TargetStorageError",
    "TcpConnector",
    "TlsIdentity",
    "VerifyResult",
    "VersionMismatch",
    "VolumeSpec",
    "fuse_options",
    "nbd_options",
    "resolve_volumes",
    "shaping_from",
]
