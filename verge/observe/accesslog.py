"""One JSON line per request, written through a buffer flushed about once a second.

The line is assembled by hand rather than with json.dumps because it is made for every request
(including ~60k cache hits/s per core), from the batches of request records the edge drains
(:mod:`verge.observe.records`); only strings that may hold client-chosen bytes are escaped,
with json's own encoder.
"""

from __future__ import annotations

import json
import operator
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

_escape = json.encoder.encode_basestring  # type: ignore[attr-defined]
# of a record (layout: verge.observe.records): what the middle of its line is made of
_MIDDLE_FIELDS = operator.itemgetter(2, 3, 4, 5, 6, 7, 8)
DURATION_MEMO = 100_000  # durations under one second, in hundredths of a ms, are memoised


class AccessLog:
    """Lines are kept in a list and written (encoded once) on flush, about once a second."""

    FLUSH_LINES = 4096
    MEMO_SIZE = 4096  # distinct (client, method, host, target, status, bytes, cache) kept

    def __init__(self, target: str | None) -> None:
        self._pending: list[str] = []
        self._middles: dict[tuple, str] = {}
        self._durations: dict[int, str] = {}
        self._ts = (0.0, 0.0, "")
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

    def write_records(self, records: Sequence[tuple]) -> None:
        """Lines for request records (the tuple layout of :mod:`verge.observe.records`).

        The part of a line between the timestamp and the duration is memoised: requests
        that repeat (same client, URL, status and size) format it once.
        """
        if self._file is None:
            return
        lines, middles, durations = self._pending, self._middles, self._durations
        ts_from, ts_until, ts_text = self._ts  # the millisecond ts_text stands for
        for record, key in zip(records, map(_MIDDLE_FIELDS, records), strict=True):
            if not ts_from <= record[0] < ts_until:
                ms = int(record[0] * 1000)
                ts_from, ts_until = ms / 1000, (ms + 1) / 1000
                ts_text = f"{ms // 1000}.{ms % 1000:03d}"
            middle = middles.get(key)
            if middle is None:
                middle = self._middle(key)
            hundredths = int(record[1] * 100_000 + 0.5)  # of a millisecond
            duration = durations.get(hundredths)
            if duration is None:
                duration = f"{hundredths // 100}.{hundredths % 100:02d}"
                if hundredths < DURATION_MEMO:
                    durations[hundredths] = duration
            lines.append(f'{{"ts":{ts_text},{middle}{duration}}}\n')
        self._ts = (ts_from, ts_until, ts_text)
        if len(lines) >= self.FLUSH_LINES:
            self.flush()

    def _middle(self, key: tuple) -> str:
        middles = self._middles
        if len(middles) >= self.MEMO_SIZE:
            middles.clear()
        client, method, host, target, status, sent, cache = key
        middles[key] = middle = (
            f'"client":"{client}","method":{_escape(method)},"host":{_escape(host)},'
            f'"uri":{_escape(target)},"status":{int(status)},"bytes":{sent},'
            f'"cache":"{cache}","ms":'
        )
        return middle

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
