"""The analysis process: ``python -m verge.stream.analysis --out DIR ... --video '["-i", F]'``.

Started by :func:`verge.stream.analysis.run_analysis` (VOD entries, ``verge vod analyze``)
and :class:`verge.stream.analysis.LiveAnalyzer` (live streams). It lowers its own priority
before anything else, so it and its ffmpeg only get CPU the packaging does not want. Protocol
on stdout, one line each: ``progress 0.42`` ... ``done``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from verge.stream.analysis.detect import load_detector
from verge.stream.analysis.runner import Analysis, AnalysisOptions, analysis_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m verge.stream.analysis")
    parser.add_argument("--ffmpeg", default="ffmpeg")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--video", type=json.loads, default=None, help="input args, JSON list")
    parser.add_argument("--audio", type=json.loads, default=None, help="input args, JSON list")
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--interval", type=float, default=None, help="seconds per thumbnail")
    parser.add_argument("--detector", default="auto", help="auto | nudenet | haar | none")
    parser.add_argument("--live", action="store_true")
    parser.add_argument("--nice", type=int, default=10)
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> None:
    options = AnalysisOptions() if args.interval is None else AnalysisOptions(args.interval)
    detector = load_detector(args.detector) if args.video else None
    command = analysis_command(
        args.ffmpeg,
        args.video,
        args.audio,
        args.out,
        options,
        detect=detector is not None,
        live=args.live,
    )
    last = [-1.0]

    def progress(done: float) -> None:
        if done - last[0] >= 0.01:
            last[0] = done
            print(f"progress {done:.3f}", flush=True)

    analysis = Analysis(
        args.out,
        args.base_url,
        options,
        detector,
        duration=args.duration,
        live=args.live,
        progress=progress,
    )
    await analysis.run(command)
    print("done", flush=True)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.nice:
        os.nice(arguments.nice)
    arguments.out.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(main(arguments))
    except (RuntimeError, OSError) as exc:
        print(f"analysis failed: {exc}", file=sys.stderr)
        sys.exit(1)
