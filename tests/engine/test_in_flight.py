"""The receiver-wide in-flight budget (engine/in_flight.py): its accounting, fairness,
isolation and progress under any interleaving of requests, give-backs and withdrawals."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.engine.in_flight import InFlight, InFlightBudget

LIMIT = 100
SESSIONS = 6

# an op: ("ask", session, size) | ("back", session, part) | ("withdraw", session, 0)
ops = st.lists(
    st.tuples(
        st.sampled_from(["ask", "ask", "back", "withdraw"]),
        st.integers(0, SESSIONS - 1),
        st.integers(0, 3 * LIMIT // 2),
    ),
    max_size=80,
)


@settings(max_examples=500, deadline=None)
@given(ops)
def test_accounting_fairness_isolation_and_progress(script: list[tuple[str, int, int]]) -> None:
    budget: InFlight[int] = InFlight(LIMIT)
    held = dict.fromkeys(range(SESSIONS), 0)  # what each session was given and holds
    given_since_empty = dict.fromkeys(range(SESSIONS), 0)  # requests, since it held 0
    queued: list[tuple[int, int]] = []  # the model's queue: (session, size), in order

    def serve(keys: list[int]) -> None:
        # served in the order asked (passing only those past their share)
        order = [s for s, _ in queued]
        assert [order.index(k) for k in keys] == sorted(order.index(k) for k in keys)
        for k in keys:
            size = next(n for s, n in queued if s == k)
            held[k] += size
            given_since_empty[k] += 1 if size else 0
            queued.remove((k, size))

    def give_back(s: int, nbytes: int) -> None:
        held[s] -= nbytes
        if not held[s]:
            given_since_empty[s] = 0
        serve(budget.give_back(s, nbytes))

    for op, s, size in script:
        waiting = any(q == s for q, _ in queued)
        if op == "ask" and not waiting:  # a session reads one frame at a time
            queued.append((s, size))
            got = budget.ask(s, size)
            if got:
                serve([s])
        elif op == "back" and held[s]:  # a sync made some or all of what it holds durable
            give_back(s, min(held[s], max(1, size)))
        elif op == "withdraw" and waiting:  # its session ended while it waited
            queued[:] = [(q, n) for q, n in queued if q != s]
            serve(budget.withdraw(s))
        assert budget.used == sum(held.values())
        assert budget.held == {k: n for k, n in held.items() if n}
        # never more than the limit, but for one request larger than it, held alone
        assert budget.used <= LIMIT or sum(1 for n in held.values() if n) == 1
        # a session holds at most half of it, or the one request it asked holding nothing
        for k, n in held.items():
            assert n <= LIMIT // 2 or given_since_empty[k] == 1
        # nothing waits that could be served: the first request within its session's
        # share does not fit in what is left
        assert budget.waiting == len(queued)
        for k, n in queued:
            if held[k] == 0 or held[k] + n <= LIMIT // 2:
                assert budget.used + n > LIMIT and budget.used > 0
                break
    # progress: as the sessions' syncs give back what they hold, every request is served
    while queued or any(held.values()):
        give_back(
            next(k for k, n in held.items() if n), held[next(k for k, n in held.items() if n)]
        )
    assert budget.used == 0 and budget.waiting == 0 and not budget.held


def test_a_request_larger_than_the_limit_is_served_alone() -> None:
    budget: InFlight[str] = InFlight(10)
    assert budget.ask("a", 4)
    assert not budget.ask("big", 64)  # waits for "a" to give back, however long
    assert not budget.ask("c", 1)  # behind it: not served before it
    assert budget.give_back("a", 4) == ["big"]
    assert budget.used == 64
    assert budget.give_back("big", 64) == ["c"]


def test_a_session_whose_syncs_stop_keeps_half_and_the_others_go_on() -> None:
    budget: InFlight[str] = InFlight(10)
    assert budget.ask("stuck", 3)
    assert budget.ask("stuck", 2)  # half: 5
    assert not budget.ask("stuck", 2)  # past its share: waits for its own syncs...
    assert budget.ask("other", 4)  # ...and lets the others pass
    assert budget.give_back("other", 4) == []
    assert budget.give_back("stuck", 5) == ["stuck"]


def test_bad_figures_are_refused() -> None:
    budget: InFlight[str] = InFlight(10)
    with pytest.raises(ValueError, match="giving back 1 bytes of the 0"):
        budget.give_back("a", 1)
    with pytest.raises(ValueError):
        InFlight(0)
    assert budget.ask("x", 10)
    assert not budget.ask("a", 5)
    with pytest.raises(ValueError, match="queued already"):
        budget.ask("a", 1)


async def test_a_waiting_task_is_served_in_turn_and_cancelling_it_frees_nothing_it_lacks() -> None:
    budget = InFlightBudget(10)
    synced: list[str] = []
    budget.holders.add(lambda: synced.append("sync now"))
    await budget.take("a", 5)
    first = asyncio.ensure_future(budget.take("b", 5))
    await budget.take("c", 0)  # nothing to take: no wait, even behind others
    await asyncio.sleep(0)
    assert first.done()  # 5 + 5 fit
    second = asyncio.ensure_future(budget.take("c", 1))
    third = asyncio.ensure_future(budget.take("d", 1))
    await asyncio.sleep(0)
    assert not second.done() and not third.done()  # the third waits behind the second
    assert synced == ["sync now", "sync now"]  # the holders were asked to sync at once
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    budget.give_back("a", 5)
    await third
    assert budget.accounts.used == 6 and budget.accounts.waiting == 0
    # served and cancelled before it ran: the bytes go back, not to nobody
    late = asyncio.ensure_future(budget.take("e", 9))
    await asyncio.sleep(0)
    budget.give_back("b", 5)  # serves ``late``...
    late.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await late
    assert budget.accounts.used == 1 and budget.accounts.held == {"d": 1}
