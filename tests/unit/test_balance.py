"""``broker.api.balance``: which worker a new connection goes to, and the channels' shared counts."""

from __future__ import annotations

import os

import pytest

from broker.api.balance import NOT_SERVING, BalanceChannels, Balancer, hand_off_target


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


def test_channels_share_counts_with_workers() -> None:
    """A worker's balancer sees what the supervisor marks and publishes what the supervisor reads."""
    channels = BalanceChannels(2)
    try:
        assert channels.counts() == [NOT_SERVING, NOT_SERVING]
        spec, fds = channels.spec(1)
        index, memfd, inbox, *peers = (int(part) for part in spec.split(","))
        assert (index, peers[1]) == (1, NOT_SERVING)
        assert {memfd, inbox, peers[0]} == set(fds)
        # The worker process gets its own copies of the descriptors; here, duplicates stand in for them.
        balancer = Balancer(1, os.dup(memfd), os.dup(inbox), [os.dup(peers[0]), NOT_SERVING])
        try:
            balancer._counts[1] = 7
            assert channels.counts() == [NOT_SERVING, 7]
            channels.mark_not_serving(1)
            assert balancer._counts.tolist() == [NOT_SERVING, NOT_SERVING]
        finally:
            balancer.close()
    finally:
        channels.close()
