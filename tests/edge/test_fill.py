"""Fill: one growing body read by many clients, from any offset, while it arrives."""

from __future__ import annotations

import asyncio

import pytest

from verge.cache.disk import DiskStore
from verge.edge.fill import Fill, FillAborted, FillHead


async def collect(fill: Fill, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in fill.stream(start, end)])


async def test_readers_get_bytes_as_they_arrive_and_the_whole_body():
    fill = Fill("k", memory_limit=1 << 20)
    fill.set_head(FillHead("stream", 200))
    readers = [asyncio.create_task(collect(fill)) for _ in range(3)]
    ranged = asyncio.create_task(collect(fill, 3, 7))
    for part in (b"abc", b"defg", b"hij"):
        await asyncio.sleep(0)
        fill.append(part)
    fill.finish(None)
    assert await asyncio.gather(*readers) == [b"abcdefghij"] * 3
    assert await ranged == b"defg"


async def test_late_reader_after_finish_reads_everything():
    fill = Fill("k", memory_limit=1 << 20)
    fill.append(b"hello")
    fill.finish(None)
    assert await collect(fill) == b"hello"
    assert fill.buffered == b"hello"


async def test_failure_cuts_readers_short():
    fill = Fill("k", memory_limit=1 << 20)
    reader = asyncio.create_task(collect(fill))
    fill.append(b"partial")
    await asyncio.sleep(0)
    fill.fail(ConnectionError("origin reset"))
    with pytest.raises(FillAborted):
        await reader
    assert fill.head.result().kind == "error"


async def test_large_body_spills_to_the_disk_writer(tmp_path):
    disk = DiskStore(tmp_path, 1 << 30)
    writer = disk.writer("big", "")
    fill = Fill("big", memory_limit=1000)
    fill.attach_writer(writer)
    reader = asyncio.create_task(collect(fill, 500, 2500))
    data = bytes(range(256)) * 12
    for i in range(0, len(data), 300):
        fill.append(data[i:i + 300])
        await asyncio.sleep(0)
    assert fill.buffered is None  # over the memory limit: only the disk copy remains
    fill.finish(None)
    assert await reader == data[500:2500]
    writer.abort()
    disk.close()
