"""The quiesce hooks around a scan: ``--pre-hook`` (freeze) and ``--post-hook`` (thaw).

What an operator relies on, because a guest left frozen is an outage of its own:

- **The thaw runs after every freeze that was tried**: the scan succeeded or failed, and
  also when the freeze itself failed, timed out or was interrupted (a script may have
  frozen part of the guest before it failed). So the post hook must be harmless on a guest
  that is not frozen (``virsh domfsthaw`` is); ``REPLICATOR_PRE_RESULT`` tells it.
- **Every hook is bounded** (``timeout``): one that runs longer is killed with its process
  group and counts as failed, so a hung guest agent never holds replication, or the guest
  frozen, for ever.
- **Hooks run in a session of their own**: a Ctrl-C in the sender's terminal does not
  reach a thaw half-way, and a thaw still running when the sender is stopped finishes.
- **Their output is the log's**, not the command's: kept in a file (its last
  ``OUTPUT_KEPT`` bytes are logged), so ``send --once --json`` prints only its summary on
  stdout, and a failure's message carries the hook's last words ("error: Guest agent is not
  responding").

A failed freeze means no consistency point this cycle (``HookFailed``: ``send --once``
exits 3; a continuous sender says so in its log and status and tries again at the next
interval). A failed thaw does not undo the scan, which was taken frozen: it is reported
(``Quiesce.thaw_failure``) and ``send --once`` exits 3 after its summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import BinaryIO, NoReturn

import structlog

from replicator.engine.errors import ConfigError
from replicator.engine.scan import CycleStopped

log = structlog.get_logger()

HOOK_TIMEOUT = 60.0  # seconds; a freeze of a busy guest takes seconds, not minutes
LONG_FREEZE = 10.0  # seconds frozen past which the log warns (a guest's I/O may time out)
OUTPUT_KEPT = 4096  # bytes of a hook's output kept for the log (its end)

_HINT = {
    "pre": "fix the pre hook (run it by hand as the sender's user) or the guest it freezes "
    "(is its agent running?); no consistency point is taken while it fails",
    "post": "the guest may still be frozen: thaw it now (e.g. `virsh domfsthaw VM`), then fix "
    "the post hook",
}


class HookFailed(ConfigError):
    """A hook exited non-zero, could not be started, or ran past its timeout."""

    def __init__(self, phase: str, command: str, why: str, output: str) -> None:
        last = output.strip().splitlines()[-1:] if output.strip() else []
        said = f"; it said: {last[0][:300]}" if last else ""
        super().__init__(f"{phase} hook {why}: {command}{said}", hint=_HINT[phase])
        self.phase = phase


@dataclass
class Quiesce:
    """The hooks of one sender; ``frozen()`` brackets each scan."""

    pre: str | None
    post: str | None
    job: str
    timeout: float = HOOK_TIMEOUT
    # the last thaw's failure, until a thaw succeeds (the caller reports it)
    thaw_failure: HookFailed | None = field(default=None, init=False)
    frozen_seconds: float | None = field(default=None, init=False)  # the last freeze's
    # a continuous sender's stop: a freeze under way when it is set is killed (CycleStopped)
    # and the thaw runs, rather than holding the stop for up to the hook's timeout
    stop: asyncio.Event | None = field(default=None, init=False)

    @property
    def freezes(self) -> bool:
        """A pre hook is set (an empty command is none)."""
        return bool(self.pre)

    @contextlib.asynccontextmanager
    async def frozen(self) -> AsyncIterator[None]:
        """Run the pre hook, the body, then the post hook (see the module docstring)."""
        try:
            await self._run("pre", self.pre)
        except BaseException:  # failed, timed out or interrupted: thaw what it may have frozen
            await self._thaw("failed")
            raise
        frozen_at = time.monotonic()
        try:
            yield
        finally:
            self._frozen_for(time.monotonic() - frozen_at)
            await self._thaw("ok")

    def _frozen_for(self, seconds: float) -> None:
        """Say how long the guest was frozen; warn when its I/O may have timed out."""
        if not self.freezes:
            return
        self.frozen_seconds = round(seconds, 3)
        log.info("sender.frozen", seconds=self.frozen_seconds)
        if seconds > LONG_FREEZE:
            log.warning(
                "sender.long_freeze",
                seconds=round(seconds, 3),
                problem=f"the guest was frozen for {seconds:.0f} s: a frozen scan reads every "
                "image whole; a guest's I/O may time out meanwhile",
                hint="capture with --capture nbd or --capture fuse, which journal every write "
                "and need no freeze; or fewer images per job",
            )

    async def _thaw(self, pre_result: str) -> None:
        try:
            await self._run("post", self.post, pre_result)
        except HookFailed as exc:
            self.thaw_failure = exc
            return
        self.thaw_failure = None

    async def _run(self, phase: str, command: str | None, pre_result: str = "") -> None:
        if not command:
            return
        env = dict(os.environ, REPLICATOR_JOB=self.job, REPLICATOR_HOOK=phase)
        if pre_result:
            env["REPLICATOR_PRE_RESULT"] = pre_result
        started = time.monotonic()
        # a file, not a pipe: nothing to read while it runs, and a thaw left running when
        # the sender stops (or a child the hook started) never meets a closed pipe
        with tempfile.TemporaryFile() as out:
            try:
                proc = await asyncio.create_subprocess_shell(
                    command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                )
            except OSError as exc:
                self._failed(HookFailed(phase, command, f"could not be started ({exc})", ""))
            try:
                async with asyncio.timeout(self.timeout):
                    rc = await self._wait(proc, phase)
            except TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                why = f"did not finish within {self.timeout:g} s (killed)"
                self._failed(HookFailed(phase, command, why, _tail(out)))
            except asyncio.CancelledError:
                if phase == "pre":  # stopping: the freeze goes, the thaw (run next) stays
                    _kill_group(proc.pid)
                else:
                    log.warning("sender.hook_left_running", hook=phase, pid=proc.pid)
                raise
            output = _tail(out)
        if rc != 0:
            why = f"failed with exit code {rc}" if rc > 0 else f"was killed by signal {-rc}"
            self._failed(HookFailed(phase, command, why, output))
        seconds = round(time.monotonic() - started, 3)
        log.info("sender.hook_ran", hook=phase, seconds=seconds, output=output or None)

    async def _wait(self, proc: asyncio.subprocess.Process, phase: str) -> int:
        """The hook's exit status; a freeze is given up (killed, CycleStopped) as soon
        as the sender is asked to stop: a thaw is never cut short."""
        stop = self.stop
        if phase != "pre" or stop is None:
            return await proc.wait()
        waiting = asyncio.ensure_future(proc.wait())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if waiting.done():
            return waiting.result()
        _kill_group(proc.pid)
        await waiting
        log.warning("sender.hook_stopped", hook=phase, why="the sender is stopping")
        raise CycleStopped("stopped while the pre hook ran")

    @staticmethod
    def _failed(exc: HookFailed) -> NoReturn:
        log.error("sender.hook_failed", hook=exc.phase, error=exc.message, hint=exc.hint)
        raise exc


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(out: BinaryIO) -> str:
    """The end of what the hook wrote (``OUTPUT_KEPT`` bytes at most)."""
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - OUTPUT_KEPT))
    return out.read().decode(errors="replace").strip()


__all__ = ["HOOK_TIMEOUT", "LONG_FREEZE", "HookFailed", "Quiesce"]
