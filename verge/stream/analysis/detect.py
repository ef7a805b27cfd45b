"""Faces and people in a frame, with a small model that ships inside a PyPI package.

Why an adapter: the detector is optional. NudeNet 3.4 bundles a YOLOv8n ONNX model
(``320n.onnx``, run with onnxruntime; its FACE_* classes are faces, its body-part classes mean
a person); OpenCV's Haar cascades (in opencv-python-headless) are the fallback. Nothing is
downloaded at run time, and nothing is imported before :func:`load_detector` is called: without
either package the analysis still finds scenes, black and silence and says
``detector: unavailable``.

A frame is a BGR ``numpy`` array (height x width x 3), as ffmpeg's ``bgr24`` gives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("verge.stream.analysis")

MIN_SCORE = 0.4  # NudeNet reports from 0.2; below this faces are mostly noise
FACE_CLASSES = frozenset({"FACE_FEMALE", "FACE_MALE"})
UNAVAILABLE = "unavailable"
NUDENET_MODEL = "320n.onnx"  # bundled in the nudenet wheel (3.4)
HAAR_FACE = "haarcascade_frontalface_default.xml"  # in opencv-python-headless 4.x

#: A detection: (kind, confidence), kind "face" or "person".
Hit = tuple[str, float]


@dataclass(frozen=True, slots=True)
class Detector:
    """``detect(frame)`` -> hits; ``name`` is what the result reports as ``detector``."""

    name: str
    detect: Callable[[Any], list[Hit]]


def load_detector(prefer: str = "auto") -> Detector | None:
    """The best detector installed (``prefer``: auto | nudenet | haar | none), or None."""
    loaders = {"nudenet": _nudenet, "haar": _haar}
    order = {"auto": ["nudenet", "haar"], "none": []}.get(prefer, [prefer])
    for name in order:
        loader = loaders.get(name)
        try:
            detector = loader() if loader else None
        except Exception as exc:  # ImportError, a broken wheel: try the next one
            log.info("analysis: detector %s unavailable: %r", name, exc)
            continue
        if detector is not None:
            return detector
    return None


def _nudenet() -> Detector:
    import nudenet
    import onnxruntime

    model = nudenet.NudeDetector()
    # its own session uses every core and spins between runs; one quiet thread is enough for a
    # keyframe a second (~15-60 ms each) and keeps the analysis a bounded share of one core
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model.onnx_session = onnxruntime.InferenceSession(
        str(Path(nudenet.__file__).with_name(NUDENET_MODEL)),
        options,
        providers=["CPUExecutionProvider"],
    )

    def detect(frame) -> list[Hit]:
        best: dict[str, float] = {}
        for found in model.detect(frame):
            score = float(found["score"])
            if score < MIN_SCORE:
                continue
            kind = "face" if found["class"] in FACE_CLASSES else "person"
            best[kind] = max(best.get(kind, 0.0), score)
        if "face" in best:  # a face is a person too
            best["person"] = max(best.get("person", 0.0), best["face"])
        return sorted(best.items())

    return Detector("nudenet-yolov8n", detect)


def _haar() -> Detector:
    import cv2

    path = Path(cv2.data.haarcascades) / HAAR_FACE
    if not path.is_file():  # opencv-python-headless 5 no longer ships the cascades
        raise RuntimeError(f"no {HAAR_FACE} in this OpenCV")
    faces = cv2.CascadeClassifier(str(path))

    def detect(frame) -> list[Hit]:
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        found = faces.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        # Haar gives no score: a detection is reported at a fixed, modest confidence
        return [("face", 0.6), ("person", 0.6)] if len(found) else []

    return Detector("opencv-haar", detect)
