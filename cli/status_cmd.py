"""``replicator status``: what a sender or receiver is doing, or what its files say.

Asks the running process through its control socket (engine/control.py); when nothing
answers, reads the state folder at rest (engine/at_rest.py) and says so. ``--watch`` asks
again every second until Ctrl-C.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from replicator.cli.common import fail, table_console
from replicator.engine.at_rest import (
    is_receiver_job_state,
    is_receiver_state,
    is_sender_state,
    receiver_at_rest,
    sender_at_rest,
)
from replicator.engine.control import (
    SENDER_CLAIM,
    SOCKET_NAME,
    ControlUnavailable,
    claim_held,
    read_claim,
    request,
)
from replicator.engine.errors import ConfigError, ExitCode, ReplicatorError
from replicator.engine.names import RECEIVER_STATE_NAME, printable
from replicator.engine.source_clock import WARN_OFFSET_SECONDS
from replicator.engine.statedir import default_state_dir
from replicator.engine.status import SILENT_AFTER
from replicator.engine.units import human_size

WATCH_INTERVAL = 1.0
_GIVE_STATE_DIR = (
    "give the --state-dir the sender runs with (default ~/.local/state/replicator/send/JOB, "
    "or /var/lib/replicator/send/JOB as root)"
)
AT_REST = "not running (read from files at rest)"


def status_command(
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="A sender's state folder; with --dir, the receiver's (default DIR/.replicator).",
        ),
    ] = None,
    directory: Annotated[
        Path | None, typer.Option("--dir", help="A receiver's --dir (its replicas).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh every second until Ctrl-C.")
    ] = False,
) -> None:
    """Show a sender's (--state-dir) or a receiver's (--dir) jobs: state, LSNs, lag, traffic."""
    if state_dir is None and directory is None:
        senders = _default_senders()
        typer.echo(
            "replicator: error: say whose status: --state-dir S for a sender, "
            "--dir DIR [--state-dir S] for a receiver (see `replicator status -h`)"
            + (
                "; senders that ran here with the default --state-dir: "
                + ", ".join(f"`replicator status --state-dir {s}`" for s in senders)
                if senders
                else ""
            ),
            err=True,
        )
        raise typer.Exit(ExitCode.USAGE)
    try:
        if not watch:
            _show(status_snapshot(state_dir, directory), as_json, _console())
            return
        _watch(*_where(state_dir, directory), directory, as_json)
    except ReplicatorError as exc:
        fail(exc)


def status_snapshot(state_dir: Path | None, directory: Path | None) -> dict[str, Any]:
    """What ``status --json`` prints for a sender's ``state_dir`` or a receiver's
    ``directory`` (and its ``state_dir``): the live status, else the files at rest.
    Raises ReplicatorError (a ConfigError naming what to give instead) where the command
    exits with an error."""
    role, root = _where(state_dir, directory)
    return _fetch(role, root, directory)


def _where(state_dir: Path | None, directory: Path | None) -> tuple[str, Path]:
    if directory is None:
        assert state_dir is not None
        if not state_dir.is_dir():
            what = "is not a folder" if state_dir.exists() else "does not exist"
            raise ConfigError(f"sender state folder {state_dir} {what}", hint=_GIVE_STATE_DIR)
        receiver = (
            is_receiver_job_state(state_dir)
            or is_receiver_state(state_dir)
            or is_receiver_state(state_dir / RECEIVER_STATE_NAME)
        )
        if receiver:
            raise ConfigError(
                f"{state_dir} is a receiver's folder, not a sender's state folder",
                hint="for a receiver's status give `--dir DIR`, the folder `replicator receive "
                "--dir` was given (and its --state-dir, if it was given one)",
            )
        if not is_sender_state(state_dir):
            held = sorted(sub.name for sub in state_dir.iterdir() if is_sender_state(sub))
            raise ConfigError(
                f"{state_dir} is not a sender's state folder (it has no {SENDER_CLAIM}, "
                "journal or manifests)",
                hint=f"it holds the state folders of {', '.join(held)}: give one of them"
                if held
                else _GIVE_STATE_DIR,
            )
        return "sender", state_dir
    if not directory.is_dir():
        raise ConfigError(
            f"receiver folder {directory} does not exist",
            hint="give the --dir that `replicator receive` was started with",
        )
    root = state_dir or directory / RECEIVER_STATE_NAME
    if state_dir is not None and is_sender_state(state_dir):
        raise ConfigError(
            f"{state_dir} is a sender's state folder: with --dir, --state-dir is the receiver's",
            hint="a sender's status: `replicator status --state-dir S` alone",
        )
    if state_dir is None and _ran_a_sender(directory):  # as --state-dir refuses --dir's
        raise ConfigError(
            f"{directory} is a sender's state folder, not a receiver's folder",
            hint=f"for a sender's status give `--state-dir {directory}`",
        )
    if not root.is_dir():
        senders = sorted(sub for sub in directory.iterdir() if _ran_a_sender(sub))
        raise ConfigError(
            f"no receiver state in {root}",
            hint="it holds senders' state folders: for a sender's status give --state-dir "
            + " or ".join(str(sub) for sub in senders)
            if senders and state_dir is None
            else "has `replicator receive --dir DIR` run here? if it was given --state-dir, "
            "give that here too",
        )
    return "receiver", root


def _default_senders() -> list[Path]:
    """The state folders of senders that ran with the default --state-dir (this user's:
    /var/lib/replicator/send/JOB as root), which a `send` without --state-dir never names."""
    root = default_state_dir("send", "job").parent
    try:
        return sorted(sub for sub in root.iterdir() if _ran_a_sender(sub))
    except OSError:
        return []


def _ran_a_sender(folder: Path) -> bool:
    """A sender's state folder by what only a sender leaves (its claim, its manifests),
    not by a ``journal`` folder alone, which a source checkout has too: for hints."""
    return is_sender_state(folder) and any(
        (folder / name).exists() for name in (SENDER_CLAIM, "manifests.state")
    )


def _fetch(role: str, root: Path, directory: Path | None) -> dict[str, Any]:
    """The live status from the process, else the files at rest (saying which; a
    receiver's replica files in ``directory`` compared with their stamps)."""
    path = root / SOCKET_NAME
    try:
        snapshot = request(path, "status", timeout=5.0)
    except ControlUnavailable as exc:
        reason, taker = str(exc), exc.pid
    else:
        if not isinstance(snapshot, dict):
            raise ConfigError(
                f"the process behind {path} gave an answer that is not a status",
                hint="is another program using this socket?",
            )
        snapshot.update(running=True, source="process", note=None)
        return snapshot
    rest = sender_at_rest(root) if role == "sender" else receiver_at_rest(root, directory)
    rest["source"] = "files"
    # running, but not answering (stopped, stuck): a sender holds its claim (and names its
    # pid there); a receiver took the connection to its control socket
    pid: object = None
    if role == "sender" and claim_held(root):
        pid = (read_claim(root) or {}).get("pid")
    elif role == "receiver" and taker is not None:
        pid = taker
    else:
        rest["note"] = AT_REST
        return rest
    rest["running"] = True
    rest["note"] = (
        f"a {role} runs{f' (pid {pid})' if pid else ''} but does not answer on its control "
        f"socket ({reason}); read from files at rest"
    )
    return rest


def _watch(role: str, root: Path, directory: Path | None, as_json: bool) -> None:
    from rich.live import Live

    # Ctrl-C (or SIGTERM) ends the watch; the entry point's early handler would exit 130
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    console = _console()
    try:
        if as_json or not console.is_terminal:  # piped: a table (or an object) per second
            while True:
                _show(_fetch(role, root, directory), as_json, console)
                time.sleep(WATCH_INTERVAL)
        with Live(
            _render(_fetch(role, root, directory)), console=console, auto_refresh=False
        ) as live:
            while True:
                time.sleep(WATCH_INTERVAL)
                live.update(_render(_fetch(role, root, directory)), refresh=True)
    except KeyboardInterrupt:
        raise typer.Exit(ExitCode.OK) from None


def _console() -> Console:
    """The terminal's width on a terminal; wide enough for a row per job otherwise."""
    return table_console(200)


def _show(snapshot: dict[str, Any], as_json: bool, console: Console) -> None:
    if as_json:
        typer.echo(json.dumps(snapshot, sort_keys=True))
    elif console.is_terminal:
        console.print(_render(snapshot))
    else:  # a pipe or a file: the grid's padding would end every line in spaces
        with console.capture() as captured:
            console.print(_render(snapshot))
        typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


# -- the table -------------------------------------------------------------------------------


def _render(snap: dict[str, Any]) -> Group:
    role = snap.get("role", "?")
    if snap.get("source") == "process":
        head = Text(
            f"{role}, pid {snap.get('pid')}, up {_duration(snap.get('uptime_seconds'))}"
            f" (state folder {printable(str(snap.get('state_dir')))})",
            style="bold",
        )
    else:
        folder = printable(str(snap.get("state_dir")))
        head = Text(f"{role}: {snap.get('note')} (state folder {folder})")
        head.stylize("bold yellow", 0, len(role) + 2 + len(str(snap.get("note"))))
    tls = _tls(snap.get("tls"))
    heads = [head] if tls is None else [head, tls]
    budget = snap.get("in_flight")
    if isinstance(budget, dict) and budget.get("waits"):
        heads.append(
            Text(
                f"in-flight budget: {budget['waits']} waits since start (peak "
                f"{_bytes(budget.get('peak'))} of {_bytes(budget.get('limit'))}): the "
                "receiver's disk, or --in-flight-max, held senders back"
            )
        )
    refused = snap.get("refused_connections")
    if isinstance(refused, dict) and refused:
        counts = ", ".join(f"{reason} {count}" for reason, count in sorted(refused.items()))
        heads.append(
            Text(
                f"refused connections since start: {counts} (the log says each: "
                "transport.tls_refused, receiver.refused)"
            )
        )
    jobs: list[dict[str, Any]] = list(snap.get("jobs", []))
    if not jobs:
        return Group(*heads, Text("no jobs yet"))
    rows = _SENDER if role == "sender" else _RECEIVER
    blocks: list[Table] = []
    for job in jobs:  # one block per job: fits any terminal width
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        for label, cell in rows:
            grid.add_row(label, cell(job))
        if job.get("last_run"):  # at rest: how the last sender there ended
            grid.add_row("last run", _last_run(job["last_run"]))
        blocks.append(grid)
    return Group(*heads, *_spaced(blocks))


def _tls(tls: Any) -> Text | None:
    """When this process's TLS certificate (or its CA) expires; loud in its last 30 days."""
    if not isinstance(tls, dict) or not tls.get("expires"):
        return None
    days = tls.get("days_left")
    text = (
        f"TLS as {tls.get('certificate')!r}: certificate expires {str(tls['expires'])[:10]}, "
        f"CA {str(tls.get('ca_expires'))[:10]}"
    )
    if isinstance(days, int | float) and days < 30:
        return Text(f"{text}: {days:g} days left; {tls.get('renew')}", style="bold yellow")
    return Text(text)


def _spaced(blocks: list[Table]) -> list[Table | Text]:
    out: list[Table | Text] = []
    for block in blocks:
        out += [Text(""), block]
    return out


def _get(job: dict[str, Any], *keys: str) -> Any:
    value: Any = job
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _paused(shaping: dict[str, Any]) -> str:
    """Why a paused sender ships nothing, and what ends it."""
    if shaping.get("source") == "schedule":
        until = shaping.get("next_change")
        return f"the schedule's rate 0{f' until {until}' if until else ''}"
    return "rate 0: `replicator rate --state-dir DIR RATE` resumes it"


def _state(job: dict[str, Any]) -> str:
    text = str(job.get("state", "?")).replace("_", " ")
    sync = job.get("initial_sync")
    if job.get("state") == "initial_sync" and isinstance(sync, dict):
        text += f" {sync.get('percent', 0)}%"
    shaping = job.get("shaping")
    if job.get("state") == "paused" and isinstance(shaping, dict):
        text += f" ({_paused(shaping)})"
    if job.get("state") == "hook_failed":
        text += (
            " (the pre hook failed at the last cycle: no consistency point is taken until it "
            "succeeds; tried again every interval; errors says how it failed)"
        )
    if job.get("state") == "volume_gone":
        text += (
            f" ({job.get('last_error')}: no consistency point is taken until it is back; "
            "tried again, 1 s doubling to 60 s)"
        )
    if job.get("state") == "diverged" and job.get("role") == "sender":
        text += f" ({job.get('last_error')})"
    if job.get("role_change"):  # a sender at rest after a planned failover / in a failback
        return f"{text}: {job['role_change'].get('note')}; next: {job['role_change'].get('next')}"
    if job.get("source") == "files" and job.get("state") != "not_running":
        text += " (no sender since the receiver started; from files)"
    pending = (job.get("consistency_point") or {}).get("pending_lsn")
    if pending:
        text += (
            f" (apply pending up to LSN {pending}, durable here: the receiver applies it when "
            "it starts, and so does a failover)"
        )
    elif job.get("recovery_pending"):
        text += " (apply pending)"
    alone = job.get("served_alone")
    if isinstance(alone, dict) and job.get("source") == "files":
        text += (
            f" (served alone from LSN {alone.get('since_lsn')}, the receiver away: the next "
            "send ships from there only to a receiver that holds nothing past it)"
        )
    elif isinstance(alone, dict):
        text += (
            f" (serving alone from LSN {alone.get('since_lsn')}: the receiver was not reached "
            "at start, --wait-for-receiver)"
        )
    if job.get("not_served"):
        text += (
            f" (the VM's disks are not served yet, and cannot be without the receiver: "
            f"{job['not_served']}; served once it is reached and they are synced)"
        )
    if job.get("compare_pending"):
        text += f" (the next cycle compares with the replica: {job['compare_pending']})"
    fence = job.get("fence")
    if isinstance(fence, dict) and fence.get("fenced"):
        text += (
            f" (no lease renewal at the witness for {fence.get('since_renewal_seconds')}s: "
            "fenced; see docs/WITNESS.md, 'Fencing')"
        )
    return text


def _lag(job: dict[str, Any]) -> str:
    lag = job.get("lag") or {}
    at_most = lag.get("at_most")
    if lag.get("not_known"):
        return f"not known: {lag['not_known']} (the receiver's `status --dir` says what it holds)"
    if job.get("source") == "files" and lag.get("records") is None and at_most is None:
        return (
            "not known: no sync from this state folder has completed (the replica may lack "
            "anything; the next `replicator send` compares it)"
        )
    if lag.get("records") is None and isinstance(at_most, dict):
        heard = job.get("applied_heard")
        known = (
            f"the receiver had applied LSN {heard.get('lsn')} at {heard.get('at')}, when this "
            "sender last heard from it"
            if isinstance(heard, dict)
            else "what the receiver applied is not known at rest"
        )
        return (
            f"at most {at_most.get('records')} records, {_bytes(at_most.get('bytes'))}, "
            f"{_duration(at_most.get('seconds'))} ({known})"
        )
    parts = [f"{lag.get('records', '-')} records"]
    if lag.get("bytes") is not None and lag.get("records"):  # journal bytes: an upper bound
        parts.append(f"<= {_bytes(lag['bytes'])}")
    parts.append(_duration(lag.get("seconds")))
    return ", ".join(parts)


def _replica_lag(job: dict[str, Any]) -> str:
    """A receiver's lag: it sees only what arrived, so its seconds are a bound, not the RPO."""
    lag = job.get("lag") or {}
    text = f"{lag.get('records', '-')} records to apply"
    promotion = job.get("promotion")
    if job.get("promoted") and isinstance(promotion, dict) and "missing_seconds" in promotion:
        missing = promotion["missing_seconds"]
        if missing is None:
            return f"{text}; promoted (its consistency point has no source time)"
        return (
            f"{text}; promoted: at most {_duration(missing)} of source writes were missing "
            "then (the promotion's time less the consistency point's time)"
        )
    if lag.get("seconds") is None:
        return text
    text = (
        f"{text}; at most {_duration(lag['seconds'])} of source writes missing (now less"
        " the consistency point's time: it grows on an idle source too)"
    )
    offset = job.get("source_clock_offset_seconds")
    if isinstance(offset, int | float) and abs(offset) > WARN_OFFSET_SECONDS:
        text += (
            f"; the source's clock is {_duration(abs(offset))} "
            f"{'ahead' if offset > 0 else 'behind'} (allowed for here; fix NTP on the hosts)"
        )
    return text


def _traffic(job: dict[str, Any]) -> str:
    moved = job.get("bytes")
    if not isinstance(moved, dict):
        return "-"
    ratio = job.get("compression_ratio")
    if not isinstance(ratio, int | float):
        shrunk = "-"
    elif ratio > 1.005:
        shrunk = f"lz4: {ratio:.2f}x smaller"
    else:  # lz4 is skipped where it does not pay (random, encrypted or compressed data)
        shrunk = "not compressible"
    return (
        f"{_bytes(moved.get('payload'))} as {_bytes(moved.get('wire'))} "
        f"({shrunk}), {_bytes(job.get('rate_bytes_per_second'))}/s"
    )


def _point(job: dict[str, Any]) -> str:
    point = job.get("consistency_point") or {}
    if point.get("unknown"):
        return (
            f"none known: {point['unknown']} (`replicator send --resync` compares it and "
            "makes it a consistency point again)"
        )
    if not point.get("lsn"):
        return "-"
    text = f"LSN {point.get('lsn')}, source time {point.get('source_time') or 'unknown'}"
    if point.get("consistent"):
        return text
    if job.get("diverged"):
        return text + (
            " (not consistent: replica files were changed outside replication; "
            "`replicator send --resync` repairs them)"
        )
    if point.get("floor_lsn"):
        return text + (
            " (not consistent: records it had acknowledged were lost; the next comparison's "
            "epoch makes it consistent again: a sender that noted the loss compares at its "
            "next session, `replicator send --resync` compares now)"
        )
    return text + " (an apply is unfinished)"


def _errors(job: dict[str, Any]) -> str:
    errors = job.get("errors") or {}
    text = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "-"
    if job.get("last_error") and not job.get("last_run"):  # at rest, "last run" says it
        text += f": {job['last_error']}"
    return text


def _last_run(run: dict[str, Any]) -> Text:
    started = str(run.get("started"))
    if run.get("outcome") == "failed":
        return Text(
            f"failed at {run.get('ended')} (exit {run.get('exit_code')}; started "
            f"{started}): {run.get('error')}",
            style="bold red",
        )
    if run.get("outcome") == "unrecorded":
        return Text(
            f"started {started}; ended without saying how (killed, or the machine "
            "stopped): its journal holds what it had captured, the next `send` ships it",
            style="yellow",
        )
    if run.get("outcome") == "unknown":
        return Text(
            f"started {started}; how it ended is not known: an older replicator ran it, which "
            "does not record that (a `send` of this one will)"
        )
    return Text(f"ended {run.get('ended')} without error (started {started})")


def _s(value: Any) -> str:
    return "-" if value is None else str(value)


def _lsns(job: dict[str, Any]) -> str:
    lsn = job.get("lsn") or {}
    return ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in lsn.items()) or "-"


def _peer(job: dict[str, Any]) -> str:
    peer = job.get("peer")
    if job.get("connected"):
        silent = job.get("peer_silent_seconds")
        if isinstance(silent, int | float) and silent >= SILENT_AFTER:
            return f"{peer} (connected, but silent for {silent:.0f} s: stuck, or the path is)"
        return f"{peer} (connected)"
    return f"{peer} (not connected)" if peer else "not connected"


def _journal(job: dict[str, Any]) -> str:
    journal = job.get("journal") or {}
    text = _bytes(journal.get("bytes"))
    if journal.get("cap"):
        text += f" of {_bytes(journal['cap'])}"
    if journal.get("problem"):
        text += f"; {journal['problem']}"
    return text


def _bandwidth(job: dict[str, Any]) -> str:
    shaping = job.get("shaping")
    if not isinstance(shaping, dict):
        return "-"
    text = f"rate {shaping.get('rate', '-')} ({shaping.get('source', '-')})"
    rpo = shaping.get("rpo")
    if isinstance(rpo, dict):
        text += (
            f", target RPO {_duration(rpo.get('target_seconds'))}, "
            f"pace {_bytes(rpo.get('pace_bytes_per_second'))}/s"
        )
        text += f"; WARNING: {rpo['warning']}" if rpo.get("warning") else ", held"
    return text


_SENDER: list[tuple[str, Any]] = [
    ("job", lambda j: _s(j.get("job"))),
    ("state", _state),
    ("receiver", _peer),
    ("LSN", _lsns),
    ("lag (RPO)", _lag),
    ("sent", _traffic),
    ("bandwidth", _bandwidth),
    ("journal", _journal),
    ("last epoch", lambda j: _s(j.get("last_epoch"))),
    ("errors", _errors),
]
_RECEIVER: list[tuple[str, Any]] = [
    ("job", lambda j: _s(j.get("job"))),
    ("state", _state),
    ("sender", _peer),
    ("LSN", _lsns),
    ("consistency point", _point),
    ("lag (RPO bound)", _replica_lag),
    ("received", _traffic),
    ("journal", _journal),
    ("generation", lambda j: _s(j.get("generation"))),
    ("errors", _errors),
]


def _bytes(value: Any) -> str:
    return human_size(value) if isinstance(value, int | float) else "-"


def _duration(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    seconds = float(value)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
