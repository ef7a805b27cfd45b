"""Video analysis at the edge of packaging: scene cuts, thumbnails, black and silent stretches,
faces and people, for live streams (apps with ``analysis: true``) and VOD entries.

Why a package of its own: analysis must never delay packaging, so it runs in a separate,
niced process (``python -m verge.stream.analysis``) that the stream server and the CLI only
start and read. The parts:

    report    pure: ffmpeg's scdet / blackdetect / silencedetect / showinfo lines -> the result
              JSON and the WebVTT chapters (tested without ffmpeg)
    runner    the analysis ffmpeg (one decode, filters fanned out) and the detector loop; runs
              inside the analysis process
    detect    the optional face/person detector (NudeNet's bundled YOLOv8n via onnxruntime,
              else OpenCV's Haar cascade, else ``detector: unavailable``), loaded lazily
    service   starting analysis processes (a VOD entry to the end; a live stream as it is
              transcoded) and where their results live on disk

The result (``GET /live/NAME/analysis``, ``GET /vod/NAME/analysis``)::

    {"duration": 7.0, "detector": "nudenet-yolov8n", "interval": 10.0, "state": "done",
     "scenes": [{"time": 2.24, "score": 0.34, "thumbnail": "/vod/NAME/analysis/RUN/c1.jpg"}],
     "events": [{"kind": "black", "start": 4.24, "end": 5.24, "confidence": 1.0}, ...],
     "thumbnails": [{"time": 0.0, "url": "/vod/NAME/analysis/RUN/t1.jpg"}, ...],
     "chapters": "/vod/NAME/analysis/RUN/chapters.vtt", ...}
"""

from verge.stream.analysis.service import (
    AnalysisError,
    LiveAnalyzer,
    analysis_file,
    analyze_entry,
    content_type,
    latest_run,
    run_analysis,
)

__all__ = [
    "AnalysisError",
    "LiveAnalyzer",
    "analysis_file",
    "analyze_entry",
    "content_type",
    "latest_run",
    "run_analysis",
]
