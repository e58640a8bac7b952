"""``python -m tests.faultfs SOURCE_DIR MOUNTPOINT --control SOCKET [--foreground]``.

Mounts a fault-injecting passthrough of SOURCE_DIR at MOUNTPOINT and takes rules on the
control socket (JSON lines; see :mod:`tests.faultfs`). Without ``--foreground`` it
detaches once the mount is live, so a shell script can go on using the mount at once
(the parent exits 0 when mounted, 1 when mounting failed); stop it with
``fusermount3 -u MOUNTPOINT`` or SIGTERM. Logs go to ``--log FILE``, else to stderr (a
detached server drops them once mounted, so it does not hold its caller's pipes open).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvloop

from tests.faultfs.fs import serve


def _problem(source: Path, mountpoint: Path) -> str | None:
    if not source.is_dir():
        return f"source {source} is not a directory"
    if not mountpoint.is_dir():
        return f"mount point {mountpoint} is not a directory"
    src, mnt = source.resolve(), mountpoint.resolve()
    if src == mnt or src in mnt.parents or mnt in src.parents:
        return "source and mount point overlap (the file system would serve itself)"
    if any(os.scandir(mnt)):
        return f"mount point {mountpoint} is not empty"
    return None


def main(argv: list[str] | None = None) -> int:
    parent = os.getppid()
    parser = argparse.ArgumentParser(prog="python -m tests.faultfs", description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--control", required=True, help="unix socket path (@name: abstract)")
    parser.add_argument("--foreground", action="store_true", help="do not detach")
    parser.add_argument(
        "--die-with-parent", action="store_true", help="stop when the parent process dies"
    )
    parser.add_argument("--log", type=Path, help="append log messages to this file")
    parser.add_argument("--debug", action="store_true", help="log pyfuse3's debug messages")
    args = parser.parse_args(argv)
    handler = logging.FileHandler(args.log) if args.log else logging.StreamHandler(sys.stderr)
    logging.basicConfig(
        handlers=[handler],
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s faultfs[%(process)d] %(levelname)s %(message)s",
    )
    if not args.debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)
    problem = _problem(args.source, args.mountpoint)
    if problem is not None:
        print(f"faultfs: {problem}", file=sys.stderr)
        return 2
    source = args.source.resolve()
    mountpoint = os.path.realpath(args.mountpoint)
    control = args.control if args.control.startswith("@") else os.path.abspath(args.control)
    os.umask(0)  # the kernel already applied the caller's umask to the modes it sends
    if args.foreground:
        watch = parent if args.die_with_parent else None
        uvloop.run(serve(source, mountpoint, control, parent=watch))
        return 0
    return _daemonize(source, mountpoint, control, keep_stderr=args.log is not None)


def _daemonize(source: Path, mountpoint: str, control: str, *, keep_stderr: bool) -> int:
    """Fork; the parent returns once the child reports the mount live (0) or dies (1).

    The parent prints the server's pid. The child keeps stderr until it is mounted, so
    a failure to mount is seen by whoever started it.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            ok = r.read(1) == b"1"
        if not ok:
            os.waitpid(pid, 0)
            print("faultfs: mounting failed (see the messages above)", file=sys.stderr)
            return 1
        print(pid)
        return 0
    os.close(rfd)
    os.setsid()
    os.chdir("/")  # do not keep the caller's working directory busy
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)

    def ready() -> None:
        if not keep_stderr:
            os.dup2(devnull, 2)
        os.close(devnull)
        os.write(wfd, b"1")
        os.close(wfd)

    try:
        uvloop.run(serve(source, mountpoint, control, ready))
    except BaseException:
        logging.getLogger("faultfs").exception("failed")
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
