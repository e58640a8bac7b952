"""The receiver-wide in-flight budget (engine/in_flight.py): its accounting, fairness and
progress under any interleaving of requests, give-backs and withdrawals."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine.in_flight import InFlight, InFlightBudget

LIMIT = 100

# an op: ("ask", session, size) | ("back", session, 0) | ("withdraw", session, 0)
ops = st.lists(
    st.tuples(
        st.sampled_from(["ask", "back", "withdraw"]),
        st.integers(0, 5),
        st.integers(0, 3 * LIMIT // 2),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_accounting_fairness_and_progress(script: list[tuple[str, int, int]]) -> None:
    budget: InFlight[int] = InFlight(LIMIT)
    held = {s: 0 for s in range(6)}  # what each session was given and holds
    queued: list[tuple[int, int]] = []  # the model's queue: (session, size), in order

    def served(keys: list[int]) -> None:
        # served in the order asked, always from the head of the queue
        assert keys == [s for s, _ in queued[: len(keys)]]
        for s, size in queued[: len(keys)]:
            held[s] += size
        del queued[: len(keys)]

    for op, s, size in script:
        waiting = any(q == s for q, _ in queued)
        if op == "ask" and not waiting:  # a session reads one frame at a time
            was_waiting = bool(queued)
            if budget.ask(s, size):
                assert not was_waiting  # nobody overtakes a waiting request
                held[s] += size
            else:
                queued.append((s, size))
        elif op == "back" and held[s]:
            back, held[s] = held[s], 0  # its sync made everything it held durable
            served(budget.give_back(back))
        elif op == "withdraw" and waiting:  # its session ended while it waited
            queued[:] = [(q, n) for q, n in queued if q != s]
            served(budget.withdraw(s))
        # the bytes given out are what the sessions hold, never more than the limit but
        # for one request larger than it, held alone
        assert budget.used == sum(held.values())
        assert budget.used <= LIMIT or sum(1 for n in held.values() if n) == 1
        assert budget.waiting == len(queued)
        # a request waits only while it cannot be served: the head does not fit
        if queued:
            assert budget.used + queued[0][1] > LIMIT and budget.used > 0
    # progress: as the sessions' syncs give back what they hold, every request is served
    while queued or any(held.values()):
        s = next(s for s, n in held.items() if n)
        back, held[s] = held[s], 0
        served(budget.give_back(back))
    assert budget.used == 0 and budget.waiting == 0
    assert budget.peak <= max(LIMIT, *(size for op, _, size in script if op == "ask"), 0)


def test_a_request_larger_than_the_limit_is_served_alone() -> None:
    budget: InFlight[str] = InFlight(10)
    assert budget.ask("a", 4)
    assert not budget.ask("big", 64)  # waits for "a" to give back, however long
    assert not budget.ask("c", 1)  # behind it: not served before it
    assert budget.give_back(4) == ["big"]
    assert budget.used == 64
    assert budget.give_back(64) == ["c"]


def test_bad_figures_are_refused() -> None:
    budget: InFlight[str] = InFlight(10)
    with pytest.raises(ValueError, match="giving back 1 bytes of the 0"):
        budget.give_back(1)
    with pytest.raises(ValueError):
        InFlight(0)
    assert budget.ask("x", 10)
    assert not budget.ask("a", 5)
    with pytest.raises(ValueError, match="already queued"):
        budget.ask("a", 1)


async def test_a_waiting_task_is_served_in_turn_and_cancelling_it_frees_nothing_it_lacks() -> None:
    budget = InFlightBudget(10)
    synced: list[str] = []
    budget.holders.add(lambda: synced.append("sync now"))
    await budget.take(8)
    first = asyncio.ensure_future(budget.take(5))
    second = asyncio.ensure_future(budget.take(1))
    await asyncio.sleep(0)
    assert not first.done() and not second.done()  # the second waits behind the first
    assert synced == ["sync now", "sync now"]  # the holders were asked to sync at once
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    budget.give_back(8)
    await first
    assert budget.accounts.used == 5 and budget.accounts.waiting == 0
    # served and cancelled before it ran: the bytes go back, not to nobody
    budget.give_back(5)
    await budget.take(10)
    late = asyncio.ensure_future(budget.take(3))
    await asyncio.sleep(0)
    budget.give_back(10)  # serves ``late``...
    late.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await late
    assert budget.accounts.used == 0
