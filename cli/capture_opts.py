"""``send --capture``: the capture modes, and the options that belong to one of them.

Read by ``send`` (an option of another mode on its command line: exit 2), by
``send --job-file`` and by ``check-config`` (a key of another mode in a job file, at its
line: exit 3, before any job starts).
"""

from __future__ import annotations

from enum import StrEnum

from replicator.cli.common import UsageError


class Capture(StrEnum):
    scan = "scan"
    nbd = "nbd"
    fuse = "fuse"


# options that belong to one capture mode, by parameter name (a job file's key)
CAPTURE_ONLY: dict[str, Capture] = {
    "nbd_socket": Capture.nbd,
    "nbd_listen": Capture.nbd,
    "nbd_size": Capture.nbd,
    "wait_for_receiver": Capture.nbd,
    "mount": Capture.fuse,
    "pre_hook": Capture.scan,
    "post_hook": Capture.scan,
}
_WHY_ONLY = {
    Capture.nbd: ("", "did you mean --capture nbd?"),
    Capture.fuse: ("", "did you mean --capture fuse?"),
    Capture.scan: (
        ": NBD and FUSE capture journal every write in order, so each point they ship is "
        "crash-consistent without a freeze",
        "leave the hooks out, or use --capture scan",
    ),
}


class MisplacedOption(UsageError):
    """An option of another capture mode; ``param`` names the first (check-config)."""

    def __init__(self, param: str, message: str, hint: str) -> None:
        super().__init__(message, hint=hint)
        self.param = param


class CaptureNeeds(UsageError):
    """A capture mode run without what it needs; ``param`` names the key to point at."""

    def __init__(self, param: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.param = param


def check_capture_needs(capture: Capture, values: dict[str, object]) -> None:
    """What ``capture`` cannot run without is given (``values`` by parameter name), and
    ``once`` is given only to scan capture."""
    if capture is not Capture.scan and values.get("once"):
        raise CaptureNeeds(
            "once",
            f"--once applies to --capture scan; --capture {capture.value} runs until stopped",
        )
    if capture is Capture.nbd and values.get("nbd_socket") in (None, ""):
        raise CaptureNeeds("capture", "--capture nbd needs --nbd-socket PATH")
    if capture is Capture.fuse and values.get("mount") in (None, ""):
        raise CaptureNeeds("capture", "--capture fuse needs --mount MOUNTPOINT")


def check_capture_options(capture: Capture, values: dict[str, object]) -> None:
    """Options of one capture mode given with another (``values`` by parameter name): a
    mistake, not something to ignore."""
    for mode in Capture:
        given = [
            name
            for name, only in CAPTURE_ONLY.items()
            if only is mode is not capture and values.get(name) not in (None, "")
        ]
        if given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            verb = "applies" if len(given) == 1 else "apply"
            why, hint = _WHY_ONLY[mode]
            raise MisplacedOption(
                given[0],
                f"{options} only {verb} to --capture {mode.value} (this is --capture "
                f"{capture.value}){why}",
                hint,
            )
