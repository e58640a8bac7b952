"""``replicator bench``: what replication achieves over a link, next to plain TCP on it.

The work is in engine/benchmark.py; this module parses and checks the options (every bad
value exits 3 quoting it, before anything runs), shows a progress bar on a terminal, and
prints a table, JSON (--json) and a plot (--plot).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from replicator.cli.common import (
    InsecureOption,
    TlsDirOption,
    TlsNameOption,
    TlsPeerOption,
    fail,
    parse_endpoint,
    run,
    table_console,
    transport_security,
)
from replicator.engine.benchmark import BenchConfig, Scenario, Step, run_bench
from replicator.engine.benchmark_netns import require_netns
from replicator.engine.benchmark_replay import journal_folder
from replicator.engine.benchmark_rsync import require_rsync
from replicator.engine.benchmark_workload import Mix
from replicator.engine.errors import ConfigError, Interrupted, ReplicatorError
from replicator.transport.rpo import parse_target
from replicator.transport.schedule import SpecError, format_rate, parse_rate, parse_size
from replicator.transport.wan import parse_duration

DEFAULT_RTT = "100ms"
DEFAULT_RATE = "100Mbit"
MIN_SIZE = 1024 * 1024

HELP = """Replicate a synthetic disk image through a real sender and receiver over an emulated
WAN link (or to a real receiver with --to) and report, per RTT and rate:

wire goodput (record bytes on the wire / the time the link carried the initial sync),
plain TCP goodput through the same emulated link in the same run, their ratio, the
file-data rate (file bytes sent as data / that time), the compression ratio, and the lag.

Scenario: write --size of --mix data, sync it (send --once), rewrite --change of it in
64 KiB extents, sync again, then check the replica equals the source (blake3; exit 1 if
not). Lag is the sender's replication lag during the change sync, sampled every 20 ms:
the age of the oldest captured change not yet applied on the receiver (the data a loss
of the source would cost at that moment). A scanning sender captures changes when it
scans, so its RPO is this lag plus its --interval.

--target-rpo S is passed to the sender, which then uses the least bandwidth that holds
it (its goodput is then not the link's capacity); "RPO held" is lag p99 <= S.

Several --rtt/--rate values (repeat the option or give a comma list) make a sweep of
every combination.

--rsync also times `rsync --inplace --no-whole-file` of the same changed image onto a copy
of the unchanged one, through its own rsync daemon behind the same emulated link, and
reports both change-sync times (start to exit) and ours/rsync.

--replay STATE_DIR replays a recorded sender journal instead (its records at the pace they
were journaled) through the same link to a receiver, and reports the lag it held (p50, p99,
max) and whether --target-rpo held: what RPO the link would give that workload. A state dir
keeps only what its receiver has not acknowledged: to record, run a live capture (send
--capture nbd or fuse) with a --to no receiver answers for the workload's duration (see
docs/OPERATIONS.md).

--netns (root) runs the sender and the receiver (and the plain TCP and rsync peers) in two
network namespaces it creates, linked through this one by veth pairs; the rate is then
enforced by the kernel (tc tbf on the sender's link), the emulator only delays. They are
removed at the end, also after an error or Ctrl-C."""


def _split(values: list[str] | None, default: str) -> list[str]:
    items = [part.strip() for value in values or [default] for part in value.split(",")]
    return [item for item in items if item] or [default]


def _rtts(values: list[str] | None) -> list[float]:
    rtts = []
    for text in _split(values, DEFAULT_RTT):
        try:
            rtts.append(parse_duration(text))
        except ValueError as exc:
            raise ConfigError(f"--rtt {text!r}: {exc}") from None
    return rtts


def _rates(values: list[str] | None) -> list[float | None]:
    rates = []
    for text in _split(values, DEFAULT_RATE):
        try:
            rates.append(parse_rate(text, allow_zero=False))
        except SpecError as exc:
            raise ConfigError(f"--rate {text!r}: {exc}") from None
    return rates


def parse_change(text: str) -> float:
    """A fraction of the image: "1%", "0.5%" or "0.01"; in (0, 1]."""
    value = text.strip()
    try:
        fraction = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        fraction = 0.0  # refused below
    if not 0 < fraction <= 1:
        raise ConfigError(
            f"--change {text!r}: wants a share of the image above 0 and at most 100%, "
            "e.g. 1% or 0.01"
        )
    return fraction


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except SpecError as exc:
        raise ConfigError(f"--size {text!r}: {exc}") from None
    if size < MIN_SIZE:
        raise ConfigError(f"--size {text!r} is too small: at least 1M")
    return size


def _target(text: str) -> float:
    try:
        return parse_target(text)  # the grammar of `send --target-rpo`
    except SpecError as exc:
        raise ConfigError(f"--target-rpo {text!r}: {exc}") from None


def bench_command(
    rtt: Annotated[
        list[str] | None,
        typer.Option(
            "--rtt",
            metavar="RTT",
            help="Round-trip time of the emulated link, e.g. 100ms (sweep: "
            "repeat or 20ms,100ms). Default 100ms.",
        ),
    ] = None,
    rate: Annotated[
        list[str] | None,
        typer.Option(
            "--rate",
            help="Rate cap of the emulated link each way, e.g. 100Mbit, "
            "12MB/s, unlimited (sweep: repeat or 100Mbit,1Gbit). Default 100Mbit.",
        ),
    ] = None,
    size: Annotated[
        str, typer.Option("--size", metavar="SIZE", help="Image size, e.g. 256M, 1G.")
    ] = "1G",
    change: Annotated[
        str,
        typer.Option(
            "--change", metavar="SHARE", help="Share rewritten after the initial sync, e.g. 1%."
        ),
    ] = "1%",
    mix: Annotated[
        Mix,
        typer.Option(
            "--mix",
            help="Image data: mixed (text, binaries, zeros, random), random, zeros or text.",
            case_sensitive=False,
        ),
    ] = Mix.mixed,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="A running remote `replicator receive` (HOST:PORT): measure "
            "the real link, no emulator and no plain TCP figure.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            metavar="FILE.png",
            help="Draw goodput and lag against RTT and rate into FILE.png "
            "(needs pip install 'replicator[bench]').",
        ),
    ] = None,
    target_rpo: Annotated[
        str | None,
        typer.Option(
            "--target-rpo",
            metavar="SECONDS",
            help="Lag to hold (30, 30s, 5m): passed to the sender (which then uses the least "
            "bandwidth that holds it); reports whether the change sync's lag p99 stays within.",
        ),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            metavar="DIR",
            help="Where the temporary image and replica go (needs 2x "
            "--size free; default: the system's temporary folder).",
        ),
    ] = None,
    rsync: Annotated[
        bool,
        typer.Option(
            "--rsync",
            help="Also time `rsync --inplace --no-whole-file` of the same changed image over "
            "the same emulated link (its own daemon on loopback) and report ours/rsync.",
        ),
    ] = False,
    replay: Annotated[
        Path | None,
        typer.Option(
            "--replay",
            metavar="STATE_DIR",
            help="Replay a recorded sender journal (a --state-dir, or a journal folder) at its "
            "original pace instead of the synthetic workload; reports the lag it would hold.",
        ),
    ] = None,
    netns: Annotated[
        bool,
        typer.Option(
            "--netns",
            help="Run sender and receiver in two network namespaces it creates (root only), "
            "the rate enforced by the kernel (tc tbf), the delay by the emulator; removed at "
            "the end, also on error or Ctrl-C.",
        ),
    ] = False,
    insecure: InsecureOption = False,
    tls_dir: TlsDirOption = None,
    tls_name: TlsNameOption = None,
    tls_peer: TlsPeerOption = None,
) -> None:
    try:
        config = check_options(
            rtt, rate, size, change, mix, to, plot, target_rpo, work_dir, insecure, tls_dir,
            tls_name, rsync=rsync, replay=replay, netns=netns, tls_peer=tls_peer,
        )  # fmt: skip
    except ReplicatorError as exc:
        fail(exc)
    with _progress(len(config.scenarios), len(config.steps)) as step:

        async def main(stop: asyncio.Event) -> list[dict[str, Any]]:
            bench = asyncio.create_task(run_bench(config, step))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({bench, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not bench.done():  # Ctrl-C: stop the children, remove the files, then exit
                bench.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await bench
                raise Interrupted("bench interrupted; its processes and temporary files are gone")
            return bench.result()

        results = run(main, graceful=True)
    if plot is not None:
        from replicator.engine.benchmark_plot import plot as draw

        draw(results, plot)
    if as_json:
        typer.echo(json.dumps({"scenarios": results}, indent=2, sort_keys=True))
    else:
        _table(results)
        if plot is not None:
            typer.echo(f"plot: {plot}")


bench_command.__doc__ = HELP


def check_options(
    rtt: list[str] | None,
    rate: list[str] | None,
    size: str,
    change: str,
    mix: Mix,
    to: str | None,
    plot: Path | None,
    target_rpo: str | None,
    work_dir: Path | None,
    insecure: bool,
    tls_dir: Path | None,
    tls_name: str | None,
    *,
    rsync: bool = False,
    replay: Path | None = None,
    netns: bool = False,
    tls_peer: str | None = None,
) -> BenchConfig:
    """Every option checked and parsed (ConfigError, exit 3, quoting the bad value)."""
    rtts, rates = _rtts(rtt), _rates(rate)
    nbytes, fraction = _size(size), parse_change(change)
    target = _target(target_rpo) if target_rpo is not None else None
    if plot is not None:
        from replicator.engine.benchmark_plot import require_matplotlib

        require_matplotlib()
        if plot.suffix.lower() != ".png":
            raise ConfigError(f"--plot {str(plot)!r}: wants a .png file name")
        if not plot.resolve().parent.is_dir():
            raise ConfigError(f"--plot {str(plot)!r}: its folder does not exist")
    if work_dir is not None and work_dir.exists() and not work_dir.is_dir():
        raise ConfigError(f"--work-dir {str(work_dir)!r} is not a folder")
    endpoint = None
    security: tuple[str, ...] = ("--insecure",)
    if netns:
        if to is not None or replay is not None:
            raise ConfigError(
                "--netns puts the benchmark's own sender and receiver in namespaces; "
                "--to and --replay have no sender child to put there",
                hint="leave out --netns, or --to/--replay",
            )
        require_netns()
    if replay is not None:
        if rsync:
            raise ConfigError(
                "--rsync compares the synthetic change sync; --replay has none",
                hint="leave out --rsync or --replay",
            )
        if tls_dir is not None:
            raise ConfigError("--replay sends without TLS: use it with --insecure")
        journal_folder(replay)  # exit 3 now when it holds no journal
    if rsync:
        if to is not None:
            raise ConfigError(
                "--rsync compares with rsync over the emulated link; with --to there is none",
                hint="leave out --rsync, or --to",
            )
        require_rsync()
    if to is not None:
        if rtt or rate:
            raise ConfigError(
                "--rtt and --rate shape the emulated link; with --to the real link is measured",
                hint="leave out --rtt/--rate, or --to",
            )
        endpoint = parse_endpoint(to, "--to")
        transport_security(
            tls_dir=tls_dir,
            tls_name=tls_name,
            insecure=insecure,
            side="sender",
            host=endpoint[0],
            tls_peer=tls_peer,
        )
        if tls_dir is not None:
            security = ("--tls-dir", str(tls_dir))
            security += ("--tls-name", tls_name) if tls_name else ()
            security += ("--tls-peer", tls_peer) if tls_peer else ()
        scenarios: tuple[Scenario, ...] = (Scenario(0.0, None),)
    else:
        if tls_dir is not None or tls_name is not None or tls_peer is not None:
            raise ConfigError(
                "--tls-dir/--tls-name/--tls-peer are for --to: the local link is loopback"
            )
        scenarios = tuple(Scenario(r, c) for r, c in itertools.product(rtts, rates))
    return BenchConfig(
        scenarios=scenarios,
        size=nbytes,
        change=fraction,
        mix=mix,
        to=endpoint,
        security=security,
        target_rpo=target,
        # the sender paces itself to the target (the least bandwidth that holds it)
        send_args=("--target-rpo", target_rpo) if target_rpo is not None else (),
        work_dir=work_dir,
        rsync=rsync,
        replay=replay,
        netns=netns,
    )


@contextlib.contextmanager
def _progress(scenarios: int, steps: int) -> Iterator[Step]:
    """A progress bar on stderr on a terminal (one tick per step); silent otherwise."""
    if not sys.stderr.isatty():
        yield lambda index, name: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("bench", total=scenarios * steps)
        started = [0]

        def step(index: int, name: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] += 1
            bar.update(task, description=f"scenario {index + 1}/{scenarios}: {name}")

        yield step


def _mbit(value: float | None) -> str:
    return "-" if value is None else f"{value * 8 / 1e6:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def _verified(value: bool | None) -> str:
    return "-" if value is None else ("equal" if value else "DIFFERS")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _table(results: list[dict[str, Any]]) -> None:
    rsync = any(r.get("rsync_change_seconds") is not None for r in results)
    caption = (
        "initial sync: goodput (ours, plain TCP) and file-data rate in Mbit/s, "
        "compression; change sync: lag p50/p99 in ms; RPO held: lag p99 <= --target-rpo"
    )
    if rsync:
        caption += "; change sync in s: ours, rsync --inplace --no-whole-file, ours/rsync"
    if any(str(r["mode"]).startswith("replay") for r in results):
        caption += "; --replay: lag during the replay, lz4 of its records"
    table = Table(title="replicator bench", caption=caption, box=box.SIMPLE_HEAD)
    table.add_column("link", no_wrap=True)
    columns = ["ours", "TCP", "ratio", "data", "lz4", "lag", "RPO", "replica"]
    columns += ["change", "rsync", "vs rsync"] if rsync else []
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for r in results:
        remote = r["mode"] in ("remote", "replay-remote")
        held = r["rpo_held"]
        link = "real" if remote else f"{r['rtt_s'] * 1e3:g}ms "
        link += "" if remote else format_rate(r["link_rate_limit_bytes_per_s"])
        row = [
            link,
            _mbit(r["wire_goodput_bytes_per_s"]),
            _mbit(r["plain_tcp_goodput_bytes_per_s"]),
            _ratio(r["goodput_ratio"]),
            _mbit(r["file_data_rate_bytes_per_s"]),
            _ratio(r["compression_ratio"]),
            f"{_ms(r['lag_p50_s'])}/{_ms(r['lag_p99_s'])}",
            "-" if held is None else ("yes" if held else "NO"),
            _verified(r["replica_verified"]),
        ]
        if rsync:
            row += [
                _seconds(r["change_seconds"]),
                _seconds(r["rsync_change_seconds"]),
                _ratio(r["change_time_over_rsync"]),
            ]
        table.add_row(*row)
    table_console().print(table)
