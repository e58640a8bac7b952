"""Validation of job and volume names: they become paths on the receiver.

A name that reaches the file system must never climb out of its folder, hide among
our own dot-files or smuggle a separator. Both sides check (the sender to fail early
with a clear message, the receiver because it must not trust the sender).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import stat
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from replicator.engine.errors import ConfigError

_JOB = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_VOLUME_BYTES = 255


# a receiver's state folder inside its --dir, when no --state-dir is given
RECEIVER_STATE_NAME = ".replicator"

# files a receiver keeps beside the job folders in its state folder
RESERVED_JOB_NAMES = frozenset({"control.sock"})  # lower case: compared casefolded


def is_reserved_job_name(job: str) -> bool:
    """True when ``job`` names, in any case, a file the receiver keeps in its state folder
    (some file systems ignore case, so ``Control.Sock`` would be the same file)."""
    return job.casefold() in RESERVED_JOB_NAMES


def check_job_name(job: str) -> str:
    """Return ``job`` when it is a safe job name, else raise ConfigError."""
    if not _JOB.fullmatch(job) or ".." in job:
        raise ConfigError(
            f"invalid job name {job!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/' or '..')"
        )
    if is_reserved_job_name(job):
        raise ConfigError(
            f"invalid job name {job!r}: the receiver keeps a file of that name in its state "
            "folder; pick another"
        )
    return job


def volume_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a volume (a top-level replica file) name, or None when it can.

    A safe relative path (``path_problem``) of one component, not hidden: the sender's
    own volume names are file names, and dot-names are left to temp files.
    """
    if "/" in name:
        return f"volume name {name!r} contains a path separator"
    if name.startswith("."):
        return f"volume name {name!r} must not start with '.'"
    return path_problem(name)


def check_volume_name(name: str) -> str:
    problem = volume_name_problem(name)
    if problem is not None:
        raise ConfigError(problem, hint="rename the file; replicas are named after the source file")
    return name


def printable(text: str | os.PathLike[str]) -> str:
    """``text`` for a message, a terminal or a TOML comment: bytes that are not UTF-8 (held
    by Python as surrogate escapes, '\\udce9') shown as '\\xe9', as ``ls -b`` shows them,
    so the name can be typed to rename the file; control characters escaped alike."""
    text = os.fspath(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to: not from the disk
        raw = text.encode("utf-8", "backslashreplace")
    return "".join(_printable_char(ch) for ch in raw.decode("utf-8", "backslashreplace"))


def shell_quote(text: str | os.PathLike[str]) -> str:
    """``text`` quoted for a shell command a user can copy from one line: as
    ``shlex.quote`` does when it holds no control character or undecodable byte; else in
    bash's ``$'...'`` form, those as ``\\xNN`` escapes (a newline inside '...' would split
    the line it is shown on, an escape sequence would reach the terminal)."""
    text = os.fspath(text)
    if printable(text) == text:
        return shlex.quote(text)
    out = []
    for ch in text:
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that is not UTF-8, as Python holds it
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch in "\\'":
            out.append("\\" + ch)
        else:
            out.append(_printable_char(ch))
    return "$'" + "".join(out) + "'"


def _printable_char(ch: str) -> str:
    if ch == " " or not unicodedata.category(ch).startswith("C"):
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


_MAX_PATH_BYTES = 4096


@functools.lru_cache(maxsize=4096)  # checked per record on both sides; a job has few paths
def path_problem(path: str) -> str | None:
    """Why a relative path (it may contain '/') cannot name a file under a replica folder.

    Used for the paths in records: top-level volume names and, with FUSE capture, nested
    paths of a VM folder. Absolute paths, '.' and '..' components, empty components,
    NUL, control and invisible characters (what ``str.isprintable`` refuses but ' ': the
    protocol carries no other names, ``transport.messages``), and names that are not
    valid UTF-8 (a file name the local file system holds as undecodable bytes) are
    refused; the applier also refuses to follow symlinks.
    """
    if not path:
        return "empty path"
    try:
        encoded = path.encode()
    except UnicodeEncodeError:
        return f"path '{printable(path)}' is not valid UTF-8"
    if len(encoded) > _MAX_PATH_BYTES:
        return f"path {path[:64]!r}... is longer than {_MAX_PATH_BYTES} bytes"
    if path.startswith("/"):
        return f"path {path!r} is not relative"
    if "\\" in path:  # a Windows separator: the replica might be read on such a host
        return f"path {path!r} contains a backslash (a path separator on Windows hosts)"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"path {path!r} has an empty, '.' or '..' component"
        if len(part.encode()) > _MAX_VOLUME_BYTES:
            return f"path component {part[:64]!r} is longer than {_MAX_VOLUME_BYTES} bytes"
        if any(ord(c) < 32 for c in part):
            return f"path {path!r} contains control characters"
        unseen = next((c for c in part if c != " " and not c.isprintable()), None)
        if unseen is not None:  # what the protocol refuses (messages._name): DEL, C1
            # controls, spaces but ' ' (U+00A0), format characters (U+200B), unassigned ones
            return (
                f"path {path!r} contains U+{ord(unseen):04X} ({_char_name(unseen)}), "
                "a control or invisible character"
            )
    return None


def _char_name(ch: str) -> str:
    return unicodedata.name(ch, "").lower() or f"category {unicodedata.category(ch)}"


_NODE_KINDS = {
    stat.S_IFREG: "regular file",
    stat.S_IFDIR: "folder",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def file_mode(mode: int) -> int:
    """The permission bits a replica file gets from its source's ``mode``: all but the
    set-user-ID and set-group-ID bits. The owner is not replicated (the replica belongs to
    the receiver's user, root as a rule), so a set-id bit would let any user of the target
    run the file as that user. Folders keep theirs (a setgid folder only passes its group
    on)."""
    return mode & 0o7777 & ~(stat.S_ISUID | stat.S_ISGID)


def node_kind(mode: int) -> str:
    """What a ``stat`` mode is, in the words of an error message ("FIFO", "socket")."""
    return _NODE_KINDS.get(stat.S_IFMT(mode), "special file")


def tree_entries(root: Path) -> Iterator[Path]:
    """Every entry under the folder ``root`` (files, folders, symlinks; not ``root``): a
    folder's names sorted, then its subfolders' entries, never through a symlink.

    Iterative: ``os.walk`` and ``Path.rglob`` recurse once a level (until Python 3.12), so
    a tree deeper than about 990 folders, which a sender can make in its own replica
    folder (MKDIR or WRITE records of 4096-byte paths, renames of deep folders into deep
    folders), raised RecursionError: its Tree requests failed, and `failover` of the job
    crashed. A folder that cannot be listed (gone, or a path past PATH_MAX) is passed
    over."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            path = folder / entry.name
            yield path
            try:
                if entry.is_dir(follow_symlinks=False):
                    subfolders.append(path)
            except OSError:
                continue
        stack.extend(reversed(subfolders))
