"""The video path: sample frames, align each with its subtitle lines by time, detect, crop and embed faces."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from agreement.optional import optional_import
from entities.backends import FaceDetector, FaceEmbedder, crop, make_detector, make_embedder
from entities.names import Gazetteer, caption_names
from entities.records import FaceRecords, stack_embeddings
from entities.subtitles import CaptionLine, lines_at, parse_subtitles


class VideoError(ValueError):
    """A video that cannot be used; the message names the file and the problem."""


@dataclass
class VideoOptions:
    """How frames are sampled and faces found.

    Args:
        sample_fps: frames per second to keep (the paper uses TVQA's 3 fps frames).
        window: seconds added on both sides of a caption line when aligning frames with it.
        detector: ``dlib``, ``dlib-cnn`` or ``opencv``.
        embedder: ``dlib`` or ``open_clip``.
        clip_model: open_clip architecture name for the ``open_clip`` embedder.
        clip_weights: local weights file for it (none: random weights, said in the log).
        upsample: dlib detector upsampling (finds smaller faces, slower).
        min_face_size: smallest face side in pixels for the OpenCV detector.
        crop_margin: crop enlargement per side, as a fraction of the box size, for galleries and open_clip.
        max_frames: stop after this many sampled frames (none: the whole video).
    """

    sample_fps: float = 2.0
    window: float = 0.0
    detector: str = "dlib"
    embedder: str = "dlib"
    clip_model: str = "ViT-B-32"
    clip_weights: str | None = None
    upsample: int = 1
    min_face_size: int = 24
    crop_margin: float = 0.2
    max_frames: int | None = None


def _cv2():
    return optional_import("cv2", extra="faces", purpose="reading videos (opencv-python-headless)")


def read_frames(
    path: str | Path, sample_fps: float, max_frames: int | None = None
) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield ``(index, time_seconds, rgb_frame)`` at ``sample_fps``; raises ``VideoError`` if unreadable."""
    cv2 = _cv2()
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    if sample_fps <= 0:
        raise ValueError(f"sample_fps must be positive, got {sample_fps}")
    capture = cv2.VideoCapture(str(path))
    try:
        fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
        ok = capture.isOpened() and capture.grab()
        if not ok or not fps or fps <= 0:
            raise VideoError(f"{path}: cannot be decoded as a video (unknown format, corrupt or empty file)")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        step = fps / sample_fps
        next_time, source_index, kept = 0.0, 0, 0
        bar = tqdm(total=None if total is None else int(total / step) + 1, desc="decoding", unit="frame")
        while ok:
            if source_index + 1e-6 >= next_time * fps:
                ok, frame = capture.retrieve()
                if ok and frame is not None:
                    yield kept, source_index / fps, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    kept += 1
                    bar.update(1)
                    next_time += 1.0 / sample_fps
                    if max_frames is not None and kept >= max_frames:
                        break
            ok = capture.grab()
            source_index += 1
        bar.close()
        if kept == 0:
            raise VideoError(f"{path}: no frame could be decoded")
    finally:
        capture.release()


def records_from_video(
    video: str | Path,
    subtitles: str | Path | list[CaptionLine] | None,
    gazetteer: Gazetteer,
    options: VideoOptions | None = None,
    crops_dir: str | Path | None = None,
    detector: FaceDetector | None = None,
    embedder: FaceEmbedder | None = None,
    ner: Callable[[str], list[str]] | None = None,
) -> FaceRecords:
    """Face records of a captioned video: every detected face gets the names of the caption lines at its frame."""
    options = options or VideoOptions()
    cues = parse_subtitles(subtitles) if isinstance(subtitles, str | Path) else list(subtitles or [])
    detector = detector or make_detector(options.detector, options.upsample, options.min_face_size)
    embedder = embedder or make_embedder(options.embedder, options.clip_model, options.clip_weights)
    cv2 = _cv2() if crops_dir is not None else None
    if crops_dir is not None:
        Path(crops_dir).mkdir(parents=True, exist_ok=True)
    frames, times, names, boxes, vectors, crops = [], [], [], [], [], []
    sampled = without_faces = 0
    detect_bar = tqdm(desc="detecting", unit="frame")
    embed_bar = tqdm(desc="embedding", unit="face")
    for index, time, image in read_frames(video, options.sample_fps, options.max_frames):
        sampled += 1
        found = detector.detect(image)
        detect_bar.update(1)
        if len(found) == 0:
            without_faces += 1
            continue
        embedded = embedder.embed(image, found)
        embed_bar.update(len(found))
        caption: list[str] = []
        for cue in lines_at(cues, time, options.window):
            caption.extend(caption_names(cue.text, cue.speaker, gazetteer, ner))
        for box, vector in zip(found, embedded):
            face = len(frames)
            frames.append(f"frame{index:06d}")
            times.append(time)
            names.append(list(caption))
            boxes.append(box)
            vectors.append(vector)
            if crops_dir is not None:
                path = Path(crops_dir) / f"face_{face:06d}.jpg"
                cv2.imwrite(str(path), cv2.cvtColor(crop(image, box, options.crop_margin), cv2.COLOR_RGB2BGR))
                crops.append(str(path))
    detect_bar.close()
    embed_bar.close()
    if not frames:
        raise VideoError(f"{video}: no face was detected in any of the {sampled} sampled frames")
    if without_faces:
        warnings.warn(
            f"{video}: {without_faces} of {sampled} sampled frames have no detected face and are skipped",
            stacklevel=2,
        )
    return FaceRecords(
        frames=frames,
        weak_names=names,
        embeddings=stack_embeddings(vectors, str(video)),
        boxes=np.asarray(boxes, dtype=np.float32),
        times=np.asarray(times),
        crops=crops if crops_dir is not None else None,
        source=str(video),
    )
