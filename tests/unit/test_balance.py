"""``broker.api.balance``: which worker a new connection goes to, and the channels' shared counts."""

from __future__ import annotations

import errno
import os

import pytest

from broker.api.balance import NOT_SERVING, BalanceChannels, Balancer, hand_off_target
from broker.api.workers import balance_channels


@pytest.mark.parametrize(
    ("index", "held", "counts", "expected"),
    [
        (0, 0, [1, 0], None),  # the first connection stays
        (0, 1, [2, 0], 1),  # one more than the other: it goes
        (0, 1, [2, 1], None),  # even: stays
        (1, 5, [3, 6, 3], 0),  # the least loaded, lowest index among equals
        (1, 5, [4, 6, 3], 2),
        (0, 9, [10, NOT_SERVING], None),  # nobody else serving
        (0, 9, [10, NOT_SERVING, 8], 2),  # draining / dead workers are skipped
        (2, 0, [0, 0, 1], None),
    ],
)
def test_hand_off_target(index: int, held: int, counts: list[int], expected: int | None) -> None:
    assert hand_off_target(index, held, counts) == expected


def test_handing_off_in_turn_ends_within_one() -> None:
    """Connections arriving at one worker while the others publish their counts end up within one of each other."""
    counts = [0, 0, 0]
    for _ in range(31):
        held = counts[0]
        target = hand_off_target(0, held, counts)
        counts[0 if target is None else target] += 1
    assert sorted(counts) == [10, 10, 11]


def test_channels_share_loads_with_workers() -> None:
    """A worker's balancer sees what the supervisor marks; loads count connections on their way to a worker."""
    channels = BalanceChannels(2)
    try:
        assert channels.loads() == [NOT_SERVING, NOT_SERVING]
        spec, fds = channels.spec(1)
        index, memfd, inbox, *peers = (int(part) for part in spec.split(","))
        assert (index, peers[1]) == (1, NOT_SERVING)
        assert {memfd, inbox, peers[0]} == set(fds)
        # The worker process gets its own copies of the descriptors; here, duplicates stand in for them.
        balancer = Balancer(1, os.dup(memfd), os.dup(inbox), [os.dup(peers[0]), NOT_SERVING])
        counters = balancer._counters
        try:
            counters.cells[0] = 3
            counters.cells[1] = 7
            assert channels.loads() == [3, 7]
            counters.cells[counters.sent(0, 1)] += 2  # worker 0 sent two to worker 1, which took one so far
            counters.cells[counters.taken(0, 1)] += 1
            assert channels.loads() == [3, 8]
            channels.mark_not_serving(1)
            assert counters.loads() == [3, NOT_SERVING]  # nothing is sent to a worker that is not serving
        finally:
            balancer.close()
    finally:
        channels.close()


@pytest.mark.parametrize(("first", "second"), [(18, 14), (14, 18), (32, 0), (19, 13)])
def test_a_worker_deciding_its_whole_share_first_still_ends_even(first: int, second: int) -> None:
    """Worker 0 decides all of its share of a burst before worker 1 wakes; both end at 16.

    The rule as the balancers apply it (publish the own load, read everyone's
    through the shared counters, hand over to the least loaded): worker 1
    counts what worker 0 sent it but it has not taken yet, so it hands its
    own share back instead of keeping it on top.
    """
    channels = BalanceChannels(2)
    counters = channels._counters
    try:
        held = [0, 0]
        for worker in (0, 1):
            counters.cells[worker] = 0

        def decide(worker: int) -> None:
            counters.cells[worker] = held[worker]
            loads = counters.loads()
            target = hand_off_target(worker, loads[worker], loads)
            if target is None:
                held[worker] += 1
            else:
                counters.cells[counters.sent(worker, target)] += 1

        def take(worker: int) -> None:
            sender = 1 - worker
            waiting = counters.cells[counters.sent(sender, worker)] - counters.cells[counters.taken(sender, worker)]
            counters.cells[counters.taken(sender, worker)] += waiting
            held[worker] += waiting

        for _ in range(first):
            decide(0)
        for _ in range(second):  # worker 1 accepts its own share before reading its inbox
            decide(1)
        take(1)
        take(0)
        assert held == [16, 16]
    finally:
        channels.close()


def test_without_a_memfd_the_workers_run_unbalanced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the system refuses the shared memory (a seccomp profile, say), the supervisor runs without balancing."""

    def refuse(*_args: object) -> int:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refuse)
    assert balance_channels(2) is None
    monkeypatch.undo()
    channels = balance_channels(2)
    assert channels is not None
    channels.close()
