"""`replicator bench` as a user runs it: a real sender and receiver through the WAN emulator
(or to a running receiver), figures as JSON, a sweep, a plot, bad options refused."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import blake3
import pytest

from replicator.cli.bench_cmd import check_options
from replicator.engine.benchmark import BenchError, verify_local
from replicator.engine.benchmark_workload import Mix, blake3_file
from replicator.engine.errors import ConfigError, ExitCode
from tests.tools import (
    ENV,
    REPLICATOR,
    LoggedPopen,
    free_port,
    one_line_error,
    replicator,
    start_receiver,
)

PHASE_KEYS = {
    "seconds", "wire_seconds", "wire_bytes", "payload_bytes", "link_bytes_up",
    "file_bytes_changed", "file_bytes_zeroed", "wire_goodput_bytes_per_s",
    "file_data_rate_bytes_per_s", "compression_ratio", "lag_samples", "lag_p50_s",
    "lag_p99_s", "lag_max_s",
}  # fmt: skip


def _bench(*args: str, timeout: float = 120) -> list[dict[str, Any]]:
    out = replicator("bench", "--json", *args, timeout=timeout)
    assert out.returncode == 0, f"bench failed ({out.returncode}): {out.stderr[-3000:]}"
    scenarios: list[dict[str, Any]] = json.loads(out.stdout)["scenarios"]
    return scenarios


def test_bench_json_through_the_emulator(tmp_path: Path) -> None:
    work = tmp_path / "work"
    [s] = _bench(
        "--size", "8M", "--rtt", "20ms", "--rate", "200Mbit", "--target-rpo", "30",
        "--work-dir", str(work),
    )  # fmt: skip
    assert s["mode"] == "emulator"
    assert s["rtt_s"] == pytest.approx(0.02) and s["one_way_delay_s"] == pytest.approx(0.01)
    assert s["link_rate_limit_bytes_per_s"] == pytest.approx(25e6)
    assert s["size_bytes"] == 8 * 1024 * 1024 and s["mix"] == "mixed"
    assert s["wire_goodput_bytes_per_s"] > 0
    assert s["plain_tcp_goodput_bytes_per_s"] > 0
    # the emulator's cap holds for plain TCP (a burst of 250 KB over a 16 MiB transfer)
    assert s["plain_tcp_goodput_bytes_per_s"] < 25e6 * 1.05
    assert s["goodput_ratio"] == pytest.approx(  # rounded to 4 places: small under --target-rpo
        s["wire_goodput_bytes_per_s"] / s["plain_tcp_goodput_bytes_per_s"], rel=1e-3, abs=1e-4
    )
    assert s["replica_verified"] is True
    assert len(s["replica_blake3"]) == 64
    initial, change = s["initial_sync"], s["change_sync"]
    assert set(initial) == PHASE_KEYS and set(change) == PHASE_KEYS
    # mixed data: zeros are skipped, the rest is sent, text and binaries compressed
    assert 0 < initial["file_bytes_changed"] <= 8 * 1024 * 1024
    assert initial["compression_ratio"] > 1.2
    assert s["changed_bytes"] == 64 * 1024  # 1% of 8 MiB: one 64 KiB extent
    assert change["file_bytes_changed"] == s["changed_bytes"]
    assert initial["lag_samples"] > 0 and initial["lag_p99_s"] >= initial["lag_p50_s"] >= 0
    assert s["target_rpo_s"] == 30.0
    assert s["rpo_held"] is (s["lag_p99_s"] is not None and s["lag_p99_s"] <= 30)
    assert list(work.iterdir()) == []  # the temporary folder was removed


def test_bench_rsync_times_the_same_change_over_the_same_link(tmp_path: Path) -> None:
    work = tmp_path / "work"
    [s] = _bench(
        "--size", "8M", "--rtt", "20ms", "--rate", "200Mbit", "--mix", "random", "--rsync",
        "--work-dir", str(work),
    )  # fmt: skip
    rsync = s["rsync"]
    assert s["rsync_change_seconds"] == rsync["seconds"] > 0
    assert s["change_seconds"] == s["change_sync"]["seconds"] > 0
    assert s["change_time_over_rsync"] == pytest.approx(
        s["change_seconds"] / s["rsync_change_seconds"], rel=1e-3
    )
    # the delta algorithm went through the emulator: block checksums down, one changed
    # 64 KiB extent and the matches up (far less than the 8 MiB image)
    assert 64 * 1024 <= rsync["link_bytes_up"] < 2 * 1024 * 1024
    assert rsync["link_bytes_down"] > 0
    assert _processes_using(work) == [] and list(work.iterdir()) == []  # daemon gone too


def test_rsync_with_to_is_refused() -> None:
    out = replicator("bench", "--to", "127.0.0.1:9", "--insecure", "--rsync")
    assert out.returncode == ExitCode.CONFIG and "--rsync" in out.stderr


def test_sweep_of_two_rtts_and_a_plot(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    scenarios = _bench(
        "--size", "2M", "--rtt", "10ms,40ms", "--rate", "400Mbit", "--mix", "text",
        "--plot", str(png),
    )  # fmt: skip
    assert [s["rtt_s"] for s in scenarios] == [pytest.approx(0.01), pytest.approx(0.04)]
    assert all(s["replica_verified"] and s["mix"] == "text" for s in scenarios)
    assert all(s["wire_goodput_bytes_per_s"] > 0 for s in scenarios)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_to_a_running_receiver(tmp_path: Path) -> None:
    rcv = start_receiver(tmp_path / "target")
    try:
        [s] = _bench("--to", rcv.address, "--insecure", "--size", "2M", "--mix", "random")
    finally:
        rcv.stop()
    assert s["mode"] == "remote" and s["replica_verified"] is True
    assert s["plain_tcp_goodput_bytes_per_s"] is None  # no sink on the far side
    assert s["initial_sync"]["file_bytes_changed"] == 2 * 1024 * 1024
    replicas = list((tmp_path / "target").glob("bench-*/disk.img"))
    assert len(replicas) == 1  # `replicator verify` compared it; check it ourselves too
    assert blake3_file(replicas[0]) == s["replica_blake3"]


def _processes_using(folder: Path) -> list[list[str]]:
    """Command lines of the processes that name ``folder`` in their arguments."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(str(folder) in arg for arg in args):
            found.append(args)
    return found


def _wait_mid_sync(bench: subprocess.Popen[str], work: Path) -> None:
    """Until a sender the benchmark started is running (the bench must still run)."""
    deadline = time.monotonic() + 60
    while not any("send" in args for args in _processes_using(work)):
        assert bench.poll() is None and time.monotonic() < deadline, bench.stderr
        time.sleep(0.1)


def test_ctrl_c_stops_the_children_and_removes_the_files(tmp_path: Path) -> None:
    work = tmp_path / "work"
    bench = LoggedPopen(
        [*REPLICATOR, "bench", "--size", "8M", "--rtt", "100ms", "--rate", "40Mbit",
         "--work-dir", str(work)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        _wait_mid_sync(bench, work)
        assert any("receive" in args for args in _processes_using(work))
        bench.send_signal(signal.SIGINT)
        _, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == ExitCode.INTERRUPTED, err
    assert "interrupted" in err
    assert _processes_using(work) == []
    assert list(work.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--rate", "100"),  # bits or bytes?
        ("--rtt", "20ms,soon"),
        ("--change", "150%"),
        ("--size", "1K"),
        ("--target-rpo", "-1"),
    ],
)
def test_bad_values_exit_3_naming_them(tmp_path: Path, option: str, value: str) -> None:
    out = replicator("bench", option, value, "--work-dir", str(tmp_path / "work"))
    assert out.returncode == ExitCode.CONFIG, out.stderr
    bad = value.split(",")[-1]
    assert f"'{bad}'" in out.stderr and option in out.stderr
    assert not (tmp_path / "work").exists()  # refused before anything ran


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--rate", "fast"),
        ("--rate", "0"),
        ("--rtt", "100"),
        ("--rtt", "-5ms"),
        ("--change", "0%"),
        ("--change", "lots"),
        ("--change", "nan"),
        ("--size", "big"),
        ("--target-rpo", "soon"),
    ],
)
def test_every_bad_value_is_named(option: str, value: str) -> None:
    """The same checks as above, in-process (each CLI run costs a second)."""
    options: dict[str, Any] = {"rtt": None, "rate": None, "size": "8M", "change": "1%"}
    options.update(mix=Mix.mixed, to=None, plot=None, target_rpo=None, work_dir=None)
    options.update(insecure=False, tls_dir=None, tls_name=None)
    key = option.removeprefix("--").replace("-", "_")
    options[key] = [value] if key in ("rtt", "rate") else value
    with pytest.raises(ConfigError) as caught:
        check_options(**options)
    assert f"{option} '{value}'" in str(caught.value)


def test_sweep_is_every_combination() -> None:
    config = check_options(
        ["20ms,100ms"], ["100Mbit", "1Gbit"], "1G", "0.5%", Mix.random, None, None, "30s",
        None, False, None, None,
    )  # fmt: skip
    assert [(s.rtt, s.rate) for s in config.scenarios] == [
        (0.02, 12.5e6), (0.02, 125e6), (0.1, 12.5e6), (0.1, 125e6)
    ]  # fmt: skip
    assert config.change == pytest.approx(0.005) and config.size == 1024**3
    assert config.target_rpo == 30.0 and config.send_args == ("--target-rpo", "30s")


def test_a_failing_sender_ends_the_bench_with_its_exit_code() -> None:
    out = replicator("bench", "--to", f"127.0.0.1:{free_port()}", "--insecure", "--size", "1M")
    assert out.returncode == ExitCode.CONNECT, out.stderr
    assert "replicator send failed (exit code 4): cannot connect" in one_line_error(out.stderr)


def test_rtt_with_to_is_refused() -> None:
    out = replicator("bench", "--to", "127.0.0.1:9", "--insecure", "--rtt", "20ms")
    assert out.returncode == ExitCode.CONFIG and "--to" in out.stderr


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.argv = ['replicator'] + sys.argv[1:]; "
        "from replicator.cli.main import main; main()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "bench", "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert out.returncode == ExitCode.CONFIG
    assert "pip install 'replicator[bench]'" in out.stderr


def test_a_differing_replica_is_an_error(tmp_path: Path) -> None:
    source, replica = tmp_path / "a", tmp_path / "b"
    source.write_bytes(b"x" * 100_000)
    replica.write_bytes(b"x" * 99_999 + b"y")
    with pytest.raises(BenchError) as caught:
        verify_local(source, replica)
    assert caught.value.exit_code == ExitCode.DIFFERENT and "differs" in str(caught.value)
    with pytest.raises(BenchError, match="missing"):
        verify_local(source, tmp_path / "none")
    assert verify_local(source, source) == blake3.blake3(b"x" * 100_000).hexdigest()


def _record(journal_dir: Path, writes: int, size: int, seconds: float) -> int:
    """A recorded journal: ``writes`` random writes of ``size`` bytes spread evenly over
    ``seconds`` (their record times), a barrier after every tenth; the record count."""
    import asyncio

    from replicator.journal import Journal, Record

    async def write() -> int:
        journal = await Journal.open(journal_dir)
        start = time.time_ns() - 3600 * 10**9  # recorded an hour ago
        try:
            for i in range(writes):
                ts = start + int(i * seconds / (writes - 1) * 1e9)
                record = Record.write("disk.img", i * size, os.urandom(size))
                await journal.append(dataclasses.replace(record, ts_ns=ts))
                if i % 10 == 9:
                    await journal.append(dataclasses.replace(Record.flush(), ts_ns=ts))
            await journal.sync()
            return journal.last_lsn
        finally:
            await journal.aclose()

    return asyncio.run(write())


def test_replay_of_a_recorded_journal_predicts_the_lag(tmp_path: Path) -> None:
    state = tmp_path / "state"
    count = _record(state / "journal", writes=40, size=16 * 1024, seconds=2.0)
    before = {p.name: p.read_bytes() for p in (state / "journal").iterdir()}
    fast, slow = _bench(
        "--replay", str(state), "--rtt", "20ms", "--rate", "100Mbit,512kbit", "--target-rpo", "3"
    )
    for s in (fast, slow):
        replayed = s["replay"]
        assert s["mode"] == "replay" and replayed["records"] == count
        assert replayed["applied_lsn"] == count  # the receiver applied every record
        assert replayed["recorded_seconds"] == pytest.approx(2.0, abs=0.01)
        assert replayed["replay_seconds"] >= 2.0  # at the recorded pace, not at once
        assert replayed["payload_bytes"] == 40 * 16 * 1024 and replayed["lag_samples"] > 0
    # 640 KiB in 2 s fits 100 Mbit at once (a lag well under the 3 s target, even on a
    # busy 2-core machine); at 512 kbit (64 kB/s) it takes over 10 s
    assert fast["lag_p99_s"] < 3 and fast["rpo_held"] is True
    assert slow["lag_max_s"] > 5 and slow["rpo_held"] is False
    after = {p.name: p.read_bytes() for p in (state / "journal").iterdir()}
    assert after == before  # the recording was read from a copy, untouched


def test_replay_of_a_folder_without_a_journal_exits_3(tmp_path: Path) -> None:
    out = replicator("bench", "--replay", str(tmp_path))
    assert out.returncode == ExitCode.CONFIG and "--replay" in out.stderr
    assert "no journal" in out.stderr


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.startswith("rbench-")}


def test_netns_mode_has_the_kernel_enforce_the_rate(tmp_path: Path) -> None:
    if os.geteuid() != 0:  # not root: refused before anything runs, saying why
        out = replicator("bench", "--netns", "--size", "8M")
        assert out.returncode == ExitCode.CONFIG and "needs root" in out.stderr
        return
    before = _namespaces()
    [s] = _bench("--netns", "--size", "8M", "--rtt", "20ms", "--rate", "40Mbit", "--rsync")
    assert s["mode"] == "netns" and s["replica_verified"] is True
    # the emulator only delays here: tbf holds plain TCP to 5 MB/s (it counts headers too)
    assert 5e6 * 0.6 < s["plain_tcp_goodput_bytes_per_s"] < 5e6 * 1.05
    assert s["rsync_change_seconds"] > 0
    assert _namespaces() == before  # its namespaces (and their veth links) are gone


def test_netns_is_removed_after_ctrl_c(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        out = replicator("bench", "--netns", "--work-dir", str(tmp_path / "work"))
        assert out.returncode == ExitCode.CONFIG and "needs root" in out.stderr
        assert not (tmp_path / "work").exists()  # refused before anything ran
        return
    before = _namespaces()
    work = tmp_path / "work"
    bench = LoggedPopen(
        [*REPLICATOR, "bench", "--netns", "--size", "16M", "--rtt", "100ms", "--rate", "20Mbit",
         "--work-dir", str(work)],
        stdout=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        _wait_mid_sync(bench, work)
        assert len(_namespaces() - before) == 2
        bench.send_signal(signal.SIGINT)
        _, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == ExitCode.INTERRUPTED, err
    assert _namespaces() == before
    assert _processes_using(work) == [] and list(work.iterdir()) == []
