"""``replicator bench --plot FILE.png``: goodput and lag against RTT and against rate.

matplotlib is an optional extra (``pip install 'replicator[bench]'``): ``require_matplotlib``
says so before the benchmark runs, ``plot`` draws once it has run.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from replicator.engine.errors import ConfigError

__all__ = ["plot", "require_matplotlib"]

_MBIT = 8 / 1e6  # bytes/s -> Mbit/s


def require_matplotlib() -> None:
    """ConfigError (exit 3) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--plot needs matplotlib, which is not installed",
            hint="pip install 'replicator[bench]' (or leave out --plot)",
        ) from None


def _label_rate(rate: float | None) -> str:
    return "no cap" if rate is None else f"{rate * _MBIT:g} Mbit/s"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Four panels: goodput vs RTT (a line per rate), goodput vs rate (a line per RTT),
    and lag p99 likewise; plain TCP's goodput dashed beside ours."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), squeeze=False)
    panels = (
        (axes[0][0], "rtt_s", "link_rate_limit_bytes_per_s", "goodput"),
        (axes[0][1], "link_rate_limit_bytes_per_s", "rtt_s", "goodput"),
        (axes[1][0], "rtt_s", "link_rate_limit_bytes_per_s", "lag"),
        (axes[1][1], "link_rate_limit_bytes_per_s", "rtt_s", "lag"),
    )
    for ax, x_key, group_key, what in panels:
        groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for result in results:
            groups[result[group_key]].append(result)
        for group, members in groups.items():
            members = [m for m in members if m[x_key] is not None]
            members.sort(key=lambda m: m[x_key])
            xs = [_x(m[x_key], x_key) for m in members]
            label = _label_rate(group) if group_key != "rtt_s" else f"RTT {group * 1e3:g} ms"
            if what == "goodput":
                ours = [_mbit(m["wire_goodput_bytes_per_s"]) for m in members]
                plain = [_mbit(m["plain_tcp_goodput_bytes_per_s"]) for m in members]
                (line,) = ax.plot(xs, ours, marker="o", label=f"replicator, {label}")
                ax.plot(xs, plain, marker="x", linestyle="--", color=line.get_color(),
                        label=f"plain TCP, {label}")  # fmt: skip
                ax.set_ylabel("goodput (Mbit/s)")
            else:
                (line,) = ax.plot(xs, [_ms(m["lag_p99_s"]) for m in members], marker="o",
                                  label=f"lag p99, {label}")  # fmt: skip
                ax.plot(xs, [_ms(m["lag_p50_s"]) for m in members], marker=".", linestyle=":",
                        color=line.get_color(), label=f"lag p50, {label}")  # fmt: skip
                ax.set_ylabel("lag (ms)")
        ax.set_xlabel("RTT (ms)" if x_key == "rtt_s" else "rate cap (Mbit/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("replicator bench: goodput and lag against RTT and rate")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _x(value: float, key: str) -> float:
    return value * 1e3 if key == "rtt_s" else value * _MBIT


def _mbit(value: float | None) -> float:
    return float("nan") if value is None else value * _MBIT


def _ms(value: float | None) -> float:
    return float("nan") if value is None else value * 1e3
