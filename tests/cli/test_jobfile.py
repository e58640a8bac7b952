"""Job files as an admin uses them, with real CLI runs: ``discover --out``, filled in,
``check-config``, ``send --job-file`` against a running receiver; bad files; the command line
over the file; ``receive --config``; several jobs in child processes of their own."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.cli.test_discover import Site
from tests.tools import (
    ENV,
    LOUD_ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    b3,
    free_port,
    one_line_error,
    qemu_io,
    replicator,
    running,
    wait_port,
)

pytestmark = pytest.mark.tools


def _fill_in(job_file: Path, receiver: str) -> None:
    """What the admin does to discover's output: uncomment `to`, choose insecure, and give
    each job a state folder (relative: it is the job file's folder's)."""
    text = job_file.read_text()
    text = re.sub(
        r'^\[jobs\.(.+)\]\n(# .*\n)# to = "HOST:PORT"\n# tls_dir = .*\n',
        lambda m: (
            f'[jobs.{m[1]}]\n{m[2]}to = {receiver!r}\ninsecure = true\nstate_dir = "state/{m[1]}"\n'
        ),
        text,
        flags=re.M,
    )
    assert text.count("insecure = true") == 3, text
    job_file.write_text(text)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = Site(tmp_path / "srv")
    qemu_io("qcow2", site.qcow2, "write -P 0x11 0 1M", "write -P 0x12 1G 64k")
    qemu_io("vpc", site.vhd, "write -P 0x21 4M 2M")
    qemu_io("vhdx", site.vhdx, "write -P 0x31 0 3M")
    qemu_io("raw", site.raw, "write -P 0x41 10M 1M")
    return site


def test_discover_check_config_then_send_replicates_every_file(
    site: Site, tmp_path: Path, receiver: ReceiverProc
) -> None:
    job_file = tmp_path / "etc" / "job.toml"
    job_file.parent.mkdir()
    out = replicator("discover", str(site.root), "--out", str(job_file))
    assert out.returncode == 0, out.stderr

    out = replicator("check-config", str(job_file))
    assert out.returncode == ExitCode.CONFIG, out.stdout  # `to` is still commented out
    assert f"{job_file}:" in one_line_error(out.stderr) and "has no 'to'" in out.stderr
    # check-config takes no --to: it said "or give --to on the command line" all the same
    assert "check-config reads the file alone" in out.stderr, out.stderr
    assert "or give --to on the command line" not in out.stderr
    sent = replicator("send", "--job-file", str(job_file), "--job", "web01", "--insecure")
    assert sent.returncode == ExitCode.CONFIG and "or give --to on the command line" in sent.stderr

    _fill_in(job_file, receiver.address)
    out = replicator("check-config", str(job_file))
    assert out.returncode == 0, out.stderr
    assert f"{job_file}: send job file, 3 job(s)" in out.stdout
    for job in ("web01", "SQL01", "scratch"):
        assert f"job {job}: to {receiver.address}, capture scan, insecure" in out.stdout
    for path in (site.qcow2, site.vhd, site.vhdx, site.raw):
        assert f"  disk {path}\n" in out.stdout
    assert f"  file {site.xml}\n" in out.stdout

    out = replicator("send", "--job-file", str(job_file), "--once")
    assert out.returncode == 0, out.stderr[-3000:]
    replicas = {
        site.qcow2: "web01",
        site.vhd: "web01",
        site.xml: "web01",
        site.vhdx: "SQL01",
        site.vmcx: "SQL01",
        site.raw: "scratch",
    }
    for source, job in replicas.items():
        replica = receiver.dir / job / source.name
        assert b3(replica) == b3(source), f"{replica} differs from {source}"
    for job in ("web01", "SQL01", "scratch"):  # state_dir = "state/JOB": the file's folder's
        assert (job_file.parent / "state" / job).is_dir()


def _job_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(body)
    return path


GOOD = """\
# a job
[jobs.vm1]
to = "127.0.0.1:1"
insecure = true
interval = 30
volumes = ["disk.img"]
"""


@pytest.mark.parametrize(
    ("edit", "line", "words"),
    [
        (("interval = 30", "interval = 30 s"), 5, ["not valid TOML", "interval = 30 s"]),
        (("interval = 30", "intervall = 30"), 5, ["'intervall'", "did you mean 'interval'"]),
        (("interval = 30", 'interval = "30"'), 5, ["'interval'", "wants a number"]),
        (('volumes = ["disk.img"]', 'volumes = "disk.img"'), 6, ["'volumes'", "array"]),
        (('to = "127.0.0.1:1"', 'to = "nowhere"'), 3, ["'to'", "wants HOST:PORT"]),
    ],
    ids=["syntax", "unknown-key", "wrong-type-number", "wrong-type-array", "bad-address"],
)
@pytest.mark.parametrize("command", ["check-config", "send"])
def test_a_bad_job_file_names_file_line_and_key(
    tmp_path: Path, edit: tuple[str, str], line: int, words: list[str], command: str
) -> None:
    (tmp_path / "disk.img").write_bytes(b"x" * 4096)
    path = _job_file(tmp_path, GOOD.replace(*edit))
    args = ["check-config", str(path)] if command == "check-config" else ["send", "--job-file"]
    out = replicator(*args, *([str(path), "--once"] if command == "send" else []))
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    assert f"{path}:{line}:" in error, error
    for word in words:
        assert word in error, error


@pytest.mark.parametrize("order", ["volumes-first", "files-first"])
def test_a_missing_file_is_reported_at_the_key_that_names_it(tmp_path: Path, order: str) -> None:
    """check-config said "jf.toml:4: key 'volumes': volume vm.xml does not exist" for a
    path given in `files` on line 5."""
    (tmp_path / "disk.img").write_bytes(b"x" * 4096)
    keys = ['volumes = ["disk.img"]\n', 'files = ["vm.xml"]\n']
    if order == "files-first":
        keys.reverse()
    path = _job_file(tmp_path, GOOD.replace('volumes = ["disk.img"]\n', "".join(keys)))
    out = replicator("check-config", str(path))
    assert out.returncode == ExitCode.CONFIG, out.stderr
    line = 6 if order == "files-first" else 7
    error = one_line_error(out.stderr)
    assert f"{path}:{line}: [jobs.vm1], key 'files': volume {tmp_path}/vm.xml does not" in error


@pytest.mark.parametrize(
    ("extra", "line", "words"),
    [
        ('nbd_socket = "nbd.sock"\n', 7, ["'nbd_socket'", "only applies to --capture nbd"]),
        ('capture = "nbd"\nnbd_socket = "s"\npost_hook = "true"\n', 9, ["'post_hook'", "scan"]),
        ('mount = "mnt"\n', 7, ["'mount'", "only applies to --capture fuse"]),
    ],
    ids=["nbd-option-with-scan", "hook-with-nbd", "mount-with-scan"],
)
@pytest.mark.parametrize("command", ["check-config", "send"])
def test_an_option_of_another_capture_mode_is_refused_at_its_line(
    tmp_path: Path, extra: str, line: int, words: list[str], command: str
) -> None:
    """By check-config and by `send --job-file`, which also refuses it before any job of
    the file starts (one bad job among good ones used to start the good ones alone)."""
    (tmp_path / "disk.img").write_bytes(b"x" * 4096)
    good = GOOD.replace(
        "[jobs.vm1]",
        '[jobs.vm0]\nto = "127.0.0.1:1"\ninsecure = true\n'
        'state_dir = "st0"\nvolumes = ["disk.img"]\n\n[jobs.vm1]',
    )
    path = _job_file(tmp_path, good + extra)
    args = ["check-config", str(path)] if command == "check-config" else ["send", "--job-file"]
    out = replicator(*args, *([str(path)] if command == "send" else []))
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    assert f"{path}:{line + 6}:" in error, error
    for word in words:
        assert word in error, error
    assert not (tmp_path / "st0").exists()  # the good job did not start either


@pytest.mark.parametrize(
    ("extra", "line", "words"),
    [
        ('burst = "zz"\n', 7, ["'burst'", "bad size 'zz'"]),
        ('target_rpo = "5x"\n', 7, ["'target_rpo'", "bad target RPO"]),
        ('witness = "nope"\n', 7, ["'witness'", "wants HOST:PORT"]),
        ("fence_after = 5.0\n", 7, ["'fence_after'", "need --witness"]),
        ('witness = "h:1"\nfence_after = 10.0\n', 8, ["'fence_after'", "not below the lease"]),
        ('capture = "nbd"\n', 7, ["'capture'", "needs --nbd-socket"]),
        ('capture = "fuse"\n', 7, ["'capture'", "needs --mount"]),
        ('state_dir = "st0"\n', 7, ["'state_dir'", "job 'vm0' has the same state folder"]),
        ('volumes = ["other.img"]\n', 7, ["'volumes'", "job 'vm0' has the same volume"]),
        ('metrics_listen = "127.0.0.1:9"\n', 7, ["job 'vm0' has the same metrics address"]),
    ],
    ids=[
        "burst", "target-rpo", "witness", "fence-without-witness", "fence-after-the-lease",
        "nbd-without-socket", "fuse-without-mount", "shared-state", "shared-volume",
        "shared-metrics",
    ],
)  # fmt: skip
@pytest.mark.parametrize("command", ["check-config", "send"])
def test_what_send_would_refuse_is_refused_before_any_job_starts(
    tmp_path: Path, extra: str, line: int, words: list[str], command: str
) -> None:
    """check-config said ok, and `send --job-file` started the good jobs, for options the
    command refuses only once it runs (a burst, a witness, fencing, what a capture mode
    needs) and for two jobs sharing what each needs to itself (one of them, by chance,
    then died at start)."""
    (tmp_path / "disk.img").write_bytes(b"x" * 4096)
    (tmp_path / "other.img").write_bytes(b"y" * 4096)
    good = GOOD.replace(
        "[jobs.vm1]",
        '[jobs.vm0]\nto = "127.0.0.1:1"\ninsecure = true\nstate_dir = "st0"\n'
        'metrics_listen = "127.0.0.1:9"\nvolumes = ["other.img"]\n\n[jobs.vm1]',
    )
    if "metrics_listen" not in extra:  # only vm0 listens, but for the case that clashes
        good = good.replace('metrics_listen = "127.0.0.1:9"\n', "")
    if extra.startswith("volumes"):  # vm1's own list, then: the shared one
        good = good.replace('interval = 30\nvolumes = ["disk.img"]\n', "interval = 30\n")
    path = _job_file(tmp_path, good + extra)
    args = ["check-config", str(path)] if command == "check-config" else ["send", "--job-file"]
    out = replicator(*args, *([str(path)] if command == "send" else []))
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    shift = 6 if "metrics_listen" not in extra else 7
    shift -= 1 if extra.startswith("volumes") else 0
    assert f"{path}:{line + shift}:" in error, error
    for word in words:
        assert word in error, error
    assert not (tmp_path / "st0").exists()  # the good job did not start either


def test_a_receive_config_is_checked_as_receive_checks_it(tmp_path: Path) -> None:
    config = tmp_path / "receive.toml"
    config.write_text('listen = "127.0.0.1:7000"\ndir = "d"\ninsecure = true\n'
                      "auto_failover_after = 5\n")  # fmt: skip
    out = replicator("check-config", str(config))
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    assert f"{config}:4:" in error and "needs --witness" in error, error
    typo = tmp_path / "typo.toml"
    typo.write_text('[job.web01]\nto = "h:1"\n')  # for [jobs.web01]
    out = replicator("check-config", str(typo))
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert "did you mean [jobs.NAME]" in one_line_error(out.stderr)
    small = tmp_path / "small.toml"  # check-config said ok; receive refused it
    small.write_text('listen = "127.0.0.1:7000"\ndir = "d"\ninsecure = true\n'
                     'in_flight_max = "1M"\n')  # fmt: skip
    out = replicator("check-config", str(small))
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    assert f"{small}:4:" in error and "too small: at least 4M" in error, error


def test_the_command_line_overrides_the_file(tmp_path: Path, receiver: ReceiverProc) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(range(256)) * 4096)
    path = _job_file(tmp_path, GOOD + 'state_dir = "st"\n')  # `to`: nothing listens there
    out = replicator("send", "--job-file", str(path), "--once", "--json")
    assert out.returncode == ExitCode.CONNECT, out.stderr
    out = replicator("send", "--job-file", str(path), "--to", receiver.address, "--once")
    assert out.returncode == 0, out.stderr
    assert b3(receiver.dir / "vm1" / "disk.img") == b3(disk)


def test_receive_config_with_an_override_and_relative_dir(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "receive.toml"
    config.parent.mkdir()
    config.write_text('listen = "127.0.0.1:1"\ndir = "../replicas"\ninsecure = true\n')
    out = replicator("check-config", str(config))
    assert out.returncode == 0, out.stderr
    assert f"replicas in {config.parent}/../replicas" in out.stdout
    assert "metrics" not in out.stdout  # nothing listens without metrics_listen
    with config.open("a") as f:
        f.write('metrics_listen = "127.0.0.1:9309"\n')
    out = replicator("check-config", str(config))
    assert "metrics on http://127.0.0.1:9309/metrics" in out.stdout, out.stdout
    config.write_text('listen = "127.0.0.1:1"\ndir = "../replicas"\ninsecure = true\n')

    port = free_port()
    proc = LoggedPopen(
        [*REPLICATOR, "receive", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        env=ENV,
    )
    rcv = ReceiverProc(port, tmp_path / "replicas", proc)
    try:
        wait_port(port, proc)
        disk = tmp_path / "disk.img"
        disk.write_bytes(b"\x5a" * 65536)
        job = _job_file(tmp_path, GOOD.replace("127.0.0.1:1", rcv.address) + 'state_dir = "s"\n')
        out = replicator("send", "--job-file", str(job), "--once")
        assert out.returncode == 0, out.stderr
        assert b3(tmp_path / "replicas" / "vm1" / "disk.img") == b3(disk)
    finally:
        assert rcv.stop() == 0


def test_a_bad_receive_config_names_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "receive.toml"
    config.write_text('listen = "127.0.0.1:7000"\n\ndirectory = "/srv"\ninsecure = true\n')
    out = replicator("receive", "--config", str(config))
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    assert f"{config}:3: unknown key 'directory'" in error and "did you mean 'dir'" in error


TWO_JOBS = """\
[jobs.good]
to = "{to}"
insecure = true
interval = 0.5
state_dir = "state/good"
volumes = ["good.img"]

[jobs.broken]
to = "{to}"
insecure = true
interval = 0.5
state_dir = "state/broken"
volumes = ["{broken}"]
"""


def test_several_jobs_fail_alone_and_the_exit_code_is_the_failed_ones(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    (tmp_path / "good.img").write_bytes(b"\x77" * 1048576)
    path = _job_file(tmp_path, TWO_JOBS.format(to=receiver.address, broken="gone.img"))
    assert replicator("check-config", str(path)).returncode == ExitCode.CONFIG  # gone.img
    out = replicator("send", "--job-file", str(path), "--once")
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert "gone.img does not exist" in out.stderr
    assert "job broken ended with exit code 3 (config)" in out.stderr
    assert "job good ended" not in out.stderr
    # stderr is not a terminal: JSON log lines, and the runner's end is one of them too
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    (failed,) = [e for e in events if e["event"] == "send.job_failed"]
    assert (failed["job"], failed["exit_code"]) == ("broken", ExitCode.CONFIG)
    assert b3(receiver.dir / "good" / "good.img") == b3(tmp_path / "good.img")
    out = replicator("send", "--job-file", str(path), "--state-dir", "x", "--once")
    assert out.returncode == ExitCode.CONFIG
    assert "--state-dir on the command line would apply to all 2 jobs" in out.stderr


def test_sigterm_stops_every_job_of_a_continuous_job_file(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    for name in ("good.img", "other.img"):
        (tmp_path / name).write_bytes(name.encode() * 65536)
    path = _job_file(tmp_path, TWO_JOBS.format(to=receiver.address, broken="other.img"))
    proc = LoggedPopen(
        [*REPLICATOR, "send", "--job-file", str(path)],
        stdout=subprocess.DEVNULL,
        env=LOUD_ENV,  # not -q: the runner says which jobs it runs
    )
    pairs = [
        (tmp_path / "good.img", receiver.dir / "good" / "good.img"),
        (tmp_path / "other.img", receiver.dir / "broken" / "other.img"),
    ]
    deadline = time.monotonic() + 30
    while not all(replica.exists() and b3(replica) == b3(src) for src, replica in pairs):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the two jobs did not both replicate in 30 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "running 2 jobs" in stderr and "ended with exit code" not in stderr
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert [e["jobs"] for e in events if e["event"] == "send.jobs_started"] == [["good", "broken"]]
    # each job's process is gone: their state folders are unlocked for a new sender
    out = replicator("send", "--job-file", str(path), "--once")  # REPLICATOR_QUIET, as -q
    assert out.returncode == 0, out.stderr[-3000:]
    assert "running 2 jobs" not in out.stderr  # warnings and errors only


def test_a_killed_runner_takes_its_jobs_down_gracefully(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """SIGKILL to `send --job-file` (the OOM killer, a supervisor other than systemd)
    left both jobs running unsupervised, and a restart found their folders held."""
    for name in ("good.img", "other.img"):
        (tmp_path / name).write_bytes(name.encode() * 65536)
    path = _job_file(tmp_path, TWO_JOBS.format(to=receiver.address, broken="other.img"))
    proc = subprocess.Popen(
        [*REPLICATOR, "send", "--job-file", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    states = [tmp_path / "state" / "good", tmp_path / "state" / "broken"]
    deadline = time.monotonic() + 30
    while not all((s / "control.sock").exists() for s in states):
        assert proc.poll() is None and time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.1)
    pids = [json.loads((s / "sender.json").read_text())["pid"] for s in states]
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, "the jobs outlived their runner"
        time.sleep(0.1)
    for state in states:  # stopped as on SIGTERM: each said how it ended
        assert json.loads((state / "sender.json").read_text())["error"] is None
    out = replicator("send", "--job-file", str(path), "--once")
    assert out.returncode == 0, out.stderr[-3000:]


def test_no_flags_turn_off_on_the_command_line_what_the_file_turns_on(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """``once = true`` and ``insecure = true`` in the file; ``--no-once`` and
    ``--no-insecure`` on the command line win, for one job and for the several-jobs runner."""
    for name in ("good.img", "other.img"):
        (tmp_path / name).write_bytes(name.encode() * 65536)
    text = TWO_JOBS.format(to=receiver.address, broken="other.img")
    path = _job_file(tmp_path, text.replace("insecure = true\n", "insecure = true\nonce = true\n"))
    out = replicator("send", "--job-file", str(path), "--job", "good")
    assert out.returncode == 0, out.stderr[-3000:]  # the file's once: one cycle, then exit

    proc = LoggedPopen(
        [*REPLICATOR, "send", "--job-file", str(path), "--no-once"],
        stdout=subprocess.DEVNULL,
        env=ENV,
    )
    source, replica = tmp_path / "other.img", receiver.dir / "broken" / "other.img"
    try:
        deadline = time.monotonic() + 30
        for content in (b"first" * 65536, b"second" * 65536):  # continuous: a change follows
            source.write_bytes(content)
            while not (replica.exists() and b3(replica) == b3(source)):
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the job did not keep replicating"
                time.sleep(0.2)
        assert proc.poll() is None  # still running after two cycles and more
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]

    for job in (("--job", "good"), ()):  # one job; every job, each in its own process
        out = replicator("send", "--job-file", str(path), *job, "--no-insecure")
        assert out.returncode == ExitCode.CONFIG, out.stderr[-3000:]
        assert "no --tls-dir" in out.stderr
    assert "job good ended with exit code 3" in out.stderr
    assert "job broken ended with exit code 3" in out.stderr


def test_discover_keeps_a_chain_whole_and_check_config_warns_when_it_is_cut(
    tmp_path: Path,
) -> None:
    """discover's job holds an overlay with its backing file, so check-config has nothing to
    say; with the backing file taken out of the volumes, it warns what the replica lacks."""
    images = tmp_path / "images"
    images.mkdir()
    base, over = images / "base.qcow2", images / "web.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "8M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
                    "qcow2", str(over)], check=True)  # fmt: skip
    job_file = tmp_path / "job.toml"
    assert replicator("discover", str(images), "--out", str(job_file)).returncode == 0
    text = job_file.read_text().replace('# to = "HOST:PORT"', 'to = "127.0.0.1:9"')
    text = text.replace("# tls_dir =", "insecure = true\n# tls_dir =")
    job_file.write_text(text)
    out = replicator("check-config", str(job_file))
    assert out.returncode == 0, out.stderr + out.stdout
    assert f"  disk {base}\n" in out.stdout and f"  disk {over}\n" in out.stdout
    assert "warning:" not in out.stdout

    job_file.write_text(re.sub(rf'^\s*"{re.escape(str(base))}",.*\n', "", text, flags=re.M))
    out = replicator("check-config", str(job_file))
    assert out.returncode == 0, out.stderr + out.stdout
    assert f"  disk {base}\n" not in out.stdout
    assert f"  warning: {over}'s backing file 'base.qcow2' ({base}) is not replicated" in (
        out.stdout
    )
