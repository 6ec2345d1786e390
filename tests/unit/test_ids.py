"""``broker.service.new_id``: lease and request ids, UUID 4 hex from the CSPRNG, batched."""

from __future__ import annotations

import os
import uuid

from broker.service import new_id


def test_ids_are_uuid4_hex_and_distinct() -> None:
    """Each id parses as a UUID 4 (RFC 4122 variant) whose hex is the id; 3 refills' worth are all distinct."""
    ids = [new_id() for _ in range(3 * 256 + 7)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(hex=text)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, text)


def test_random_bits_vary_in_every_free_position() -> None:
    """Apart from the 6 fixed bits, every bit position takes both values (no mask wiped random bits)."""
    ids = [int(new_id(), 16) for _ in range(2048)]
    ones = 0
    zeros = 0
    for value in ids:
        ones |= value
        zeros |= ~value & ((1 << 128) - 1)
    fixed = {(128 - 48 - 4) + i for i in range(4)} | {(128 - 64 - 2) + i for i in range(2)}  # version, variant
    varying = ones & zeros
    assert {i for i in range(128) if not varying >> i & 1} == fixed


def test_forked_child_does_not_repeat_the_parents_ids() -> None:
    """Ids buffered before a fork are dropped in the child, so parent and child never hand out the same id."""
    new_id()  # the buffer now holds the rest of a batch
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then exit at once
        os.close(read)
        os.write(write, "".join(new_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    child_ids = {child[i : i + 32] for i in range(0, len(child), 32)}
    parent_ids = {new_id() for _ in range(300)}
    assert len(child_ids) == 10
    assert not child_ids & parent_ids
