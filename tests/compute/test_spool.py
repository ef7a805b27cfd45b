"""The ingest spool: append/claim/ack, quota, restart, request keys, aggregator state."""

from __future__ import annotations

import asyncio
import json

import pytest

from verge.compute.ingest import Aggregator, WindowAverage
from verge.compute.spool import AppendRequest, AsyncSpool, Spool, SpoolFull, SpoolLocked


def readings(start: int, count: int, device: str = "d1") -> list[dict]:
    return [{"device": device, "value": float(i), "id": i} for i in range(start, start + count)]


def ids(batch) -> list[int]:
    return [json.loads(p)["id"] for p in batch.payloads]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "spool.db"


def test_append_claim_ack(path):
    spool = Spool(path)
    first = spool.append(readings(0, 3))
    second = spool.append(readings(3, 2))
    assert (first.first_seq, first.last_seq, second.first_seq, second.last_seq) == (1, 3, 4, 5)
    batch = spool.claim(max_records=4)
    assert ids(batch) == [0, 1, 2, 3]
    assert batch.key == f"{spool.spool_id}-1-4"
    assert batch.body().count(b"\n") == 4 and json.loads(batch.body().splitlines()[0])["id"] == 0
    rest = spool.claim(max_records=4)
    assert ids(rest) == [4]
    assert spool.claim() is None  # both batches in flight, nothing unclaimed
    spool.ack(batch)
    spool.ack(rest)
    assert spool.stats()["records"] == 0 and spool.stats()["bytes"] == 0
    spool.close()


def test_batch_bytes_limit_takes_at_least_one_record(path):
    spool = Spool(path)
    spool.append(readings(0, 5))
    size = len(spool.claim(max_records=1).payloads[0])
    batch = spool.claim(max_records=10, max_bytes=2 * size + 1)
    assert batch.count == 2
    assert spool.claim(max_records=10, max_bytes=1).count == 1  # a big record still goes
    spool.close()


def test_claimed_batch_is_resent_after_restart_with_the_same_key(path):
    spool = Spool(path)
    spool.append(readings(0, 10))
    batch = spool.claim(max_records=6)
    spool.append(readings(10, 5))  # arrives after the claim: must not join that batch
    spool.close()  # like kill -9: nothing acked

    spool = Spool(path)
    again = spool.claim(max_records=100)
    assert (again.key, ids(again)) == (batch.key, ids(batch))
    following = spool.claim(max_records=100)
    assert ids(following) == list(range(6, 15))
    spool.ack(again)
    spool.close()

    spool = Spool(path)
    assert ids(spool.claim(max_records=100)) == list(range(6, 15))  # still claimed, same range
    spool.close()


def test_sequence_numbers_are_never_reused(path):
    spool = Spool(path)
    spool.append(readings(0, 3))
    spool.ack(spool.claim())
    spool.close()
    spool = Spool(path)
    assert spool.stats()["records"] == 0
    assert spool.append(readings(3, 1)).first_seq == 4  # a key never names two batches
    spool.close()


def test_quota_refuses_whole_requests_and_keeps_accepted_data(path):
    spool = Spool(path, quota_records=5)
    spool.append(readings(0, 4))
    with pytest.raises(SpoolFull):
        spool.append(readings(4, 2))
    assert spool.stats()["records"] == 4  # nothing of the refused request was written
    spool.append(readings(4, 1))
    with pytest.raises(SpoolFull):
        spool.append(readings(5, 1))
    spool.ack(spool.claim(max_records=3))  # the sink took some: room again
    spool.append(readings(5, 3))
    spool.close()


def test_quota_in_bytes(path):
    spool = Spool(path, quota_bytes=200)
    spool.append([{"device": "d", "value": 1, "pad": "x" * 100}])
    with pytest.raises(SpoolFull) as info:
        spool.append([{"device": "d", "value": 2, "pad": "x" * 100}])
    assert info.value.retry_after > 0
    spool.close()


def test_group_commit_results_are_per_request(path):
    spool = Spool(path, quota_records=5)
    results = spool.commit(
        [
            AppendRequest(readings(0, 3)),
            AppendRequest(readings(3, 3)),
            AppendRequest(readings(6, 2)),
        ],
        Aggregator(),
    )
    assert [type(r).__name__ for r in results] == ["AppendResult", "SpoolFull", "AppendResult"]
    assert (results[2].first_seq, results[2].last_seq) == (4, 5)
    assert spool.commits == 1
    spool.close()


def test_request_key_makes_a_retried_post_count_once(path):
    spool = Spool(path)
    first = spool.append(readings(0, 3), key="dev1-post-7")
    again = spool.append(readings(0, 3), key="dev1-post-7")
    assert again.replayed and (again.first_seq, again.last_seq) == (first.first_seq, first.last_seq)
    spool.close()
    spool = Spool(path)
    assert spool.append(readings(0, 3), key="dev1-post-7").replayed  # survives a restart
    assert spool.stats()["records"] == 3
    results = spool.commit(
        [AppendRequest(readings(9, 1), "k2"), AppendRequest(readings(9, 1), "k2")], Aggregator()
    )
    assert not results[0].replayed and results[1].replayed  # same key twice in one group
    assert spool.stats()["records"] == 4
    spool.close()


def test_request_keys_expire_on_tick(path):
    spool = Spool(path, request_key_ttl=10)
    spool.append(readings(0, 1), key="k", now=1000.0)
    spool.tick(Aggregator(), now=1005.0)
    assert spool.append(readings(0, 1), key="k", now=1006.0).replayed
    spool.tick(Aggregator(), now=1011.0)
    assert not spool.append(readings(0, 1), key="k", now=1012.0).replayed
    spool.close()


def test_dead_letter_moves_the_batch_aside(path):
    spool = Spool(path)
    spool.append(readings(0, 2))
    batch = spool.claim()
    spool.dead_letter(batch, 400, "bad record")
    assert spool.stats()["records"] == 0 and spool.stats()["dead_batches"] == 1
    [dead] = spool.dead_letters()
    assert (dead["key"], dead["status"], dead["count"]) == (batch.key, 400, 2)
    spool.close()
    assert Spool(path).stats()["dead_batches"] == 1


def test_one_process_per_spool(path):
    spool = Spool(path)
    with pytest.raises(SpoolLocked):
        Spool(path)
    spool.close()
    Spool(path).close()


def test_due_in_size_and_age(path):
    spool = Spool(path)
    assert spool.due_in(100.0, 3, 10**6, 5.0) is None
    spool.append(readings(0, 1), now=100.0)
    assert spool.due_in(101.0, 3, 10**6, 5.0) == pytest.approx(4.0)
    assert spool.due_in(105.0, 3, 10**6, 5.0) == 0
    spool.append(readings(1, 2), now=101.0)
    assert spool.due_in(101.0, 3, 10**6, 5.0) == 0
    batch = spool.claim(max_records=3)
    assert spool.due_in(101.0, 3, 10**6, 5.0) is None  # in flight
    spool.release(batch)
    assert spool.due_in(101.0, 3, 10**6, 5.0) == 0  # to be retried
    spool.close()


def test_window_state_is_durable_and_rolled_back_with_refused_requests(path):
    spool = Spool(path, quota_records=1)
    agg = WindowAverage(window=10)
    load = [{"device": "d1", "value": v, "ts": 100.0 + v} for v in (1.0, 2.0, 3.0)]
    [result] = spool.commit([AppendRequest(load)], agg, now=105.0)
    assert result.records == 0  # folded into the open window, durable with the 2xx
    spool.close()

    spool = Spool(path, quota_records=1)
    agg = WindowAverage(window=10)
    agg.load(spool.load_state())  # restart: the open window comes back
    # a request that closes the window and would need 2 records is refused whole...
    late = [{"device": "d1", "value": 9.0, "ts": 101.0}, {"device": "d2", "value": 1.0, "ts": 95}]
    [refused] = spool.commit([AppendRequest(late)], agg, now=111.0)
    assert isinstance(refused, SpoolFull)
    assert agg.state == spool.load_state()  # ...and leaves the state as it was
    assert spool.tick(agg, now=111.0) == 1  # the window closes: one record
    [record] = [json.loads(p) for p in spool.claim().payloads]
    assert record == {
        "device": "d1",
        "window_start": 100,
        "window_end": 110,
        "count": 3,
        "sum": 6.0,
        "avg": 2.0,
        "min": 1.0,
        "max": 3.0,
    }
    assert spool.load_state() == {}
    spool.close()


async def test_async_spool_group_commits_concurrent_appends(path):
    spool = await AsyncSpool.open(path)
    results = await asyncio.gather(*(spool.append(readings(i * 10, 10)) for i in range(50)))
    seqs = sorted((r.first_seq, r.last_seq) for r in results)
    assert seqs[0] == (1, 10) and seqs[-1] == (491, 500)
    assert all(b[0] == a[1] + 1 for a, b in zip(seqs, seqs[1:], strict=False))
    assert spool.appended.is_set()
    assert spool.stats()["commits"] < 50  # waiting requests shared commits
    await spool.close()


async def test_async_spool_reports_quota_per_request(path):
    spool = await AsyncSpool.open(path, quota_records=15)
    outcomes = await asyncio.gather(
        *(spool.append(readings(i * 10, 10)) for i in range(3)), return_exceptions=True
    )
    assert sum(isinstance(o, SpoolFull) for o in outcomes) == 2
    assert spool.stats()["records"] == 10
    await spool.close()
