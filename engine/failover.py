"""Failover on the target: promote a job's replicas so its VM can start there.

``failover_at_rest`` runs when no receiver serves the folder (the usual case after the
source site is lost and the receiver was stopped, or on a target that runs nothing but
replicas); a running receiver promotes through its control socket instead (``Receiver.
failover``). Both end in ``JobReplica.promote``: every complete epoch durably received is
applied, the replica must then be at a consistency point (else: refused, nothing changes),
``promoted.state`` is written, the generation is bumped (``engine/generations.py``), and
replication writes nothing more to the job until it is demoted.

After promotion, configuration files of the job that name disk paths are pointed at the
replicas (libvirt domain XML ``<disk><source file=…>``; the original kept beside it as
``NAME.pre-failover``), so the VM can be defined and started on the target; a backing
file, data file or parent that a replica's header names and this host lacks is warned
about (``engine/image_deps.py``); and ``--exec`` runs (the command that starts the VM). The
result says the measured RTO (from the start of the command to the promoted replicas, and to
``--exec`` started) and the consistency point the replicas hold.

``promoted.state`` is the one durable step that decides: a failure before it leaves the
job as it was, and one after it (the generation, the configuration files, the headers
read) is ``PromotedUnfinished``, whose message says the job IS promoted; running the same
failover again finishes what is left and answers ``already_promoted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import structlog

from replicator.engine.errors import ConfigError
from replicator.engine.generations import PromotedUnfinished, Promotion
from replicator.engine.image_deps import missing_on_target
from replicator.engine.job_replica import JobReplica, ReceiverConfig
from replicator.engine.names import check_job_name, shell_quote, tree_entries
from replicator.engine.source_clock import missing_seconds
from replicator.engine.statedir import receiver_folder_locks
from replicator.engine.status import iso_time
from replicator.engine.user_command import split_command
from replicator.journal.durable import atomic_write

log = structlog.get_logger()

BACKUP_SUFFIX = ".pre-failover"
_MAX_CONFIG_BYTES = 4 * 1024 * 1024


@dataclass
class FailoverResult:
    job: str
    generation: int
    previous_generation: int
    point_lsn: int
    consistent: bool  # False: promoted as it was (--allow-inconsistent)
    point_time: str | None  # the source's wall-clock time of the consistency point (ISO)
    replica_dir: str
    promote_seconds: float  # from the start of the command to the replicas promoted
    rto_seconds: float  # to --exec started (or to promoted, without --exec)
    already_promoted: bool = False
    rewritten: list[str] = field(default_factory=list)  # configuration files pointed here
    exec_pid: int | None = None
    next_steps: list[str] = field(default_factory=list)
    # backing files, data files or parents a replica needs and this host lacks
    warnings: list[str] = field(default_factory=list)
    # at most this much of the source's writes were missing when promoted (the RPO bound,
    # on this target's clock: engine/source_clock.py); None when the point's time is unknown
    missing_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def failover_at_rest(
    config: ReceiverConfig,
    job: str,
    *,
    exec_cmd: str | None = None,
    started: float | None = None,
    allow_inconsistent: bool = False,
) -> FailoverResult:
    """Promote ``job`` with no receiver running on the folder (it is locked meanwhile)."""
    t0 = time.monotonic() if started is None else started
    check_job_name(job)
    state_dir = config.state_root / job
    if not (state_dir / "applied.state").exists() and not (state_dir / "journal").is_dir():
        raise ConfigError(
            f"unknown job {job!r}: no receiver state in {config.state_root}",
            hint="check --dir (and --state-dir) and the job name; `replicator status --dir "
            "DIR` lists the jobs",
        )
    with contextlib.ExitStack() as owned:
        running = (
            "fail over through it (it answers on its control socket), or stop it with "
            "SIGTERM and run failover again"
        )
        for lock in receiver_folder_locks(config.state_root, config.replica_root, hint=running):
            owned.enter_context(lock)
        replica = await JobReplica.open(job, config)
        try:
            before = replica.promotion
            promotion = await replica.promote(allow_inconsistent=allow_inconsistent)
        except PromotedUnfinished as exc:
            raise (exc.exec_not_run() if exec_cmd else exc) from exc.error
        finally:
            await replica.aclose()
    return await finish_failover(
        config, job, promotion, exec_cmd=exec_cmd, started=t0, already=before is not None
    )


async def finish_failover(
    config: ReceiverConfig,
    job: str,
    promotion: Promotion,
    *,
    exec_cmd: str | None,
    started: float,
    already: bool,
) -> FailoverResult:
    """After promotion: point configuration files at the replicas, run ``exec_cmd``."""
    promoted_at = time.monotonic()
    # absolute: libvirt takes only absolute disk paths, and --exec runs in the folder, so
    # a REPLICATOR_REPLICA_DIR relative to this process's folder would name another one
    replica_dir = (config.replica_root / job).absolute()
    try:
        rewritten = await asyncio.to_thread(point_configs_at_replicas, replica_dir)
    except OSError as exc:  # promoted all the same: said so (and running it again finishes)
        raise PromotedUnfinished(
            job,
            promotion,
            "pointing its configuration files (libvirt domain XML) at the replicas",
            exc,
            exec_cmd=bool(exec_cmd),
        ) from exc
    try:
        missing = await asyncio.to_thread(missing_on_target, replica_dir)
    except OSError as exc:
        raise PromotedUnfinished(
            job,
            promotion,
            "reading its replicas' headers (backing files a VM needs)",
            exc,
            exec_cmd=bool(exec_cmd),
        ) from exc
    for problem in missing:
        log.warning("failover.image_dependency", job=job, problem=problem)
    result = FailoverResult(
        job=job,
        generation=promotion.generation,
        previous_generation=promotion.previous,
        point_lsn=promotion.point_lsn,
        consistent=promotion.consistent,
        point_time=iso_time(promotion.point_ts_ns),
        replica_dir=str(replica_dir),
        promote_seconds=round(promoted_at - started, 3),
        rto_seconds=round(promoted_at - started, 3),
        already_promoted=already,
        rewritten=[str(p) for p in rewritten],
        warnings=missing,
        missing_seconds=_rpo_bound(promotion),
    )
    if exec_cmd:
        result.exec_pid = await _start(exec_cmd, job, replica_dir)
        result.rto_seconds = round(time.monotonic() - started, 3)
    else:
        result.next_steps = [f"virsh define {shell_quote(p)}" for p in rewritten]
    log.warning(
        "failover.done",
        job=job,
        generation=result.generation,
        point_lsn=result.point_lsn,
        point_time=result.point_time,
        rto_s=result.rto_seconds,
    )
    return result


async def _start(command: str, job: str, replica_dir: Path) -> int:
    """Start ``command`` (split like a shell would, run without one) and return its pid;
    it runs on after failover ends (it usually starts the VM). A command that cannot be
    started is an error; what it does afterwards is its own business."""
    argv = split_command("--exec", command, "starts the VM")
    env = {**os.environ, "REPLICATOR_JOB": job, "REPLICATOR_REPLICA_DIR": str(replica_dir)}
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=replica_dir, start_new_session=True
        )
    except OSError as exc:
        raise ConfigError(
            f"--exec {command!r} could not be started: {exc.strerror or exc}",
            hint="the replicas are promoted; start the VM by hand, or fix the command and run "
            "failover again (it is idempotent)",
        ) from exc
    return proc.pid


def point_configs_at_replicas(replica_dir: Path) -> list[Path]:
    """Rewrite libvirt domain XML files in ``replica_dir`` whose ``<disk><source file=…>``
    names a disk this job replicates (same file name) to the replica's path. The original
    is kept as ``NAME.pre-failover`` (once: a second failover keeps the first original).
    Returns the files rewritten."""
    if not replica_dir.is_dir():
        return []
    disks = {p.name for p in replica_dir.iterdir() if p.is_file() and not p.is_symlink()}
    rewritten: list[Path] = []
    for path in sorted(p for p in tree_entries(replica_dir) if p.name.endswith(".xml")):
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_CONFIG_BYTES:
            continue
        text = path.read_text(errors="replace")
        new = _rewrite_domain(text, disks, replica_dir)
        if new is None or new == text:
            continue
        mode = path.stat().st_mode & 0o7777
        backup = path.with_name(path.name + BACKUP_SUFFIX)
        if not backup.exists():
            atomic_write(backup, text.encode(), mode, shared_folder=True)
        atomic_write(path, new.encode(), mode, shared_folder=True)
        rewritten.append(path)
        log.info("failover.config_rewritten", path=str(path), original=str(backup))
    return rewritten


def _rpo_bound(promotion: Promotion) -> float | None:
    """Seconds of source writes the replica lacked when promoted (status's
    ``promotion.missing_seconds``)."""
    seconds = missing_seconds(promotion.at_ns, promotion.point_ts_ns, promotion.point_target_ns)
    return None if seconds is None else round(seconds, 3)


def _rewrite_domain(text: str, disks: set[str], replica_dir: Path) -> str | None:
    """``text`` with disk sources pointed at ``replica_dir``, or None when it is not a
    libvirt domain (or not one we may parse: DTDs and entities are never expanded)."""
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        return None
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    if root.tag != "domain":
        return None
    new = text
    for source in root.iterfind("./devices/disk/source"):
        old = source.get("file")
        if not old or os.path.basename(old) not in disks:
            continue
        target = str(replica_dir / os.path.basename(old))
        if old == target:
            continue
        # textual replacement keeps the file as the admin wrote it (comments, layout)
        for quoted in {quoteattr(old), f"'{old}'", f'"{old}"'}:
            new = new.replace(f"file={quoted}", f"file={quoteattr(target)}")
    return new


async def demote_at_rest(config: ReceiverConfig, job: str) -> int:
    """Make a promoted job a replica again (no receiver running); its generation."""
    check_job_name(job)
    with contextlib.ExitStack() as owned:
        running = (
            "no receiver answers on this state folder's control socket: give demote the "
            "--state-dir the running receiver uses (it demotes through it), or stop it first"
        )
        for lock in receiver_folder_locks(config.state_root, config.replica_root, hint=running):
            owned.enter_context(lock)
        replica = await JobReplica.open(job, config)
        try:
            if replica.promotion is None:
                raise ConfigError(f"job {job!r} is not promoted", hint="nothing to demote")
            await replica.demote()
            return replica.state.generation
        finally:
            await replica.aclose()
