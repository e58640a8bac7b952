"""``replicator bench --netns``: sender and receiver in two network namespaces of their own,
with a kernel-enforced rate (``tc tbf``) on the sender's link.

Layout (``namespaces``; needs root, ``ip`` and ``tc``)::

    [netns S: replicator send]--veth--[this process: WanEmulator]--veth--[netns R: receive]
       10.A.B.2 (tbf both ways)        10.A.B.1   10.A.B.5             10.A.B.6

The emulator stays in this process (its byte clock times the link, as without --netns) and
only delays (there is no netem here); the rate is the kernel's: a ``tbf`` qdisc on both
ends of the sender's veth pair (``rate R burst B latency L``). Namespace and link names
carry a random suffix; everything is removed when the block ends, however it ends (error,
Ctrl-C): deleting a namespace deletes its processes' sockets and its veth ends with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from replicator.engine.errors import ConfigError

__all__ = ["LOOPBACK", "Loopback", "Netns", "Place", "namespaces", "require_netns", "tbf_args"]

TBF_LATENCY = "100ms"  # how long a packet may wait in the tbf queue (its queue length)
MIN_TBF_BURST = 64 * 1024
TBF_BURST_TIME = 0.01  # the burst is 10 ms at the rate, at least MIN_TBF_BURST

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Netns:
    sender_ns: str
    receiver_ns: str
    proxy_host: str  # this side of the sender's link: the emulator listens here
    receiver_host: str  # the receiver's address in its namespace

    def sender(self, args: Sequence[str]) -> tuple[str, ...]:
        """``args`` run in the sender's namespace."""
        return ("ip", "netns", "exec", self.sender_ns, *args)

    def receiver(self, args: Sequence[str]) -> tuple[str, ...]:
        """``args`` run in the receiver's namespace."""
        return ("ip", "netns", "exec", self.receiver_ns, *args)


@dataclass(frozen=True)
class Loopback:
    """Everything on this machine's loopback, in this namespace (the default)."""

    proxy_host: str = "127.0.0.1"
    receiver_host: str = "127.0.0.1"

    def sender(self, args: Sequence[str]) -> tuple[str, ...]:
        return tuple(args)

    def receiver(self, args: Sequence[str]) -> tuple[str, ...]:
        return tuple(args)


LOOPBACK: Final = Loopback()
Place = Netns | Loopback  # where the peers run and the addresses they use


def require_netns() -> None:
    """ConfigError (exit 3) unless this process can make namespaces (root, ip, tc)."""
    if os.geteuid() != 0:
        raise ConfigError(
            "--netns creates network namespaces: it needs root",
            hint="run bench as root, or leave out --netns (the emulator alone shapes the link)",
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ConfigError(
                f"--netns needs the {tool!r} program (iproute2), which is not installed",
                hint="install iproute2, or leave out --netns",
            )


def tbf_args(rate: float) -> list[str]:
    """``tc qdisc add`` arguments after ``dev X root`` for a rate in bytes per second."""
    burst = max(MIN_TBF_BURST, int(rate * TBF_BURST_TIME))
    return ["tbf", "rate", f"{int(rate * 8)}bit", "burst", str(burst), "latency", TBF_LATENCY]


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(
            f"--netns: `{' '.join(args)}` failed: {done.stderr.strip() or done.returncode}",
            hint="check that this machine allows network namespaces and veth links",
        )


def _subnet() -> ipaddress.IPv4Network:
    """A free 10.x.y.0/29 (two /30 links), not on any of this machine's interfaces."""
    used = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False
    ).stdout
    taken = {
        ipaddress.ip_interface(word).network
        for line in used.splitlines()
        for word in line.split()
        if "/" in word and word[0].isdigit()
    }
    for _ in range(100):
        net = ipaddress.IPv4Network(
            f"10.{secrets.randbelow(56) + 200}.{secrets.randbelow(256)}.0/29"
        )
        if not any(net.overlaps(other) for other in taken):
            return net
    raise ConfigError("--netns: found no free 10.x.y.0/29 for its links")


def _setup(rate: float | None, suffix: str, net: ipaddress.IPv4Network) -> Netns:
    hosts = list(net)
    proxy, sender, proxy_r, receiver = hosts[1], hosts[2], hosts[5], hosts[6]
    ns_s, ns_r = f"rbench-s-{suffix}", f"rbench-r-{suffix}"
    s0, s1, r0, r1 = (f"rb{x}{suffix}" for x in ("s0", "s1", "r0", "r1"))
    _run("ip", "netns", "add", ns_s)
    _run("ip", "netns", "add", ns_r)
    _run("ip", "link", "add", s0, "type", "veth", "peer", "name", s1)
    _run("ip", "link", "add", r0, "type", "veth", "peer", "name", r1)
    _run("ip", "link", "set", s1, "netns", ns_s)
    _run("ip", "link", "set", r1, "netns", ns_r)
    _run("ip", "addr", "add", f"{proxy}/30", "dev", s0)
    _run("ip", "addr", "add", f"{proxy_r}/30", "dev", r0)
    _run("ip", "-n", ns_s, "addr", "add", f"{sender}/30", "dev", s1)
    _run("ip", "-n", ns_r, "addr", "add", f"{receiver}/30", "dev", r1)
    for ns, dev in ((None, s0), (None, r0), (ns_s, s1), (ns_r, r1), (ns_s, "lo"), (ns_r, "lo")):
        _run("ip", *(("-n", ns) if ns else ()), "link", "set", dev, "up")
    if rate is not None:  # both ways on the sender's link: data one way, acks the other
        _run("tc", "qdisc", "add", "dev", s0, "root", *tbf_args(rate))
        _run("ip", "netns", "exec", ns_s, "tc", "qdisc", "add", "dev", s1, "root", *tbf_args(rate))
    return Netns(ns_s, ns_r, str(proxy), str(receiver))


def _teardown(suffix: str) -> None:
    """Remove what ``_setup`` made with this suffix (whatever of it exists)."""
    for ns in (f"rbench-s-{suffix}", f"rbench-r-{suffix}"):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    for dev in (f"rbs0{suffix}", f"rbr0{suffix}"):  # left in this namespace if setup failed
        subprocess.run(["ip", "link", "del", dev], capture_output=True, check=False)


@contextlib.asynccontextmanager
async def namespaces(rate: float | None) -> AsyncIterator[Netns]:
    """Two namespaces linked through this one (see the module docstring), ``rate`` bytes/s
    on the sender's link (None: no tbf); removed when the block ends, however it ends."""
    suffix = secrets.token_hex(3)
    try:
        net = await asyncio.to_thread(_subnet)
        place = await asyncio.to_thread(_setup, rate, suffix, net)
        log.debug("bench.netns", sender=place.sender_ns, receiver=place.receiver_ns, net=str(net))
        yield place
    finally:
        # shielded: a Ctrl-C arriving now must not leave namespaces behind
        await asyncio.shield(asyncio.to_thread(_teardown, suffix))
