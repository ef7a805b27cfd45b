"""HPACK that remembers: a header block that repeats is encoded once per table state.

Why: with h2's own checks replaced (see :func:`verge.http.h2server.request_from_fields`), the
pure-Python ``hpack`` coder was the largest cost of an HTTP/2 cache hit (~a quarter). HPACK is
stateful, but a block whose coding leaves the dynamic table as it found it (every field indexed
or sent without indexing) codes the same way again while the table stays as it is. That is the
common case on a busy connection: a client repeating the same request fields, the edge repeating
a hit's response head (it changes once a second, with ``Age``). So each connection's coder keeps
a small memo of such blocks, valid for one table state; any change to the table (a field added,
an eviction, a size change) moves on to a new state and old entries stop matching.

:class:`MemoEncoder` is a drop-in subclass of ``hpack.Encoder`` (h2 calls only ``encode``
and the table size properties), installed on a fresh ``H2Connection`` by :func:`install`.
"""

from __future__ import annotations

import hpack

MEMO_ENTRIES = 64  # blocks remembered per connection and direction


class _TableState:
    """What identifies the dynamic table's content: the newest entry itself (a new tuple on
    every add, compared by identity and held here, so its id can never be reused by a later
    entry while a memo depends on it), the entry count (evictions), the size limit and a
    pending size update."""

    __slots__ = ("newest", "rest")

    def __init__(self, table: hpack.HeaderTable, *extra) -> None:
        entries = table.dynamic_entries
        self.newest = entries[0] if entries else None
        self.rest = (len(entries), table.maxsize, table.resized, *extra)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TableState) and self.newest is other.newest \
            and self.rest == other.rest

    __hash__ = None  # type: ignore[assignment]


class MemoEncoder(hpack.Encoder):
    """``hpack.Encoder`` with a per-table-state memo of blocks that left the table unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self._memo: dict[tuple, bytes] = {}
        self._memo_state: _TableState | None = None

    def encode(self, headers, huffman: bool = True) -> bytes:
        if type(headers) is not list or any(type(h) is not tuple for h in headers):
            return super().encode(headers, huffman)  # dicts, never-indexed fields: no memo
        state = _TableState(self.header_table)
        if state != self._memo_state:
            self._memo.clear()
            self._memo_state = state
        key = (huffman, *headers)
        block = self._memo.get(key)
        if block is not None:
            return block
        block = super().encode(headers, huffman)
        if _TableState(self.header_table) == state and len(self._memo) < MEMO_ENTRIES:
            self._memo[key] = block
        return block


def install(conn) -> None:
    """Give a new h2 connection (before any frame went either way) a memoising encoder.

    Only the encoder: a decoding memo was removed after a property test caught it decoding
    against a table it had not updated (requests decoded wrongly are worse than slow)."""
    encoder = MemoEncoder()
    encoder.header_table_size = conn.encoder.header_table_size
    conn.encoder = encoder
