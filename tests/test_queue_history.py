"""Per-recipient attempt history in the envelope record (ENVELOPE_VERSION 2).

Unit tests of the record (round trip, the cap, bounded fields, version-1 records
loading and being upgraded on their next update), the queue manager recording one
entry per attempt over a real spool, and the real daemon retrying a message whose
next hop refuses connections: the history in its envelope file grows with every
attempt and stops at HISTORY_LIMIT.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from empath.config import load_config_text
from empath.queue import QueueManager
from empath.spool import CorruptEnvelope, Envelope, Recipient, RecoveryReport, Spool
from empath.spool.envelope import (
    ENVELOPE_VERSION,
    HISTORY_FIELD_MAX,
    HISTORY_LIMIT,
    HISTORY_TEXT_MAX,
    Attempt,
)
from empath.spool.ids import new_message_id
from tests.harness import Daemon, free_port, queued_id, send_message, spool_record_bytes

MESSAGE = b"From: alice@test.example\r\nSubject: history\r\n\r\nHello.\r\n"
REFUSED = "X-Empath; connect to 127.0.0.2:25: Connection refused"


def make_env(id: str, recipients: list[Recipient], **kw: Any) -> Envelope:
    return Envelope(id=id, sender="alice@test.example", recipients=recipients,
                    received_at=1_700_000_000.5, client_addr="127.0.0.1", client_port=40000,
                    helo="client.test", **kw)


def attempt(i: int, status: str = "deferred", **kw: Any) -> Attempt:
    return Attempt.make(1_700_000_000 + i, status, "4.4.1" if status == "deferred" else "2.0.0",
                        kw.pop("diagnostic", f"{REFUSED} ({i})"), **kw)


def v1_record(id: str, size: int) -> bytes:
    """A record exactly as the version-1 writer made it (no ``history`` anywhere)."""
    obj = json.loads(make_env(id, [Recipient("bob@b.example", state="deferred", attempts=3,
                                             next_attempt=1_700_000_900.0,
                                             last_error=REFUSED),
                                   Recipient("carol@c.example")], size=size).to_bytes())
    obj["version"] = 1
    for r in obj["recipients"]:
        del r["history"]
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool")
    s.prepare()
    yield s
    s.close()


# ---- the record ------------------------------------------------------------------------


def test_round_trip_with_history() -> None:
    r = Recipient("bob@b.example", state="deferred", attempts=3, next_attempt=1_700_000_900.0,
                  last_error=REFUSED)
    r.record(attempt(1))
    r.record(attempt(2, relay="mx1.b.example", tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
                     diagnostic="smtp; 451 4.7.1 greylisted, caf\u00e9 \udcff"))
    r.record(Attempt.make(1_700_000_003.123456, "bounced", "5.1.1",
                          "smtp; 550 5.1.1 no such user", "mx1.b.example"))
    env = make_env(new_message_id(), [r, Recipient("carol@c.example")])
    data = env.to_bytes()
    assert data.isascii() and data.endswith(b"\n")
    obj = json.loads(data)
    assert obj["version"] == ENVELOPE_VERSION == 2
    assert obj["recipients"][1]["history"] == []
    first, _, last = obj["recipients"][0]["history"]
    assert first == {"at": 1_700_000_001.0, "status": "deferred", "enhanced": "4.4.1",
                     "diagnostic": f"{REFUSED} (1)", "relay": None, "tls": None}
    assert last["at"] == 1_700_000_003.123  # milliseconds are enough, and shorter
    again = Envelope.from_bytes(data)
    assert again == env
    assert again.to_bytes() == data


def test_history_keeps_the_last_attempts_only() -> None:
    r = Recipient("bob@b.example")
    for i in range(3 * HISTORY_LIMIT + 5):
        r.record(attempt(i))
    assert len(r.history) == HISTORY_LIMIT
    assert [a.at for a in r.history] == [
        1_700_000_000 + i for i in range(2 * HISTORY_LIMIT + 5, 3 * HISTORY_LIMIT + 5)]
    env = make_env(new_message_id(), [r])
    assert Envelope.from_bytes(env.to_bytes()) == env
    # Ten refusals cost about 1.2 KiB; the record stays small.
    assert len(env.to_bytes()) < len(make_env(env.id, [Recipient("bob@b.example")]).to_bytes()) \
        + HISTORY_LIMIT * 160


def test_make_bounds_every_field() -> None:
    a = Attempt.make(1.23456, "deferred", "4.4.1", "x" * 10_000, "r" * 1000, "t" * 1000)
    assert len(a.diagnostic) == HISTORY_TEXT_MAX and a.diagnostic.endswith("...")
    assert len(a.relay or "") == len(a.tls or "") == HISTORY_FIELD_MAX
    assert a.at == 1.235
    # A malformed status code is replaced by its class's, never refused: a delivered
    # recipient must always be recordable, or it would be delivered again.
    for bad in ("", "4.4", "44.1.1", "4.4.1 ", "\u0664.4.1", "6.0.0"):
        assert Attempt.make(0, "deferred", bad, "").enhanced == "4.0.0"
        assert Attempt.make(0, "delivered", bad, "").enhanced == "2.0.0"
        assert Attempt.make(0, "bounced", bad, "").enhanced == "5.0.0"
    # An expired message bounces with the last (temporary) status; kept as it is.
    assert Attempt.make(0, "bounced", "4.4.7", "").enhanced == "4.4.7"
    with pytest.raises(ValueError):
        Attempt.make(0, "sent", "2.0.0", "")
    r = Recipient("bob@b.example", history=[a])
    assert Envelope.from_bytes(make_env(new_message_id(), [r]).to_bytes()).recipients == [r]


def test_loading_shares_repeated_strings_and_accepts_integer_times() -> None:
    r = Recipient("bob@b.example")
    for i in range(HISTORY_LIMIT):
        r.record(attempt(i, diagnostic=REFUSED, relay="mx1.b.example"))
    obj = json.loads(make_env(new_message_id(), [r]).to_bytes())
    obj["recipients"][0]["history"][0]["at"] = 1_700_000_000  # as another writer may
    loaded = Envelope.from_bytes(json.dumps(obj).encode()).recipients[0].history
    assert loaded[0].at == 1_700_000_000.0 and type(loaded[0].at) is float
    assert loaded[1:] == r.history[1:]
    # One copy of each repeated string per loaded record (a big queue is held in
    # memory by `queue stats`).
    assert all(a.diagnostic is loaded[0].diagnostic and a.relay is loaded[0].relay
               for a in loaded)


def test_corrupt_history_is_refused() -> None:
    env = make_env(new_message_id(), [Recipient("bob@b.example", history=[attempt(1)])])
    good = json.loads(env.to_bytes())

    def with_entry(**changes: Any) -> bytes:
        obj = json.loads(json.dumps(good))
        obj["recipients"][0]["history"][0].update(changes)
        return json.dumps(obj).encode()

    def with_history(history: Any) -> bytes:
        obj = json.loads(json.dumps(good))
        obj["recipients"][0]["history"] = history
        return json.dumps(obj).encode()

    entry = good["recipients"][0]["history"][0]
    cases = [
        with_history(None),
        with_history({}),
        with_history([entry] * (HISTORY_LIMIT + 1)),
        with_history([1]),
        with_history([{k: v for k, v in entry.items() if k != "relay"}]),
        with_history([{**entry, "code": 451}]),
        with_entry(at=None),
        with_entry(at="1700000001"),
        with_entry(at=True),
        with_entry(status="sent"),
        with_entry(status=None),
        with_entry(enhanced="4.4"),
        with_entry(enhanced="4.4.1 "),
        with_entry(enhanced="\u0664.4.1"),
        with_entry(enhanced=441),
        with_entry(diagnostic=None),
        with_entry(diagnostic="x" * (HISTORY_TEXT_MAX + 1)),
        with_entry(relay=1),
        with_entry(relay="r" * (HISTORY_FIELD_MAX + 1)),
        with_entry(tls=False),
        with_entry(tls="t" * (HISTORY_FIELD_MAX + 1)),
    ]
    for data in cases:
        with pytest.raises(CorruptEnvelope):
            Envelope.from_bytes(data)
    assert Envelope.from_bytes(with_history([entry] * HISTORY_LIMIT))


# ---- version 1 -----------------------------------------------------------------------


def test_version_1_record_loads_with_empty_history() -> None:
    id = new_message_id()
    env = Envelope.from_bytes(v1_record(id, 10))
    assert [r.history for r in env.recipients] == [[], []]
    assert env.recipients[0].attempts == 3 and env.recipients[0].last_error == REFUSED
    # Strict as before: a version-1 record with a history is damage, not a v2 record.
    obj = json.loads(v1_record(id, 10))
    obj["recipients"][0]["history"] = []
    with pytest.raises(CorruptEnvelope):
        Envelope.from_bytes(json.dumps(obj).encode())


def test_version_1_spool_survives_recovery_and_is_rewritten_as_version_2(spool: Spool) -> None:
    id = new_message_id()
    (spool.queue_dir / f"{id}.msg").write_bytes(MESSAGE)
    (spool.queue_dir / f"{id}.env").write_bytes(v1_record(id, len(MESSAGE)))
    # Recovery after the upgrade: nothing quarantined.
    assert spool.recover() == RecoveryReport(ids=[id], removed_tmp=0, quarantined=[])
    env = spool.load(id)
    assert env.recipients[0].history == []
    env.recipients[0].attempts += 1
    env.recipients[0].record(attempt(4))
    spool.update(env)
    raw = json.loads((spool.queue_dir / f"{id}.env").read_bytes())
    assert raw["version"] == 2
    assert [len(r["history"]) for r in raw["recipients"]] == [1, 0]
    assert spool.load(id) == env
    assert spool.recover().ids == [id]


# ---- the queue manager records every attempt --------------------------------------------


def test_queue_manager_records_one_entry_per_attempt(tmp_path: Path) -> None:
    mail = tmp_path / "mail"
    mail.mkdir()
    port = free_port()  # nothing listens on 127.0.0.2:port: refused
    config = load_config_text(yaml.safe_dump({
        "hostname": "mx.test.example", "postmaster": "postmaster@test.example",
        "state_dir": str(tmp_path / "state"), "local_domains": ["test.example"],
        "delivery": {"mode": "mx", "retry_schedule": [1], "breaker_failures": 3,
                     "routes": {"test.example": f"maildir:{mail}",
                                "stuck.example": f"smtp:127.0.0.2:{port}"}},
    }))

    async def run() -> tuple[list[Envelope], str]:
        spool = Spool(tmp_path / "spool")
        spool.prepare()
        try:
            qm = QueueManager(config, spool)
            w = spool.create()
            w.write(MESSAGE)
            await spool.commit(w, Envelope(
                id=w.id, sender="alice@test.example",
                recipients=[Recipient("bob@test.example"), Recipient("carol@stuck.example")],
                received_at=time.time(), client_addr="127.0.0.1", client_port=1,
                helo="client.test"))
            seen = []
            for _ in range(HISTORY_LIMIT + 3):
                qm.retry_now(w.id)
                await qm.attempt(w.id)
                seen.append(spool.load(w.id))  # what is on disk after each attempt
            return seen, w.id
        finally:
            spool.close()

    seen, _ = asyncio.run(run())
    delivered, stuck = seen[-1].recipients
    # Tried once, delivered once, never again.
    assert [a.status for a in delivered.history] == ["delivered"]
    assert delivered.history[0].enhanced == "2.0.0"
    assert "maildir" in delivered.history[0].diagnostic
    for n, env in enumerate(seen, 1):
        r = env.recipients[1]
        assert r.attempts == n
        assert len(r.history) == min(n, HISTORY_LIMIT)
        assert r.last_error == r.history[-1].diagnostic
    assert all(a.status == "deferred" and a.enhanced == "4.4.1" and a.relay is None
               and a.tls is None for a in stuck.history)
    ats = [a.at for a in stuck.history]
    assert ats == sorted(ats) and ats[0] > seen[2].recipients[1].history[0].at  # oldest dropped
    # Three refusals open the breaker; the history says so, which is why it is stuck.
    first = seen[HISTORY_LIMIT - 1].recipients[1].history
    assert all("Connection refused" in a.diagnostic for a in first[:3])
    assert all("circuit breaker open" in a.diagnostic for a in first[3:])


# ---- end to end: the real daemon ----------------------------------------------------------


def test_daemon_history_grows_per_attempt_and_is_capped(
    make_daemon: Callable[..., Daemon], tmp_path: Path,
) -> None:
    mail = tmp_path / "mail"
    mail.mkdir()
    port = free_port()
    d = make_daemon(start=False, local_domains=["test.example"], delivery={
        "mode": "mx", "retry_schedule": [1],
        # Every attempt connects (and is refused), rather than the breaker skipping it.
        "breaker_failures": 1000,
        "routes": {"test.example": f"maildir:{mail}", "stuck.example": f"smtp:127.0.0.2:{port}"},
    })
    d.start()
    code, text = asyncio.run(send_message(d.smtp_port, "alice@test.example",
                                          ["carol@stuck.example"], MESSAGE, "history"))
    assert code == 250, text
    id = queued_id(text)
    env_path = d.queue_dir / f"{id}.env"  # there once the first attempt changed it

    observed: dict[int, Envelope] = {}  # attempts -> the record with that many
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and max(observed, default=0) < HISTORY_LIMIT + 2:
        try:
            # renamed into place: whole
            env = Envelope.from_bytes(spool_record_bytes(d.queue_dir, id))
        except FileNotFoundError:
            raise AssertionError(f"message {id} left the queue\n{d.log()}") from None
        r = env.recipients[0]
        observed.setdefault(r.attempts, env)
        time.sleep(0.05)
    assert max(observed, default=0) >= HISTORY_LIMIT + 2, (observed.keys(), d.log())

    for n, env in sorted(observed.items()):
        r = env.recipients[0]
        assert r.state == ("pending" if n == 0 else "deferred")
        assert len(r.history) == min(n, HISTORY_LIMIT), (n, r.history)
        if n:
            assert r.last_error == r.history[-1].diagnostic
            assert all(a.status == "deferred" and a.enhanced == "4.4.1" for a in r.history)
            assert all(f"127.0.0.2:{port}" in a.diagnostic and "refused" in a.diagnostic
                       for a in r.history)
    last = observed[max(observed)].recipients[0].history
    ats = [a.at for a in last]
    assert ats == sorted(ats)
    # Once past the cap the oldest attempts are gone: the first one kept is later
    # than the very first attempt (seen in the record after attempt 1).
    assert ats[0] > observed[min(k for k in observed if k)].recipients[0].history[0].at
    # Retried on the schedule (1 s), not in a tight loop.
    assert ats[-1] - ats[0] >= HISTORY_LIMIT - 2
    assert d.stop() == 0
    assert json.loads(env_path.read_bytes())["version"] == ENVELOPE_VERSION
