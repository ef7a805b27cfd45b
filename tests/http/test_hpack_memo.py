"""The memoising HPACK coders code exactly as hpack's own, whatever the table does meanwhile."""

from __future__ import annotations

import hpack
from hypothesis import given, settings
from hypothesis import strategies as st

from verge.http.hpack_memo import MemoEncoder

# few distinct names and values, so blocks repeat, hit the table, and evict (small tables)
FIELD = st.tuples(st.sampled_from([b"age", b"etag", b"x-a", b"cache-status", b":path"]),
                  st.sampled_from([b"1", b"2", b"/x", b"verge; hit", b"a" * 300]))
BLOCK = st.lists(FIELD, min_size=1, max_size=6)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.one_of(BLOCK, st.just("repeat"), st.sampled_from([256, 512, 4096])),
                min_size=1, max_size=40))
def test_memo_encoder_matches_hpack_step_by_step(steps):
    plain_enc, memo_enc = hpack.Encoder(), MemoEncoder()
    plain_dec = hpack.Decoder()
    previous: list = [(b"age", b"1")]
    resized = False
    for step in steps:
        if isinstance(step, int):
            # the decoder learns the new size from the encoder's size update, as on the wire;
            # one change between blocks (hpack signals only the last of several, RFC 7541 §4.2
            # wants the smallest too: both coders would then disagree with any decoder)
            if not resized:
                for coder in (plain_enc, memo_enc):
                    coder.header_table_size = step
            resized = True
            continue
        resized = False
        block = list(previous) if step == "repeat" else [tuple(field) for field in step]
        encoded = plain_enc.encode(block)
        assert memo_enc.encode(list(block)) == encoded
        assert plain_dec.decode(encoded, raw=True) == block
        previous = block


def test_repeated_blocks_come_from_the_memo():
    encoder, decoder = MemoEncoder(), hpack.Decoder()
    block = [(b":status", b"200"), (b"cache-status", b"verge; hit"), (b"age", b"3")]
    first = encoder.encode(block)  # adds the fields to the table: not remembered
    second = encoder.encode(block)  # all indexed now: remembered
    assert encoder.encode(block) is second and second != first
    added = encoder.encode([(b"x-new", b"v")])  # the table changes: indices move
    third = encoder.encode(block)
    assert third != second  # not the remembered block of the old table
    assert decoder.decode(first, raw=True) == decoder.decode(second, raw=True) == block
    assert decoder.decode(added, raw=True) == [(b"x-new", b"v")]
    assert decoder.decode(third, raw=True) == block


def test_a_table_state_is_never_mistaken_for_a_later_one():
    """The state holds the newest entry itself: an entry evicted and freed cannot hand its
    id to the next one while a memo depends on it (CPython reuses freed tuples' memory,
    which once let a stale memo decode against the wrong table)."""
    from verge.http.hpack_memo import _TableState

    table = hpack.Encoder().header_table
    table.maxsize = 40  # room for one 36-byte entry
    table.add(b"age", b"1")
    before = _TableState(table)
    table.add(b"age", b"1")  # evicts the old entry, adds an equal one: same count, same size
    after = _TableState(table)
    assert len(table.dynamic_entries) == 1
    assert before.newest is not table.dynamic_entries[0]
    assert before != after and after == _TableState(table)
