"""Tiny captioned videos made from real face images that ship with scikit-image (no download)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from skimage import data

SIZE = 100


def faces() -> list[np.ndarray]:
    """Three different real faces as RGB uint8 (SIZE x SIZE): the astronaut photo and two LFW-subset faces."""
    astronaut = data.astronaut()[56:186, 155:285]
    lfw = data.lfw_subset()
    out = [cv2.resize(astronaut, (SIZE, SIZE), interpolation=cv2.INTER_AREA)]
    for index in (0, 1):
        gray = (lfw[index] * 255).astype(np.uint8)
        gray = cv2.resize(gray, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        out.append(np.stack([gray] * 3, axis=-1))
    return out


def srt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def write_video(
    path: Path, segments: list[int | None], seconds_per_segment: float = 2.0, fps: int = 4
) -> Path:
    """An MJPG .avi, 200x200: segment i shows face ``segments[i]`` (None: an empty grey frame), slightly moving."""
    pictures = faces()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (200, 200))
    rng = np.random.default_rng(0)
    for who in segments:
        for _ in range(int(seconds_per_segment * fps)):
            frame = np.full((200, 200, 3), 110, np.uint8)
            if who is not None:
                dx, dy = rng.integers(20, 80, size=2)
                frame[dy : dy + SIZE, dx : dx + SIZE] = pictures[who]
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def write_srt(path: Path, lines: list[tuple[float, float, str]]) -> Path:
    blocks = [f"{i + 1}\n{srt_time(a)} --> {srt_time(b)}\n{text}\n" for i, (a, b, text) in enumerate(lines)]
    path.write_text("\n".join(blocks))
    return path
