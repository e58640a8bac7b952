"""Bad input: one line on stderr and a distinct exit code, nothing lost."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import (
    ENV,
    REPLICATOR,
    ReceiverProc,
    free_port,
    one_line_error,
    replicator,
    send_once,
)


def test_missing_volume(tmp_path: Path, receiver: ReceiverProc) -> None:
    out = replicator(
        "send", "--to", receiver.address, "--job", "j", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(tmp_path / "nope.vhd"),
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG
    assert "does not exist" in one_line_error(out.stderr)


def test_a_volume_with_an_invisible_character_is_the_users_to_rename(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A no-break space passed the sender's name check and the protocol refused it at
    the handshake: exit 70, "a bug in replicator", with a traceback."""
    disk = tmp_path / "vm\u00a0disk.img"
    disk.write_bytes(b"x" * 4096)
    out = replicator(
        "send", "--to", receiver.address, "--job", "j", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(disk),
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr[-2000:]
    line = one_line_error(out.stderr)
    assert "U+00A0 (no-break space)" in line and "rename the file" in line


def test_a_folder_name_with_a_newline_and_an_escape_is_printed_escaped(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A VM folder's name held a newline and a colour escape: the error split over two
    lines (the second one not `replicator: error:`), and on a terminal the escape was
    obeyed; status and journal inspect printed the folder the same way."""
    folder = tmp_path / "vm\x1b[31mred\nline2"
    folder.mkdir()
    shown = "vm\\x1b[31mred\\x0aline2"  # as ls -b shows it, one line
    out = replicator(
        "send", "--to", receiver.address, "--job", "j", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(folder / "missing.img"),
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG
    assert f"{shown}/missing.img does not exist" in one_line_error(out.stderr)
    assert "\x1b" not in out.stderr.replace("\\u001b", "")  # the JSON line escapes its own
    disk = folder / "disk.img"
    disk.write_bytes(b"x" * 4096)
    state = folder / "state"
    send_once(receiver, "j", state, disk)
    status = replicator("status", "--state-dir", str(state))
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0].endswith(f"{shown}/state)")
    inspect = replicator("journal", "inspect", str(state / "journal"))
    assert inspect.returncode == 0, inspect.stderr
    assert inspect.stdout.splitlines()[0].endswith(f"{shown}/state/journal")
    assert "\x1b" not in status.stdout + inspect.stdout


@pytest.mark.parametrize("job", ["../evil", "a/b", "..", ".hidden"])
def test_job_name_with_path_tricks(tmp_path: Path, receiver: ReceiverProc, job: str) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 4096)
    out = replicator(
        "send", "--to", receiver.address, "--job", job, "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(disk),
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG
    assert "invalid job name" in one_line_error(out.stderr)
    assert not (receiver.dir.parent / "evil").exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("receive", "--listen", "127.0.0.1:{port}", "--insecure", "--dir", ""), "--dir"),
        (("receive", "--listen", "127.0.0.1:{port}", "--insecure", "--dir=."), None),
        (("receive", "--listen", "127.0.0.1:{port}", "--insecure", "--dir", "r",
          "--state-dir="), "--state-dir"),
        (("send", "--to", "127.0.0.1:{port}", "--job", "j", "--insecure", "--once",
          "--state-dir", "s", ""), "an argument"),
    ],
)  # fmt: skip
def test_an_empty_value_is_refused_not_read_as_the_current_folder(
    tmp_path: Path, args: tuple[str, ...], named: str | None
) -> None:
    """`--dir "$REPLICA_DIR"` with the variable unset was `--dir .`: a receiver run by
    systemd put its replicas and state in `/`."""
    port = free_port()
    argv = [a.format(port=port) for a in args]
    if named is None:  # a real value: the command runs (stopped at once here)
        proc = subprocess.Popen(
            ["timeout", "--preserve-status", "-s", "INT", "2", *REPLICATOR, *argv],
            cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert (tmp_path / ".replicator").is_dir()
        return
    out = subprocess.run(
        [*REPLICATOR, *argv], cwd=tmp_path, env=ENV, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == ExitCode.USAGE, out.stderr
    assert f"{named} is" in out.stderr and "an unset variable" in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing made in the current folder


@pytest.mark.parametrize(
    ("args", "told"),
    [
        (("status", "-v"), "(replicator -v status ...)"),
        (("send", "d", "--log-format=json"), "(replicator --log-format <auto|json|console> send"),
        (("journal", "inspect", "--quiet", "j"), "(replicator --quiet journal inspect ...)"),
        (("status", "--version"), "(replicator --version)"),
    ],
)  # fmt: skip
def test_an_option_of_the_program_after_the_command_says_where_it_goes(
    args: tuple[str, ...], told: str
) -> None:
    """`replicator status -v` said "No such option: -v" with nothing to go on: -v is the
    program's own option, given before the command."""
    out = replicator(*args)
    assert out.returncode == ExitCode.USAGE, out.stderr
    option = next(a for a in args if a.startswith("-")).split("=")[0]
    assert f"{option} is an option of replicator itself" in out.stderr, out.stderr
    assert told in out.stderr, out.stderr


def test_an_unknown_option_is_still_named_as_unknown() -> None:
    out = replicator("status", "--bogus")
    assert out.returncode == ExitCode.USAGE, out.stderr
    assert "No such option: --bogus" in out.stderr, out.stderr


def test_a_mistyped_command_is_given_the_one_meant() -> None:
    """`replicator journal inspec` got "Did you mean 'inspect'?"; `replicator recieve`
    got nothing, the program's commands being loaded only once named."""
    for typo, meant in (("recieve", "receive"), ("stauts", "status"), ("failbak", "failback")):
        out = replicator(typo)
        assert out.returncode == ExitCode.USAGE, out.stderr
        assert f"No such command '{typo}'. Did you mean '{meant}'?" in out.stderr, out.stderr
    out = replicator("zzz")
    assert out.returncode == ExitCode.USAGE and "No such command 'zzz'." in out.stderr


def test_receiver_dir_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = replicator(
        "receive", "--listen", f"127.0.0.1:{free_port()}", "--dir", str(blocker / "replicas"),
        "--insecure",
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG
    assert "cannot create replica folder" in one_line_error(out.stderr)


@pytest.fixture
def read_only_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs holding an empty folder ``existing``, remounted read-only (as the kernel
    does to an ext4 that hit disk errors)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        (mount / "existing").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("side", ["receiver", "sender"])
@pytest.mark.parametrize("folder", ["existing", "to-be-created"])
def test_a_folder_on_a_read_only_file_system_is_named_so(
    tmp_path: Path, read_only_fs: Path, side: str, folder: str
) -> None:
    """It said "not writable (fix its permissions ...)", or a sender failed later on its
    journal: permissions are not what to look at, the disk is."""
    where = read_only_fs / folder
    if side == "receiver":
        out = replicator(
            "receive", "--listen", f"127.0.0.1:{free_port()}", "--dir", str(where),
            "--state-dir", str(where / ".replicator"), "--insecure",
        )  # fmt: skip
    else:
        disk = tmp_path / "d.img"
        disk.write_bytes(b"x" * 4096)
        out = replicator(
            "send", "--to", f"127.0.0.1:{free_port()}", "--job", "j", "--once", "--insecure",
            "--state-dir", str(where), str(disk),
        )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr
    line = one_line_error(out.stderr)
    assert f"{where}" in line and "read-only file system" in line, line
    assert "remount it read-write" in line and "permissions" not in line, line


def test_receiver_not_there(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 4096)
    out = replicator(
        "send", "--to", f"127.0.0.1:{free_port()}", "--job", "j", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(disk),
    )  # fmt: skip
    assert out.returncode == ExitCode.CONNECT
    assert "cannot connect" in one_line_error(out.stderr)


def test_a_host_name_that_does_not_resolve_says_to_check_it(tmp_path: Path) -> None:
    """It was told "is `replicator receive` running there and reachable?": there is no
    there; the name is what to check (a typo, the README's `target:7400` as written)."""
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 4096)
    out = replicator(
        "send", "--to", "no-such-host.invalid:7400", "--job", "j", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(disk),
    )  # fmt: skip
    assert out.returncode == ExitCode.CONNECT
    error = one_line_error(out.stderr)
    assert "cannot resolve the host name" in error and "check the host name" in error, error
    assert "running there" not in error, error


def test_tls_dir_or_insecure_is_required(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x")
    out = replicator("send", "--to", "127.0.0.1:1", "--job", "j", "--once", str(disk))
    assert out.returncode == ExitCode.CONFIG
    assert "--insecure" in one_line_error(out.stderr)
    assert "replicator keygen --out DIR" in one_line_error(out.stderr)


def test_bad_endpoint(tmp_path: Path) -> None:
    out = replicator("receive", "--listen", "nowhere", "--dir", str(tmp_path), "--insecure")
    assert out.returncode == ExitCode.USAGE  # a bad command line, as docs/OPERATIONS.md says
    assert "HOST:PORT" in one_line_error(out.stderr)


@pytest.mark.parametrize(
    "args",
    [
        ("send", "--to", "127.0.0.1:1", "--job", "j", "--insecure", "--interval", "nan", "x"),
        ("send", "--to", "127.0.0.1:1", "--job", "j", "--insecure", "--hook-timeout", "inf", "x"),
        ("receive", "--listen", "127.0.0.1:1", "--dir", "d", "--auto-failover-after", "nan"),
        ("failover", "--dir", "d", "--job", "j", "--planned", "--timeout", "nan"),
    ],
)
def test_seconds_that_are_not_finite_are_a_usage_error(args: tuple[str, ...]) -> None:
    """`--interval nan` ran one cycle, then died as a bug (exit 70, restarted by systemd
    every 30 s); inf never woke the sender again."""
    out = replicator(*args)
    assert out.returncode == ExitCode.USAGE, out.stderr
    assert "is not a number of seconds: give a finite number" in out.stderr


@pytest.mark.parametrize(
    ("mode", "needs"),
    [("nbd", "--nbd-socket PATH"), ("fuse", "--mount MOUNTPOINT"), ("scan", None)],
)
def test_a_capture_mode_without_what_it_needs_is_a_usage_error(
    tmp_path: Path, mode: str, needs: str | None
) -> None:
    """`--capture nbd` without `--nbd-socket` exited 3 (bad input) where an option of
    another mode exits 2: both are a bad command line."""
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 4096)
    extra = ("--once",) if needs is None else ()
    args = ("--capture", mode, *extra) if needs is not None else ("--nbd-socket", "s", *extra)
    out = replicator("send", "--to", "127.0.0.1:1", "--job", "j", "--insecure",
                     "--state-dir", str(tmp_path / "s"), *args, str(disk))  # fmt: skip
    assert out.returncode == ExitCode.USAGE, out.stderr
    error = one_line_error(out.stderr)
    assert (f"--capture {mode} needs {needs}" if needs else "--nbd-socket only applies") in error


def test_help_on_every_command() -> None:
    for cmd in ([], ["send"], ["receive"], ["verify"], ["journal"], ["journal", "inspect"]):
        out = replicator(*cmd, "-h")
        assert out.returncode == 0, (cmd, out.stderr)
        assert "Usage" in out.stdout
        # one style everywhere: plain click help, no shell-completion options, no boxes
        assert "--install-completion" not in out.stdout and "╭" not in out.stdout, cmd


@pytest.mark.parametrize(
    ("text", "size"), [("4096", 4096), ("512M", 512 << 20), ("16G", 16 << 30), ("2GiB", 2 << 30)]
)
def test_sizes_parse(text: str, size: int) -> None:
    from replicator.cli.common import parse_size

    assert parse_size(text, "--journal-max") == size


def test_bad_journal_max(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x")
    out = replicator(
        "send", "--to", "127.0.0.1:1", "--job", "j", "--once", "--insecure",
        "--journal-max", "lots", str(disk),
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG
    assert "--journal-max" in one_line_error(out.stderr)


def test_second_sender_for_a_connected_job_is_refused(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    import signal
    import subprocess
    import time

    from tests.tools import ENV, REPLICATOR

    disk = tmp_path / "d.img"
    disk.write_bytes(b"\x03" * 65536)
    first = subprocess.Popen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "busy", "--state-dir",
         str(tmp_path / "s1"), "--interval", "60", "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (receiver.dir / "busy" / "d.img").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        copy = tmp_path / "copy" / "d.img"  # the same job from another source image
        copy.parent.mkdir()
        copy.write_bytes(disk.read_bytes())
        second = replicator(
            "send", "--to", receiver.address, "--job", "busy", "--state-dir",
            str(tmp_path / "s2"), "--once", "--insecure", str(copy),
        )  # fmt: skip
        assert second.returncode == ExitCode.REFUSED
        busy = one_line_error(second.stderr)
        assert "already has a sender" in busy
        assert "(127.0.0.1:" in busy and "connected since 20" in busy  # who holds it, since when
        same_image = replicator(  # the same image under another job: one sender per image
            "send", "--to", receiver.address, "--job", "other", "--state-dir",
            str(tmp_path / "s3"), "--once", "--insecure", str(disk),
        )  # fmt: skip
        assert same_image.returncode == ExitCode.CONFIG
        assert "already being replicated" in one_line_error(same_image.stderr)
        same_state = replicator(
            "send", "--to", receiver.address, "--job", "busy", "--state-dir",
            str(tmp_path / "s1"), "--once", "--insecure", str(disk),
        )  # fmt: skip
        assert same_state.returncode == ExitCode.CONFIG
        assert "already runs with state folder" in one_line_error(same_state.stderr)
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0


def test_receiver_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_bytes(b"")
    out = replicator("receive", "--listen", f"127.0.0.1:{free_port()}", "--dir",
                     str(tmp_path / "afile"), "--insecure")  # fmt: skip
    assert out.returncode == ExitCode.CONFIG
    assert "is a file, not a folder" in one_line_error(out.stderr)


def test_receiver_port_in_use(tmp_path: Path, receiver: ReceiverProc) -> None:
    out = replicator("receive", "--listen", receiver.address, "--dir", str(tmp_path / "x"),
                     "--insecure")  # fmt: skip
    assert out.returncode == ExitCode.CONFIG
    error = one_line_error(out.stderr)
    assert "cannot listen" in error and "another receiver" in error  # says what to do next


@pytest.mark.parametrize("planted", ["symlink", "FIFO", "regular file"])
def test_a_job_folder_that_is_not_a_folder_is_refused_with_what_to_do(
    tmp_path: Path, receiver: ReceiverProc, planted: str
) -> None:
    """DIR/JOB planted as a symlink to a folder elsewhere (or as anything but a folder):
    nothing is written through it, and the sender is told what is wrong and what to do
    (not a bare errno)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    receiver.dir.mkdir(parents=True, exist_ok=True)
    if planted == "symlink":
        (receiver.dir / "vm1").symlink_to(outside)
    elif planted == "FIFO":
        os.mkfifo(receiver.dir / "vm1")
    else:
        (receiver.dir / "vm1").write_bytes(b"not a folder")
    disk = tmp_path / "d.img"
    disk.write_bytes(b"x" * 65536)
    out = replicator(
        "send", "--to", receiver.address, "--job", "vm1", "--once", "--insecure",
        "--state-dir", str(tmp_path / "s"), str(disk),
    )  # fmt: skip
    assert out.returncode == ExitCode.REFUSED
    line = one_line_error(out.stderr)
    assert f"{receiver.dir / 'vm1'} is a {planted}, not a folder" in line
    assert "remove it on the target" in line and "nothing is lost" in line
    assert list(outside.iterdir()) == []


def test_a_job_sent_meanwhile_from_another_state_folder_is_named_as_a_cause(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """The gap a state folder finds after another one sent its job (a --state-dir given
    once, forgotten the next time; a `--state-dir=~/x` that went to a folder named ~) was
    put down to a restore from an older copy alone."""
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(1 << 20))
    first, other = tmp_path / "s1", tmp_path / "s2"
    send_once(receiver, "j", first, disk)
    with disk.open("r+b") as f:
        f.write(os.urandom(4096))
    send_once(receiver, "j", other, disk)
    out = replicator(
        "send", "--to", receiver.address, "--job", "j", "--once", "--insecure",
        "--state-dir", str(first), str(disk),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    gap = [line for line in out.stderr.splitlines() if "sender.journal_gap" in line]
    assert len(gap) == 1, out.stderr
    assert "another --state-dir replicate this job since" in gap[0], gap[0]
