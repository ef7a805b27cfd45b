"""``verge stream``: the streaming server (RTMP ingest, ABR transcoding, LL-HLS/HLS/DASH/
HTTP-FLV); the logic is verge.stream."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from verge.cli.common import fail, split_hostport


def stream(
    rtmp: Annotated[
        str,
        typer.Option(
            help="HOST:PORT of the RTMP ingest (publish to rtmp://HOST:PORT/APP/NAME?key=KEY)."
        ),
    ] = "127.0.0.1:1935",
    http: Annotated[
        str, typer.Option(help="HOST:PORT serving HTTP-FLV, HLS and DASH (the edges' origin).")
    ] = "127.0.0.1:8090",
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML config; its `stream` section (apps, keys, ladder, part/segment targets)."
        ),
    ] = None,
) -> None:
    """Run the streaming server: RTMP ingest, ABR transcoding, LL-HLS/HLS/DASH/HTTP-FLV."""
    import uvloop

    from verge.config import ConfigError, load_config
    from verge.stream.server import run_stream

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        fail(str(exc))
    from verge.stream.transcode import FfmpegNotFound, resolve_ffmpeg

    try:
        resolve_ffmpeg()  # before listening: a stream server without ffmpeg cannot package
    except FfmpegNotFound as exc:
        fail(str(exc))
    rtmp_at, http_at = split_hostport(rtmp, "--rtmp"), split_hostport(http, "--http")
    try:
        uvloop.run(run_stream(cfg.stream, rtmp_at, http_at))
    except OSError as exc:
        fail(f"cannot listen: {exc}")
