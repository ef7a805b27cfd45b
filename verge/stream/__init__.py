"""Live and on-demand streaming: RTMP ingest (sans-I/O protocol + asyncio server), FLV muxing.

Media flows publisher -> ``rtmp`` (protocol) -> ``ingest`` (server, per-stream sink) -> packagers.
``stream`` never imports ``edge``: it produces bytes and files that the edge serves like any origin.
"""
