"""``replicator status`` and ``--metrics-listen`` against real processes: a continuous scan
sender and a receiver answer while replicating, the lag moves when the receiver stops,
the files answer when nothing runs, and nothing listens that was not asked for."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from replicator.engine.control import ControlUnavailable, request
from replicator.engine.errors import ExitCode
from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    free_port,
    replicator,
    send_once,
    start_send,
    wait_port,
)

AT_REST = "not running (read from files at rest)"


def _status(*args: str) -> dict[str, Any]:
    out = replicator("status", *args, "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def _ask(socket_path: Path) -> dict[str, Any] | None:
    """The live status through the control socket (in process: fast enough to poll)."""
    try:
        answer: dict[str, Any] = request(socket_path, "status", timeout=5)
    except ControlUnavailable:
        return None
    return answer


def _until(
    what: str, probe: Callable[[], dict[str, Any] | None], ok: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last is not None and ok(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: last status {json.dumps(last)[:2000]}")


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        return str(answer.read().decode())


def _sample(text: str, name: str, **labels: str) -> float:
    want = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(name + want + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{want} in the metrics")


def _receiver(directory: Path, *extra: str) -> ReceiverProc:
    port = free_port()
    proc = LoggedPopen(
        [*REPLICATOR, "receive", "--listen", f"127.0.0.1:{port}", "--dir", str(directory),
         "--insecure", *extra],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    wait_port(port, proc)
    return ReceiverProc(port, directory, proc)


def _receive_at(address: str, directory: Path) -> subprocess.Popen[str]:
    """A receiver at ``address`` again (listening once this returns)."""
    proc = subprocess.Popen(
        [*REPLICATOR, "receive", "--listen", address, "--dir", str(directory), "--insecure"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=ENV,
    )  # fmt: skip
    wait_port(int(address.rsplit(":", 1)[1]), proc)
    return proc


def _sender(address: str, job: str, state: Path, disk: Path, *extra: str) -> subprocess.Popen[str]:
    return start_send(address, job, state, disk, extra=("--interval", "0.2", *extra))


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_a_running_pair_answers_status_and_metrics_and_the_lag_moves(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(2 * 1024 * 1024))
    state, target = tmp_path / "state", tmp_path / "target"
    rmetrics, smetrics = free_port(), free_port()
    receiver = _receiver(target, "--metrics-listen", f"127.0.0.1:{rmetrics}")
    sender = _sender(
        receiver.address, "st", state, disk, "--metrics-listen", f"127.0.0.1:{smetrics}"
    )
    sock = state / "control.sock"
    try:
        _until(
            "the sender replicates",
            lambda: _ask(sock),
            lambda s: (
                s["jobs"][0]["connected"]
                and 0 < s["jobs"][0]["lsn"]["applied"] == s["jobs"][0]["lsn"]["journaled"]
            ),
        )
        live = _status("--state-dir", str(state))
        assert live["running"] and live["source"] == "process" and live["pid"] == sender.pid
        job = live["jobs"][0]
        assert job["job"] == "st" and job["role"] == "sender" and job["capture"] == "scan"
        assert job["peer"] == receiver.address and job["state"] in ("replicating", "lagging")
        assert set(job["lag"]) >= {"records", "bytes", "seconds"}
        assert job["bytes"]["payload"] >= disk.stat().st_size
        # the sender scans every 0.2 s and the receiver applies each cycle: during an
        # apply it honestly says "not consistent"; between applies it is
        rlive = _until(
            "the receiver reports a consistency point",
            lambda: _status("--dir", str(target)),
            lambda s: bool(s["jobs"]) and s["jobs"][0]["consistency_point"]["consistent"],
        )
        assert rlive["running"] and rlive["role"] == "receiver"
        rjob = rlive["jobs"][0]
        assert rjob["job"] == "st" and rjob["lsn"]["applied"] > 0
        assert rjob["lag"]["seconds"] is not None
        generation = rjob["generation"]

        text = _metrics(smetrics)
        me = {"job": "st", "role": "sender"}
        assert _sample(text, "replicator_connected", **me) == 1
        assert _sample(text, "replicator_replicated_bytes_total", **me) >= disk.stat().st_size
        assert _sample(text, "replicator_lag_seconds", **me) >= 0
        assert _sample(text, "replicator_applied_lsn", **me) > 0
        rtext = _metrics(rmetrics)
        them = {"job": "st", "role": "receiver"}
        assert _sample(rtext, "replicator_applied_lsn", **them) > 0
        assert _sample(rtext, "replicator_wire_received_bytes_total", **them) > 0
        assert _sample(rtext, "replicator_state", state="receiving", **them) == 1
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{smetrics}/", timeout=10)
            raise AssertionError("/ answered")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404

        # the receiver stops answering: new writes are journaled, shipped, never applied
        receiver.proc.send_signal(signal.SIGSTOP)
        with disk.open("r+b") as f:
            f.seek(1024 * 1024)
            f.write(os.urandom(65536))
        _until(
            "the lag grows while the receiver is stopped",
            lambda: _ask(sock),
            lambda s: s["jobs"][0]["lag"]["records"] > 0 and s["jobs"][0]["lag"]["seconds"] > 0.3,
        )
        receiver.proc.kill()  # and now it is gone: the sender says so, the lag stays
        receiver.proc.wait(timeout=30)
        away = _until(
            "the sender notices the receiver is gone",
            lambda: _ask(sock),
            lambda s: not s["jobs"][0]["connected"],
        )["jobs"][0]
        assert away["state"] == "connecting"
        assert away["lag"]["records"] > 0 and away["lag"]["seconds"] > 0.3
        text = _metrics(smetrics)
        assert _sample(text, "replicator_connected", **me) == 0
        assert _sample(text, "replicator_state", state="connecting", **me) == 1
        assert _sample(text, "replicator_lag_records", **me) > 0
        assert _sample(text, "replicator_errors_total", kind="connection", **me) >= 1
    finally:
        if receiver.proc.poll() is None:
            receiver.proc.kill()
            receiver.proc.wait(timeout=30)
        assert _stop(sender) == 0, sender.stderr.read() if sender.stderr else ""
    assert not sock.exists()  # removed on a clean exit

    rest = _status("--state-dir", str(state))
    assert rest["running"] is False and rest["note"] == AT_REST
    job = rest["jobs"][0]
    assert job["job"] == "st" and job["state"] == "not_running" and job["peer"]
    assert job["lag"]["at_most"]["records"] > 0 and job["last_epoch"] > 0
    rrest = _status("--dir", str(target))
    assert rrest["running"] is False and rrest["note"] == AT_REST
    rjob = rrest["jobs"][0]
    assert rjob["job"] == "st" and rjob["lsn"]["applied"] > 0
    assert rjob["consistency_point"]["source_time"]
    assert rjob["generation"] == generation  # as the running receiver said
    table = replicator("status", "--dir", str(target))
    assert table.returncode == 0 and AT_REST in table.stdout and "st" in table.stdout


def test_a_scanning_sender_without_its_receiver_reports_a_growing_lag(tmp_path: Path) -> None:
    """A scanning sender captures changes only in its cycles, which need the receiver: while
    the receiver is away, what the source writes is on the source alone, so the lag (the
    RPO less the interval) counts from the scan of the point the receiver applied. It read
    0 with nothing journaled, and an alert on `replicator_lag_seconds` never fired."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1024 * 1024))
    state, target, metrics = tmp_path / "state", tmp_path / "target", free_port()
    receiver = _receiver(target)
    sender = _sender(
        receiver.address, "st", state, disk, "--metrics-listen", f"127.0.0.1:{metrics}"
    )
    sock = state / "control.sock"
    try:
        for _ in range(5):
            _until(
                "the sender replicates",
                lambda: _ask(sock),
                lambda s: 0 < s["jobs"][0]["lsn"]["applied"] == s["jobs"][0]["lsn"]["journaled"],
            )
            receiver.proc.kill()
            receiver.proc.wait(timeout=30)
            # once the sender knows (a cycle under way at the kill, every 0.2 s, could still
            # read the write below and journal it before its link failed: a loaded CI did);
            # no cycle runs without a link, so what it has journaled stays as it is now
            gone = _until(
                "the sender sees it", lambda: _ask(sock), lambda s: not s["jobs"][0]["connected"]
            )["jobs"][0]["lsn"]
            if gone["journaled"] == gone["applied"]:
                break
            # a cycle journaled its EPOCH between the receiver's last ack and the kill (a
            # loaded machine): the lag would be that record's, not the case here. Again.
            receiver = ReceiverProc(
                receiver.port, target, _receive_at(receiver.address, target), None
            )
        else:
            raise AssertionError("every kill came after a cycle journaled its epoch")
        with disk.open("r+b") as f:  # written on the source alone
            f.write(os.urandom(65536))
        away = _until(
            "the lag grows while the receiver is away",
            lambda: _ask(sock),
            lambda s: not s["jobs"][0]["connected"] and s["jobs"][0]["lag"]["seconds"] > 2,
        )["jobs"][0]
        assert away["lag"]["records"] == 0  # nothing captured: the age is not the journal's
        assert _sample(_metrics(metrics), "replicator_lag_seconds", job="st", role="sender") > 2
        back = _receive_at(receiver.address, target)  # the receiver is back, where it was
        try:
            _until(
                "the lag is small again once a new point is applied",
                lambda: _ask(sock),
                lambda s: s["jobs"][0]["connected"] and s["jobs"][0]["lag"]["seconds"] < 1.5,
            )
        finally:
            back.terminate()
            back.wait(timeout=60)
    finally:
        if receiver.proc.poll() is None:
            receiver.proc.kill()
            receiver.proc.wait(timeout=30)
        assert _stop(sender) == 0, sender.stderr.read() if sender.stderr else ""


def _listening_tcp_ports(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_nothing_listens_unless_asked_and_the_control_sockets_are_private(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(256 * 1024))
    state = tmp_path / "state"
    sender = _sender(receiver.address, "quiet", state, disk)
    try:
        _until(
            "the sender replicates",
            lambda: _ask(state / "control.sock"),
            lambda s: s["jobs"][0]["lsn"]["applied"] > 0,
        )
        assert _listening_tcp_ports(sender.pid) == set()
        assert _listening_tcp_ports(receiver.proc.pid) == {receiver.port}
        for sock in (state / "control.sock", receiver.dir / ".replicator" / "control.sock"):
            st = sock.lstat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, sock
            assert st.st_uid == os.geteuid()
        claim = json.loads((state / "sender.json").read_text())
        assert claim["job"] == "quiet" and claim["pid"] == sender.pid
        # a second sender on the same state folder is told who runs there
        second = replicator(
            "send", "--to", receiver.address, "--job", "quiet", "--state-dir", str(state),
            "--insecure", str(disk), timeout=60,
        )  # fmt: skip
        assert second.returncode == ExitCode.CONFIG
        assert f"(pid {sender.pid}) already runs with state folder" in second.stderr
    finally:
        assert _stop(sender) == 0


def test_status_alone_names_the_senders_that_ran_with_the_default_state_dir() -> None:
    """A `send` without --state-dir (the README's) keeps its state in a folder it never
    names; `status` alone said only "--state-dir S for a sender". It lists them now. Run
    as nobody: root's default is /var/lib/replicator/send, this machine's."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is missing"
    home = Path(tempfile.mkdtemp(prefix="status-default-"))  # nobody cannot reach tmp_path
    try:
        home.chmod(0o777)
        disk = home / "disk.img"
        disk.write_bytes(b"x" * 4096)
        disk.chmod(0o644)
        env = {**ENV, "HOME": str(home), "XDG_STATE_HOME": str(home / "state")}
        nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *REPLICATOR]

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*nobody, *args], cwd=home, env=env, capture_output=True,
                                  text=True, timeout=60)  # fmt: skip

        before = run("status")
        assert before.returncode == ExitCode.USAGE and "--state-dir S" in before.stderr
        assert "default --state-dir" not in before.stderr, before.stderr  # none ran yet
        sent = run("send", "--to", "127.0.0.1:1", "--job", "web01", "--once", "--insecure",
                   str(disk))  # fmt: skip
        assert sent.returncode == ExitCode.CONNECT, sent.stderr
        after = run("status")
        assert after.returncode == ExitCode.USAGE
        state = home / "state" / "replicator" / "send" / "web01"
        assert f"`replicator status --state-dir {state}`" in after.stderr, after.stderr
        assert run("status", "--state-dir", str(state)).returncode == 0
    finally:
        shutil.rmtree(home)


def test_status_dir_given_a_senders_folder_says_to_use_state_dir(tmp_path: Path) -> None:
    """`status --state-dir` given a receiver's folder said so and what to give; the other
    way round, `status --dir` of a sender's state folder (or of the folder holding them,
    /var/lib/replicator/send) said only "no receiver state in .../.replicator"."""
    state = tmp_path / "send" / "web01"
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"x" * 4096)
    ran = replicator("send", "--to", "127.0.0.1:1", "--job", "web01", "--state-dir", str(state),
                     "--once", "--insecure", str(disk))  # fmt: skip
    assert ran.returncode == ExitCode.CONNECT, ran.stderr  # it ran there, and says so
    assert replicator("status", "--state-dir", str(state)).returncode == 0
    mine = replicator("status", "--dir", str(state))
    assert mine.returncode == ExitCode.CONFIG and mine.stdout == "", mine.stdout
    assert f"{state} is a sender's state folder, not a receiver's folder" in mine.stderr
    assert f"give `--state-dir {state}`" in mine.stderr
    parent = replicator("status", "--dir", str(tmp_path / "send"))
    assert parent.returncode == ExitCode.CONFIG
    assert f"for a sender's status give --state-dir {state}" in parent.stderr
    (tmp_path / "src" / "journal").mkdir(parents=True)  # a checkout: no sender ran there
    checkout = replicator("status", "--dir", str(tmp_path / "src"))
    assert checkout.returncode == ExitCode.CONFIG
    assert "has `replicator receive --dir DIR` run here?" in checkout.stderr


def test_status_errors_and_watch(tmp_path: Path) -> None:
    none = replicator("status")
    assert none.returncode == ExitCode.USAGE and "--state-dir" in none.stderr
    missing = replicator("status", "--state-dir", str(tmp_path / "nope"))
    assert missing.returncode == ExitCode.CONFIG and "does not exist" in missing.stderr
    assert "--state-dir the sender runs with" in missing.stderr  # and what to do
    (tmp_path / "a-file").write_text("x")  # it said "does not exist" of a file
    afile = replicator("status", "--state-dir", str(tmp_path / "a-file"))
    assert afile.returncode == ExitCode.CONFIG and "is not a folder" in afile.stderr
    nodir = replicator("status", "--dir", str(tmp_path / "nope"))
    assert nodir.returncode == ExitCode.CONFIG and "receive" in nodir.stderr
    (tmp_path / "empty").mkdir()
    nostate = replicator("status", "--dir", str(tmp_path / "empty"))
    assert nostate.returncode == ExitCode.CONFIG and "no receiver state" in nostate.stderr
    # a folder that is no sender's state (the VM's own, say) is not a job with no lag
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "disk.qcow2").write_bytes(b"QFI\xfb")
    wrong = replicator("status", "--state-dir", str(tmp_path / "vm"))
    assert wrong.returncode == ExitCode.CONFIG and wrong.stdout == "", wrong.stdout
    assert "is not a sender's state folder" in wrong.stderr
    assert "--state-dir the sender runs with" in wrong.stderr
    (tmp_path / "vm" / "web01" / "journal").mkdir(parents=True)  # the parent of job folders
    parent = replicator("status", "--state-dir", str(tmp_path / "vm"))
    assert parent.returncode == ExitCode.CONFIG
    assert "it holds the state folders of web01: give one of them" in parent.stderr
    # a receiver's folders hold a journal and a control socket too: never a sender's
    replicas = tmp_path / "replicas"
    (replicas / ".replicator" / "web01" / "journal").mkdir(parents=True)
    (replicas / ".replicator" / "web01" / "applied.state").write_bytes(b"x")
    (replicas / ".replicator" / "control.sock").touch()
    for folder in (replicas, replicas / ".replicator", replicas / ".replicator" / "web01"):
        theirs = replicator("status", "--state-dir", str(folder))
        assert theirs.returncode == ExitCode.CONFIG and theirs.stdout == "", theirs.stdout
        assert "is a receiver's folder, not a sender's state folder" in theirs.stderr
        assert "give `--dir DIR`" in theirs.stderr
    both = replicator(
        "status", "--dir", str(replicas), "--state-dir", str(tmp_path / "vm" / "web01")
    )
    assert both.returncode == ExitCode.CONFIG
    assert "is a sender's state folder: with --dir, --state-dir is the receiver's" in both.stderr
    for command in (
        ("send", "--to", "127.0.0.1:1", "--job", "j", "--insecure", str(tmp_path)),
        ("receive", "--listen", "127.0.0.1:1", "--dir", str(tmp_path / "r"), "--insecure"),
    ):
        bad = replicator(*command, "--metrics-listen", "bogus")
        assert bad.returncode == ExitCode.USAGE, bad.stderr
        assert "'bogus'" in bad.stderr and "--metrics-listen 127.0.0.1:" in bad.stderr

    # --watch until Ctrl-C: exit 0 (a state folder at rest answers every second)
    state = tmp_path / "state"
    (state / "journal").mkdir(parents=True)  # a sender ran here
    watch = subprocess.Popen(
        [*REPLICATOR, "status", "--state-dir", str(state), "--watch", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert watch.stdout is not None
    first = json.loads(watch.stdout.readline())
    assert first["running"] is False and first["jobs"][0]["job"] == "state"
    assert json.loads(watch.stdout.readline())["note"] == AT_REST  # a second later
    watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=30) == 0
    # piped without --json: a table each second, as it comes (not only one at Ctrl-C)
    tables = subprocess.Popen(
        [*REPLICATOR, "status", "--state-dir", str(state), "--watch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert tables.stdout is not None
    stop = threading.Timer(15, tables.send_signal, (signal.SIGINT,))  # if they never come
    stop.start()
    heads = 0
    try:
        while heads < 2 and (line := tables.stdout.readline()):
            heads += line.startswith("sender: not running")
    finally:
        stop.cancel()
    tables.send_signal(signal.SIGINT)
    assert tables.wait(timeout=30) == 0
    assert heads == 2, "the tables did not come one after another"


def _ask_as(uid: int, sock: Path) -> str:
    """Ask the control socket for the status from a forked child running as ``uid``:
    "EACCES" when it may not connect, else the answer line."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        code = 0
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            answer = b""
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                except PermissionError:
                    answer = b"EACCES"
                else:
                    # refused before it read anything: the answer is there all the same
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        s.sendall(b'{"op": "status"}\n')
                    answer = s.makefile("rb").readline().strip()
            os.write(write_end, answer)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the other user's client failed"
    return out


def test_the_control_socket_refuses_other_users() -> None:
    """Mode 0600 keeps them out; a socket made wider by hand still answers them no
    (SO_PEERCRED), in a real receiver (uvloop). Runs as root, like the rest of the suite
    (FUSE mounts, namespaces): the client drops to uid 65534 in a forked child."""
    where = Path(tempfile.mkdtemp(prefix="replicator-status-"))  # tmp_path is 0700
    try:
        where.chmod(0o755)
        receiver = _receiver(where / "target")
        sock = where / "target" / ".replicator" / "control.sock"
        try:
            _until("the control socket answers", lambda: _ask(sock), lambda s: True)

            def ask_as_nobody() -> str:
                return _ask_as(65534, sock)

            assert ask_as_nobody() == "EACCES"
            sock.chmod(0o666)
            answer = json.loads(ask_as_nobody())
            assert answer == {"ok": False, "code": "forbidden", "error": answer["error"]}
            assert "uid 65534" in answer["error"]
            assert _ask(sock) is not None  # its owner still gets answers
        finally:
            assert receiver.stop() == 0
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_status_at_rest_after_send_once_counts_nothing_the_receiver_applied(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A cron-driven `send --once`: `status` at rest knows the receiver applied all it
    journaled (the run retired those records: the journal at rest holds none)."""
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    disk.write_bytes(os.urandom(2 * 1024 * 1024))
    send_once(receiver, "cron", state, disk)
    with disk.open("r+b") as f:
        f.write(os.urandom(256 * 1024))
    send_once(receiver, "cron", state, disk)
    job = _status("--state-dir", str(state))["jobs"][0]
    assert job["lsn"]["trimmed_below"] == job["lsn"]["journaled"] + 1  # none left
    assert job["applied_heard"]["lsn"] == job["lsn"]["journaled"]
    assert job["lag"]["at_most"] == {"records": 0, "bytes": 0, "seconds": 0.0}
    table = replicator("status", "--state-dir", str(state))
    assert table.returncode == 0
    assert f"had applied LSN {job['lsn']['journaled']}" in " ".join(table.stdout.split())
    # piped, the table is plain lines: none padded out to the widest value
    padded = [line for line in table.stdout.splitlines() if line != line.rstrip()]
    assert not padded, padded


def test_status_at_rest_says_how_the_last_sender_ended(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A `send --once` from cron that failed showed nothing at rest ("errors -"): the
    claim now records how each sender ended, and one killed leaves no record to say so."""
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    disk.write_bytes(os.urandom(1024 * 1024))
    away = f"127.0.0.1:{free_port()}"
    failed = replicator("send", "--to", away, "--job", "cron", "--state-dir", str(state),
                        "--once", "--insecure", str(disk))  # fmt: skip
    assert failed.returncode == ExitCode.CONNECT, failed.stderr
    job = _status("--state-dir", str(state))["jobs"][0]
    run = job["last_run"]
    assert run["outcome"] == "failed" and run["exit_code"] == ExitCode.CONNECT, run
    assert f"cannot connect to receiver {away}" in run["error"] and run["ended"], run
    assert job["last_error"] == run["error"]
    table = " ".join(replicator("status", "--state-dir", str(state)).stdout.split())
    assert f"last run failed at {run['ended']} (exit {int(ExitCode.CONNECT)};" in table
    assert f"cannot connect to receiver {away}" in table

    send_once(receiver, "cron", state, disk)
    run = _status("--state-dir", str(state))["jobs"][0]["last_run"]
    assert run["outcome"] == "ok" and run["error"] is None and run["ended"], run
    assert "without error" in replicator("status", "--state-dir", str(state)).stdout

    proc = _sender(receiver.address, "cron", state, disk)
    _until("connected", lambda: _ask(state / "control.sock"), lambda s: s["jobs"][0]["connected"])
    proc.kill()
    proc.wait(timeout=30)
    job = _status("--state-dir", str(state))["jobs"][0]
    assert job["last_run"]["outcome"] == "unrecorded" and job["last_run"]["ended"] is None
    assert "ended without saying how" in replicator("status", "--state-dir", str(state)).stdout


def test_status_at_rest_of_a_run_by_an_older_release_does_not_say_it_was_killed(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """Releases before 2026-12-07 never recorded how a run ended: after an upgrade, status
    at rest said every job's last run "ended without saying how (killed, or the machine
    stopped)", though it had ended well. The claim below is what `send --once` built from
    e8262fd (protocol 5) left after exiting 0 (its pid and time changed)."""
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    disk.write_bytes(os.urandom(1024 * 1024))
    send_once(receiver, "cron", state, disk)
    (state / "sender.json").write_text(
        f'{{"capture": "scan", "job": "cron", "peer": "{receiver.address}", "pid": 3231, '
        f'"started": 1796620563.0846431, "volumes": ["{disk}"]}}'
    )
    run = _status("--state-dir", str(state))["jobs"][0]["last_run"]
    assert run["outcome"] == "unknown" and run["ended"] is None and run["error"] is None, run
    table = " ".join(replicator("status", "--state-dir", str(state)).stdout.split())
    assert (
        "last run started 2026-12-07T05:16:03.084Z; how it ended is not known: an older " in table
    )
    assert "killed" not in table


def test_a_send_once_under_way_says_it_replicates(tmp_path: Path, receiver: ReceiverProc) -> None:
    """It said "starting" for as long as it shipped (8 MiB at 4 MB/s here)."""
    disk, state = tmp_path / "disk.img", tmp_path / "state"
    disk.write_bytes(os.urandom(8 * 1024 * 1024))
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", "once", "--state-dir",
         str(state), "--once", "--insecure", "--rate", "4M", "--burst", "1M", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    seen: set[str] = set()
    try:
        while proc.poll() is None:
            out = replicator("status", "--state-dir", str(state), "--json")
            if out.returncode == 0:
                snap = json.loads(out.stdout)
                if snap.get("running"):
                    seen.add(snap["jobs"][0]["state"])
            time.sleep(0.2)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert "replicating" in seen, seen


def test_a_stopped_receiver_is_said_to_run_but_not_to_answer(tmp_path: Path) -> None:
    """A receiver that runs but does not answer on its control socket (SIGSTOP: stuck) is
    read from its files, as a sender in that state is, and said to run, with its pid: not
    "not running", which would invite starting a second one or failing over at rest."""
    target = tmp_path / "target"
    receiver = _receiver(target)
    try:
        sock = target / ".replicator" / "control.sock"
        _until("the receiver answers", lambda: _ask(sock), lambda s: s["role"] == "receiver")
        receiver.proc.send_signal(signal.SIGSTOP)
        try:
            stopped = _status("--dir", str(target))
            table = replicator("status", "--dir", str(target), timeout=60)
        finally:
            receiver.proc.send_signal(signal.SIGCONT)
        pid = receiver.proc.pid
        assert stopped["running"] is True and stopped["source"] == "files", stopped
        assert stopped["note"] == (
            f"a receiver runs (pid {pid}) but does not answer on its control socket (control "
            f"socket {sock}: no answer in time); read from files at rest"
        )
        assert table.returncode == 0
        assert f"receiver: a receiver runs (pid {pid}) but does not answer" in table.stdout
        assert _status("--dir", str(target))["source"] == "process"  # running again
    finally:
        receiver.stop()
    assert _status("--dir", str(target))["note"] == AT_REST


def _silent_for_12_s(answer: dict[str, Any]) -> bool:
    """A control socket's answer: its job's peer has been silent for 12 s or more."""
    return bool((answer["jobs"][0]["peer_silent_seconds"] or 0) >= 12)


def test_a_stuck_peer_shows_as_silent_in_status_and_metrics(tmp_path: Path) -> None:
    """A receiver that stops answering (SIGSTOP: a hung disk, a stuck path) keeps its TCP
    connection up; `status` must not just say "connected": the receiver pings every 5 s
    and the sender answers, so from 12 s of silence on the table and the metrics say so,
    and once it runs again they do not. The receiver sees a stuck sender the same way."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    receiver = _receiver(tmp_path / "target")
    port = free_port()
    state = tmp_path / "state"
    sender = _sender(receiver.address, "st", state, disk, "--metrics-listen", f"127.0.0.1:{port}")
    sock = state / "control.sock"
    try:
        job = _until("replicating", lambda: _ask(sock), lambda s: bool(s["jobs"][0]["connected"]))
        assert job["jobs"][0]["peer_silent_seconds"] < 12
        receiver.proc.send_signal(signal.SIGSTOP)
        try:
            # silent for 12 s counts from the last ping heard, up to 5 s before the stop
            _until("silent for 12 s", lambda: _ask(sock), _silent_for_12_s)
            silent = _status("--state-dir", str(state))["jobs"][0]
            assert silent["connected"] and silent["peer_silent_seconds"] >= 12, silent
            table = replicator("status", "--state-dir", str(state))
            assert "(connected, but silent for " in table.stdout, table.stdout
            wait_port(port, sender)
            assert _sample(_metrics(port), "replicator_peer_silent_seconds",
                           role="sender", job="st") >= 12  # fmt: skip
        finally:
            receiver.proc.send_signal(signal.SIGCONT)
        _until(
            "heard again",
            lambda: _ask(sock),
            lambda s: (s["jobs"][0]["peer_silent_seconds"] or 99) < 12,
        )
        assert "silent" not in replicator("status", "--state-dir", str(state)).stdout

        # and the other way round: the receiver tells a sender that stopped answering
        target = str(tmp_path / "target")
        sender.send_signal(signal.SIGSTOP)
        try:
            rsock = tmp_path / "target" / ".replicator" / "control.sock"
            _until("the receiver says silent for 12 s", lambda: _ask(rsock), _silent_for_12_s)
            (job,) = _status("--dir", target)["jobs"]
            assert job["connected"] and job["peer_silent_seconds"] >= 12, job
            assert "(connected, but silent for " in replicator("status", "--dir", target).stdout
        finally:
            sender.send_signal(signal.SIGCONT)
    finally:
        assert _stop(sender) == 0
        receiver.stop()


def test_a_start_that_fails_before_running_leaves_nothing_behind(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """`send` exiting 3 on a metrics address in use had already made its state folder and
    `sender.json`: `status` then showed a job that never ran, and over a folder used
    before it replaced how the last run ended. The failed start now undoes its claim."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1024 * 1024))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"

        def start(state: Path) -> None:
            failed = replicator("send", "--to", receiver.address, "--job", "vm", "--state-dir",
                                str(state), "--once", "--insecure", "--metrics-listen", busy,
                                str(disk))  # fmt: skip
            assert failed.returncode == ExitCode.CONFIG, failed.stderr
            assert f"cannot serve metrics on {busy}" in failed.stderr

        fresh = tmp_path / "states" / "vm"
        start(fresh)
        assert not (tmp_path / "states").exists(), list((tmp_path / "states").rglob("*"))
        gone = replicator("status", "--state-dir", str(fresh))
        assert gone.returncode == ExitCode.CONFIG and "does not exist" in gone.stderr

        used = tmp_path / "used"
        send_once(receiver, "vm", used, disk)
        before = {p.name: p.read_bytes() for p in used.iterdir() if p.is_file()}
        folders = sorted(p.name for p in used.rglob("*"))
        start(used)
        assert {p.name: p.read_bytes() for p in used.iterdir() if p.is_file()} == before
        assert sorted(p.name for p in used.rglob("*")) == folders
        run = _status("--state-dir", str(used))["jobs"][0]["last_run"]
        assert run["outcome"] == "ok" and run["error"] is None, run
