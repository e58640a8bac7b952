"""Commands an operator gives as one string (``failover --exec``, ``--fence-exec``,
``receive --auto-failover-exec``): split as a shell would, run without one."""

from __future__ import annotations

import shlex

from replicator.engine.errors import ConfigError


def split_command(option: str, command: str, does: str) -> list[str]:
    """``command`` as an argv; ConfigError naming ``option`` when it cannot be split or is
    empty (``does``: what the command is for, e.g. "starts the VM")."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(
            f"{option} {command!r} cannot be split into a command: {exc}",
            hint="quote it as a shell would (it is run without one)",
        ) from exc
    if not argv:
        raise ConfigError(f"{option} is empty", hint=f"give the command that {does}")
    return argv
