"""Counts the cases each fuzz test ran and prints them, with its time, at the end of the
session (hypothesis does not report how many examples it ran)."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator

import pytest

from tests.fuzz import support

_COUNTS: dict[str, int] = {}
_STEPS: dict[str, int] = {}
_TIMES: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _count_cases(request: pytest.FixtureRequest) -> Iterator[None]:
    before, steps = support.cases(), support.steps()
    yield
    _COUNTS[request.node.nodeid] = support.cases() - before
    _STEPS[request.node.nodeid] = support.steps() - steps


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        _TIMES[item.nodeid] = time.perf_counter() - start


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _COUNTS:
        return
    terminalreporter.write_sep("-", "fuzz cases run")
    files: dict[str, int] = {}
    for nodeid, n in sorted(_COUNTS.items()):
        seconds = _TIMES.get(nodeid, 0.0)
        steps = _STEPS.get(nodeid, 0)
        extra = f" ({steps:,} steps)" if steps else ""
        terminalreporter.write_line(f"{n:>9,} cases {seconds:7.1f} s  {nodeid}{extra}")
        name = nodeid.split("::")[0]
        files[name] = files.get(name, 0) + n
    for name, n in sorted(files.items()):
        terminalreporter.write_line(f"{n:>9,} cases in {name}")
    terminalreporter.write_line(f"{sum(files.values()):>9,} fuzz cases in all")
