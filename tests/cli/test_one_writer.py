"""One writer per thing: a socket, an image, a receiver folder, a job's state folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from replicator.engine.errors import ExitCode
from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    ReceiverProc,
    free_port,
    idle_qemu_writer,
    one_line_error,
    qemu_compare,
    qemu_img,
    qemu_io,
    replicator,
    send_once,
    start_receiver,
)


def _live(
    receiver: ReceiverProc, job: str, state: Path, sock: Path, disk: Path
) -> subprocess.Popen[str]:
    return LoggedPopen(
        [*REPLICATOR, "send", "--to", receiver.address, "--job", job, "--state-dir", str(state),
         "--capture", "nbd", "--nbd-socket", str(sock), "--insecure", str(disk)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def _wait_socket(sock: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


@pytest.mark.tools
def test_a_second_nbd_sender_never_takes_over_a_live_socket(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """Used to replace the socket silently: the first VM's clients reached the other's disk."""
    first_disk, second_disk = tmp_path / "a.img", tmp_path / "b.img"
    for disk in (first_disk, second_disk):
        qemu_img("create", "-q", "-f", "raw", str(disk), "8M")
    sock = tmp_path / "nbd.sock"
    first = _live(receiver, "vm-a", tmp_path / "sa", sock, first_disk)
    try:
        _wait_socket(sock, first)
        second = _live(receiver, "vm-b", tmp_path / "sb", sock, second_disk)
        assert second.wait(timeout=60) == ExitCode.CONFIG
        assert second.stderr is not None and "is in use" in second.stderr.read()
        # the first sender's export is still the one behind the socket
        qemu_io("raw", f"nbd+unix:///a.img?socket={sock}", "write -P 7 0 64k", "flush")
    finally:
        assert _stop(first) == 0
    assert first_disk.read_bytes()[:65536] == b"\x07" * 65536


@pytest.mark.tools
def test_an_image_served_over_nbd_cannot_be_written_behind_the_shim(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    disk = tmp_path / "a.img"
    qemu_img("create", "-q", "-f", "raw", str(disk), "8M")
    sock = tmp_path / "nbd.sock"
    sender = _live(receiver, "vm-a", tmp_path / "sa", sock, disk)
    try:
        _wait_socket(sock, sender)
        direct = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write 0 4k", str(disk)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert direct.returncode != 0
        assert 'Failed to get "write" lock' in direct.stdout + direct.stderr
        other_job = replicator(  # and no other sender takes it, under any job
            "send", "--to", receiver.address, "--job", "vm-x", "--state-dir",
            str(tmp_path / "sx"), "--once", "--insecure", str(disk),
        )  # fmt: skip
        assert other_job.returncode == ExitCode.CONFIG
        assert "already being replicated" in other_job.stderr
    finally:
        assert _stop(sender) == 0


@pytest.mark.tools
def test_an_nbd_sender_on_an_image_a_vm_writes_is_refused_before_any_sync(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A VM left running on the file itself: its writes would bypass the shim. This was
    found only when serving began, after an initial sync of the whole disk (a scan of an
    image it was writing, warned about with "use --capture nbd"): hours on a large disk
    over a WAN, for an exit 3 at the end. Now the start names it, and nothing moves."""
    disk = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    qemu_io("qcow2", disk, "write -P 0x5a 0 1M")
    vm = idle_qemu_writer("qcow2", disk)
    try:
        sender = _live(receiver, "vm-a", tmp_path / "sa", tmp_path / "nbd.sock", disk)
        assert sender.wait(timeout=60) == ExitCode.CONFIG
        err = sender.stderr.read() if sender.stderr else ""
    finally:
        vm.kill()
        vm.wait()
    assert "is open for writing by another program" in one_line_error(err), err
    assert "sender.connected" not in err and "sender.scanning_a_running_vm" not in err, err
    assert not (receiver.dir / "vm-a").exists()  # not a byte synced
    assert not (tmp_path / "nbd.sock").exists()


def test_a_second_receiver_on_the_same_folder_is_refused_at_start(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """Used to start and listen; senders then got 'journal already open' mid-session."""
    out = replicator(
        "receive", "--listen", f"127.0.0.1:{free_port()}", "--dir", str(receiver.dir),
        "--insecure", timeout=30,
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr
    assert "already runs" in out.stderr


def test_a_second_receiver_with_its_own_state_folder_is_refused_the_same_replicas(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A state folder of its own does not make the replica folder its own: the refusal
    names the folder both would write and the way out (used to say "state folder" and
    to advise the --state-dir it already had)."""
    out = replicator(
        "receive", "--listen", f"127.0.0.1:{free_port()}", "--dir", str(receiver.dir),
        "--state-dir", str(tmp_path / "own-state"), "--insecure", timeout=30,
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG, out.stderr
    error = one_line_error(out.stderr)
    assert f"a receiver already runs with replica folder {receiver.dir}" in error
    assert "needs a --dir of its own" in error and "own --state-dir" not in error
    # demote on a state folder no receiver answers for: the replica folder is still held
    demote = replicator(
        "demote", "--dir", str(receiver.dir), "--state-dir", str(tmp_path / "own-state"),
        "--job", "none", "--discard-changes", timeout=30,
    )  # fmt: skip
    assert demote.returncode == ExitCode.CONFIG, demote.stderr
    error = one_line_error(demote.stderr)
    assert f"a receiver already runs with replica folder {receiver.dir}" in error


def test_a_symlinked_job_state_folder_is_refused(tmp_path: Path, receiver: ReceiverProc) -> None:
    """DIR/.replicator/JOB as a symlink used to be followed: journal and state outside DIR."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (receiver.dir / ".replicator" / "trap").symlink_to(outside)
    disk = tmp_path / "d.img"
    disk.write_bytes(os.urandom(65536))
    out = replicator(
        "send", "--to", receiver.address, "--job", "trap", "--state-dir", str(tmp_path / "s"),
        "--once", "--insecure", str(disk),
    )  # fmt: skip
    assert out.returncode == ExitCode.REFUSED, out.stderr
    assert "not a folder" in out.stderr
    assert list(outside.iterdir()) == []  # nothing written outside DIR
    assert not (receiver.dir / "trap").exists()
    send_once(receiver, "fine", tmp_path / "s2", disk)  # and the receiver keeps serving


def test_a_scan_of_an_image_a_running_qemu_writes_warns_unless_frozen(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A scan copies an image while a VM writes it: not crash-consistent. A QEMU that has
    it open for writing (here qemu-io, idle) holds QEMU's write lock, and the scan says so,
    with what to do; a --pre-hook (the freeze) or no writer at all is not warned about."""
    disk = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    qemu_io("qcow2", disk, "write -P 0x5a 0 1M")

    def send(*extra: str) -> str:
        state = str(tmp_path / "state")
        out = replicator("send", "--to", receiver.address, "--job", "vm1", "--state-dir", state,
                         "--once", "--insecure", *extra, str(disk))  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stderr

    assert "sender.scanning_a_running_vm" not in send()
    vm = idle_qemu_writer("qcow2", disk)
    try:
        warned = send()
        assert "sender.scanning_a_running_vm" in warned and "not crash-consistent" in warned
        assert "--pre-hook" in warned and "--capture nbd" in warned
        assert "sender.scanning_a_running_vm" not in send("--pre-hook", "true")
        assert vm.poll() is None  # it kept the image open throughout
    finally:
        vm.kill()
        vm.wait()
    assert "sender.scanning_a_running_vm" not in send()


@pytest.mark.tools
def test_a_vm_started_on_a_replica_by_hand_is_stopped_or_waited_for(tmp_path: Path) -> None:
    """A receiver used to write under a VM someone started on a replica (a "test boot"),
    noticing only once the VM wrote. Now, as a DRBD secondary cannot be opened: while the
    receiver keeps a replica, QEMU cannot open it for writing (readers can); a VM that had
    it open before the receiver started makes sessions wait, writing nothing, until it is
    gone; a failover lets the VM in."""
    disk = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "32M")
    qemu_io("qcow2", disk, "write -P 0x11 0 4M")
    rcv = start_receiver(tmp_path / "target")
    replica = rcv.dir / "vm1" / "vm.qcow2"
    state = tmp_path / "state"
    sender: subprocess.Popen[str] | None = None
    try:
        send_once(rcv, "vm1", state, disk)
        refused = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(replica)],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert refused.returncode != 0
        assert 'Failed to get "write" lock' in refused.stderr + refused.stdout
        assert "identical" in qemu_img("compare", str(disk), str(replica))  # readers: no -U

        rcv.stop()  # the VM starts on the replica while no receiver runs
        vm = idle_qemu_writer("qcow2", replica)
        try:
            rcv = start_receiver(rcv.dir, port=rcv.port)
            qemu_io("qcow2", disk, "write -P 0x22 8M 2M")
            out = replicator("send", "--to", rcv.address, "--job", "vm1", "--state-dir",
                             str(state), "--once", "--insecure", str(disk))  # fmt: skip
            assert out.returncode == ExitCode.REFUSED, out.stderr
            assert "'vm.qcow2' is open for writing by another program" in out.stderr
            assert "replicator failover" in out.stderr
            status = json.loads(replicator("status", "--dir", str(rcv.dir), "--json").stdout)
            job = status["jobs"][0]  # the target's own status says why, too
            assert job["errors"]["in_use"] >= 1 and "open for writing" in job["last_error"]
            assert _differ(disk, replica)
            sender = subprocess.Popen(
                [*REPLICATOR, "send", "--to", rcv.address, "--job", "vm1", "--state-dir",
                 str(state), "--interval", "0.5", "--insecure", str(disk)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=ENV,
            )  # fmt: skip
            time.sleep(2)
            assert _differ(disk, replica)
        finally:
            vm.kill()
            vm.wait()
        _wait_equal(disk, replica, sender)  # the continuous sender retries and gets in
        assert _stop(sender) == 0

        failover = replicator("failover", "--dir", str(rcv.dir), "--job", "vm1", "--force")
        assert failover.returncode == 0, failover.stderr
        qemu_io("qcow2", replica, "write -P 0x33 0 4k")  # the VM's now
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
        rcv.stop()


def test_an_image_replaced_under_a_scanning_sender_is_followed_and_stays_one_senders(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """A disk restored from a backup or converted over its own name (a new file at the
    same path): the scan replicated the new file, but the sender's lock stayed on the
    deleted one, keeping its space and letting a second sender take the new file."""
    disk = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    qemu_io("qcow2", disk, "write -P 0x11 0 1M")
    replica = receiver.dir / "vm1" / "vm.qcow2"
    log = tmp_path / "sender.log"
    with log.open("w") as sink:  # a pipe nobody reads would fill up and stop the sender
        sender = subprocess.Popen(
            [*REPLICATOR, "send", "--to", receiver.address, "--job", "vm1", "--state-dir",
             str(tmp_path / "s1"), "--interval", "0.3", "--insecure", str(disk)],
            stdout=subprocess.DEVNULL, stderr=sink, text=True, env=ENV,
        )  # fmt: skip
    try:
        _wait_equal(disk, replica, sender)
        restored = tmp_path / "restored.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(restored), "16M")
        qemu_io("qcow2", restored, "write -P 0x77 0 2M")
        restored.rename(disk)
        _wait_equal(disk, replica, sender)
        deadline = time.monotonic() + 30
        while _deleted_files(sender.pid):  # the old file is let go at the next scan
            assert time.monotonic() < deadline, _deleted_files(sender.pid)
            time.sleep(0.1)
        second = replicator("send", "--to", receiver.address, "--job", "vm2", "--state-dir",
                            str(tmp_path / "s2"), "--once", "--insecure", str(disk))  # fmt: skip
        assert second.returncode == ExitCode.CONFIG, second.stderr
        assert "already being replicated by another replicator sender" in second.stderr
    finally:
        code = _stop(sender)
    assert code == 0
    assert "sender.image_replaced" in log.read_text()


def _differ(a: Path, b: Path) -> bool:
    """Whether two qcow2 images differ (``qemu-img compare -U``; an error fails)."""
    code = qemu_compare("qcow2", a, b, shared=True).returncode
    assert code in (0, 1), code
    return code == 1


def _wait_equal(a: Path, b: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while qemu_compare("qcow2", a, b, shared=True).returncode != 0:  # or not there yet
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)


def _deleted_files(pid: int) -> list[str]:
    """The deleted files ``pid`` holds open, its standard streams left out: the test gave it
    those (its stderr an unlinked temporary file, tests.tools.LoggedPopen)."""
    links = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        if int(fd.name) <= 2:
            continue
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return [link for link in links if link.endswith(" (deleted)")]


def test_receivers_nested_in_one_tree_never_write_into_each_other(tmp_path: Path) -> None:
    """A receiver whose --dir is inside another's (or holds another's): a job named after
    the inner folder used to write the outer receiver's replicas into the inner one, and a
    folder job's first sync deleted the inner receiver's journals and replicas."""
    outer = start_receiver(tmp_path / "replicas")
    try:
        inside = replicator("receive", "--listen", f"127.0.0.1:{free_port()}", "--dir",
                            str(outer.dir / "site-b"), "--insecure", timeout=30)  # fmt: skip
        assert inside.returncode == ExitCode.CONFIG, inside.stderr
        assert f"is inside {outer.dir}, which another replicator process holds" in inside.stderr
        assert not (outer.dir / "site-b").exists()  # nothing created
    finally:
        outer.stop()

    inner = start_receiver(tmp_path / "top" / "vm1")  # the inner one first, this time
    outer = start_receiver(tmp_path / "top")
    try:
        disk = tmp_path / "d.img"
        disk.write_bytes(os.urandom(1 << 20))
        send_once(inner, "job", tmp_path / "s-inner", disk)
        before = sorted(p.relative_to(inner.dir) for p in inner.dir.rglob("*"))
        out = replicator("send", "--to", outer.address, "--job", "vm1", "--state-dir",
                         str(tmp_path / "s-outer"), "--once", "--insecure", str(disk))  # fmt: skip
        assert out.returncode == ExitCode.REFUSED, out.stderr
        assert "the job folder is held by another replicator process" in out.stderr
        assert sorted(p.relative_to(inner.dir) for p in inner.dir.rglob("*")) == before
        send_once(inner, "job", tmp_path / "s-inner", disk)  # the inner one is unharmed
    finally:
        outer.stop()
        inner.stop()


def test_a_receiver_whose_folder_holds_the_sources_themselves_writes_nothing(
    tmp_path: Path,
) -> None:
    """Both hosts mount one datastore, and the receiver's --dir is its root: job vm1's
    replica was the source itself. A scan said "durable" with no replica anywhere, and a
    live capture's receiver wrote the source's past over it. A sender reading a replica
    onward (A to B to C) is another sender, and is not mistaken for it."""
    store = tmp_path / "datastore"
    (store / "vm1").mkdir(parents=True)
    disk = store / "vm1" / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    qemu_io("qcow2", disk, "write -P 0x11 0 2M")
    rcv = start_receiver(store)
    try:
        before = disk.read_bytes()
        out = replicator("send", "--to", rcv.address, "--job", "vm1", "--state-dir",
                         str(tmp_path / "s"), "--once", "--insecure", str(disk))  # fmt: skip
        assert out.returncode == ExitCode.REFUSED, out.stderr
        assert f"'disk.qcow2' (in {store / 'vm1'}) is this sender's own source image" in out.stderr
        status = json.loads(replicator("status", "--dir", str(store), "--json").stdout)
        assert "own source image" in status["jobs"][0]["last_error"]
        assert disk.read_bytes() == before
        qemu_io("qcow2", disk, "write -P 0x22 0 4k")  # the receiver let go: the VM starts
    finally:
        rcv.stop()

    site_b, site_c = start_receiver(tmp_path / "b"), start_receiver(tmp_path / "c")
    onward: subprocess.Popen[str] | None = None
    try:
        send_once(site_b, "vm1", tmp_path / "to-b", disk)
        replica_b = site_b.dir / "vm1" / "disk.qcow2"
        onward = subprocess.Popen(
            [*REPLICATOR, "send", "--to", site_c.address, "--job", "vm1", "--state-dir",
             str(tmp_path / "to-c"), "--interval", "0.5", "--insecure", str(replica_b)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, env=ENV,
        )  # fmt: skip
        _wait_equal(replica_b, site_c.dir / "vm1" / "disk.qcow2", onward)
        qemu_io("qcow2", disk, "write -P 0x33 1M 64k")
        send_once(site_b, "vm1", tmp_path / "to-b", disk)  # B is still served
        _wait_equal(disk, site_c.dir / "vm1" / "disk.qcow2", onward)
        assert _stop(onward) == 0
    finally:
        if onward is not None and onward.poll() is None:
            onward.kill()
        site_b.stop()
        site_c.stop()


def test_a_replica_deleted_on_the_target_gives_its_space_back(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """An operator deletes a replica to free space on the target: the next session is
    refused as diverged, and the receiver holds no descriptor of the deleted file (the
    space comes back); `send --resync` makes a new replica."""
    disk = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    qemu_io("qcow2", disk, "write -P 0x11 0 8M")
    state = tmp_path / "state"
    send_once(receiver, "vm1", state, disk)
    replica = receiver.dir / "vm1" / "d.qcow2"
    replica.unlink()
    out = replicator("send", "--to", receiver.address, "--job", "vm1", "--state-dir",
                     str(state), "--once", "--insecure", str(disk))  # fmt: skip
    assert out.returncode == ExitCode.REFUSED, out.stderr
    assert "deleted outside replication" in out.stderr
    assert _deleted_files(receiver.proc.pid) == []
    send_once(receiver, "vm1", state, disk, extra=("--resync",))
    assert not _differ(disk, replica)


def test_a_job_deleted_on_the_target_under_a_running_receiver_starts_over(
    tmp_path: Path, receiver: ReceiverProc
) -> None:
    """An operator starts a job over on the target (rm -rf DIR/JOB DIR/.replicator/JOB)
    with the receiver running: it kept the job open on the deleted files, and every later
    session failed with "No such file or directory" until the receiver was restarted.
    Now the job reopens from disk as a new replica; with only the replica folder deleted
    it is the documented "diverged" until --resync."""
    disk = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(disk), "16M")
    qemu_io("qcow2", disk, "write -P 0x11 0 4M")
    state = tmp_path / "state"
    replica = receiver.dir / "vm1" / "d.qcow2"
    send_once(receiver, "vm1", state, disk)
    shutil.rmtree(receiver.dir / "vm1")
    shutil.rmtree(receiver.dir / ".replicator" / "vm1")
    qemu_io("qcow2", disk, "write -P 0x22 0 1M")
    send_once(receiver, "vm1", state, disk)
    assert not _differ(disk, replica)
    assert _deleted_files(receiver.proc.pid) == []

    shutil.rmtree(receiver.dir / "vm1")
    out = replicator("send", "--to", receiver.address, "--job", "vm1", "--state-dir",
                     str(state), "--once", "--insecure", str(disk))  # fmt: skip
    assert out.returncode == ExitCode.REFUSED, out.stderr
    assert "'d.qcow2' was deleted outside replication" in out.stderr
    send_once(receiver, "vm1", state, disk, extra=("--resync",))
    assert not _differ(disk, replica)
    assert _deleted_files(receiver.proc.pid) == []


def test_a_configuration_file_inside_the_receivers_folder_is_not_its_own_replica(
    tmp_path: Path,
) -> None:
    """A job's configuration file in the receiver's --dir (job vm1's replica path): a scan
    said "durable" with no copy anywhere (the image-lock guard covered disk images only).
    The sender marks its files too, also after an editor replaced one; a sender reading
    the file onward to another receiver is not mistaken for it."""
    store = tmp_path / "datastore"
    (store / "vm1").mkdir(parents=True)
    conf = store / "vm1" / "vm1.xml"
    conf.write_text("<domain><name>vm1</name></domain>\n")
    rcv = start_receiver(store)
    onward = start_receiver(tmp_path / "elsewhere")
    try:
        for attempt in ("first", "replaced by an editor"):
            if attempt != "first":
                new = conf.with_name(".vm1.xml.swp")
                new.write_text("<domain><name>vm1</name><memory>2</memory></domain>\n")
                new.rename(conf)
            before = conf.read_bytes()
            out = replicator("send", "--to", rcv.address, "--job", "vm1", "--state-dir",
                             str(tmp_path / "s"), "--once", "--insecure", str(conf))  # fmt: skip
            assert out.returncode == ExitCode.REFUSED, (attempt, out.stderr)
            error = one_line_error(out.stderr)
            assert f"'vm1.xml' (in {store / 'vm1'}) is this sender's own source file" in error
            assert "Give the receiver a --dir on other storage" in error
            assert conf.read_bytes() == before
        send_once(onward, "vm1", tmp_path / "s2", conf)  # A to B to C: not refused
        assert (onward.dir / "vm1" / "vm1.xml").read_bytes() == conf.read_bytes()
    finally:
        rcv.stop()
        onward.stop()


def test_a_folder_job_and_a_receiver_folder_inside_each_other_are_refused(
    tmp_path: Path,
) -> None:
    """FUSE capture of a folder inside the receiver's job folder: the first sync deleted
    the source as files the source lacked (exit 3, "was removed"). A receiver folder
    inside the VM folder: the receiver's own socket was the reason given."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = tmp_path / "store"
    source = store / "fvm" / "vm"  # the receiver's job folder holds the VM folder
    source.mkdir(parents=True)
    (source / "vm.xml").write_text("<domain/>\n")
    qemu_img("create", "-q", "-f", "raw", str(source / "disk.raw"), "1M")
    fuse = ("--capture", "fuse", "--mount", str(mnt), "--insecure")
    rcv = start_receiver(store)
    try:
        out = replicator("send", "--to", rcv.address, "--job", "fvm", "--state-dir",
                         str(tmp_path / "s"), *fuse, str(source), timeout=60)  # fmt: skip
        assert out.returncode == ExitCode.REFUSED, out.stderr
        error = one_line_error(out.stderr)
        assert f"folder '{source}' is this sender's own source folder" in error, error
        assert f"it holds the replica folder {store / 'fvm'} or lies in it" in error
        assert sorted(p.name for p in source.iterdir()) == ["disk.raw", "vm.xml"]
    finally:
        rcv.stop()
    vm = tmp_path / "vm"  # and the other way: the receiver's folder inside the VM folder
    vm.mkdir()
    (vm / "vm.xml").write_text("<domain/>\n")
    inner = start_receiver(vm / "replicas")
    try:
        out = replicator("send", "--to", inner.address, "--job", "fvm", "--state-dir",
                         str(tmp_path / "s3"), *fuse, str(vm), timeout=60)  # fmt: skip
        assert out.returncode == ExitCode.CONFIG, out.stderr
        error = one_line_error(out.stderr)
        assert f"cannot replicate {vm}: it holds a receiver's folder {vm / 'replicas'}" in error
        assert "give `replicator receive` a --dir outside the VM folder" in error
        assert not (tmp_path / "s3").exists()
    finally:
        inner.stop()
