"""Checks of a job file's values that the option types cannot make (an address that is not
HOST:PORT, a size or schedule that does not parse), reported with the file, line and key.

``send --job-file`` and ``receive --config`` run them on the values that come from the file
before the command starts, so such a mistake names where it is; ``check-config`` runs them
and more (volumes, TLS keys). Values given on the command line are the command's to check.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Set
from typing import Any

from replicator.cli.capture_opts import (
    Capture,
    CaptureNeeds,
    MisplacedOption,
    check_capture_needs,
    check_capture_options,
)
from replicator.cli.common import parse_endpoint, parse_in_flight_max, parse_size
from replicator.cli.jobfile import ConfigFile, Section, located
from replicator.cli.shaping_opts import make_shaping
from replicator.engine.authz import parse_allow
from replicator.engine.errors import ConfigError


@contextlib.contextmanager
def at(config: ConfigFile, section: Section, param: str) -> Iterator[None]:
    """Report a ConfigError raised inside as being about ``param``'s key, at its line."""
    try:
        yield
    except ConfigError as exc:
        key = section.keys.get(param, param)
        raise located(
            config.path,
            section.lines.get(param, section.line),
            f"{section.label}, key {key!r}: {exc.message}",
            exc.hint,
        ) from None


@contextlib.contextmanager
def at_item(config: ConfigFile, section: Section, param: str, item: str) -> Iterator[None]:
    """As ``at``, for one item of a list parameter: at the key that gave it (a path in
    ``files`` is reported at ``files``' line, not at ``volumes``')."""
    key, line = section.items.get((param, item), (section.keys.get(param, param), None))
    try:
        yield
    except ConfigError as exc:
        raise located(
            config.path,
            line or section.lines.get(param, section.line),
            f"{section.label}, key {key!r}: {exc.message}",
            exc.hint,
        ) from None


def _endpoint(value: Any) -> None:
    parse_endpoint(value, "it")


def _witness(value: Any) -> None:
    from replicator.engine.witness_client import check_witness_spec

    check_witness_spec(value)


def _fence_exec(value: Any) -> None:
    from replicator.engine.witness_fence import check_fence_exec

    check_fence_exec(value)


# by parameter name: what each value must parse as
CHECKS: dict[str, Callable[[Any], object]] = {
    "to": _endpoint,
    "listen": _endpoint,
    "nbd_listen": _endpoint,
    "metrics_listen": _endpoint,
    "journal_max": lambda value: parse_size(value, "journal_max"),
    "in_flight_max": parse_in_flight_max,
    "allow": lambda rules: [parse_allow(rule) for rule in rules],
    "rate": lambda value: make_shaping(value, None, None),
    "burst": lambda value: make_shaping(None, value, None),
    "schedule": lambda value: make_shaping(None, None, value),
    "target_rpo": lambda value: make_shaping(None, None, None, value),
    "witness": _witness,
    "fence_exec": _fence_exec,
}
# options that name what one job has to itself on this host: two jobs of a file sharing one
# would fight over it (only one would run), what each is in words
OWN = {
    "state_dir": "state folder",
    "volumes": "volume",
    "metrics_listen": "metrics address",
    "nbd_socket": "NBD socket",
    "nbd_listen": "NBD address",
    "mount": "mount point",
}
_PATHS = ("state_dir", "volumes", "nbd_socket", "mount")


def check_values(config: ConfigFile, section: Section, skip: Set[str] = frozenset()) -> None:
    """Every checked value of ``section`` parses, except the parameters in ``skip``."""
    for param, check in CHECKS.items():
        value = section.values.get(param)
        if value is not None and param not in skip:
            with at(config, section, param):
                check(value)


def _capture_of(values: Mapping[str, Any]) -> Capture | None:
    """The job's capture mode; None when the value is none (refused as the option's)."""
    try:
        return Capture(str(values.get("capture") or "scan").lower())
    except ValueError:
        return None


def check_together(config: ConfigFile, section: Section, command_line: Mapping[str, Any]) -> None:
    """What the section's options mean together, as the command checks it before it starts
    (a capture mode and what it needs, fencing and the witness, automatic failover and the
    witness), said at a key's line. A rule that involves a value from the command line is
    the command's to report."""
    from replicator.cli.witness_opts import WITNESS_INTERVAL, check_auto_failover, source_fence

    values = {**section.values, **command_line}

    def mine(*params: str) -> bool:
        return not any(p in command_line for p in params)

    def key(*params: str) -> str:
        return next((p for p in params if p in section.values), params[0])

    if config.kind == "receive":
        if mine("auto_failover_after", "witness"):
            with at(config, section, key("auto_failover_after", "witness")):
                check_auto_failover(values.get("auto_failover_after"), values.get("witness"))
        return
    capture = _capture_of(values)
    if capture is None:
        return
    try:
        check_capture_needs(capture, values)
    except CaptureNeeds as exc:
        if mine(exc.param, "capture", "once", "nbd_socket", "mount"):
            with at(config, section, exc.param):
                raise
    fencing = ("fence_after", "fence_exec", "witness_interval", "witness")
    if mine(*fencing):
        with at(config, section, key(*fencing)):
            source_fence(
                section.name,
                values.get("witness"),
                values.get("witness_interval") or WITNESS_INTERVAL,
                values.get("fence_after"),
                values.get("fence_exec"),
                None,
            )


def check_jobs_apart(config: ConfigFile, command_line: Mapping[str, Any]) -> None:
    """No two jobs of a send job file share a state folder, a volume, or an address,
    socket or mount point of their own (``OWN``): one of them would fail at start, which
    one by chance. A state folder left out is the job's default one."""
    from replicator.engine.statedir import default_state_dir

    seen: dict[tuple[str, str], str] = {}
    for name, section in config.sections.items():
        values = {**section.values, **command_line}
        values.setdefault("state_dir", str(default_state_dir("send", name)))
        for param, what in OWN.items():
            given = values.get(param)
            for value in given if isinstance(given, list) else [given]:
                if value in (None, ""):
                    continue
                text = os.path.realpath(value) if param in _PATHS else str(value)
                other = seen.setdefault((what, text), name)
                if other != name:
                    with at(config, section, param):
                        raise ConfigError(
                            f"job {other!r} has the same {what} ({text}): two jobs cannot "
                            "share it (only one of them would run)",
                            hint=f"give each job a {what} of its own",
                        )


def check_capture(config: ConfigFile, section: Section, command_line: Mapping[str, Any]) -> None:
    """No key of ``section`` belongs to another capture mode than the job's, as `send`
    refuses it, but said at the key's line. ``command_line``: the parameters the command
    line sets (they override the file); a misplaced one of those is `send`'s to refuse as
    typed (exit 2)."""
    values = {**section.values, **command_line}
    capture = _capture_of(values)
    if capture is None:
        return
    try:
        check_capture_options(capture, values)
    except MisplacedOption as exc:
        if exc.param in command_line:
            return
        with at(config, section, exc.param):
            raise
