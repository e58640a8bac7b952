"""Byte counts as people read them: binary units, one decimal."""

from __future__ import annotations


def human_size(n: int | float | None) -> str:
    """1536 -> '1.5 KiB', 2**41 -> '2.0 TiB', 12 -> '12 B'; None -> '-'."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
