"""One JSON line per request, written through a buffer flushed about once a second.

The line is assembled by hand rather than with json.dumps because it is made for every request
(including ~60k cache hits/s per core), from the batches of request records the edge drains
(:mod:`verge.observe.records`); only strings that may hold client-chosen bytes are escaped,
with json's own encoder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from typing import TextIO

_escape = json.encoder.encode_basestring  # type: ignore[attr-defined]


class AccessLog:
    """Lines are kept in a list and written (encoded once) on flush, about once a second."""

    FLUSH_LINES = 4096
    MEMO_SIZE = 4096  # distinct (client, method, host, target, status, bytes, cache) kept

    def __init__(self, target: str | None) -> None:
        self._pending: list[str] = []
        self._middles: dict[tuple, str] = {}
        self._last_ms, self._ts = -1, ""
        self._file: TextIO | None
        if target is None:
            self._file = None
        elif target == "-":
            self._file = sys.stdout
        else:
            os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
            self._file = open(target, "a", buffering=1 << 16, encoding="utf-8")  # noqa: SIM115
        self.enabled = self._file is not None

    def write(self, client: str, method: str, host: str, target: str, status: int, sent: int,
              cache: str, duration: float, service: str = "") -> None:
        """One request's line (the edge batches instead: see verge.observe.records)."""
        self.write_records([(time.time(), duration, client, method, host, target, status, sent,
                             cache, service)])

    def write_records(self, records: Iterable[tuple]) -> None:
        """Lines for request records (the tuple layout of :mod:`verge.observe.records`).

        The part of a line between the timestamp and the duration is memoised: requests
        that repeat (same client, URL, status and size) format it once.
        """
        if self._file is None:
            return
        lines, middles, last_ms, ts_text = self._pending, self._middles, self._last_ms, self._ts
        for ts, duration, client, method, host, target, status, sent, cache, _ in records:
            ms = int(ts * 1000)
            if ms != last_ms:
                last_ms, ts_text = ms, f"{ms // 1000}.{ms % 1000:03d}"
            key = (client, method, host, target, status, sent, cache)
            middle = middles.get(key)
            if middle is None:
                if len(middles) >= self.MEMO_SIZE:
                    middles.clear()
                middle = middles[key] = (
                    f'"client":"{client}","method":{_escape(method)},"host":{_escape(host)},'
                    f'"uri":{_escape(target)},"status":{int(status)},"bytes":{sent},'
                    f'"cache":"{cache}","ms":'
                )
            lines.append(f'{{"ts":{ts_text},{middle}{duration * 1000:.2f}}}\n')
        self._last_ms, self._ts = last_ms, ts_text
        if len(lines) >= self.FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if self._file is not None:
            if self._pending:
                self._file.write("".join(self._pending))
                self._pending.clear()
            self._file.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
