"""Shared by the fuzzers: profiles (fast and long) and the case counter."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_cases = 0
_steps = 0


def tick(n: int = 1) -> None:
    """Count ``n`` cases run (called by every fuzz body; conftest.py reports the sums)."""
    global _cases
    _cases += n


def cases() -> int:
    return _cases


def tick_steps(n: int) -> None:
    """Count steps of a stateful case (reported beside the cases)."""
    global _steps
    _steps += n


def steps() -> int:
    return _steps


SEEDS = st.integers(0, 2**32 - 1)  # for random.Random: splits and input paths

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def profile(max_examples: int, **kw: Any) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=_SUPPRESS,
        print_blob=True,
        **kw,
    )


def profiles(fast: int, long: int, **kw: Any) -> list[Any]:
    """Parameters for ``@pytest.mark.parametrize("prof", ...)``: a fast run for
    ``make test`` and a ``long`` one for ``make test-long``."""
    return [
        pytest.param(profile(fast, **kw), id="fast"),
        pytest.param(
            profile(long, **kw), id="long", marks=[pytest.mark.long, pytest.mark.timeout(1800)]
        ),
    ]


def run(prof: settings, body: Callable[..., None], *strategies: st.SearchStrategy[Any]) -> None:
    """Run ``body`` as a hypothesis test with the given profile."""
    settings(prof)(given(*strategies)(body))()


def splits(rnd: random.Random, data: bytes, max_chunk: int | None = None) -> Iterator[bytes]:
    """``data`` cut into random chunks (sizes skewed small: many 1-byte edges)."""
    pos = 0
    while pos < len(data):
        rest = len(data) - pos
        top = rest if max_chunk is None else min(rest, max_chunk)
        pick = rnd.random()
        if pick < 0.3:
            n = rnd.randint(1, min(top, 8))
        elif pick < 0.6:
            n = rnd.randint(1, min(top, 64))
        else:
            n = rnd.randint(1, top)
        yield data[pos : pos + n]
        pos += n


@st.composite
def mutations(draw: st.DrawFn, stream: bytes) -> bytes:
    """``stream`` with 1-3 bytes flipped, set, inserted, deleted or swapped, or cut short."""
    data = bytearray(stream)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "flip", "set", "insert", "delete", "swap", "cut"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        elif kind == "swap" and pos + 1 < len(data):
            data[pos], data[pos + 1] = data[pos + 1], data[pos]
        elif kind == "cut":
            del data[pos:]
    return bytes(data)
