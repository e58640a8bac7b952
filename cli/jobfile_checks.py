"""Checks of a job file's values that the option types cannot make (an address that is not
HOST:PORT, a size or schedule that does not parse), reported with the file, line and key.

``send --job-file`` and ``receive --config`` run them on the values that come from the file
before the command starts, so such a mistake names where it is; ``check-config`` runs them
and more (volumes, TLS keys). Values given on the command line are the command's to check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Set
from typing import Any

from replicator.cli.capture_opts import Capture, MisplacedOption, check_capture_options
from replicator.cli.common import parse_endpoint, parse_size
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


def _endpoint(value: Any) -> None:
    parse_endpoint(value, "it")


# by parameter name: what each value must parse as
CHECKS: dict[str, Callable[[Any], object]] = {
    "to": _endpoint,
    "listen": _endpoint,
    "nbd_listen": _endpoint,
    "metrics_listen": _endpoint,
    "journal_max": lambda value: parse_size(value, "journal_max"),
    "allow": lambda rules: [parse_allow(rule) for rule in rules],
    "rate": lambda value: make_shaping(value, None, None),
    "schedule": lambda value: make_shaping(None, None, value),
}


def check_values(config: ConfigFile, section: Section, skip: Set[str] = frozenset()) -> None:
    """Every checked value of ``section`` parses, except the parameters in ``skip``."""
    for param, check in CHECKS.items():
        value = section.values.get(param)
        if value is not None and param not in skip:
            with at(config, section, param):
                check(value)


def check_capture(config: ConfigFile, section: Section, command_line: Mapping[str, Any]) -> None:
    """No key of ``section`` belongs to another capture mode than the job's, as `send`
    refuses it, but said at the key's line. ``command_line``: the parameters the command
    line sets (they override the file); a misplaced one of those is `send`'s to refuse as
    typed (exit 2)."""
    values = {**section.values, **command_line}
    try:
        capture = Capture(str(values.get("capture") or "scan").lower())
    except ValueError:
        return  # not a mode at all: refused as the option's value
    try:
        check_capture_options(capture, values)
    except MisplacedOption as exc:
        if exc.param in command_line:
            return
        with at(config, section, exc.param):
            raise
