"""Where the NBD shim listens, checked before anything is synced.

The exports are served only after the initial sync, which can take hours; a typo in
``--nbd-socket`` or a port already taken must be found before it, not after (it was, as
"local storage error", exit 9). ``NbdServer.start_unix`` applies the same rules when it
binds.
"""

from __future__ import annotations

import os
import socket
import stat

from replicator.engine.errors import ConfigError

ANSWER_TIMEOUT = 2.0  # seconds a live server at the socket path has to accept
SUN_PATH_MAX = 107  # bytes of a unix socket's path: sockaddr_un.sun_path holds 108 with the NUL


def stale_unix_socket(path: str) -> bool:
    """Whether ``path`` is a socket file nobody accepts on (to be replaced); False when
    nothing is there. ConfigError when the NBD socket cannot be made at ``path``: its
    folder is missing, something that is not a socket is there (never replaced), or a
    live server answers on it (replacing it would send that server's clients, another VM,
    to our exports)."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        # said as a disk problem before ("local storage error: AF_UNIX path too long (check
        # the disk (free space, permissions)"), exit 9, after the whole initial sync
        raise ConfigError(
            f"NBD socket {path} is {len(os.fsencode(path))} bytes long; a unix socket's "
            f"path holds at most {SUN_PATH_MAX} (neither we nor qemu can use a longer one)",
            hint="give --nbd-socket a shorter path, such as /run/replicator/JOB.sock",
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(
            f"NBD socket {path}: the folder {folder} does not exist",
            hint="create that folder, or give --nbd-socket a path in an existing one",
        )
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise ConfigError(
            f"NBD socket {path} exists and is not a socket; it is never replaced",
            hint="remove it if it is not needed, or give --nbd-socket another path",
        )
    if _answers(path):
        raise ConfigError(
            f"NBD socket {path} is in use by another server (another sender?)",
            hint="give this sender its own --nbd-socket, or stop the other one",
        )
    return True


def check_listen(host: str, port: int) -> None:
    """ConfigError unless this host can listen on ``host``:``port`` (a probe bound and
    closed at once, with the options asyncio's server uses)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen for NBD on {host}:{port}: {exc.strerror or exc}",
            hint="give --nbd-listen a free port on an address of this host, or stop what "
            "listens there",
        ) from exc


def check_endpoints(path: str, listen: tuple[str, int] | None) -> None:
    """Both endpoints, before the initial sync (a stale socket file is left for
    ``start_unix`` to replace)."""
    stale_unix_socket(path)
    if listen is not None:
        check_listen(*listen)


def _answers(path: str) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(ANSWER_TIMEOUT)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
