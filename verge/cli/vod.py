"""``verge vod ...``: package files into the VOD library locally (the logic is verge.stream.vod).

``verge vod add movie.mp4 --name movie`` transcodes to the stream application's ladder with a
progress bar; the running ``verge stream`` serves the entry at /vod/movie.m3u8, .mpd and .mp4
(the library is a directory: no server needs to be told). ``verge vod analyze movie`` (re-)runs
the video analysis (scene cuts, thumbnails, black/silence, faces: verge.stream.analysis) of an
entry, served at /vod/movie/analysis; ``vod add`` runs it too unless ``--no-analyze``.

Without ``--config`` or ``--data-dir``, a ``verge up`` state directory here (``.verge-up/`` with
up.json) means the demo's stream config: the entry goes where the demo's stream server (and so
its edges) serves it, not into a ``./stream-data`` nobody serves. Either way the command says
where the files went and how to watch them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from verge.cli.common import fail, warn

if TYPE_CHECKING:
    from verge.stream.vod import VodLibrary
    from verge.up import DemoStream

vod_app = typer.Typer(
    help="On-demand video: package files into HLS + DASH + progressive MP4.",
    no_args_is_help=True,
)

DEFAULT_UP_JSON = ".verge-up/up.json"
ConfigOption = Annotated[
    Path | None, typer.Option(help="YAML config; its `stream` section (data_dir, ladder).")
]
DataDirOption = Annotated[
    Path | None, typer.Option(help="Stream data directory (default: the config's data_dir).")
]


def _demo_stream(config: Path | None, data_dir: Path | None) -> DemoStream | None:
    """The `verge up` demo's stream server when no library was named (and one is here)."""
    if config is not None or data_dir is not None:
        return None
    from verge.up import find_demo_stream

    demo = find_demo_stream()
    if demo is not None:
        typer.echo(
            f"using the `verge up` demo's stream config {demo.config} "
            f"(from {demo.state_dir / 'up.json'}; --config or --data-dir to choose another)",
            err=True,
        )
    return demo


def _progress_bar():
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, transient=False)


def _library(config: Path | None, data_dir: Path | None) -> VodLibrary:
    from verge.config import ConfigError, load_config
    from verge.stream.vod import VodLibrary

    try:
        settings = load_config(config).stream
    except ConfigError as exc:
        fail(str(exc))
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
    analyze: Annotated[
        bool, typer.Option(help="Analyse it too (scenes, thumbnails, black, silence, faces).")
    ] = True,
) -> None:
    """Transcode FILE to the ABR ladder (HLS + DASH) and a progressive MP4, with a progress bar."""
    from verge.stream.transcode import FfmpegNotFound
    from verge.stream.vod import VodError

    demo = _demo_stream(config, data_dir)
    library = _library(demo.config if demo else config, data_dir)
    try:
        ladder = library.ladder(app)
        with _progress_bar() as bar:
            task = bar.add_task(f"packaging {name}", total=1.0)
            entry = asyncio.run(
                library.package_file(
                    file, name, ladder, lambda done: bar.update(task, completed=done)
                )
            )
    except (VodError, FfmpegNotFound) as exc:
        fail(str(exc))
    if analyze:
        _analyze(library, name)
    renditions = ", ".join(
        f"{r['name']} {r['width']}x{r['height']}" if r.get("width") else r["name"]
        for r in entry.renditions
    )
    typer.echo(f"{entry.name}: {entry.duration:.1f} s, {renditions} -> {entry.path.resolve()}")
    for line in _where_to_watch(entry.name, demo, config, data_dir, library):
        typer.echo(line)


def _where_to_watch(
    name: str,
    demo: DemoStream | None,
    config: Path | None,
    data_dir: Path | None,
    library: VodLibrary,
) -> list[str]:
    """Lines saying which server serves the new entry and at which URLs."""
    if demo is not None:
        where = f"{demo.vod_url}/{name}.m3u8" if demo.vod_url else f"/vod/{name}.m3u8"
        return [f"watch it through the demo's edges while `verge up` runs: {where} (.mpd, .mp4)"]
    lines = []
    if config is None and data_dir is None:
        lines.append(f"no `verge up` state here ({DEFAULT_UP_JSON}), so not in a demo's library")
    lines += [
        f"serve it with {_serve_command(config, data_dir, library)}, "
        f"at http://127.0.0.1:8090/vod/{name}.m3u8 (.mpd, .mp4)",
        "through an edge: a service rule sending /vod/ to that stream server",
    ]
    return lines


def _serve_command(config: Path | None, data_dir: Path | None, library: VodLibrary) -> str:
    """The `verge stream` command line that serves this library."""
    if data_dir is not None:
        return (
            "`verge stream --config FILE` where FILE has "
            f"`stream: {{data_dir: {library.root.parent.resolve()}}}`"
        )
    here = "" if Path(library.settings.data_dir).is_absolute() else f" run in {Path.cwd()}"
    if config is not None:
        return f"`verge stream --config {config.resolve()}`{here}"
    return f"`verge stream`{here} (data_dir ./stream-data)"


def _analyze(library: VodLibrary, name: str) -> dict:
    """Analyse entry ``name`` with a progress bar; a failure is reported, not fatal."""
    from verge.stream.transcode import FfmpegNotFound
    from verge.stream.vod import VodError

    try:
        with _progress_bar() as bar:
            task = bar.add_task(f"analysing {name}", total=1.0)
            result = asyncio.run(
                library.analyze(name, lambda done: bar.update(task, completed=done))
            )
    except (VodError, FfmpegNotFound) as exc:
        warn(f"analysis failed: {exc}")
        return {}
    kinds = [e["kind"] for e in result["events"]]
    found = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) or "no events"
    typer.echo(
        f"{name}: {len(result['scenes'])} scene cuts, {len(result['thumbnails'])} thumbnails, "
        f"{found} (detector: {result['detector']}) -> /vod/{name}/analysis"
    )
    return result


@vod_app.command("analyze")
def vod_analyze(
    name: Annotated[str, typer.Argument(help="Entry to (re-)analyse.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """(Re-)analyse an entry: scene cuts, thumbnails, black/silent stretches, faces and people.

    The result is served at /vod/NAME/analysis, the chapters (WebVTT) and thumbnails below it.
    """
    demo = _demo_stream(config, data_dir)
    library = _library(demo.config if demo else config, data_dir)
    if library.get(name) is None:
        fail(f"no VOD entry {name!r} in {library.root}")
    if not _analyze(library, name):
        raise typer.Exit(1)


@vod_app.command("list")
def vod_list(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the entries' metadata as JSON.")
    ] = False,
) -> None:
    """List the VOD library's entries."""
    demo = _demo_stream(config, data_dir)
    entries = _library(demo.config if demo else config, data_dir).entries()
    if as_json:
        typer.echo(json.dumps([dict(e.meta) for e in entries], indent=2))
        return
    if not entries:
        typer.echo("no VOD entries")
    for entry in entries:
        names = ",".join(r["name"] for r in entry.renditions)
        typer.echo(f"{entry.name}\t{entry.duration:.1f} s\t{names}")
