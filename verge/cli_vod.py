"""``verge vod ...``: package files into the VOD library locally (the logic is verge.stream.vod).

``verge vod add movie.mp4 --name movie`` transcodes to the stream application's ladder with a
progress bar; the running ``verge stream`` serves the entry at /vod/movie.m3u8, .mpd and .mp4
(the library is a directory: no server needs to be told).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer

vod_app = typer.Typer(
    help="On-demand video: package files into HLS + DASH + progressive MP4.",
    no_args_is_help=True,
)

ConfigOption = Annotated[
    Path | None, typer.Option(help="YAML config; its `stream` section (data_dir, ladder).")
]
DataDirOption = Annotated[
    Path | None, typer.Option(help="Stream data directory (default: the config's data_dir).")
]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _library(config: Path | None, data_dir: Path | None):
    from verge.config import ConfigError, load_config
    from verge.stream.vod import VodLibrary

    try:
        settings = load_config(config).stream
    except ConfigError as exc:
        _fail(str(exc))
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": str(data_dir)})
    return VodLibrary(settings)


@vod_app.command("add")
def vod_add(
    file: Annotated[Path, typer.Argument(help="Video (or audio) file to package.")],
    name: Annotated[str, typer.Option(help="Entry name: /vod/NAME.m3u8, .mpd, .mp4.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    app: Annotated[
        str | None, typer.Option(help="Stream application whose ladder to use (default: first).")
    ] = None,
) -> None:
    """Transcode FILE to the ABR ladder (HLS + DASH) and a progressive MP4, with a progress bar."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn

    from verge.stream.transcode import FfmpegNotFound
    from verge.stream.vod import VodError

    library = _library(config, data_dir)
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
    )
    try:
        ladder = library.ladder(app)
        with Progress(*columns, transient=False) as bar:
            task = bar.add_task(f"packaging {name}", total=1.0)
            entry = asyncio.run(
                library.package_file(
                    file, name, ladder, lambda done: bar.update(task, completed=done)
                )
            )
    except (VodError, FfmpegNotFound) as exc:
        _fail(str(exc))
    renditions = ", ".join(
        f"{r['name']} {r['width']}x{r['height']}" if r.get("width") else r["name"]
        for r in entry.renditions
    )
    typer.echo(f"{entry.name}: {entry.duration:.1f} s, {renditions} -> {entry.path}")
    typer.echo(
        f"serve with `verge stream`: /vod/{entry.name}.m3u8 /vod/{entry.name}.mpd "
        f"/vod/{entry.name}.mp4"
    )


@vod_app.command("list")
def vod_list(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the entries' metadata as JSON.")
    ] = False,
) -> None:
    """List the VOD library's entries."""
    entries = _library(config, data_dir).entries()
    if as_json:
        typer.echo(json.dumps([dict(e.meta) for e in entries], indent=2))
        return
    if not entries:
        typer.echo("no VOD entries")
    for entry in entries:
        names = ",".join(r["name"] for r in entry.renditions)
        typer.echo(f"{entry.name}\t{entry.duration:.1f} s\t{names}")


def register(app: typer.Typer) -> None:
    """Add the ``vod`` command group to the ``verge`` app."""
    app.add_typer(vod_app, name="vod")
