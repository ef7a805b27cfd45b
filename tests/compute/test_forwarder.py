"""The forwarder against the reference sink, in process: retries, keys, poison, outages."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from verge.compute.forwarder import (
    DONE,
    POISON,
    RETRY,
    Forwarder,
    ForwarderSettings,
    backoff_delay,
    classify,
    parse_retry_after,
)
from verge.compute.sink import Fault, start_sink
from verge.compute.spool import AsyncSpool

FAST = ForwarderSettings(
    batch_records=10, max_age=0.02, backoff_base=0.01, backoff_cap=0.05, timeout=2.0
)


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def sink(tmp_path):
    running = await start_sink(tmp_path / "sink.db")
    yield running
    await running.close()


@pytest.fixture
async def spool(tmp_path):
    opened = await AsyncSpool.open(tmp_path / "spool.db")
    yield opened
    await opened.close()


async def fill(spool: AsyncSpool, count: int) -> None:
    for start in range(0, count, 10):
        await spool.append(
            [{"device": "d", "value": i, "id": i} for i in range(start, min(count, start + 10))]
        )


def sink_ids(sink) -> list[int]:
    return [json.loads(line)["id"] for line in sink.app.store.records()]


class Running:
    """A forwarder task, cancelled (like a shutdown) on exit."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    async def __aenter__(self) -> Forwarder:
        self.task = asyncio.create_task(self.forwarder.run())
        return self.forwarder

    async def __aexit__(self, *exc) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, DONE),
        (201, DONE),
        (204, DONE),
        (409, DONE),
        (400, POISON),
        (401, POISON),
        (404, POISON),
        (413, POISON),
        (422, POISON),
        (408, RETRY),
        (429, RETRY),
        (500, RETRY),
        (502, RETRY),
        (503, RETRY),
        (504, RETRY),
        (None, RETRY),
        (302, RETRY),
    ],
)
def test_classify(status, outcome):
    assert classify(status) == outcome


def test_backoff_grows_with_jitter_and_is_bounded():
    low = [backoff_delay(n, 0.1, 5.0, rand=lambda: 0.0) for n in range(200)]
    high = [backoff_delay(n, 0.1, 5.0, rand=lambda: 1.0) for n in range(200)]
    assert low[:3] == pytest.approx([0.05, 0.1, 0.2]) and high[:3] == pytest.approx([0.1, 0.2, 0.4])
    assert max(high) == 5.0 and min(low[10:]) == 2.5  # capped, jitter keeps half
    assert all(a <= b for a, b in zip(high, high[1:], strict=False))


def test_parse_retry_after():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_retry_after_is_honoured_up_to_the_cap(spool):
    forwarder = Forwarder(spool, "http://unused", FAST, rand=lambda: 0.0)
    assert forwarder._retry_delay(0, 0.03) == 0.03
    assert forwarder._retry_delay(0, 100.0) == FAST.backoff_cap


async def test_delivers_everything_in_batches_with_distinct_keys(spool, sink):
    await fill(spool, 25)
    async with Running(Forwarder(spool, sink.url, FAST)) as forwarder:
        await wait_until(lambda: spool.stats()["records"] == 0)
    assert sorted(sink_ids(sink)) == list(range(25))
    keys = [key for key, _ in sink.app.attempts]
    assert len(keys) == len(set(keys)) == 3
    spool_id = spool.stats()["spool_id"]
    assert keys[0] == f"{spool_id}-1-10" and keys[-1] == f"{spool_id}-21-25"
    assert forwarder.counters.records == 25


async def test_the_same_key_on_every_retry(spool, sink):
    sink.app.faults.extend([Fault(503), Fault(502), Fault(500)])
    await fill(spool, 10)
    async with Running(Forwarder(spool, sink.url, FAST)) as forwarder:
        await wait_until(lambda: spool.stats()["records"] == 0)
    assert [status for _, status in sink.app.attempts] == [503, 502, 500, 200]
    assert len({key for key, _ in sink.app.attempts}) == 1
    assert sorted(sink_ids(sink)) == list(range(10))
    assert forwarder.counters.retries == 3


async def test_lost_answer_is_deduplicated_by_the_sink(spool, sink):
    sink.app.faults.append(Fault(500, after_store=True))  # stored, but the edge hears 500
    await fill(spool, 20)
    async with Running(Forwarder(spool, sink.url, FAST)):
        await wait_until(lambda: spool.stats()["records"] == 0)
    assert sorted(sink_ids(sink)) == list(range(20))  # exactly once
    assert sink.app.duplicates == 1


async def test_poison_batch_goes_to_dead_letters_and_the_rest_flows(spool, sink):
    sink.app.faults.append(Fault(422))
    await fill(spool, 30)
    async with Running(Forwarder(spool, sink.url, FAST)) as forwarder:
        await wait_until(lambda: spool.stats()["records"] == 0)
    assert sorted(sink_ids(sink)) == list(range(10, 30))
    [dead] = spool.spool.dead_letters()
    assert (dead["status"], dead["count"], dead["first_seq"]) == (422, 10, 1)
    assert forwarder.counters.dead_batches == 1


async def test_409_means_the_sink_already_has_it(spool, sink):
    sink.app.faults.append(Fault(409))
    await fill(spool, 10)
    async with Running(Forwarder(spool, sink.url, FAST)):
        await wait_until(lambda: spool.stats()["records"] == 0)
    assert spool.stats()["dead_batches"] == 0


async def test_network_cut_then_sink_back_on_the_same_port(spool, tmp_path):
    down = await start_sink(tmp_path / "sink.db")
    port, url = down.port, down.url
    await down.close()  # connection refused from now on
    await fill(spool, 40)
    async with Running(Forwarder(spool, url, FAST)) as forwarder:
        await wait_until(lambda: forwarder.counters.retries >= 3)
        assert forwarder.counters.failing_since is not None
        assert forwarder.retry_after_hint() >= 1
        assert spool.stats()["records"] == 40  # nothing lost while the sink is away
        sink = await start_sink(tmp_path / "sink.db", port=port)
        try:
            await wait_until(lambda: spool.stats()["records"] == 0)
            assert sorted(sink_ids(sink)) == list(range(40))
            assert forwarder.counters.failing_since is None
        finally:
            await sink.close()


async def test_batch_interrupted_mid_retry_is_resent_by_the_next_forwarder(spool, sink):
    sink.app.faults.extend([Fault(503)] * 1000)
    await fill(spool, 10)
    async with Running(Forwarder(spool, sink.url, FAST)):
        await wait_until(lambda: len(sink.app.attempts) >= 2)
    sink.app.faults.clear()
    async with Running(Forwarder(spool, sink.url, FAST)):
        await wait_until(lambda: spool.stats()["records"] == 0)
    assert len({key for key, _ in sink.app.attempts}) == 1
    assert sorted(sink_ids(sink)) == list(range(10))


async def test_partial_batch_leaves_after_max_age(spool, sink):
    settings = ForwarderSettings(batch_records=1000, max_age=0.1, backoff_base=0.01)
    async with Running(Forwarder(spool, sink.url, settings)):
        started = time.monotonic()
        await fill(spool, 3)
        await wait_until(lambda: spool.stats()["records"] == 0)
        assert 0.08 <= time.monotonic() - started < 2.0
    assert sorted(sink_ids(sink)) == [0, 1, 2]
