"""Supervisor ↔ worker channel (empath/daemon/ipc.py) over a real socketpair.

Messages sent in one loop turn share a write; what matters to users is that none is
lost or reordered (an admit answered out of turn would hang a client's greeting) and
that a worker's last message — its final counts — is out before it exits.
"""

from __future__ import annotations

import asyncio
import socket

from empath.daemon.ipc import open_channel


def test_messages_of_one_turn_arrive_complete_and_in_order() -> None:
    async def main() -> list[dict[str, object]]:
        a, b = socket.socketpair()
        left, right = await open_channel(a), await open_channel(b)
        for n in range(500):
            left.send({"t": "admit", "n": n, "ip": "192.0.2.1"})
        await asyncio.sleep(0)  # a later turn: its messages follow the first batch
        left.send({"t": "queued", "id": "x" * 70_000})  # longer than a socket buffer
        got = [await right.recv() for _ in range(501)]
        left.close()
        right.close()
        return [m for m in got if m is not None]

    got = asyncio.run(main())
    assert [m.get("n") for m in got[:500]] == list(range(500))
    assert got[500] == {"t": "queued", "id": "x" * 70_000}


def test_drain_sends_the_last_message_before_close() -> None:
    async def main() -> tuple[dict[str, object] | None, dict[str, object] | None]:
        a, b = socket.socketpair()
        left, right = await open_channel(a), await open_channel(b)
        left.send({"t": "metrics", "snapshot": {}})
        await left.drain()
        left.writer.transport.abort()  # gone at once, as a worker's exit is
        last, after = await right.recv(), await right.recv()
        right.close()
        return last, after

    last, after = asyncio.run(main())
    assert last == {"t": "metrics", "snapshot": {}}
    assert after is None  # then EOF: the other side is gone


def test_a_config_of_megabytes_arrives_whole_between_small_messages() -> None:
    # A reload's config text spans many reads of the other side; the admits around it
    # must come out whole and in order too.
    text = "x" * 3_000_000

    async def main() -> list[dict[str, object] | None]:
        a, b = socket.socketpair()
        left, right = await open_channel(a), await open_channel(b)
        left.send({"t": "admit", "n": 1})
        left.send({"t": "config", "text": text})
        left.send({"t": "admit", "n": 2})
        await left.drain()
        left.close()
        got = [await right.recv() for _ in range(4)]
        right.close()
        return got

    got = asyncio.run(main())
    assert got == [{"t": "admit", "n": 1}, {"t": "config", "text": text},
                   {"t": "admit", "n": 2}, None]


def test_a_later_notice_is_not_lost_and_never_overtaken() -> None:
    # A worker's release (sent later, batched) must reach the supervisor on its own, and
    # must not arrive after an admit sent behind it: the count would be off by one.
    async def main() -> list[dict[str, object] | None]:
        a, b = socket.socketpair()
        left, right = await open_channel(a), await open_channel(b)
        left.send({"t": "release", "ip": "192.0.2.1"}, later=True)
        lone = await asyncio.wait_for(right.recv(), 5)
        left.send({"t": "release", "ip": "192.0.2.2"}, later=True)
        left.send({"t": "admit", "n": 7, "ip": "192.0.2.2"})
        got = [lone, await right.recv(), await right.recv()]
        left.close()
        right.close()
        return got

    assert asyncio.run(main()) == [{"t": "release", "ip": "192.0.2.1"},
                                   {"t": "release", "ip": "192.0.2.2"},
                                   {"t": "admit", "n": 7, "ip": "192.0.2.2"}]
